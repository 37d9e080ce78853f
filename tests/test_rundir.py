"""The run directory's life (rundir.py): chosen, built aside, logged per run, published or cleaned up."""

from __future__ import annotations

import logging
import threading

import pytest

import headstart
from conftest import write_image_folder
from headstart.runs import context
from headstart.learn import checkpoints
from headstart.runs import rundir
from headstart.runs import train as training
from headstart.errors import HeadstartError

TINY = dict(strategy="feature-extraction", image_size=32, workers=0, weights="none", cache_dir="none",
            test_fraction=0.3)


def test_two_runs_at_once_in_two_threads_each_log_only_their_own_lines(tmp_path, monkeypatch, one_torch_thread):
    """A notebook or a server training twice at once: each train.log holds its own run's lines only."""
    data = {name: write_image_folder(tmp_path / f"data-{name}", n_per_class=6, size=(16, 16), seed=i)
            for i, name in enumerate(("alpha", "bravo"))}
    both_logging = threading.Barrier(2, timeout=120)
    real_load_data = context.load_data

    def load_data_together(*args, **kw):  # both runs are inside their log before either logs its data
        both_logging.wait()
        return real_load_data(*args, **kw)

    monkeypatch.setattr(context, "load_data", load_data_together)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = headstart.train(data[name], out=tmp_path / f"run-{name}", **TINY)
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, other in (("alpha", "bravo"), ("bravo", "alpha")):
        log = (tmp_path / f"run-{name}" / "train.log").read_text()
        assert f"data {data[name]}" in log and "test accuracy" in log
        assert f"data-{other}" not in log and f"run-{other}" not in log
        # one run's lines once: a leaked handler would also double the lines both runs log
        assert log.count("weights: ") == 1


def test_the_run_log_takes_threads_the_run_starts_through_in_this_run(tmp_path):
    logger = logging.getLogger("headstart.test")
    with rundir.run_log(tmp_path / "a.log"):
        logger.info("own thread")
        marked = threading.Thread(target=rundir.in_this_run(lambda: logger.info("marked worker")))
        unmarked = threading.Thread(target=lambda: logger.info("unmarked thread"))
        for t in (marked, unmarked):
            t.start()
            t.join()
    logger.info("after the run")
    text = (tmp_path / "a.log").read_text()
    assert "own thread" in text and "marked worker" in text
    assert "unmarked thread" not in text and "after the run" not in text


def test_the_logger_level_is_restored_by_the_last_run_out(tmp_path):
    logger = logging.getLogger("headstart")
    saved = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with rundir.run_log(tmp_path / "a.log"):
            with rundir.run_log(tmp_path / "b.log"):
                assert logger.level == logging.INFO
            assert logger.level == logging.INFO  # the first run is still going
        assert logger.level == logging.WARNING and not any(
            isinstance(h, logging.FileHandler) for h in logger.handlers)
    finally:
        logger.setLevel(saved)


def test_choose_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "r").mkdir()
    assert rundir.choose_run_dir(tmp_path / "r", overwrite=False) == tmp_path / "r"  # empty: fine
    (tmp_path / "r" / "x").write_text("x")
    with pytest.raises(HeadstartError, match="already exists.*`overwrite=True`"):
        rundir.choose_run_dir(tmp_path / "r", overwrite=False)
    assert rundir.choose_run_dir(tmp_path / "r", overwrite=True) == tmp_path / "r"


def test_check_outside_refuses_out_or_cache_inside_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(HeadstartError, match="--out .* is inside the data folder"):
        rundir.check_outside(str(data), None, data / "run", None)
    (data / "labels.csv").write_text("path,label\n")
    with pytest.raises(HeadstartError, match="--cache-dir .* is inside the data folder"):
        rundir.check_outside(str(data), str(data / "labels.csv"), tmp_path / "run", data / "sub" / "cache")
    rundir.check_outside(str(data), None, tmp_path / "run", tmp_path / "cache")  # beside it: fine


def test_building_publishes_on_success_and_replaces_an_older_run(tmp_path):
    final = tmp_path / "deep" / "run"
    with rundir.building(final) as partial:
        assert partial.name.startswith("run.partial-") and partial.parent == final.parent
        (partial / "metrics.json").write_text("{}")
        checkpoints.start_checkpoints(final, {"data": "x"}, resume=False)
    assert (final / "metrics.json").is_file() and (final / "train.log").is_file()
    assert not checkpoints.checkpoint_dir(final).exists()  # published: checkpoints gone
    with rundir.building(final) as partial:
        (partial / "new").write_text("x")
    assert sorted(p.name for p in final.iterdir()) == ["new", "train.log"]
    assert [p.name for p in final.parent.iterdir()] == ["run"]


def test_building_cleans_up_on_failure_and_names_the_environment(tmp_path):
    final = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError):
        with rundir.building(final):
            raise ValueError("a bug")
    assert not (tmp_path / "new").exists()  # the folders made for the run went too
    with pytest.raises(HeadstartError, match=r"was not completed: .*No space.*free some space"):
        with rundir.building(final):
            raise OSError(28, "No space left on device")


def test_ctrl_c_with_a_checkpoint_keeps_it_and_says_how_to_resume(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        with rundir.building(final):
            ckpt = checkpoints.start_checkpoints(final, {"data": "x"}, resume=False)
            (ckpt / "last.pt").write_bytes(b"x")
            raise KeyboardInterrupt
    assert (checkpoints.checkpoint_dir(final) / "last.pt").is_file() and not final.exists()
    assert rundir.resume_settings(final) == ({"data": "x"}, checkpoints.checkpoint_dir(final) / "config.json")
