"""Test-time flips (`--tta flip`): the mean of each image's and its mirror's probabilities, the same
in the run, evaluate, predict, the server, the bundle and the ONNX export; and `--tta auto`'s rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from headstart.strategies.auto import choose_tta
from headstart.models.bundle import META
from headstart.models.bundle import save as save_bundle
from headstart.errors import BundleError, HeadstartError
from headstart.learn.heads import softmax
from headstart.data.images import load_image

TINY = dict(image_size=32, workers=0, seed=0)
FP32 = dict(engine="torch", precision="fp32")


@pytest.fixture(scope="module")
def flip_run(fmnist_tiny, tmp_path_factory, one_torch_thread):
    """A tiny feature-extraction run (real MobileNetV2 weights) with flips at test time."""
    out = tmp_path_factory.mktemp("runs") / "flip"
    run = headstart.train(fmnist_tiny, out=out, cache_dir=out.parent / "cache", strategy="feature-extraction",
                          tta="flip", **TINY)
    return run, out


def _test_paths(fmnist_tiny: Path, n: int = 6) -> list[Path]:
    return sorted((fmnist_tiny / "test").rglob("*.png"))[:n]


def _views(model, images) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of the preprocessed images and of the same tensors mirrored, by hand through torch."""
    transform = model.preprocessing.transform()
    x = torch.stack([transform(im) for im in images])  # (n, 3, 32, 32)
    model.backbone.eval()
    with torch.inference_mode():
        one = [softmax(model.head(model.backbone(v)).double().numpy()) for v in (x, x.flip(-1))]
    return one[0], one[1]


def test_flip_prediction_is_the_mean_of_the_two_views(flip_run, fmnist_tiny, tmp_path):
    run, _ = flip_run
    model = run.model
    assert model.tta == "flip" and model.feature_width == 2 * model.entry.feature_dim
    paths = _test_paths(fmnist_tiny)
    image, mirror = _views(model, [load_image(p) for p in paths])
    assert np.abs(image - mirror).max() > 1e-3  # the mirror is a different view: the test can tell them apart
    want = (image + mirror) / 2
    from_files = model.predict_proba(paths, cache_dir=tmp_path / "cache", workers=0, **FP32)
    from_cache = model.predict_proba(paths, cache_dir=tmp_path / "cache", workers=0, **FP32)  # both views cached
    in_memory = model.predict_proba([load_image(p) for p in paths], cache_dir="none", **FP32)
    assert np.allclose(from_files, want, atol=1e-6) and np.allclose(in_memory, want, atol=1e-6)
    assert np.array_equal(from_files, from_cache)
    top = model.predict(paths, top_k=1, cache_dir=tmp_path / "cache", workers=0, **FP32)
    assert [p.label for p in top] == [model.classes[i] for i in want.argmax(1)]


def test_the_mirror_view_has_its_own_cache_namespace(flip_run):
    model = flip_run[0].model
    choice = model.engine(**FP32).choice
    image, mirror = model.namespace(choice), model.namespace(choice, "mirror")
    assert "view" not in image and mirror == {**image, "view": "mirror"}  # plain keys as before, so caches stay warm


def test_evaluate_reproduces_a_flip_runs_accuracy_exactly(flip_run, fmnist_tiny):
    run, out = flip_run
    meta = json.loads((out / "model" / META).read_text())
    config = json.loads((out / "config.json").read_text())
    assert meta["tta"] == "flip" and config["resolved_tta"] == "flip" and config["tta_decision"] is None
    assert "| test-time views | flip (asked for (--tta)) |" in (out / "report.md").read_text()
    own = headstart.evaluate(out, cache_dir=out.parent / "cache")
    assert own["accuracy"] == run.metrics["test"]["accuracy"]
    assert own["confusion_matrix"] == run.metrics["test"]["confusion_matrix"]
    folder = headstart.evaluate(out, fmnist_tiny / "test")  # the default cache: features computed again
    assert folder["accuracy"] == run.metrics["test"]["accuracy"]


def test_bundle_round_trip_keeps_tta_and_older_bundles_load_without(flip_run, tmp_path):
    _, out = flip_run
    again = headstart.load(save_bundle(headstart.load(out), tmp_path / "copy"))
    assert again.tta == "flip"
    meta = json.loads((out / "model" / META).read_text())
    old = tmp_path / "old"
    save_bundle(again, old)
    del meta["tta"]  # as every bundle saved before test-time flips
    (old / META).write_text(json.dumps(meta))
    assert headstart.load(old).tta == "none"
    (old / META).write_text(json.dumps({**meta, "tta": "rotate"}))
    with pytest.raises(BundleError, match="'tta' is 'rotate'"):
        headstart.load(old)


