"""Typed settings (settings.py): validated once, the same errors from the API and the CLI, the CLI's
choices and fine-tuning flags from the dataclasses, and saved configs that no longer match."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import headstart
from headstart.strategies import configure, list_strategies
from headstart import cli, settings
from headstart.engines import rule as engine
from headstart.learn import finetune
from headstart.errors import HeadstartError
from headstart.settings import FineTuneSettings, Runtime, TrainConfig
from test_cli import run_cli


def test_the_cli_offers_the_modules_choices():
    parser = cli.get_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    assert list(actions["strategy"].choices) == list_strategies()
    assert tuple(actions["engine"].choices) == ("auto", *engine.ENGINES)
    assert tuple(actions["augment"].choices) == finetune.AUGMENTS
    assert tuple(actions["schedule"].choices) == finetune.SCHEDULES
    assert engine.ENGINES is settings.ENGINES and finetune.FineTuneSettings is FineTuneSettings
    from headstart.learn import heads

    assert tuple(heads.HEADS) == settings.HEADS == tuple(actions["head"].choices)  # settings.py stays torch-free


def test_every_fine_tuning_field_is_a_train_flag_and_reaches_train(monkeypatch, tmp_path):
    flags = {f.name for f in FineTuneSettings.cli_fields()}
    assert flags == {f.name for f in dataclasses.fields(FineTuneSettings)} - {"batch_size"}
    seen = {}
    monkeypatch.setattr("headstart.runs.train.train", lambda data, **kw: seen.update(kw) or (_ for _ in ()).throw(
        HeadstartError("stop")))
    args = ["--unfreeze", "3", "--epochs", "2", "--lr", "0.01", "--lr-head", "0.1", "--lr-decay", "0.5",
            "--optimizer", "adam", "--weight-decay", "0", "--label-smoothing", "0", "--schedule", "constant",
            "--augment", "none", "--bn-update", "--early-stop-metric", "val_loss", "--patience", "2",
            "--time-budget", "2m", "--sampler", "balanced"]
    code, _, _ = run_cli("train", tmp_path, *args)
    assert code == 2
    assert seen["finetune"] == {"unfreeze": "3", "epochs": 2, "lr": 0.01, "lr_head": 0.1, "lr_decay": 0.5,
                                "optimizer": "adam", "weight_decay": 0.0, "label_smoothing": 0.0,
                                "schedule": "constant", "augment": "none", "bn_update": True,
                                "early_stop_metric": "val_loss", "patience": 2, "time_budget": 120.0,
                                "sampler": "balanced"}
    assert set(seen) == {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "resume", "finetune_given"}
    # and train's config takes exactly them, typed
    cfg = configure(TrainConfig(data="x", strategy="fine-tune", finetune=seen["finetune"]))
    assert cfg.finetune.unfreeze == 3 and cfg.finetune.time_budget == 120.0


@pytest.mark.parametrize("finetune, strategy, match", [
    ({"unfreeze": "some"}, "fine-tune", "--unfreeze takes a number of blocks or 'all', not 'some'"),
    ({"epochs": 3}, "feature-extraction", "--epochs.*fine-tune"),
    ({"augment": "heavy"}, "fine-tune", "--augment must be one of none, flip, light, standard"),
    ({"sampler": "uniform"}, "auto", "--sampler must be one of balanced"),
    ({"epochs": 0}, "scratch", "--epochs must be at least 1"),
])
def test_the_api_and_the_cli_refuse_the_same_settings_with_the_same_words(finetune, strategy, match, image_folder,
                                                                          tmp_path, capsys):
    with pytest.raises(HeadstartError, match=match):
        headstart.train(image_folder, strategy=strategy, finetune=finetune, out=tmp_path / "r")
    flags = [a for k, v in finetune.items() for a in ("--" + k.replace("_", "-"), str(v))]
    if "augment" in finetune or "sampler" in finetune:  # argparse's choices say it first, as usage
        with pytest.raises(SystemExit):
            cli.main(["train", str(image_folder), "--strategy", strategy, *flags])
        assert "invalid choice" in capsys.readouterr().err
    else:
        code, _, stderr = run_cli("train", image_folder, "--strategy", strategy, "--out", tmp_path / "r", *flags)
        assert code == 2 and pytest.importorskip("re").search(match, stderr), stderr
    assert not (tmp_path / "r").exists()


def test_rules_the_cli_enforced_now_hold_for_the_api(image_folder, tmp_path):
    with pytest.raises(HeadstartError, match="--head must be one of linear, mlp"):
        headstart.train(image_folder, head="svm", out=tmp_path / "r")
    with pytest.raises(HeadstartError, match="--class-weight must be balanced"):
        headstart.train(image_folder, class_weight="inverse", out=tmp_path / "r")
    with pytest.raises(HeadstartError, match="--device must be auto, cpu or cuda"):
        headstart.train(image_folder, device="tpu", out=tmp_path / "r")
    with pytest.raises(HeadstartError, match="--batch-size must be a whole number of at least 1"):
        headstart.train(image_folder, batch_size=0, out=tmp_path / "r")
    with pytest.raises(HeadstartError, match="--cv 1: K-fold cross-validation needs 2 <= K"):
        headstart.train(image_folder, strategy="feature-extraction", cv=1, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_finetune_is_typed_after_validation():
    cfg = configure(TrainConfig(data="x", strategy="scratch", finetune={"epochs": 3}))
    assert isinstance(cfg.finetune, FineTuneSettings)
    assert (cfg.finetune.epochs, cfg.finetune.unfreeze, cfg.finetune.bn_update) == (3, "all", True)  # scratch's own
    assert cfg.finetune_given == ("epochs",) and cfg.weights == "none" and cfg.backbone == "small_cnn"
    assert configure(TrainConfig(data="x", strategy="feature-extraction")).finetune is None
    given = FineTuneSettings(epochs=2)
    assert configure(TrainConfig(data="x", strategy="fine-tune", finetune=given)).finetune.epochs == 2
    d = configure(TrainConfig(data="x", strategy="fine-tune", finetune={"lr": 0.5})).to_dict()
    assert d["finetune"]["lr"] == 0.5 and "finetune_given" not in d  # config.json's layout: a plain dict
    assert json.loads(json.dumps(d)) == d


def test_runtime_takes_the_older_loose_keywords_and_checks_them():
    rt = Runtime(engine="torch", batch_size=8)
    assert Runtime.of(rt, precision="fp32") == Runtime(engine="torch", precision="fp32", batch_size=8)
    assert Runtime.of(None, workers=0).workers == 0 and Runtime.of(rt) is rt
    with pytest.raises(TypeError, match="unexpected keyword argument batchsize"):
        Runtime.of(None, batchsize=8)
    with pytest.raises(HeadstartError, match="--engine must be one of auto, onnxruntime"):
        Runtime(engine="onnx")
    with pytest.raises(HeadstartError, match="--workers must be a whole number"):
        Runtime(workers=-1)


def _saved_config(**changes) -> dict:
    """What a fine-tuning run saves for --resume (finetune_run._resumable_config), changed."""
    d = configure(TrainConfig(data="/data", strategy="scratch", out="/runs/r")).to_dict()
    d.pop("resume")
    d.update(changes)
    return d


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "key 'colour' is not a setting of this version"),
    ({"seed": "zero"}, "key 'seed' should be int, not 'zero'"),
    ({"finetune": {"epochs": 3, "warmup": 2}}, "key 'finetune.warmup' is not a setting"),
    ({"finetune": {"epochs": "3"}}, "key 'finetune.epochs' should be int"),
    ({"data": None}, "key 'data' should be str"),
])
def test_resume_with_a_saved_config_that_no_longer_matches_says_which_key(change, words, tmp_path):
    ckpt = tmp_path / "r.checkpoints"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(_saved_config(**change)))
    with pytest.raises(HeadstartError) as err:
        headstart.resume(tmp_path / "r")
    assert words in str(err.value) and str(ckpt / "config.json") in str(err.value)
    assert "train the run again" in str(err.value)
    code, _, stderr = run_cli("train", "--resume", tmp_path / "r")
    assert code == 2 and words in stderr and "Traceback" not in stderr


def test_resume_with_a_missing_required_key(tmp_path):
    ckpt = tmp_path / "r.checkpoints"
    ckpt.mkdir()
    saved = _saved_config()
    del saved["data"]
    (ckpt / "config.json").write_text(json.dumps(saved))
    with pytest.raises(HeadstartError, match="key 'data' is missing"):
        headstart.resume(tmp_path / "r")


def test_a_saved_config_missing_an_optional_key_takes_its_default(tmp_path):
    """Keys an older version did not write: that version did what the default does."""
    saved = _saved_config()
    del saved["tensorboard"], saved["finetune"]["sampler"]
    cfg = configure(TrainConfig.from_saved(saved, tmp_path / "config.json"))
    assert cfg.tensorboard is False and cfg.finetune.sampler is None and cfg.finetune.epochs == 15


@pytest.mark.parametrize("change, words", [
    (lambda c: c["requested_engine"].update(device=3), "key 'requested_engine.device': --device must be"),
    (lambda c: c["requested_engine"].update(speed="fast"), "key 'requested_engine.speed' is not an engine setting"),
    (lambda c: c.update(requested_engine="torch"), "key 'requested_engine' should be an object"),
    (lambda c: c.update(classes="a,b"), "key 'classes' should be a list of class names"),
])
def test_evaluate_with_an_edited_config_says_which_key(change, words, small_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadstartError) as err:
        headstart.evaluate(run)
    assert words in str(err.value) and str(run / "config.json") in str(err.value)
    code, _, stderr = run_cli("evaluate", run)
    assert code == 2 and words in stderr and "Traceback" not in stderr


def test_evaluate_takes_a_runtime_and_the_loose_keywords_alike(small_run):
    a = headstart.evaluate(small_run, runtime=Runtime(engine="torch", batch_size=4, cache_dir="none"))
    b = headstart.evaluate(small_run, engine="torch", batch_size=4, cache_dir="none")
    assert a["accuracy"] == b["accuracy"] and a["n_images"] == b["n_images"] > 0
    model = headstart.load(small_run)
    paths = sorted(str(p) for p in (small_run.parent / "data").rglob("*.png"))[:3]
    p1 = model.predict_proba(paths, Runtime(engine="torch", cache_dir="none"))
    p2 = model.predict_proba(paths, engine="torch", cache_dir="none")
    assert np.array_equal(p1, p2)
