"""The fine-tuning loop's documented behaviour, each shown directly: best weights restored at early
stop, the time budget checked inside the loop, one-cycle and discriminative rates per parameter group,
`--augment standard` on training images only, phase 1 not refitting on validation, and the converted
frozen bottom agreeing with torch's. Small: small_cnn or 32 px MobileNetV2, 1-3 epochs, one thread."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import headstart
from headstart.nets.registry import get_backbone
from headstart.engines.rule import choose_engine, make_engine
from headstart.learn.finetune import Boundary, FineTuneNet, FineTuneSettings, fit, trainable_state
from headstart.data.images import load_image
from headstart.nets.weights import load_backbone

from conftest import MEASURED

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = get_backbone("small_cnn")
MOBILENET = get_backbone("mobilenet_v2")


def _small_net(seed: int = 0) -> FineTuneNet:
    """small_cnn, every block trainable (so the boundary is the image itself), and a 3-class head."""
    torch.manual_seed(seed)
    model, _ = load_backbone(SMALL, "none", seed=seed)
    return FineTuneNet(SMALL, model, nn.Linear(SMALL.feature_dim, 3), "all", bn_update=True)


def _boundary(n: int = 24, seed: int = 0) -> Boundary:
    g = torch.Generator().manual_seed(seed)
    return Boundary(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3)


def _states_by_epoch(scores: list[float]):
    """A validation function that reports `scores` as val accuracy, epoch by epoch, and keeps the weights
    the net had when each was reported."""
    states: list[dict] = []

    def val_fn(net):
        states.append(trainable_state(net))
        return 1.0, scores[len(states) - 1]

    return val_fn, states


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_weights_are_restored_at_early_stop():
    net = _small_net()
    val_fn, states = _states_by_epoch([0.5, 0.9, 0.6, 0.4, 0.95])
    s = FineTuneSettings(epochs=5, patience=2, lr=1e-2, lr_head=1e-2, augment="none", batch_size=8)
    result = fit(net, s, seed=0, train_data=_boundary(), val=None, val_fn=val_fn)
    assert (result.epochs_run, result.best_epoch, result.stopped_by) == (4, 2, "early stopping")
    assert not _same(states[1], states[3])  # the weights did move after the best epoch ...
    assert _same(trainable_state(net), states[1])  # ... and the best epoch's weights are the ones kept


def test_time_budget_stops_after_the_epoch_that_crossed_it(monkeypatch):
    """The budget is checked inside the loop, after each epoch (not only before the run)."""
    import headstart.learn.finetune as ft

    clock = iter(range(0, 10_000, 10))  # every reading of the clock is 10 s after the last
    s = FineTuneSettings(epochs=10, patience=10, augment="none", batch_size=8, time_budget=45)
    with monkeypatch.context() as m:  # not monkeypatch.undo(): that would lift the network guard too
        m.setattr(ft.time, "perf_counter", lambda: float(next(clock)))
        result = fit(_small_net(), s, seed=0, train_data=_boundary(), val=_boundary(6, seed=1))
    assert result.stopped_by == "time budget" and 1 < result.epochs_run < 10
    unbounded = fit(_small_net(), FineTuneSettings(epochs=3, patience=10, augment="none", batch_size=8),
                    seed=0, train_data=_boundary(), val=_boundary(6, seed=1))
    assert unbounded.stopped_by == "epochs" and unbounded.epochs_run == 3


@pytest.mark.slow
def test_time_budget_from_the_command_line_and_phase_one_kept_off_validation(fmnist_tiny, tmp_path):
    """One fine-tuning run through the CLI: --time-budget stops it after its first epoch, and its phase-1
    head was fitted on the training images alone (phase 2 validates on the validation images)."""
    from test_cli import run_cli

    code, stdout, stderr = run_cli("train", fmnist_tiny, "--strategy", "fine-tune", "--unfreeze", "1",
                                   "--epochs", "5", "--time-budget", "0.001s", "--augment", "none",
                                   "--image-size", "32", "--workers", "0", "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    metrics = json.loads(stdout)
    ft = metrics["fine_tune"]
    assert ft["settings"]["time_budget"] == 0.001
    assert (ft["epochs_run"], ft["stopped_by"]) == (1, "time budget")
    assert "time budget of 0s reached after epoch 1" in stderr
    assert metrics["n_val"] > 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"fit, validation kept out, on {metrics['n_train']} images" in log and "final fit" not in log


def test_feature_extraction_refits_phase_one_on_train_and_validation(fmnist_tiny, tmp_path):
    """The control for the test above: without phase 2, the log counts the validation images in."""
    run = headstart.train(fmnist_tiny, strategy="feature-extraction", backbone="small_cnn", weights="none",
                          out=tmp_path / "r", image_size=32, workers=0, seed=0)
    n_train, n_val = run.metrics["n_train"], run.metrics["n_val"]
    assert n_val > 0
    assert (tmp_path / "r" / "train.log").read_text().count(f"final fit on {n_train + n_val} images") == 1


def test_auto_choosing_feature_extraction_logs_one_final_fit(image_folder, tmp_path):
    """Auto's phase-1 head keeps validation out; when auto then keeps feature extraction it refits on train +
    validation: one "final fit" line, not two."""
    run = headstart.train(image_folder, backbone="small_cnn", weights="none", out=tmp_path / "r", image_size=32,
                          workers=0, cache_dir="none", val_fraction=0.25, test_fraction=0.0)
    assert run.config["resolved_strategy"] == "feature-extraction"
    log = (tmp_path / "r" / "train.log").read_text()
    assert log.count("final fit") == 1 and "fit, validation kept out" in log


def _recorded_rates(monkeypatch) -> list[dict[str, float]]:
    """Each optimizer step's learning rate per named parameter group."""
    steps: list[dict[str, float]] = []
    for cls in (torch.optim.AdamW, torch.optim.Adam):
        real = cls.step

        def step(self, *args, real=real, **kwargs):
            steps.append({g["name"]: g["lr"] for g in self.param_groups})
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)
    return steps


