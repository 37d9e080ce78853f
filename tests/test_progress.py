"""Progress of long phases: a bar on a terminal, periodic plain lines with images/s and ETA in the log otherwise."""

from __future__ import annotations

import logging

from headstart import progress


def test_without_a_terminal_progress_goes_to_the_log_every_tenth(monkeypatch, caplog):
    clock = iter(float(t) for t in range(1000))  # each reading of the clock: one second later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="headstart.progress"):
        with progress.bar(10_000, "extracting") as p:
            assert p.bar is None  # stderr is not a terminal under pytest
            for _ in range(40):
                p.update(256)
    lines = [r.getMessage() for r in caplog.records]
    assert 8 <= len(lines) <= 11  # one a tenth, not one a batch
    # A line each 1,000 images or more (a tenth): after the 4th batch, then after the 8th, 2,048 images in 8 s.
    assert lines[1] == "extracting: 2,048/10,000 images, 256 images/s, ETA 31 s"


def test_short_phases_write_no_lines_and_quiet_bars_stay_silent(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="headstart.progress"):
        with progress.bar(100, "boundary (val)") as p:
            for _ in range(10):
                p.update(10)  # done well inside LOG_SECONDS
    assert caplog.records == []
    monkeypatch.setattr(progress, "enabled", lambda: True)  # as on a terminal
    with progress.bar(100, "fine-tune epoch 1/3") as p:
        assert p.bar is not None and not p.log_lines
        p.update(50)
        assert p.bar.n == 50
