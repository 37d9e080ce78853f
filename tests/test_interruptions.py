"""Reliability (issue 6), interruptions: killed or Ctrl-C'd runs resume to the same result.

Interruptions use the HEADSTART_FAULT hook (headstart/faults.py), never a sleep and a kill.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.engines import features as features_mod

from conftest import write_image_folder
from reliability_helpers import CliChild, TINY
from test_cli import run_cli


def cache_contents(cache_root: Path) -> dict[str, np.ndarray]:
    """Every (image key -> feature vector) in every shard under a cache folder."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for shard in sorted(cache_root.rglob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            keys, block = json.loads(f.metadata()["keys"]), f.get_tensor("features")
        for k, row in zip(keys, block):
            assert k not in out or np.array_equal(out[k], row), "one image, two different features"
            out[k] = row
    return out


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """900 tiny images: more than 3 cache chunks of 256."""
    assert features_mod.CHUNK == 256
    return write_image_folder(tmp_path_factory.mktemp("many") / "data", n_per_class=450, size=(8, 8))


@pytest.fixture(scope="module")
def reference_run(many_images, tmp_path_factory, one_torch_thread):
    """One uninterrupted run in this process: its cache and metrics are what interrupted runs must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    code, _, stderr = run_cli("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", base / "cache",
                              "--out", base / "run")
    assert code == 0, stderr
    return cache_contents(base / "cache"), json.loads((base / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_extraction_killed_after_the_third_chunk_resumes_to_identical_features(many_images, reference_run,
                                                                               tmp_path, one_torch_thread):
    features, metrics = reference_run
    assert len(features) == 900
    args = ("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "run")
    code, _, stderr = CliChild(tmp_path, *args, fault="chunk:3").finish()
    assert code == -signal.SIGKILL, stderr
    assert not (tmp_path / "run").exists()  # only a .partial-<pid> folder, which does not look finished
    assert [p.name.split(".partial-")[0] for p in tmp_path.glob("run.partial-*")] == ["run"]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert len(cache_contents(tmp_path / "cache")) == 3 * 256

    code, _, stderr = run_cli(*args)  # started again, as a user would, with nothing else changed
    assert code == 0, stderr
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["extraction"]["from_cache"] == 768 and again["extraction"]["computed"] == 132
    assert again["extraction"]["network_images"] == 132  # only the unfinished images went through the network
    resumed = cache_contents(tmp_path / "cache")
    assert resumed.keys() == features.keys()
    assert all(np.array_equal(resumed[k], features[k]) for k in features)  # bitwise
    assert again["val_accuracy"] == metrics["val_accuracy"]


@pytest.mark.slow
def test_two_processes_sharing_one_cache_at_once(many_images, reference_run, tmp_path):
    features, metrics = reference_run
    procs = [CliChild(tmp_path, "train", many_images, *TINY, "--test-fraction", "0", "--cache-dir",
                      tmp_path / "cache", "--out", tmp_path / f"run{i}") for i in range(2)]
    results = [p.finish() for p in procs]
    for code, _, stderr in results:
        assert code == 0, stderr
        assert "ignoring unreadable cache shard" not in stderr
    shared = cache_contents(tmp_path / "cache")  # also checks no key has two different vectors
    assert shared.keys() == features.keys()
    assert all(np.array_equal(shared[k], features[k]) for k in features)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    for i in range(2):
        assert json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["val_accuracy"] == \
            metrics["val_accuracy"]
    code, _, stderr = run_cli("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", tmp_path / "cache",
                              "--out", tmp_path / "after")  # a third run reads the shared cache whole
    assert code == 0, stderr
    assert json.loads((tmp_path / "after" / "metrics.json").read_text())["extraction"]["network_images"] == 0


def test_ctrl_c_stops_cleanly_with_a_message(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=150, size=(8, 8))
    # SIGINT to the whole process group after the first chunk, as a terminal does: the decoding worker
    # (--workers 1) gets it too.
    proc = CliChild(tmp_path, "train", data, "--strategy", "feature-extraction", "--backbone", "small_cnn",
                    "--weights", "none", "--workers", "1", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run",
                    fault="sigint-chunk:1", new_session=True)
    code, _, stderr = proc.finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "headstart: interrupted; nothing partial was kept."
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run.partial-*"))
    assert len(cache_contents(tmp_path / "cache")) == 256  # the finished chunk stays for the next run


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "mlp"])  # the MLP's dropout draws random numbers: the RNG must resume
def test_fine_tuning_killed_mid_epoch_resumes_to_the_same_final_metrics(head, tmp_path, one_torch_thread):
    data = write_image_folder(tmp_path / "data", n_per_class=70, classes=("a", "b"), size=(12, 12))
    args = ("train", data, "--strategy", "scratch", "--head", head, "--epochs", "3", "--patience", "5",
            "--workers", "0", "--cache-dir", "none", "--json")
    code, whole, stderr = run_cli(*args, "--out", tmp_path / "whole")
    assert code == 0, stderr
    steps = json.loads(whole)["fine_tune"]["history"]
    # 2 steps an epoch (batch 64): the 3rd step is the first of epoch 2, the kill lands mid-epoch.
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["n_train"] in range(65, 129)
    code, _, stderr = CliChild(tmp_path, *args, "--out", tmp_path / "cut", fault="step:3").finish()
    assert code == -signal.SIGKILL, stderr
    assert "epoch 1/3" in stderr and "epoch 2/3" not in stderr
    assert not (tmp_path / "cut").exists()
    import torch

    assert torch.load(tmp_path / "cut.checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    code, resumed, stderr = run_cli("train", "--resume", tmp_path / "cut", "--json")
    assert code == 0, stderr
    assert "resumed fine-tuning after epoch 1" in stderr
    a, b = json.loads(whole), json.loads(resumed)
    assert b["fine_tune"]["history"] == steps | {"seconds": b["fine_tune"]["history"]["seconds"]}
    assert b["test"] == a["test"] and b["val_accuracy"] == a["val_accuracy"]
    assert not (tmp_path / "cut.checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_during_fine_tuning_keeps_the_checkpoints_and_resumes(tmp_path, one_torch_thread):
    """Ctrl-C mid-epoch (the terminal's SIGINT to the process group): exit 130 with one line, no run
    folder, and the checkpoint of the last finished epoch kept, from which --resume finishes the run."""
    data = write_image_folder(tmp_path / "data", n_per_class=70, classes=("a", "b"), size=(12, 12))
    args = ("train", data, "--strategy", "scratch", "--epochs", "3", "--patience", "5", "--workers", "0",
            "--cache-dir", "none", "--json")
    # 2 steps an epoch (batch 64): the 3rd step is the first of epoch 2.
    code, _, stderr = CliChild(tmp_path, *args, "--out", tmp_path / "cut", fault="sigint-step:3",
                               new_session=True).finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("headstart: interrupted")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "epoch 1/3" in stderr and "epoch 2/3" not in stderr
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob("cut.partial-*"))
    import torch

    assert torch.load(tmp_path / "cut.checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    # The same command again does not throw the checkpoints away: it refuses and names both ways on.
    code, _, stderr = run_cli(*args, "--out", tmp_path / "cut")
    assert code == 2 and f"headstart train --resume {tmp_path / 'cut'}" in stderr and "--overwrite" in stderr
    assert (tmp_path / "cut.checkpoints" / "last.pt").is_file()
    code, resumed, stderr = run_cli("train", "--resume", tmp_path / "cut", "--json")
    assert code == 0, stderr
    assert "resumed fine-tuning after epoch 1" in stderr
    assert json.loads(resumed)["fine_tune"]["epochs_run"] == 3
    assert headstart.load(tmp_path / "cut").classes == ["a", "b"]
    assert not (tmp_path / "cut.checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_keeps_nothing(tmp_path, one_torch_thread):
    """Interrupted in the first epoch, before any checkpoint: "nothing partial was kept" is true, so the same
    command runs again from the start without --overwrite."""
    data = write_image_folder(tmp_path / "data", n_per_class=70, classes=("a", "b"), size=(12, 12))
    args = ("train", data, "--strategy", "scratch", "--epochs", "2", "--workers", "0", "--cache-dir", "none",
            "--out", tmp_path / "cut")
    code, _, stderr = CliChild(tmp_path, *args, fault="sigint-step:1", new_session=True).finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "headstart: interrupted; nothing partial was kept."
    assert not (tmp_path / "cut.checkpoints").exists() and not (tmp_path / "cut").exists()
    code, _, stderr = run_cli(*args)
    assert code == 0, stderr