def test_one_cycle_and_lr_decay_set_each_group_rate(monkeypatch):
    torch.manual_seed(0)
    model, _ = load_backbone(MOBILENET, "none", seed=0)
    net = FineTuneNet(MOBILENET, model, nn.Linear(MOBILENET.feature_dim, 3), 3)
    s = FineTuneSettings(epochs=4, lr=1e-3, lr_head=1e-2, lr_decay=0.5, schedule="onecycle", augment="none",
                         batch_size=4, patience=10)
    top = list(MOBILENET.blocks[-3:])  # features.16, 17, 18: the deepest block is trained fastest
    peak = {"head": 1e-2, top[2]: 1e-3, top[1]: 5e-4, top[0]: 2.5e-4}
    assert {g["name"]: g["lr"] for g in net.param_groups(s)} == pytest.approx(peak)
    # The boundary of 8 random images (3 classes): the loop runs only the top blocks and the head.
    data = Boundary(net.boundary(torch.randn(8, 3, 32, 32)), torch.arange(8) % 3)
    steps = _recorded_rates(monkeypatch)
    fit(net, s, seed=0, train_data=data, val=data)
    assert len(steps) == 8  # 4 epochs of 2 steps
    for rates in steps:  # every group keeps its ratio to the head's rate, step after step
        assert {k: v / rates["head"] for k, v in rates.items()} == pytest.approx({k: v / 1e-2 for k, v in peak.items()})
    head = [r["head"] for r in steps]
    # torch's OneCycleLR: start at max/25, reach the maximum at step 0.25 * 8 - 1 = 1, then anneal far below.
    assert head[0] == pytest.approx(1e-2 / 25)
    assert head[1] == pytest.approx(1e-2) and max(head) == head[1]
    assert head[-1] < head[0] and all(a > b for a, b in zip(head[1:], head[2:]))


