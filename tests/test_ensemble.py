"""`--strategy ensemble`: the members' probabilities averaged, the same way in the run, evaluate, predict,
the Python API, export and serve; the bundle layout; auto's rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.strategies import configure
from headstart.strategies.auto import ENSEMBLE_MAX_SIDE, ENSEMBLE_MIN_PER_CLASS, choose_ensemble, keep_ensemble
from headstart.models.bundle import save as save_bundle
from headstart.models.ensemble import Ensemble
from headstart.errors import BundleError, HeadstartError
from headstart.data.images import ImageError
from headstart.settings import ENSEMBLE, TrainConfig
from test_cli import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(strategy="feature-extraction", backbone="small_cnn", weights="none", workers=0, cache_dir="none")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two small random CNNs with linear heads on the same tiny data, at two sizes (so two preprocessings)."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("ens")
    data = write_image_folder(root / "data", n_per_class=10, classes=("cat", "dog", "owl"))
    a = headstart.train(data, image_size=32, seed=0, out=root / "a", **SMALL)
    b = headstart.train(data, image_size=48, seed=1, out=root / "b", **SMALL)
    ensemble = Ensemble([headstart.load(a.run_dir), headstart.load(b.run_dir)], names=["first", "second"])
    bundle = save_bundle(ensemble, root / "ensemble")
    return data, bundle, [a.run_dir / "model", b.run_dir / "model"]


def _images(data: Path) -> list[Path]:
    return sorted(data.rglob("*.png"))


def test_probabilities_are_exactly_the_mean_of_the_members(members):
    data, bundle, member_dirs = members
    ensemble = headstart.load(bundle)
    images = _images(data)
    want = np.mean([headstart.load(d).predict_proba(images, cache_dir="none") for d in member_dirs], axis=0)
    got = ensemble.predict_proba(images, cache_dir="none")
    assert np.array_equal(got, want)
    assert got.shape == (len(images), 3) and np.allclose(got.sum(1), 1)
    # a member alone differs: the average is not one member's answer
    assert not np.allclose(got, headstart.load(member_dirs[0]).predict_proba(images, cache_dir="none"))


def test_bundle_round_trip_layout_and_classes(members, tmp_path):
    _, bundle, member_dirs = members
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["strategy"] == "ensemble" and "mean" in meta["averaging"]
    assert [m["path"] for m in meta["members"]] == ["members/0", "members/1"]
    assert [m["name"] for m in meta["members"]] == ["first", "second"]
    for i in range(2):  # each member is an ordinary bundle, loadable alone
        assert isinstance(headstart.load(bundle / "members" / str(i)), headstart.Model)
    loaded = headstart.load(bundle)
    assert isinstance(loaded, Ensemble) and loaded.classes == ["cat", "dog", "owl"]
    assert [m.preprocessing.crop_size for m in loaded.members] == [32, 48]
    assert isinstance(headstart.load(member_dirs[0]), headstart.Model)  # bundles of before still load alone

    # members must agree on their classes
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    m1 = json.loads((bad / "members" / "1" / "model.json").read_text())
    m1["classes"] = ["cat", "owl", "dog"]
    (bad / "members" / "1" / "model.json").write_text(json.dumps(m1))
    with pytest.raises(BundleError, match="same classes in the same order"):
        headstart.load(bad)
    shutil.rmtree(bad / "members" / "1")
    with pytest.raises(BundleError, match="missing"):
        headstart.load(bad)


def test_predict_keeps_inputs_aligned_with_a_broken_file(members, tmp_path):
    data, bundle, _ = members
    ensemble = headstart.load(bundle)
    images = _images(data)[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    inputs = [images[0], broken, images[1], tmp_path / "missing.png", images[2]]
    proba = ensemble.predict_proba(inputs, cache_dir="none", errors="nan")
    alone = ensemble.predict_proba([images[0], images[1], images[2]], cache_dir="none")
    assert np.isnan(proba[[1, 3]]).all()
    assert np.allclose(proba[[0, 2, 4]], alone, atol=1e-6)
    with pytest.raises(ImageError, match="2 of 5 inputs cannot be used"):
        ensemble.predict_proba(inputs, cache_dir="none")
    preds = ensemble.predict(inputs, top_k=2, cache_dir="none")
    assert [p.ok for p in preds] == [True, False, True, False, True]
    assert preds[0].top[0][1] == pytest.approx(alone[0].max())
    code, stdout, stderr = run_cli("predict", bundle, images[0], broken, "--json", "--top-k", "3",
                                   "--cache-dir", "none")
    assert code == 0, stderr
    out = json.loads(stdout)
    got = {p["class"]: p["probability"] for p in out["predictions"][0]["predictions"]}
    assert np.allclose([got[c] for c in ensemble.classes], alone[0], atol=1e-6)
    assert [s["path"] for s in out["skipped"]] == [str(broken)]


def test_evaluate_a_bundle_scores_the_average(members):
    data, bundle, _ = members
    ensemble = headstart.load(bundle)
    metrics = headstart.evaluate(bundle, data, cache_dir="none")
    images = _images(data)
    y = np.array([ensemble.classes.index(p.parent.name) for p in images])
    proba = ensemble.predict_proba(images, cache_dir="none")
    assert metrics["accuracy"] == pytest.approx(float((proba.argmax(1) == y).mean()))


def test_export_one_input_per_member_and_a_json_only_client_agrees(members, tmp_path):
    pytest.importorskip("onnxruntime")
    from test_export import _client

    data, bundle, _ = members
    export_dir = tmp_path / "onnx"
    code, _, stderr = run_cli("export", bundle, "--out", export_dir)
    assert code == 0, stderr
    meta = json.loads((export_dir / "model.onnx.json").read_text())
    assert meta["strategy"] == "ensemble" and [i["name"] for i in meta["inputs"]] == ["image_0", "image_1"]
    assert [i["preprocessing"]["parameters"]["crop_size"] for i in meta["inputs"]] == [32, 48]
    assert [m["name"] for m in meta["members"]] == ["first", "second"]
    images = _images(data)[::4]
    got = _client(export_dir, images)
    assert got["modules"] == [] and got["classes"] == ["cat", "dog", "owl"]
    want = headstart.load(bundle).predict_proba(images, cache_dir="none", precision="fp32")
    assert np.abs(np.array(got["probabilities"]) - want).max() < 1e-5


def test_serve_answers_the_ensembles_probabilities(members):
    from headstart.serve.app import Predictor, model_info

    data, bundle, _ = members
    ensemble = headstart.load(bundle)
    images = _images(data)[:3]
    predictor = Predictor(ensemble, cache_dir="none")
    decoded = [predictor.decode(p.read_bytes()) for p in images]
    got = predictor.submit(decoded).result(timeout=120)
    want = ensemble.predict_proba(images, cache_dir="none")
    assert np.allclose(got, want, atol=1e-5)
    # One averaging: the server hands the members' features to the ensemble, so whatever the ensemble does with
    # them is the server's answer too; here its mean with the columns reversed, a change no answer could hide.
    ensemble.proba_from_features = lambda feats: np.mean(ensemble.member_probas(feats), axis=0)[:, ::-1]
    got = predictor.submit(decoded).result(timeout=120)
    assert np.allclose(got, ensemble.predict_proba(images, cache_dir="none"), atol=1e-5)
    assert not np.allclose(got, want, atol=1e-3)
    info = model_info(ensemble, predictor.choices, bundle)
    assert info["strategy"] == "ensemble" and [m["image_size"] for m in info["members"]] == [32, 48]
    choices = [e.choice for e in ensemble.engine(cache_root=None)]
    assert [m["engine"] for m in info["members"]] == [c.to_dict() for c in choices]
    assert (info["engine"]["engine"], info["engine"]["precision"]) == (choices[0].engine, choices[0].precision)


# ------------------------------------------------------------------------------------------------ settings, auto


def test_settings_defaults_in_one_place_and_checked():
    cfg = configure(TrainConfig(data="x", strategy="ensemble"))
    assert cfg.finetune.epochs == ENSEMBLE.finetune_epochs and cfg.scratch_epochs == ENSEMBLE.scratch_epochs
    cfg = configure(TrainConfig(data="x", strategy="ensemble", finetune={"epochs": 3}, scratch_epochs=5))
    assert (cfg.finetune.epochs, cfg.scratch_epochs) == (3, 5)
    with pytest.raises(HeadstartError, match="--scratch-epochs"):
        configure(TrainConfig(data="x", strategy="fine-tune", scratch_epochs=3))
    with pytest.raises(HeadstartError, match="at least 1"):
        configure(TrainConfig(data="x", strategy="ensemble", scratch_epochs=0))
    with pytest.raises(HeadstartError, match="--resume"):
        configure(TrainConfig(data="x", strategy="ensemble", resume=True))


def test_auto_trains_an_ensemble_on_small_images_with_many_per_class_only():
    yes = choose_ensemble(28.0, 900)  # FMNIST-TL
    assert yes["ensemble"] and "28 px" in yes["reasons"][0]
    photos = choose_ensemble(375.0, 900)  # photos: no scratch member
    assert not photos["ensemble"] and f"over {ENSEMBLE_MAX_SIDE} px" in photos["reasons"][0]
    few = choose_ensemble(28.0, ENSEMBLE_MIN_PER_CLASS - 1)
    assert not few["ensemble"] and "too few" in few["reasons"][0]
    assert choose_ensemble(ENSEMBLE_MAX_SIDE, ENSEMBLE_MIN_PER_CLASS)["ensemble"]  # the bounds are inclusive
    assert not choose_ensemble(None, 900)["ensemble"]
    assert not choose_ensemble(28.0, 900, world_size=2)["ensemble"]


def test_auto_keeps_the_ensemble_only_when_it_wins_on_validation():
    member = {"accuracy": 0.90, "log_loss": 0.30}
    assert keep_ensemble(member, {"accuracy": 0.91, "log_loss": 0.25})[0]
    assert not keep_ensemble(member, {"accuracy": 0.89, "log_loss": 0.25})[0]  # lower accuracy
    assert not keep_ensemble(member, {"accuracy": 0.92, "log_loss": 0.31})[0]  # higher log loss
    assert keep_ensemble(member, {"accuracy": 0.90, "log_loss": 0.29})[0]


def test_auto_on_large_images_trains_no_scratch_member(tmp_path):
    """Photos-sized images: auto's rule says no ensemble, so no members/ folder (feature extraction here)."""
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(160, 128))
    run = headstart.train(data, strategy="auto", backbone="small_cnn", weights="none", image_size=32, workers=0,
                          cache_dir="none", out=tmp_path / "run")
    decision = run.config["strategy_decision"]["ensemble"]
    assert decision["ensemble"] is False and "128 px" in decision["reasons"][0]
    assert not (run.run_dir / "members").exists()


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.mark.slow
def test_cli_ensemble_run_records_members_and_evaluate_reproduces_it(fmnist_tiny, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", fmnist_tiny, "--strategy", "ensemble", "--epochs", "1", "--unfreeze", "2",
                                   "--scratch-epochs", "1", "--image-size", "32", "--workers", "0", "--out", out,
                                   "--cache-dir", tmp_path / "cache", "--json")
    assert code == 0, stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["strategy"] == config["resolved_strategy"] == "ensemble" and config["scratch_epochs"] == 1
    assert [m["name"] for m in config["ensemble"]["members"]] == ["fine-tune", "scratch"]
    members = metrics["ensemble"]["members"]
    assert [m["strategy"] for m in members] == ["fine-tune", "scratch"]
    assert members[1]["backbone"] == "small_cnn" and members[1]["image_size"] == 32  # its native size
    for m in members:
        assert set(m["val"]) == {"accuracy", "log_loss"} and m["wall_seconds"] > 0 and m["test_accuracy"] is not None
        member_metrics = json.loads((out / m["run"] / "metrics.json").read_text())
        assert member_metrics["test"]["accuracy"] == m["test_accuracy"]
        assert member_metrics["fine_tune"]["epochs_run"] == 1
    assert metrics["val_accuracy"] == metrics["ensemble"]["val"]["accuracy"]
    assert metrics["ensemble"]["test_accuracy"] == metrics["test"]["accuracy"]
    assert "## Ensemble members" in (out / "report.md").read_text()
    assert not list(out.rglob("*.checkpoints"))
    model = headstart.load(out)
    assert isinstance(model, Ensemble) and model.names == ["fine-tune", "scratch"]
    code, stdout, stderr = run_cli("evaluate", out, "--json", "--cache-dir", tmp_path / "cache")
    assert code == 0, stderr[-3000:]
    own = json.loads(stdout)
    assert own["accuracy"] == metrics["test"]["accuracy"]
    assert own["confusion_matrix"] == metrics["test"]["confusion_matrix"]