def test_the_server_averages_the_views_too(flip_run, fmnist_tiny):
    from headstart.serve.app import Predictor

    model = flip_run[0].model
    paths = _test_paths(fmnist_tiny, 3)
    server = Predictor(model, cache_dir="none", **FP32)
    got = server.submit([server.decode(p.read_bytes()) for p in paths]).result(timeout=120)
    want = model.predict_proba(paths, cache_dir="none", workers=0, **FP32)
    assert np.allclose(got, want, atol=1e-6)


def test_the_onnx_export_computes_the_flip_average(flip_run, fmnist_tiny, tmp_path):
    import onnxruntime as ort

    from headstart.runs.export import export_onnx

    model = flip_run[0].model
    path = export_onnx(model, tmp_path / "onnx")
    meta = json.loads((path.parent / "model.onnx.json").read_text())
    assert meta["test_time_augmentation"]["name"] == "flip"
    paths = _test_paths(fmnist_tiny)
    transform = model.preprocessing.transform()
    x = torch.stack([transform(load_image(p)) for p in paths]).numpy()
    logits, proba = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits", "probabilities"], {"image": x})
    want = model.predict_proba(paths, cache_dir="none", workers=0, **FP32)
    assert np.abs(proba - want).max() < 1e-5  # the export agreement test's tolerance on probabilities
    assert np.allclose(softmax(logits.astype(np.float64)), proba, atol=1e-6)
    plain = np.mean(_views(model, [load_image(p) for p in paths])[:1], axis=0)
    assert np.abs(proba - plain).max() > 1e-3  # not the image alone


def test_auto_keeps_flips_only_where_validation_says_they_pay():
    y = np.array([0, 1, 1, 0])
    image = np.array([[0.6, 0.4], [0.45, 0.55], [0.4, 0.6], [0.7, 0.3]])
    better = np.array([[0.8, 0.2], [0.3, 0.7], [0.3, 0.7], [0.8, 0.2]])
    chosen = choose_tta(y, image, better)
    assert chosen["tta"] == "flip" and chosen["measurements"]["val_flip"]["log_loss"] < \
        chosen["measurements"]["val_image"]["log_loss"]
    worse = np.array([[0.55, 0.45], [0.6, 0.4], [0.45, 0.55], [0.6, 0.4]])  # one more mistake
    assert choose_tta(y, image, worse)["tta"] == "none"
    surer_but_wrong_once = np.array([[0.9, 0.1], [0.55, 0.45], [0.1, 0.9], [0.9, 0.1]])  # lower loss, less accurate
    assert choose_tta(y, image, surer_but_wrong_once)["tta"] == "none"


@pytest.mark.slow
def test_auto_measures_flips_after_fine_tuning_with_flips_and_not_after_feature_extraction(fmnist_tiny, tmp_path,
                                                                                        one_torch_thread):
    ft = headstart.train(fmnist_tiny, out=tmp_path / "ft", cache_dir=tmp_path / "cache", strategy="fine-tune",
                         finetune=dict(epochs=1, unfreeze=2), **TINY)
    decision = ft.config["tta_decision"]
    assert decision["tta"] == ft.model.tta == ft.config["resolved_tta"]
    assert set(decision["measurements"]) >= {"val_image", "val_flip"}
    assert decision["measurements"]["n_val"] == ft.metrics["n_val"]
    assert decision["measurements"]["flip_seconds_per_1000_images"] > 0  # the cost auto weighs, measured
    assert headstart.evaluate(tmp_path / "ft", cache_dir=tmp_path / "cache")["accuracy"] == \
        ft.metrics["test"]["accuracy"]
    fe = headstart.train(fmnist_tiny, out=tmp_path / "fe", cache_dir=tmp_path / "cache",
                         strategy="feature-extraction", **TINY)
    assert fe.model.tta == "none" and "not trained on mirror images" in fe.config["tta_decision"]["reasons"][0]


def test_cli_and_api_refuse_an_unknown_tta(fmnist_tiny, tmp_path, capsys):
    from headstart import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", str(fmnist_tiny), "--tta", "rotate", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "argument --tta: invalid choice: 'rotate'" in capsys.readouterr().err
    with pytest.raises(HeadstartError, match="--tta must be one of"):
        headstart.train(fmnist_tiny, tta="rotate", out=tmp_path / "run")
