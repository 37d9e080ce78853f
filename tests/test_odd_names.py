"""Reliability (issue 6), odd file names and links: scanned, split, trained and predicted alike."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from headstart.data.folders import scan_folder, split_of
from headstart.data.images import load_image

from conftest import tree_digest
from reliability_helpers import BLUE, GREEN, RED, TINY, _png
from test_cli import run_cli


ODD_NAMES = ["my cat.png", "-rf.png", "--help.png", "café ü 猫.png", "cafe\u0301.png", "tab\there.png",
             "new\nline.png", "ends with space .png", os.fsdecode(b"latin1-caf\xe9.png")]


def test_odd_file_names_are_scanned_with_stable_splits(tmp_path):
    root = tmp_path / "d"
    for i, name in enumerate(ODD_NAMES):
        _png(root / ("-dash class" if i % 2 else "Ünïcode class") / name)
    data = scan_folder(root)
    assert data.classes == sorted(["-dash class", "Ünïcode class"])
    assert sorted(Path(s.path).name for s in data.samples) == sorted(ODD_NAMES)
    for s in data.samples:
        assert s.split == split_of(s.rel, 0.1, 0.1)
        assert load_image(s.path).size == (4, 3)


@pytest.mark.slow
def test_odd_names_train_and_predict_end_to_end(tmp_path):
    root = tmp_path / "d"
    for c, colour in (("-dash class", RED), (os.fsdecode(b"caf\xe9 class"), BLUE)):
        for i, name in enumerate(ODD_NAMES):
            _png(root / c / f"{i}{name}", colour, size=(8, 8))
    before = tree_digest(root)
    code, _, stderr = run_cli("train", root, *TINY, "--out", tmp_path / "run", "--test-fraction", "0.3")
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Logging error" not in stderr
    run = tmp_path / "run"
    assert json.loads((run / "skipped.json").read_text()) == []
    rows = (run / "splits.csv").read_bytes()
    assert b"latin1-caf\xe9.png" in rows  # the name's own bytes, not a replacement character
    assert json.loads((run / "config.json").read_text())["classes"] == sorted(["-dash class",
                                                                              os.fsdecode(b"caf\xe9 class")])
    dash = root / "-dash class" / "1-rf.png"
    code, stdout, stderr = run_cli("predict", run, "--json", "--", dash)
    assert code == 0, stderr
    assert json.loads(stdout)["predictions"][0]["path"] == str(dash)
    assert tree_digest(root) == before


def test_links_are_followed_to_files_and_loops_are_reported(tmp_path):
    root = tmp_path / "d"
    _png(root / "cat" / "a.png", RED)
    _png(root / "dog" / "b.png", BLUE)
    outside = _png(tmp_path / "elsewhere" / "c.png", GREEN)
    os.symlink(outside, root / "cat" / "linked.png")  # a link to an image: used
    os.symlink("gone.png", root / "cat" / "dangling.png")
    os.symlink("self.png", root / "cat" / "self.png")  # a link to itself (ELOOP)
    os.symlink("..", root / "cat" / "up")  # a folder link back to the data root: a loop
    os.symlink("../dog", root / "cat" / "dogs")  # a folder link inside a class: not followed
    os.symlink(".", root / "loop")  # a class-level link to the data root itself
    os.symlink(tmp_path / "elsewhere", root / "bird")  # a class folder kept elsewhere: followed
    data = scan_folder(root, val_fraction=0, test_fraction=0)
    assert data.classes == ["bird", "cat", "dog"]
    rels = sorted(s.rel for s in data.samples)
    assert rels == ["bird/c.png", "cat/a.png", "cat/dangling.png", "cat/linked.png", "cat/self.png", "dog/b.png"]
    ignored = {Path(i["path"]).name: i["reason"] for i in data.ignored}
    assert set(ignored) == {"up", "dogs", "loop"}
    assert "not followed" in ignored["up"] and "not followed" in ignored["dogs"]
    assert "loop" in ignored["loop"]
    assert load_image(root / "cat" / "linked.png").size == (4, 3)


def test_unlistable_folder_is_reported_not_fatal(tmp_path, monkeypatch):
    root = tmp_path / "d"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "locked" / "b.png")
    _png(root / "dog" / "c.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads everything: permission bits prove nothing
    data = scan_folder(root)
    assert sorted(s.rel for s in data.samples) == ["cat/a.png", "dog/c.png"]
    [entry] = data.ignored
    assert entry["path"].endswith("locked") and "Permission denied" in entry["reason"]
