"""Reliability (issue 6), environment faults: failed writes, bad weights files and an unwritable
cache give a clear message and keep the earlier run.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

import headstart
from headstart import fileio
from headstart.engines import features as features_mod

from conftest import tree_digest, write_image_folder
from reliability_helpers import TINY
from test_cli import run_cli


def _failing(real, target: str, exc: OSError):
    """Wrap an atomic_path so that writing `target` fails after its temporary file exists."""
    from contextlib import contextmanager

    @contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            if Path(path).name == target:
                raise exc
            yield tmp

    return atomic_path


FAULTS = {
    "ENOSPC writing metrics.json": ("metrics.json", OSError(errno.ENOSPC, "No space left on device")),
    "EACCES writing the bundle": ("model.safetensors", PermissionError(errno.EACCES, "Permission denied")),
    "ENOSPC writing a plot": ("confusion_matrix.png", OSError(errno.ENOSPC, "No space left on device")),
    "EROFS renaming the run into place": ("publish", OSError(errno.EROFS, "Read-only file system")),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_write_failure_gives_a_clear_message_and_keeps_the_earlier_run(tmp_path, monkeypatch, fault):
    import headstart.models.bundle
    import headstart.reports.plots
    import headstart.runs.train

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    out = tmp_path / "run"
    code, _, stderr = run_cli("train", data, *TINY, "--out", out, "--test-fraction", "0.3")
    assert code == 0, stderr
    earlier = tree_digest(out)
    target, exc = FAULTS[fault]
    if target == "publish":
        real_replace = os.replace

        def replace(src, dst):
            if ".partial-" in os.fspath(src) and Path(dst) == out:
                raise OSError(exc.errno, exc.strerror, os.fspath(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(headstart.runs.train.os, "replace", replace)
    else:
        exc.filename = str(tmp_path / "somewhere" / target)
        for module in (fileio, headstart.models.bundle, headstart.reports.plots):
            monkeypatch.setattr(module, "atomic_path", _failing(module.atomic_path, target, exc))
    code, _, stderr = run_cli("train", data, *TINY, "--out", out, "--test-fraction", "0.3", "--overwrite",
                              "--seed", "1")
    assert code == 2, stderr
    message = stderr[stderr.index("headstart: error: "):]
    assert exc.strerror in message and f"run {out} was not completed" in message
    assert "The earlier run there is untouched." in message and "Traceback" not in stderr
    assert tree_digest(out) == earlier  # the earlier run, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no partial, no .old, no temp file
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("weights", ["truncated", "another model's"])
def test_bad_weights_file_keeps_the_earlier_run(tmp_path, weights):
    import torch

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    out = tmp_path / "run"
    code, _, stderr = run_cli("train", data, *TINY, "--out", out)
    assert code == 0, stderr
    earlier = tree_digest(out)
    small = headstart.get_backbone("small_cnn").create().state_dict()
    torch.save(small, tmp_path / "w.pth")
    if weights == "truncated":
        (tmp_path / "w.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:5000])
    code, _, stderr = run_cli("train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "w.pth",
                              "--image-size", "32", "--workers", "0", "--out", out, "--overwrite")
    assert code == 2 and "Traceback" not in stderr and str(tmp_path / "w.pth") in stderr
    assert ("cannot read weights file" if weights == "truncated" else "does not fit backbone mobilenet_v2") in stderr
    assert tree_digest(out) == earlier and sorted(os.listdir(tmp_path)) == ["data", "run", "w.pth"]


@pytest.mark.parametrize("where", ["creating the cache folder", "writing a chunk"])
def test_unwritable_cache_warns_once_and_the_run_completes_without_it(tmp_path, monkeypatch, where):
    data = write_image_folder(tmp_path / "data", n_per_class=150, size=(8, 8))  # 2 chunks
    cache = tmp_path / "cache"
    denied = PermissionError(errno.EACCES, "Permission denied")
    if where == "creating the cache folder":
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if cache in (self, *self.parents):
                raise denied
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        def save_file(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(features_mod, "save_file", save_file)
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--cache-dir", cache)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "feature cache" in line]
    assert len(warnings) == 1 and str(cache / "features") in warnings[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert config["cache_dir"] is None and metrics["extraction"]["computed"] == 300
    assert not list(cache.rglob("*.safetensors")) and not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_oserror_outside_train_is_exit_2_not_a_traceback(tmp_path, monkeypatch):
    import shutil

    def rmtree(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    (tmp_path / "cache" / "features").mkdir(parents=True)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, _, stderr = run_cli("cache", "clear", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "Permission denied" in stderr and str(tmp_path / "cache" / "features") in stderr
    assert "Traceback" not in stderr
