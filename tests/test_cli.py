"""End to end through the `headstart` command, on a small real Fashion-MNIST subset with the
real ImageNet MobileNetV2 weights (from the offline weights package)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import headstart
from headstart import cli
from headstart.engines.rule import choose_engine

from conftest import MEASURED, count_network_batches, tree_digest, write_image_folder


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_a_command_skips_the_last_garbage_collections_at_exit(monkeypatch):
    """cli._quick_exit: gc.freeze runs at exit, registered once per process however many commands run."""
    import gc

    registered, real = [], cli.atexit.register

    def register(f, *args, **kwargs):  # modules first imported by the command register their own handlers
        return registered.append(f) if f is gc.freeze else real(f, *args, **kwargs)

    monkeypatch.setattr(cli.atexit, "register", register)
    cli._quick_exit.cache_clear()
    try:
        assert run_cli("backbones")[0] == 0 and run_cli("backbones")[0] == 0
    finally:
        cli._quick_exit.cache_clear()
    assert registered == [gc.freeze]


def test_tree_digest_sees_folders_modes_links_and_mtimes(tmp_path):
    """The helper the "nothing touched" checks rest on: each change below, none of which alters a regular
    file's bytes, changes the digest."""
    root = write_image_folder(tmp_path / "d", n_per_class=1, size=(4, 4))
    os.symlink("cat", root / "link")
    changes = {
        "empty folder added": lambda: (root / "cat" / "new").mkdir(),
        "folder added and removed": lambda: ((root / "cat" / "tmp").mkdir(), (root / "cat" / "tmp").rmdir()),
        "file mode": lambda: os.chmod(root / "dog" / "dog_000.png", 0o600),
        "folder mode": lambda: os.chmod(root / "dog", 0o700),
        "link target": lambda: (os.unlink(root / "link"), os.symlink("dog", root / "link")),
        "file mtime": lambda: os.utime(root / "cat" / "cat_000.png", ns=(0, 10**9)),
    }
    for what, change in changes.items():
        for folder in (root, root / "cat", root / "dog"):  # far from now: a change within one clock tick shows
            os.utime(folder, ns=(0, 0))
        before = tree_digest(root)
        change()
        assert tree_digest(root) != before, what


@pytest.fixture(scope="module")
def trained(fmnist_small, tmp_path_factory):
    """One real training run shared by the tests below; the data folder is hashed before and after."""
    before = tree_digest(fmnist_small)
    out = tmp_path_factory.mktemp("runs") / "fm"
    code, stdout, stderr = run_cli("train", fmnist_small, "--out", out, "--image-size", "64", "--workers", "0")
    assert code == 0, stderr
    return out, stdout, stderr, before


@pytest.mark.slow
def test_train_reaches_accuracy_and_writes_a_complete_run(trained, fmnist_small):
    out, stdout, _, before = trained
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = metrics["test"]["accuracy"]
    MEASURED.append(f"end-to-end CLI, real Fashion-MNIST subset (300 train / 200 test images), MobileNetV2 "
                    f"ImageNet weights, 64 px, linear head: test accuracy {accuracy:.4f}")
    assert accuracy >= 0.70
    assert f"{accuracy:.4f}" in stdout
    for name in ("config.json", "metrics.json", "skipped.json", "splits.csv", "train.log", "report.md",
                 "confusion_matrix.png", "worst_errors.png", "model/model.safetensors", "model/model.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["weights"]["kind"] == "imagenet"
    assert config["weights"]["sha256"] == headstart.get_backbone("mobilenet_v2").weights.sha256
    assert config["image_size"] == 64 and config["engine"]["engine"] == choose_engine("cpu").engine
    assert config["classes"] == sorted(os.listdir(fmnist_small / "train"))
    rows = list(csv.DictReader(io.StringIO((out / "splits.csv").read_text())))
    assert len(rows) == 500 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert sum(r["split"] == "test" for r in rows) == 200
    assert json.loads((out / "skipped.json").read_text()) == []
    assert not list(out.parent.glob("*.partial-*"))
    assert tree_digest(fmnist_small) == before  # nothing written into the data folder


@pytest.mark.slow
def test_second_identical_train_runs_no_forward_pass(trained, fmnist_small, tmp_path, monkeypatch):
    from headstart.reports import html

    calls = count_network_batches(monkeypatch)
    # report.html's worst errors draw their heatmaps from the backbone's last feature map, which the cache (of
    # pooled features) does not hold: those passes, of the errors shown only, are counted apart.
    for_maps: list[int] = []

    def worst_overlays(*args, **kwargs):
        start = len(calls)
        out = real(*args, **kwargs)
        for_maps.extend(calls[start:])
        del calls[start:]
        return out

    real = html.worst_overlays
    monkeypatch.setattr(html, "worst_overlays", worst_overlays)
    code, stdout, stderr = run_cli("train", fmnist_small, "--out", tmp_path / "again", "--image-size", "64",
                                   "--workers", "0")
    assert code == 0, stderr
    assert calls == [], stderr  # no feature computed again
    assert 0 < sum(for_maps) <= html.WORST, for_maps
    assert "extracting: all 500 features from cache" in stderr
    first = json.loads((trained[0] / "metrics.json").read_text())["test"]
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())["test"]
    assert second == first  # same inputs and seed, same numbers


