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
from headstart.nets.registry import get_backbone, sequence
from headstart.learn.finetune import FineTuneNet
from headstart.data.images import load_image
from headstart.nets.weights import load_backbone

ENTRY = get_backbone("mobilenet_v2")
UNFREEZE = 3
# Boundary activations are stored in fp16 (finetune.STORAGE_DTYPE): rounding to 11 significant
# bits moves each value by at most 2^-11 of itself, and the frozen bottom may differ in its last
# float32 bits between batchings; 2^-10 covers both.
FP16_RTOL = 2.0 ** -10
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
            "--unfreeze", "2", "--epochs", "2", "--patience", "5", "--json")
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
    from headstart.nets.registry import seeded_init

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
                                   "--workers", "0", "--epochs", "2")
    assert code == 0, stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    names = [r["strategy"] for r in result["runs"]]
    assert names == ["scratch", "feature-extraction-linear", "feature-extraction-mlp", "fine-tune"]
    for name in ("scratch", "fine-tune"):  # --epochs is both trained strategies' budget
        history = json.loads((tmp_path / "cmp" / name / "metrics.json").read_text())["fine_tune"]["history"]
        assert history["epoch"][-1] <= 2
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

    from headstart.strategies.auto import choose_strategy

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
    from headstart.data.folders import scan_folder
    from headstart.learn.finetune import _boundary_batch, compute_boundary

    model, _ = load_backbone(ENTRY, "none", seed=0)
    net = FineTuneNet(ENTRY, model, nn.Linear(ENTRY.feature_dim, 10), UNFREEZE)
    samples = scan_folder(fmnist_tiny / "train").samples[:6]
    prep = ENTRY.preprocessing.scaled(32)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    b = compute_boundary(net, paths, labels, prep.transform(), 4, 0, "test", flip=True)
    x = torch.stack([prep.transform()(load_image(p)) for p in paths])
    torch.testing.assert_close(b.x.float(), net.boundary(x), rtol=FP16_RTOL, atol=1e-5)
    torch.testing.assert_close(b.x_flip.float(), net.boundary(x.flip(-1)), rtol=FP16_RTOL, atol=1e-5)
    assert not torch.equal(b.x, b.x_flip)
    idx = torch.arange(6)
    xb, _ = _boundary_batch(b, idx, seed=0, epoch=1)
    assert xb.dtype == torch.float32
    mirrored = [not torch.equal(xb[i], b.x[i].float()) for i in range(6)]
    assert all(torch.equal(xb[i], (b.x_flip[i] if m else b.x[i]).float()) for i, m in enumerate(mirrored))
    assert torch.equal(_boundary_batch(b, idx, seed=0, epoch=1)[0], xb)  # same (seed, epoch): same batch
    assert any(not torch.equal(_boundary_batch(b, idx, seed=0, epoch=e)[0], xb) for e in range(2, 6))


def test_boundary_is_stored_in_16_bits_and_read_as_float32(fmnist_tiny, one_torch_thread):
    """Boundary activations at rest in fp16 (half of float32's memory), batches in float32 within
    the fp16 rounding of the float32 activations; a set fp16 cannot hold goes to bf16, never to inf."""
    from headstart.data.folders import scan_folder
    from headstart.learn.finetune import STORAGE_DTYPE, Boundary, _Store, compute_boundary, predict_boundary

    assert STORAGE_DTYPE == torch.float16
    model, _ = load_backbone(ENTRY)
    net = FineTuneNet(ENTRY, model, nn.Linear(ENTRY.feature_dim, 10), UNFREEZE)
    samples = scan_folder(fmnist_tiny / "train").samples[:10]
    prep = ENTRY.preprocessing.scaled(32)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    b = compute_boundary(net, paths, labels, prep.transform(), 4, 0, "test", flip=True)
    assert b.dtype == b.x.dtype == b.x_flip.dtype == torch.float16
    ref = net.boundary(torch.stack([prep.transform()(load_image(p)) for p in paths]))
    batch = b.batch(torch.arange(10))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, ref, rtol=FP16_RTOL, atol=1e-5)
    # What training sees: logits from the fp16 store against those from a float32 one.
    as_fp32 = Boundary(ref, b.y)
    torch.testing.assert_close(predict_boundary(net, b), predict_boundary(net, as_fp32), rtol=1e-2, atol=1e-3)

    store = _Store(3)
    store.add(torch.tensor([[1.0], [2.0]]))
    store.add(torch.tensor([[1e6]]))  # beyond fp16's 65504
    big = store.result()
    assert big.dtype == torch.bfloat16 and torch.isfinite(big.float()).all()
    torch.testing.assert_close(big.float(), torch.tensor([[1.0], [2.0], [1e6]]), rtol=2.0 ** -8, atol=0)


def test_fine_tuning_on_16_bit_boundaries_matches_float32(fmnist_tiny, one_torch_thread):
    """Two epochs of the top and head on the fp16 store against the same on a float32 store: the val
    losses agree within 1% and the trained networks' logits within 10% of their scale (stated
    tolerances: measured 0.3% and 5%; Adam's first steps are about lr x sign(gradient), so a
    weight whose gradient is near zero moves by a whole step either way). Early stopping on
    val_loss, which falls in both runs: both keep epoch 2."""
    from headstart.data.folders import scan_folder
    from headstart.learn.finetune import Boundary, FineTuneSettings, compute_boundary, fit, predict_boundary

    samples = scan_folder(fmnist_tiny / "train").samples
    prep = ENTRY.preprocessing.scaled(32)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    results = {}
    for store in ("fp16", "fp32"):
        torch.manual_seed(0)
        model, _ = load_backbone(ENTRY)
        net = FineTuneNet(ENTRY, model, nn.Linear(ENTRY.feature_dim, 10), UNFREEZE)
        b = compute_boundary(net, paths, labels, prep.transform(), 32, 0, "test")
        if store == "fp32":  # the float32 activations themselves, as before 16-bit storage
            b = Boundary(net.boundary(torch.stack([prep.transform()(load_image(p)) for p in paths])), b.y)
        s = FineTuneSettings(epochs=2, batch_size=32, patience=5, early_stop_metric="val_loss")
        r = fit(net, s, seed=0, train_data=b, val=b)
        assert r.best_epoch == 2
        results[store] = (net, r.history["val_loss"])
        reference = b if store == "fp32" else None
    (net16, loss16), (net32, loss32) = results["fp16"], results["fp32"]
    logits16, logits32 = predict_boundary(net16, reference), predict_boundary(net32, reference)
    torch.testing.assert_close(logits16, logits32, rtol=0, atol=0.1 * float(logits32.abs().max()))
    assert loss16 == pytest.approx(loss32, rel=1e-2)
