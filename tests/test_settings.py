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
    ({"epochs": 0}, "scratch", "--epochs must be a whole number of at least 1, not 0"),
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


IMPOSSIBLE = [  # (flags, the words of the refusal); issue 29: --image-size 0 was refused only after the scan
    (["--image-size", "0"], "--image-size must be a whole number of at least 16 and at most 2048, not 0"),
    (["--image-size", "-5"], "--image-size must be a whole number of at least 16"),
    (["--image-size", "100000"], "--image-size must be a whole number of at least 16 and at most 2048"),
    (["--val-fraction", "1.5"], "--val-fraction must be a number of at least 0 and below 1, not 1.5"),
    (["--val-fraction", "nan"], "--val-fraction must be a number of at least 0 and below 1, not nan"),
    (["--test-fraction", "-0.1"], "--test-fraction must be a number of at least 0 and below 1"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"],
     "--val-fraction 0.5 and --test-fraction 0.5 leave no training images; their sum must be below 1"),
    (["--seed", "-1"], "--seed must be a whole number of at least 0 and at most 4294967295"),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1, not 0"),
    (["--workers", "-1"], "--workers must be a whole number of at least 0 and at most 256, not -1"),
    (["--workers", "100000"], "--workers must be a whole number of at least 0 and at most 256"),
    (["--strategy", "feature-extraction", "--cv", "1"], "--cv 1: K-fold cross-validation needs 2 <= K"),
    (["--strategy", "fine-tune", "--epochs", "0"], "--epochs must be a whole number of at least 1, not 0"),
    (["--strategy", "fine-tune", "--lr", "0"], "--lr must be a positive number, not 0.0"),
    (["--strategy", "fine-tune", "--lr-head", "inf"], "--lr-head must be a positive number, not inf"),
    (["--strategy", "fine-tune", "--label-smoothing", "1"], "--label-smoothing must be a number of at least 0 and below 1"),
    (["--strategy", "fine-tune", "--weight-decay", "-0.5"], "--weight-decay must be a number of at least 0"),
    (["--strategy", "fine-tune", "--patience", "0"], "--patience must be a whole number of at least 1"),
    (["--strategy", "fine-tune", "--time-budget", "0s"], "--time-budget must be a positive number"),
    (["--strategy", "ensemble", "--scratch-epochs", "0"], "--scratch-epochs must be a whole number of at least 1"),
]


@pytest.mark.parametrize("flags, words", IMPOSSIBLE, ids=[" ".join(f) for f, _ in IMPOSSIBLE])
def test_impossible_values_are_refused_before_the_folder_is_scanned(flags, words, image_folder, tmp_path, monkeypatch):
    """The CLI and the API refuse them with the same words, before the data folder is listed or anything made."""
    from headstart.data import folders

    scans = []
    monkeypatch.setattr(folders, "scan_folder", lambda *a, **k: scans.append(a) or pytest.fail("scanned"))
    code, _, stderr = run_cli("train", image_folder, "--out", tmp_path / "r", *flags)
    assert code == 2 and f"headstart: error: {words}" in stderr, stderr
    assert "Traceback" not in stderr and "[headstart]" not in stderr  # not one line of work logged
    # the API: the same settings as keywords, the same words
    import typing

    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(FineTuneSettings)}
    kw = {}
    for flag, text in zip(flags[::2], flags[1::2]):
        name = flag[2:].replace("-", "_")
        kind = float if float in (hints[name], *typing.get_args(hints[name])) else int
        value = text if name in ("strategy", "time_budget") else kind(text)  # as argparse types them
        if name in {f.name for f in dataclasses.fields(FineTuneSettings)}:
            kw.setdefault("finetune", {})[name] = value
        else:
            kw[name] = value
    with pytest.raises(HeadstartError) as refused:
        headstart.train(image_folder, out=tmp_path / "r", **kw)
    assert words in str(refused.value)
    assert scans == [] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [True, "3", 2.5, None])
def test_a_limit_takes_numbers_of_its_kind_only(value):
    """`Limit.accepts`: a bool is no number, a string is not parsed, a whole number is whole (None: not set)."""
    if value is None:
        settings.check_limits(epochs=None)  # nothing to check
        return
    with pytest.raises(HeadstartError, match="--epochs must be a whole number of at least 1"):
        settings.check_limits(epochs=value)


def test_every_numeric_limit_says_its_range_in_words():
    words = {name: limit.words() for name, limit in settings.LIMITS.items()}
    assert words["image_size"] == "a whole number of at least 16 and at most 2048"
    assert words["val_fraction"] == "a number of at least 0 and below 1"
    assert words["lr"] == "a positive number" and words["top_k"] == "a whole number of at least 1"
    assert settings.LIMITS["port"].accepts(65535) and not settings.LIMITS["port"].accepts(65536)
    assert settings.LIMITS["val_fraction"].accepts(0) and not settings.LIMITS["val_fraction"].accepts(1.0)


@pytest.mark.parametrize("args, words", [
    (["predict", "no-such-run", "x.png", "--top-k", "0"], "--top-k must be a whole number of at least 1, not 0"),
    (["predict", "no-such-run", "x.png", "--batch-size", "0"], "--batch-size must be a whole number of at least 1"),
    (["serve", "no-such-run", "--port", "70000"], "--port must be a whole number of at least 1 and at most 65535"),
    (["serve", "no-such-run", "--top-k", "-1"], "--top-k must be a whole number of at least 1, not -1"),
    (["evaluate", "no-such-run", "--batch-size", "-3"], "--batch-size must be a whole number of at least 1"),
    (["extract", "no-such-folder", "--image-size", "0"], "--image-size must be a whole number of at least 16"),
    (["extract", "no-such-folder", "--workers", "-1"], "--workers must be a whole number of at least 0"),
    (["compare", "no-such-folder", "--out", "OUT", "--epochs", "0"], "--epochs must be a whole number of at least 1"),
    (["compare", "no-such-folder", "--out", "OUT", "--seed", "-2"], "--seed must be a whole number of at least 0"),
    (["datasets", "prepare", "fashion-mnist", "OUT", "--per-class", "0"], "per_class must be a positive whole number"),
])
def test_the_other_commands_refuse_impossible_values_before_any_work(args, words, tmp_path, monkeypatch):
    """Before the run is loaded (no 'does not exist' about it), the folder read or --out made."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(*args)
    assert code == 2 and words in stderr, stderr
    assert "does not exist" not in stderr and not (tmp_path / "OUT").exists()


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
