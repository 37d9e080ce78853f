"""Fine-tuning on a small real Fashion-MNIST subset with the real MobileNetV2 weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import headstart
from headstart.backbones import get_backbone, sequence
from headstart.finetune import FineTuneNet
from headstart.images import load_image
from headstart.weights import load_backbone

ENTRY = get_backbone("mobilenet_v2")
UNFREEZE = 3
COMMON = dict(image_size=32, workers=0, seed=0)


def split_state(model: nn.Module, n_top: int) -> tuple[dict, dict]:
    """Parameters and buffers of the frozen bottom and of the top `n_top` blocks, cloned."""
    layers = [(n, m) for n, m in sequence(ENTRY, model) if n]
    frozen, top = layers[:-n_top], layers[-n_top:]
    grab = lambda part: {f"{n}.{k}": v.detach().clone() for n, m in part for k, v in m.state_dict().items()}  # noqa
    return grab(frozen), grab(top)


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.fixture(scope="module")
def imagenet_state():
    model, _ = load_backbone(ENTRY)
    return split_state(model, UNFREEZE)


@pytest.mark.slow
def test_frozen_means_frozen_through_training_with_augmentation(fmnist_tiny, tmp_path, imagenet_state):
    # engine torch: the frozen modules themselves run every batch (the other engines run a converted copy).
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "ft", **COMMON, engine="torch",
                          finetune=dict(unfreeze=UNFREEZE, epochs=2, augment="light"))
    frozen_before, top_before = imagenet_state
    frozen_after, top_after = split_state(run.model.backbone, UNFREEZE)
    assert changed(frozen_before, frozen_after) == []  # parameters and BatchNorm buffers, bitwise
    moved = changed(top_before, top_after)
    assert any(k.endswith("weight") for k in moved)  # the unfrozen blocks did train
    assert not any("running_" in k for k in moved)  # and kept their BatchNorm statistics (no --bn-update)
    ft = run.metrics["fine_tune"]
    assert ft["trainable_blocks"] == list(ENTRY.blocks[-UNFREEZE:]) and ft["epochs_run"] == 2
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["strategy"] == "fine-tune" and config["finetune"]["augment"] == "light"
    assert not (tmp_path / "ft.checkpoints").exists()  # removed once the run is complete


@pytest.mark.slow
def test_control_frozen_check_catches_a_frozen_part_in_train_mode(fmnist_tiny, tmp_path, imagenet_state,
                                                                 monkeypatch):
    # What a per-epoch plain `model.train()` does: the frozen BatchNorm layers collect batch statistics.
    monkeypatch.setattr(FineTuneNet, "train", lambda self, mode=True: nn.Module.train(self, mode))
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "bad", **COMMON, engine="torch",
                          finetune=dict(unfreeze=UNFREEZE, epochs=1, augment="light"))
    frozen_after, _ = split_state(run.model.backbone, UNFREEZE)
    moved = changed(imagenet_state[0], frozen_after)
    assert moved and all("running_" in k or "num_batches" in k for k in moved)


@pytest.mark.slow
def test_fine_tuning_lowers_training_loss_and_bn_update_moves_statistics(fmnist_tiny, tmp_path, imagenet_state):
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "bn", **COMMON,
                          finetune=dict(unfreeze=UNFREEZE, epochs=3, bn_update=True, patience=5))
    history = json.loads((tmp_path / "bn" / "metrics.json").read_text())["fine_tune"]
    assert history["epochs_run"] == 3 and history["boundary_cache"] is True
    frozen_after, top_after = split_state(run.model.backbone, UNFREEZE)
    assert changed(imagenet_state[0], frozen_after) == []
    assert any("running_mean" in k for k in changed(imagenet_state[1], top_after))
    assert (tmp_path / "bn" / "training_curve.png").is_file()
    curve = history["history"]["train_loss"]
    assert len(curve) == 3 and curve[-1] < curve[0]
    assert "epoch 3/3: train loss" in (tmp_path / "bn" / "train.log").read_text()


@pytest.mark.slow
def test_fine_tuned_bundle_loads_and_predicts_like_the_run(fmnist_tiny, tmp_path):
    # fp32 pinned: with the rule's bf16 (native-bf16 CPUs) the run and this check round differently.
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "ft", **COMMON, precision="fp32",
                          finetune=dict(unfreeze=2, epochs=1))
    model = headstart.load(tmp_path / "ft")
    assert model.strategy == "fine-tune" and model.backbone_identity.startswith("finetuned-")
    metrics = headstart.evaluate(model, fmnist_tiny / "test", precision="fp32")
    assert metrics["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"], abs=1e-9)


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headstart.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(fmnist_tiny, tmp_path):
    args = ("train", fmnist_tiny, "--strategy", "fine-tune", "--image-size", "32", "--workers", "0",
            "--unfreeze", "2", "--epochs", "3", "--patience", "5", "--json")
    whole = _cli(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    env = {**os.environ, "HEADSTART_FAULT": "epoch:1"}  # SIGKILL right after the first epoch's checkpoint
    killed = _cli(*args, "--out", tmp_path / "cut", env=env)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.checkpoints" / "last.pt").is_file()
    resumed = _cli("train", "--resume", tmp_path / "cut", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed fine-tuning after epoch 1" in resumed.stderr
    a, b = json.loads(whole.stdout), json.loads(resumed.stdout)
    assert b["test"] == a["test"]
    assert b["fine_tune"]["best_val_loss"] == a["fine_tune"]["best_val_loss"]


@pytest.mark.slow
def test_bad_unfreeze_is_a_clear_error(fmnist_tiny, tmp_path):
    from headstart.errors import HeadstartError

    with pytest.raises(HeadstartError, match="has 19 blocks"):
        headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "x", **COMMON, finetune=dict(unfreeze=40))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_scratch_trains_every_layer_of_the_small_cnn(fmnist_tiny, tmp_path):
    from headstart.backbones import seeded_init

    run = headstart.train(fmnist_tiny, strategy="scratch", out=tmp_path / "scratch", workers=0, seed=0,
                          finetune=dict(epochs=2))
    config = json.loads((tmp_path / "scratch" / "config.json").read_text())
    assert config["backbone"] == "small_cnn" and config["weights"]["kind"] == "random"
    assert config["image_size"] == 32 and config["finetune"]["unfreeze"] == "all"
    assert config["finetune"]["bn_update"] is True
    initial = seeded_init(get_backbone("small_cnn"), 0).state_dict()
    trained = run.model.backbone.state_dict()
    assert all(not torch.equal(initial[k], trained[k]) for k in initial if "weight" in k or "running_" in k)
    assert run.metrics["fine_tune"]["trainable_parameters"] > 250_000
    # The head starts from PyTorch's init, not from phase 1's fit to random features (whose folded
    # scaler once made the first loss run into the thousands): near ln(10) = 2.3 for 10 classes.
    assert run.metrics["fine_tune"]["history"]["train_loss"][0] < 4
    again = headstart.load(tmp_path / "scratch")
    assert again.predict(sorted((fmnist_tiny / "test" / "Bag").iterdir())[:2], top_k=1)


@pytest.mark.slow
def test_scratch_refuses_pretrained_weights(fmnist_tiny, tmp_path):
    from headstart.errors import HeadstartError

    with pytest.raises(HeadstartError, match="random initialisation"):
        headstart.train(fmnist_tiny, strategy="scratch", weights="imagenet", out=tmp_path / "x")


@pytest.mark.slow
def test_compare_runs_every_strategy_on_one_split(fmnist_tiny, tmp_path):
    from test_cli import run_cli

    code, stdout, stderr = run_cli("compare", fmnist_tiny, "--out", tmp_path / "cmp", "--image-size", "32",
                                   "--workers", "0")
    assert code == 0, stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    names = [r["strategy"] for r in result["runs"]]
    assert names == ["scratch", "feature-extraction-linear", "feature-extraction-mlp", "fine-tune"]
    for r in result["runs"]:
        assert 0 <= r["test_accuracy"] <= 1 and r["wall_seconds"] > 0 and r["trainable_parameters"] > 0
        assert r["strategy"] in stdout
    splits = {(tmp_path / "cmp" / n / "splits.csv").read_text() for n in names}
    assert len(splits) == 1  # the same files in the same splits for every strategy
    assert (tmp_path / "cmp" / "compare.png").is_file() and not list((tmp_path / "cmp").glob(".cache-*"))


@pytest.mark.slow
def test_auto_explains_its_choice(fmnist_tiny, tmp_path):
    run = headstart.train(fmnist_tiny, strategy="auto", out=tmp_path / "auto", image_size=32, workers=0)
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    decision = config["strategy_decision"]
    # 12 images per class: too few to fine-tune, so auto keeps the base frozen and says so.
    assert decision["strategy"] == "feature-extraction" == config["resolved_strategy"]
    assert "too few" in decision["reasons"][0]
    assert decision["measurements"]["min_train_images_per_class"] < 100
    assert "strategy auto -> feature-extraction" in (tmp_path / "auto" / "train.log").read_text()
    assert run.model.strategy == "feature-extraction" and "fine_tune" not in run.metrics


def test_auto_rule_on_measurements():
    import numpy as np

    from headstart.auto import choose_strategy

    y = np.repeat(np.arange(3), 500)
    assert choose_strategy(y, 0.87, 2000, 100.0, 5, None)["strategy"] == "fine-tune"
    assert choose_strategy(y, 0.99, 2000, 100.0, 5, None)["strategy"] == "feature-extraction"
    slow = choose_strategy(y, 0.87, 2000, 100.0, 5, time_budget=60)
    assert slow["strategy"] == "feature-extraction" and "time budget" in slow["reasons"][0]
    assert choose_strategy(np.repeat(np.arange(3), 50), 0.87, 200, None, 5, None)["strategy"] == "feature-extraction"


@pytest.mark.slow
def test_flip_augmentation_keeps_the_boundary_cache(fmnist_tiny):
    """--augment flip: boundary activations of each image and of its mirror, computed once; each epoch
    mixes them by (seed, epoch, index), so the same seed gives the same batches."""
    from headstart.data import scan_folder
    from headstart.finetune import _boundary_batch, compute_boundary

    model, _ = load_backbone(ENTRY, "none", seed=0)
    net = FineTuneNet(ENTRY, model, nn.Linear(ENTRY.feature_dim, 10), UNFREEZE)
    samples = scan_folder(fmnist_tiny / "train").samples[:6]
    prep = ENTRY.preprocessing.scaled(32)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    b = compute_boundary(net, paths, labels, prep.transform(), 4, 0, "test", flip=True)
    x = torch.stack([prep.transform()(load_image(p)) for p in paths])
    torch.testing.assert_close(b.x, net.boundary(x))
    torch.testing.assert_close(b.x_flip, net.boundary(x.flip(-1)))
    assert not torch.equal(b.x, b.x_flip)
    idx = torch.arange(6)
    xb, _ = _boundary_batch(b, idx, seed=0, epoch=1)
    mirrored = [not torch.equal(xb[i], b.x[i]) for i in range(6)]
    assert all(torch.equal(xb[i], b.x_flip[i] if m else b.x[i]) for i, m in enumerate(mirrored))
    assert torch.equal(_boundary_batch(b, idx, seed=0, epoch=1)[0], xb)  # same (seed, epoch): same batch
    assert any(not torch.equal(_boundary_batch(b, idx, seed=0, epoch=e)[0], xb) for e in range(2, 6))