@pytest.mark.slow
def test_auto_ensemble_decides_on_validation_and_says_why(fmnist_tiny, tmp_path, monkeypatch):
    """auto's thresholds lowered to the tiny data's: auto fine-tunes, trains a scratch member beside it, and
    keeps the average or the fine-tuned member alone by their validation scores."""
    from headstart.strategies import auto

    monkeypatch.setattr(auto, "MIN_PER_CLASS", 5)
    monkeypatch.setattr(auto, "ENSEMBLE_MIN_PER_CLASS", 5)
    run = headstart.train(fmnist_tiny, strategy="auto", finetune=dict(epochs=1, unfreeze=2), scratch_epochs=1,
                          image_size=32, workers=0, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    decision = run.config["strategy_decision"]
    assert decision["ensemble"] is True and decision["first_member"]["strategy"] == "fine-tune"
    m = decision["measurements"]
    kept = m["val_ensemble"]["log_loss"] < m["val_fine-tune"]["log_loss"] and \
        m["val_ensemble"]["accuracy"] >= m["val_fine-tune"]["accuracy"]
    assert decision["kept"] is kept and run.metrics["ensemble"]["kept"] is kept
    assert isinstance(run.model, Ensemble) is kept
    assert run.config["resolved_strategy"] == ("ensemble" if kept else "fine-tune")
    assert ("both members kept" if kept else "fine-tuned member kept alone") in decision["reasons"][-1]
    assert (run.run_dir / "members" / "scratch" / "model" / "model.json").is_file()
    assert headstart.evaluate(run.run_dir, cache_dir=tmp_path / "cache")["accuracy"] == run.metrics["test"]["accuracy"]
