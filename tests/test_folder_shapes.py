"""Reliability (issue 6), folder shapes: user mistakes stop before any work, odd layouts and
labels-CSV rows are reported, and the exit codes are the documented ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import headstart
from headstart.errors import DataError

from conftest import count_network_batches, tree_digest, write_image_folder
from reliability_helpers import TINY, _png
from test_cli import run_cli


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Batch sizes through any backbone engine (torch or converted): proves whether any feature work was done."""
    return count_network_batches(monkeypatch)


def _case(tmp_path: Path, name: str) -> tuple[list, str]:
    """A user mistake: the command's arguments and the words its error must contain."""
    data = tmp_path / "data"
    if name == "missing path":
        return ["train", tmp_path / "nowhere"], "does not exist"
    if name == "path is a file":
        return ["train", _png(tmp_path / "one.png")], "is a file, not a folder"
    if name == "empty folder":
        data.mkdir()
        return ["train", data], "no images found"
    if name == "no image files":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "notes.txt").write_text("x")
        return ["train", data], "no images found"
    if name == "single class":
        _png(data / "cat" / "a.png")
        return ["train", data], "single class"
    if name == "labels csv missing":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--labels", tmp_path / "labels.csv"], "does not exist"
    if name == "labels csv with no usable row":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        (data / "labels.csv").write_text("path,label\ngone.png,cat\nok.png,\n")
        return ["train", data, "--labels", data / "labels.csv"], "no usable image"
    if name == "fractions":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--val-fraction", "0.7", "--test-fraction", "0.5"], "fraction"
    if name == "out inside the data":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--out", data / "run"], "inside the data folder"
    if name == "cache inside the data":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--cache-dir", data / "cache"], "inside the data folder"
    if name == "no data argument":
        return ["train"], "needs a DATA folder"
    if name == "corrupt weights file":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not really a zip")
        return ["train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "w.pth"], "w.pth"
    if name == "weights of another model":
        import torch

        write_image_folder(data, n_per_class=2, size=(4, 4))
        torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
        return ["train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "linear.pth"], "does not fit"
    raise AssertionError(name)


USER_MISTAKES = ["missing path", "path is a file", "empty folder", "no image files", "single class",
                 "labels csv missing", "labels csv with no usable row", "fractions", "out inside the data",
                 "cache inside the data", "no data argument", "corrupt weights file", "weights of another model"]


@pytest.mark.parametrize("name", USER_MISTAKES)
def test_user_mistakes_stop_before_any_work_with_exit_2(tmp_path, name, forward_calls, monkeypatch):
    args, words = _case(tmp_path, name)
    data = tmp_path / "data"
    before = tree_digest(data) if data.exists() else None
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where the default --out, runs/<timestamp>, would go
    code, stdout, stderr = run_cli(*args, "--image-size", "32", "--workers", "0")
    assert code == 2, stderr
    assert "headstart: error: " in stderr and words in stderr[stderr.index("headstart: error: "):]
    assert "Traceback" not in stderr and stdout == ""
    assert forward_calls == []  # no image went through a network
    assert os.listdir(tmp_path / "cwd") == []  # no run folder, partial or not, not even runs/
    if before is not None:
        assert tree_digest(data) == before


def test_a_class_without_usable_images_warns_and_goes_on(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b"), size=(8, 8))
    (data / "c").mkdir()
    for i in range(4):
        (data / "c" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    (data / "d").mkdir()
    (data / "d" / "readme.txt").write_text("images coming soon")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--val-fraction", "0",
                              "--test-fraction", "0")
    assert code == 0, stderr
    assert "classes ['c'] have no readable training image left" in stderr
    assert "class folders ['d'] hold no image files" in stderr
    skipped = {Path(s["path"]).name: s["reason"] for s in json.loads((tmp_path / "run" / "skipped.json").read_text())}
    assert set(skipped) == {"broken0.png", "broken1.png", "broken2.png", "broken3.png", "readme.txt"}
    assert headstart.load(tmp_path / "run").classes == ["a", "b"]


@pytest.mark.slow
def test_train_and_test_folders_with_different_classes(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", n_per_class=6, classes=("a", "b", "c"), size=(8, 8))
    write_image_folder(data / "test", n_per_class=3, classes=("a", "b", "d"), size=(8, 8))
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert "classes ['d'] have no training images" in stderr
    assert "3 test images belong to classes with no training images" in stderr
    run = headstart.load(tmp_path / "run")
    assert run.classes == ["a", "b", "c"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["n_images"] == 6  # a and b; d is left out of the scores


def test_labels_csv_rows_with_unknown_paths_or_empty_labels_are_skipped_and_reported(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b"), size=(8, 8))
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in "ab" for i in range(6) if (c, i) not in (("b", 0), ("b", 1))]
    rows += ["a/ghost.png,a", "b/b_000.png,", "b/b_001.png,   "]
    (data / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, stderr = run_cli("train", "--labels", data / "labels.csv", *TINY, "--out", tmp_path / "run",
                              "--test-fraction", "0")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped == [{"path": str(data / "a" / "ghost.png"), "reason": "labels.csv line 12: file not found"},
                       {"path": str(data / "b" / "b_000.png"), "reason": "labels.csv line 13: empty label"},
                       {"path": str(data / "b" / "b_001.png"), "reason": "labels.csv line 14: empty label"}]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "ghost.png: labels.csv line 12: file not found" in log
    # The rows with empty labels were not trained on at all.
    splits = (tmp_path / "run" / "splits.csv").read_text()
    assert "ghost.png" not in splits and f"{data}/b/b_000.png" not in splits and f"{data}/b/b_001.png" not in splits


def test_labels_csv_oddities(tmp_path):
    from headstart.data.folders import read_labels_csv

    for i in range(3):
        _png(tmp_path / f"{i}.png")
    long_name, nul = "x" * 300 + ".png", "2.p\x00ng"
    (tmp_path / "l.csv").write_text(f"0.png,a\n1.png,b\n0.png,b\n./x/../0.png,b\n~no_such_user_xyz/2.png,a\n"
                                    f"{long_name},a\n{nul},a\n")
    data, bad = read_labels_csv(tmp_path / "l.csv")
    assert sorted(s.rel for s in data.samples) == ["0.png", "1.png"]
    assert [b["reason"].split(": ", 1)[1] for b in bad] == [
        "listed again (first on line 1); only the first row is used"] * 2 + ["file not found"] * 3
    assert data.classes[[s for s in data.samples if s.rel == "0.png"][0].label] == "a"  # the first row wins
    (tmp_path / "l.csv").write_bytes(b"0.png,caf\xe9\n")  # Latin-1, as a spreadsheet may save it
    with pytest.raises(DataError, match="cannot be read as CSV.*UTF-8"):
        read_labels_csv(tmp_path / "l.csv")


def test_exit_codes_are_documented():
    readme = (Path(__file__).parent.parent / "docs" / "guides" / "reliability.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in table


@pytest.mark.slow
def test_a_bug_is_exit_1_with_its_traceback(tmp_path):
    """An unexpected exception is not dressed up as a user error: `python -m headstart.cli` (the console
    script runs the same main) lets it propagate, so Python prints the traceback and exits 1."""
    data = write_image_folder(tmp_path / "d", n_per_class=1)
    script = ("import runpy, sys, headstart.runs.train\n"
              "def bug(*args, **kwargs):\n"
              "    raise ZeroDivisionError('a deliberate bug')\n"
              "headstart.runs.train.train = bug\n"
              f"sys.argv = ['headstart', 'train', {str(data)!r}, '--out', {str(tmp_path / 'run')!r}]\n"
              "runpy.run_module('headstart.cli', run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: a deliberate bug"
    assert 'headstart/cli.py", line' in done.stderr and "in main" in done.stderr  # raised through the CLI
    assert "headstart: error" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "run").exists()