def test_cosine_schedule_is_the_default_and_decays(monkeypatch):
    steps = _recorded_rates(monkeypatch)
    s = FineTuneSettings(epochs=2, lr=1e-2, lr_head=1e-2, augment="none", batch_size=8, patience=10)
    assert s.schedule == "cosine"
    fit(_small_net(), s, seed=0, train_data=_boundary(), val=None)
    head = [r["head"] for r in steps]
    assert head == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])


@pytest.mark.slow
def test_augment_standard_applies_to_training_images_only(fmnist_tiny, tmp_path, monkeypatch):
    """Counted at the random ops themselves: each training image once per epoch, and not one while the
    validation and test images go through the frozen part (the plain transform)."""
    import headstart.strategies.finetune as ftr
    from torchvision.transforms import v2

    jitters = [0]
    real_jitter = v2.ColorJitter.forward
    monkeypatch.setattr(v2.ColorJitter, "forward",
                        lambda self, *a: jitters.__setitem__(0, jitters[0] + 1) or real_jitter(self, *a))
    during_boundaries: list[tuple[str, int]] = []
    real_boundary = ftr.compute_boundary

    def compute_boundary(net, paths, labels, transform, *args, **kwargs):
        before = jitters[0]
        out = real_boundary(net, paths, labels, transform, *args, **kwargs)
        during_boundaries.append((args[2], jitters[0] - before))
        return out

    monkeypatch.setattr(ftr, "compute_boundary", compute_boundary)
    # The test split is scored through the saved model's feature path (as `evaluate` scores it).
    import headstart.runs.train as training

    real_features_of = training.features_of

    def features_of(model, paths, *args, **kwargs):
        before = jitters[0]
        out = real_features_of(model, paths, *args, **kwargs)
        during_boundaries.append((kwargs.get("desc"), jitters[0] - before))
        return out

    monkeypatch.setattr(training, "features_of", features_of)
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "ft", image_size=32, workers=0, seed=0,
                          cache_dir="none", finetune=dict(unfreeze=1, epochs=2, augment="standard", patience=5))
    ft = run.metrics["fine_tune"]
    assert ft["boundary_cache"] is False and ft["epochs_run"] == 2
    assert [desc for desc, _ in during_boundaries] == ["boundary (val)", "test"]
    assert all(n == 0 for _, n in during_boundaries)  # validation and test: plain transform
    assert jitters[0] == 2 * run.metrics["n_train"]  # training: every image, every epoch


def test_converted_frozen_part_matches_torch_within_the_stated_bound(fmnist_tiny):
    """On CPU the frozen bottom runs as an ONNX Runtime copy; its boundary activations agree with the
    torch modules' to within 1e-4 of the largest activation (README: the engines' parity bound)."""
    model, _ = load_backbone(MOBILENET)
    net = FineTuneNet(MOBILENET, model, nn.Linear(MOBILENET.feature_dim, 10), 8)
    prep = MOBILENET.preprocessing.scaled(64)
    paths = [sorted(d.iterdir())[0] for d in sorted((fmnist_tiny / "train").iterdir())]
    x = torch.stack([prep.transform()(load_image(p)) for p in paths])  # one real image per class
    reference = net.boundary(x)
    net.frozen_engine = make_engine(net.frozen, choose_engine("cpu", "onnxruntime"))
    converted = net.boundary(x)
    assert converted.shape == reference.shape and converted.dtype == torch.float32
    error = float((converted - reference).abs().max() / reference.abs().max())
    MEASURED.append(f"fine-tuning boundary (MobileNetV2 top 8 blocks unfrozen, 64 px, 10 real images): "
                    f"ONNX Runtime vs torch, max abs difference / max abs activation = {error:.2e}")
    assert error < 1e-4
    # The frozen pass hands it uint8 pixels, normalised in its graph (pixels.py): the same activations.
    pixels = torch.stack([prep.transform().decode(load_image(p)) for p in paths])
    from_pixels = net.boundary(pixels, normalize=prep.normalizer)
    assert float((from_pixels - reference).abs().max() / reference.abs().max()) < 1e-4
    net.frozen_engine = None
    assert torch.equal(net.boundary(pixels, normalize=prep.normalizer), reference)  # torch: bitwise