@pytest.mark.slow
def test_one_changed_image_is_the_only_one_recomputed(fmnist_small, tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_image_folder(data, n_per_class=5, classes=("a", "b", "c"))
    args = ("train", data, "--image-size", "32", "--workers", "0", "--weights", "none", "--test-fraction", "0")
    assert run_cli(*args, "--out", tmp_path / "r1")[0] == 0
    victim = sorted((data / "b").iterdir())[2]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    seen = count_network_batches(monkeypatch)
    code, _, stderr = run_cli(*args, "--out", tmp_path / "r2")
    assert code == 0, stderr
    assert seen == [1]
    assert "14/15 features from cache" in stderr


@pytest.mark.slow
def test_evaluate_json(trained, fmnist_small):
    out = trained[0]
    code, stdout, stderr = run_cli("evaluate", out, fmnist_small / "test", "--json")
    assert code == 0, stderr
    m = json.loads(stdout)
    assert set(m) >= {"accuracy", "balanced_accuracy", "macro_f1", "n_images", "classes", "per_class",
                      "confusion_matrix", "skipped"}
    assert m["n_images"] == 200
    train_metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert m["accuracy"] == pytest.approx(train_metrics["accuracy"])
    code, text, _ = run_cli("evaluate", out, fmnist_small / "test")
    assert code == 0 and "confusion" in text.lower() and "Ankle_boot" in text


@pytest.mark.slow
def test_evaluate_subset_warns_and_unknown_class_is_refused(trained, fmnist_small, tmp_path):
    out = trained[0]
    subset = tmp_path / "subset"
    for name in ("Bag", "Trouser"):
        (subset / name).mkdir(parents=True)
        for p in sorted((fmnist_small / "test" / name).iterdir())[:3]:
            (subset / name / p.name).write_bytes(p.read_bytes())
    code, stdout, stderr = run_cli("evaluate", out, subset, "--json")
    assert code == 0 and json.loads(stdout)["n_images"] == 6
    assert "no images of classes" in stderr
    (subset / "Zebra").mkdir()
    (subset / "Zebra" / "z.png").write_bytes((subset / "Bag").iterdir().__next__().read_bytes())
    code, _, stderr = run_cli("evaluate", out, subset)
    assert code == 2 and "Zebra" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_predict_json_and_csv(trained, fmnist_small, tmp_path):
    out = trained[0]
    one = sorted((fmnist_small / "test" / "Trouser").iterdir())[0]
    folder = fmnist_small / "test" / "Bag"
    broken = tmp_path / "broken.jpg"
    broken.write_text("<html>not an image</html>")
    code, stdout, stderr = run_cli("predict", out, one, folder, broken, "--top-k", "3", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert len(result["predictions"]) == 1 + 20
    first = result["predictions"][0]
    assert first["path"] == str(one) and len(first["predictions"]) == 3
    probs = [p["probability"] for p in first["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert result["skipped"][0]["path"] == str(broken) and "broken.jpg" in stderr
    code, stdout, _ = run_cli("predict", out, one, "--csv", "--top-k", "2")
    rows = list(csv.reader(io.StringIO(stdout)))
    assert rows[0] == ["path", "class1", "probability1", "class2", "probability2", "engine", "precision"]
    assert rows[1][0] == str(one) and rows[1][-2:] == [result["engine"]["engine"], result["engine"]["precision"]]


@pytest.mark.slow
def test_bundle_round_trip_gives_identical_predictions(trained, fmnist_small):
    out = trained[0]
    run_model = headstart.load(out)
    images = sorted((fmnist_small / "test" / "Coat").iterdir())[:8]
    p1 = run_model.predict_proba(images, cache_dir="none")
    again = headstart.load(out / "model")
    p2 = again.predict_proba(images, cache_dir="none")
    assert np.array_equal(p1, p2)
    from PIL import Image

    p3 = again.predict_proba([Image.open(p) for p in images])  # in-memory images, no cache
    assert np.allclose(p1, p3, atol=1e-6)
    top = again.predict(images, top_k=2)
    assert len(top) == 8 and all(len(t.top) == 2 and t.top[0][0] in again.classes for t in top)


@pytest.mark.slow
def test_backbones_and_cache_commands(trained, tmp_path):
    code, stdout, _ = run_cli("backbones")
    assert code == 0
    lines = {line.split()[0]: line for line in stdout.splitlines()[1:]}
    assert set(lines) == {"mobilenet_v2", "resnet18", "resnet50", "vgg16", "efficientnet_b0", "small_cnn",
                          "efficientnet_lite0", "efficientnet_lite1"}
    assert "from scratch" in lines["small_cnn"]
    # the Lite files ship in PyPI packages (make install): found offline, like MobileNetV2's
    assert "found: " in lines["efficientnet_lite0"] and "found: " in lines["efficientnet_lite1"]
    assert "found" in lines["mobilenet_v2"] and "not found" in lines["resnet50"]
    code, stdout, _ = run_cli("cache", "info", "--json")
    info = json.loads(stdout)
    # The session's default cache holds every test's features; the run above put MobileNetV2's there.
    assert code == 0 and info["bytes"] > 0 and "mobilenet_v2" in {s["backbone"] for s in info["namespaces"]}
    (tmp_path / "empty-cache").mkdir()
    code, stdout, _ = run_cli("cache", "clear", "--cache-dir", tmp_path / "empty-cache")
    assert code == 0 and "cleared: 0.0 MB freed" in stdout


def test_user_errors_exit_2_without_traceback(tmp_path, image_folder):
    code, _, stderr = run_cli("train", tmp_path / "missing")
    assert code == 2 and "does not exist" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli("train", image_folder, "--backbone", "resnet50", "--out", tmp_path / "r")
    assert code == 2 and "no ImageNet weights found for resnet50" in stderr and "--weights" in stderr
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.partial-*"))
    code, _, stderr = run_cli("evaluate", tmp_path / "nothing", image_folder)
    assert code == 2 and "no model found" in stderr
    before, folder_mtime = tree_digest(image_folder), image_folder.stat().st_mtime_ns
    code, _, stderr = run_cli("train", image_folder, "--out", image_folder / "run")
    assert code == 2 and "inside the data folder" in stderr
    assert sorted(p.name for p in image_folder.iterdir()) == ["cat", "dog"]  # not even a partial run folder
    assert tree_digest(image_folder) == before
    assert image_folder.stat().st_mtime_ns == folder_mtime  # no entry was even created and removed


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_flag(trained, image_folder):
    before = tree_digest(trained[0])
    code, _, stderr = run_cli("train", image_folder, "--out", trained[0], "--weights", "none")
    assert code == 2 and "already exists" in stderr
    assert tree_digest(trained[0]) == before  # every file, folder, mode and mtime as it was
    assert not list(trained[0].parent.glob(f"{trained[0].name}.partial-*"))


@pytest.mark.slow
def test_train_overwrite_replaces_the_run(image_folder, tmp_path):
    args = ("train", image_folder, "--backbone", "small_cnn", "--weights", "none", "--image-size", "32",
            "--workers", "0", "--test-fraction", "0", "--out", tmp_path / "run")
    assert run_cli(*args)[0] == 0
    (tmp_path / "run" / "stale-note.txt").write_text("left by the first run's user")
    first = json.loads((tmp_path / "run" / "config.json").read_text())
    code, _, stderr = run_cli(*args, "--overwrite", "--head", "mlp", "--seed", "3")
    assert code == 0, stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert first["head"] == "linear" and config["head"] == "mlp" and config["seed"] == 3
    assert not (tmp_path / "run" / "stale-note.txt").exists()  # replaced as a whole, not written over
    assert headstart.load(tmp_path / "run").head_config["kind"] == "mlp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no partial or backup folder left


@pytest.mark.slow
def test_mlp_head_run_has_training_curve(fmnist_small, tmp_path):
    code, _, stderr = run_cli("--quiet", "train", fmnist_small, "--out", tmp_path / "mlp", "--head", "mlp",
                              "--image-size", "64", "--workers", "0")
    assert code == 0, stderr
    assert (tmp_path / "mlp" / "training_curve.png").is_file()
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert config["head_settings"]["kind"] == "mlp" and config["head_settings"]["epochs"] >= 1
    metrics = json.loads((tmp_path / "mlp" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.6
    model = headstart.load(tmp_path / "mlp")
    assert model.head_config["kind"] == "mlp"


@pytest.mark.slow
def test_corrupt_image_is_skipped_and_strict_stops(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b"))
    bad = data / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    args = ("train", data, "--image-size", "32", "--weights", "none", "--workers", "0", "--test-fraction", "0")
    code, _, stderr = run_cli(*args, "--out", tmp_path / "run")
    assert code == 0, stderr
    assert "broken.png" in stderr
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert [s["path"] for s in skipped] == [str(bad)] and skipped[0]["reason"]
    code, _, stderr = run_cli(*args, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and "--strict" in stderr and "broken.png" in stderr
    assert not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------- the command line itself


def parse_error(capsys, *args: str) -> str:
    """argparse's own errors exit 2 before any command runs; return what they printed."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_no_prefix_matching_and_a_mistyped_flag_names_the_closest_one(capsys, image_folder):
    err = parse_error(capsys, "train", image_folder, "--epoch", "3")  # became --epochs before
    assert "headstart train: error: unrecognized arguments: --epoch 3; did you mean --epochs?" in err
    # train's usage runs to 30 lines: the error points to its --help instead (issue 29)
    assert err.startswith("usage: headstart train [options]") and "`headstart train --help`" in err
    assert len(err.splitlines()) == 2 and "--image-size" not in err
    err = parse_error(capsys, "train", image_folder, "--strategey", "fine-tune")  # the issue's own typo
    assert "unrecognized arguments: --strategey fine-tune; did you mean --strategy?" in err
    err = parse_error(capsys, "train", image_folder, "--strategey=fine-tune")
    assert "did you mean --strategy?" in err
    err = parse_error(capsys, "cache", "info", "--cache", "x")  # a prefix of --cache-dir
    assert err.startswith("usage: headstart cache") and "--cache x; did you mean --cache-dir?" in err
    parser = cli.get_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert parser.allow_abbrev is False and all(sp.allow_abbrev is False for sp in subparsers.values())
    err = parse_error(capsys, "--quite", "backbones")  # a short usage is still shown whole
    assert err.startswith("usage: headstart [-h]") and "--quite; did you mean --quiet?" in err
    err = parse_error(capsys, "train", image_folder, "--zzzzzz")  # nothing close: no guess
    assert "unrecognized arguments: --zzzzzz\n" in err and "did you mean" not in err
    err = parse_error(capsys, "train", image_folder, "--head", "mpl")
    assert "argument --head: invalid choice: 'mpl' (choose from 'linear', 'mlp'); did you mean 'mlp'?" in err
    err = parse_error(capsys, "trian", image_folder)
    assert "did you mean 'train'?" in err
    err = parse_error(capsys, "train", image_folder, "--image-size", "abc")
    assert "a number of pixels or 'auto'" in err and "'abc'" in err


def _options(parser: argparse.ArgumentParser):
    """(command, action) for every argument of every command, the top level's included."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in [("headstart", parser), *sub.choices.items()]:
        for action in sp._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                yield name, sp, action


def test_every_option_of_every_command_has_help_that_gives_its_default():
    """Issue 29: --top-k, --json, --csv, --epochs, --seed, serve's --port, ... had no help line. Every argument
    has one; every option that takes a value says its default (or that it is required), in the user's words."""
    parser = cli.get_parser()
    missing, no_default, jargon = [], [], []
    hidden = {"-q", "--quiet", "-v", "--verbose"}  # the commands' copies of the top-level flags
    for command, sp, action in _options(parser):
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        if action.help == argparse.SUPPRESS and set(action.option_strings) <= hidden and command != "headstart":
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(name)
            continue
        text = sp._get_formatter()._expand_help(action)
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and not action.required and "default" not in text:
            no_default.append(f"{name}: {text}")
        if "%(" in text or "None" in text or "choose_engine" in text or 'README "' in text:
            jargon.append(f"{name}: {text}")
    assert missing == [], f"options without help: {missing}"
    assert no_default == [], "options whose help does not give the default:\n" + "\n".join(no_default)
    assert jargon == [], "help in words a user does not know:\n" + "\n".join(jargon)
    assert len(list(_options(parser))) > 100  # the walk saw every command


def test_the_epochs_help_gives_each_strategys_default():
    from headstart.settings import ENSEMBLE, SCRATCH_DEFAULTS, FineTuneSettings

    train = next(a for a in cli.get_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = " ".join(train.format_help().split())
    assert (f"(default: {FineTuneSettings.epochs} with --strategy fine-tune or auto, {SCRATCH_DEFAULTS['epochs']} "
            f"with scratch, {ENSEMBLE.finetune_epochs} with ensemble") in text
    assert "README.txt" in text and "never stop the run" in text  # --strict says which files count


def test_fine_tuning_settings_with_feature_extraction_are_refused_by_the_api_too(image_folder, tmp_path):
    from headstart.errors import HeadstartError

    with pytest.raises(HeadstartError, match="epochs.*fine-tune"):
        headstart.train(image_folder, strategy="feature-extraction", finetune={"epochs": 3}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    code, _, stderr = run_cli("train", image_folder, "--strategy", "feature-extraction", "--lr", "0.1")
    assert code == 2 and "--lr" in stderr


@pytest.mark.slow
def test_settings_auto_does_not_use_are_warned_about_and_recorded(image_folder, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", image_folder, "--out", out, "--image-size", "32", "--workers", "0",
                                   "--weights", "none", "--epochs", "3", "--lr", "0.001", "--time-budget", "1h",
                                   "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["run_dir"] == str(out)  # --json names the run it wrote
    config = json.loads((out / "config.json").read_text())
    assert config["resolved_strategy"] == "feature-extraction"  # 6 images per class
    assert config["unused_settings"] == {"epochs": 3, "lr": 0.001}  # the time budget took part in the choice
    assert "not used: --epochs, --lr" in stderr


def test_counts_are_pluralised(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    write_image_folder(tmp_path / "data", n_per_class=1, classes=("a",))
    code, _, stderr = run_cli("train", tmp_path / "data", "--out", tmp_path / "run", "--weights", "none")
    assert code == 2 and "1 image in 1 class " in stderr  # it said "1 images in 1 classes"
    from headstart.progress import count

    assert [count(n, w) for n, w in ((0, "image"), (1, "class"), (2, "class"), (1, "file"))] == \
        ["0 images", "1 class", "2 classes", "1 file"]


def _with_reader_gone(*args: str) -> tuple[int, str]:
    """Run the command with stdout a pipe whose reader has closed, as `| head` does once it has its lines."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "headstart.cli", *map(str, args)], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    os.close(read_end)  # before the command prints anything: its first write meets a closed pipe
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.decode()


@pytest.mark.slow
def test_a_closed_pipe_exits_141_quietly_and_keeps_the_run(tmp_path):
    # 28 images: every class has validation and test images (by the file-name hash), so no warning at all
    data = write_image_folder(tmp_path / "data", n_per_class=14)
    out = tmp_path / "run"
    code, stderr = _with_reader_gone("-q", "train", data, "--out", out, "--image-size", "32",
                                     "--workers", "0", "--weights", "none")
    assert (code, stderr) == (141, "")  # was exit 2 with "error: Broken pipe; check the path..."
    for name in ("config.json", "metrics.json", "model/model.json", "model/model.safetensors", "report.md"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("run.partial-*"))
    code, stderr = _with_reader_gone("cache", "info", "--json")  # the cache the run above filled
    assert (code, stderr) == (141, "")


@pytest.mark.slow
def test_a_broken_pipe_elsewhere_is_not_mistaken_for_the_reader_leaving(tmp_path):
    """141 is for stdout's reader going away; another pipe breaking (a worker's) stays an error."""
    script = ("import sys; from headstart import cli\n"
              "def broken(a): raise BrokenPipeError(32, 'Broken pipe')\n"
              "cli.COMMANDS['backbones'] = broken\n"
              "sys.exit(cli.main(['backbones']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Broken pipe" in proc.stderr


def test_help_and_argument_errors_start_without_torch():
    """`import headstart` loads its public names on first use: help and a mistyped command answer without
    importing torch, torchvision or scikit-learn (about 7 s of a 2-core CPU), and the names still work."""
    script = ("import sys, contextlib, io\n"
              "import headstart\n"
              "from headstart import cli\n"
              "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
              "    assert cli.main(['--help']) == 0\n"
              "assert 'train' in out.getvalue()\n"
              "with contextlib.redirect_stderr(io.StringIO()):\n"
              "    assert cli.main(['trian']) == 2\n"
              "heavy = sorted(m for m in ('torch', 'torchvision', 'sklearn', 'onnxruntime') if m in sys.modules)\n"
              "assert not heavy, heavy\n"
              "assert callable(headstart.train) and 'torch' in sys.modules\n"
              "assert 'mobilenet_v2' in headstart.list_backbones() and 'train' in dir(headstart)\n"
              "assert headstart.get_backbone('timm:resnet18').name == 'timm:resnet18'  # the timm source registered\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        headstart.trainer
