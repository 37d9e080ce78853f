"""A run's own numbers: what evaluate reproduces, what it warns about, and what it writes for a reader."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import headstart
from test_cli import run_cli

TINY_RUN = dict(image_size=32, workers=0, seed=0)
STRATEGIES = {
    "feature-extraction-linear": dict(strategy="feature-extraction", head="linear"),
    "feature-extraction-mlp": dict(strategy="feature-extraction", head="mlp"),
    "fine-tune": dict(strategy="fine-tune", finetune=dict(epochs=1, unfreeze=2)),
    "scratch": dict(strategy="scratch", finetune=dict(epochs=2)),
    # a fine-tuned member and a scratch member, their probabilities averaged (ensemble.py)
    "ensemble": dict(strategy="ensemble", finetune=dict(epochs=1, unfreeze=2), scratch_epochs=1),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ensemble" else n
                                  for n in STRATEGIES])  # the ensemble trains two networks
def test_evaluate_reproduces_the_runs_test_accuracy_exactly(name, fmnist_tiny, tmp_path, one_torch_thread):
    out = tmp_path / name
    run = headstart.train(fmnist_tiny, out=out, cache_dir=tmp_path / "cache", **TINY_RUN, **STRATEGIES[name])
    accuracy = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert accuracy == run.metrics["test"]["accuracy"]
    own = headstart.evaluate(out, cache_dir=tmp_path / "cache")  # its own test split, from splits.csv
    assert own["accuracy"] == accuracy and own["n_images"] == run.metrics["test"]["n_images"] == 40
    assert own["seen_in_training"] == 0
    folder = headstart.evaluate(out, fmnist_tiny / "test")  # another cache (the default): recomputed features
    assert folder["accuracy"] == accuracy
    assert folder["confusion_matrix"] == run.metrics["test"]["confusion_matrix"]


@pytest.mark.slow
def test_fine_tuning_with_a_test_class_missing_from_training(fmnist_tiny, tmp_path, one_torch_thread):
    data = tmp_path / "data"
    shutil.copytree(fmnist_tiny, data)
    shutil.rmtree(data / "train" / "Bag")  # Bag appears in test/ only
    code, stdout, stderr = run_cli("train", data, "--strategy", "fine-tune", "--image-size", "32", "--workers", "0",
                                   "--epochs", "1", "--unfreeze", "2", "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert "4 test images belong to classes with no training images" in stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert metrics["n_images"] == 36 and "Bag" not in metrics["classes"]
    code, stdout, stderr = run_cli("evaluate", tmp_path / "run", "--json")  # its own test split
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == metrics["accuracy"] and json.loads(stdout)["n_images"] == 36
    assert "classes ['Bag'] that had no training images" in stderr
    assert "| left out of the test scores | 4 test images of classes with no training images" in \
        (tmp_path / "run" / "report.md").read_text()
    code, stdout, stderr = run_cli("evaluate", tmp_path / "run", data, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["accuracy"] == metrics["accuracy"]


# ----------------------------------------------------------------------------- evaluation that cannot fool itself

SMALL_CNN = ("--strategy", "feature-extraction", "--backbone", "small_cnn", "--weights", "none", "--image-size", "32",
             "--workers", "0")


def test_evaluate_needs_data_for_a_bundle_and_counts_training_images(image_folder, tmp_path):
    code, _, stderr = run_cli("train", image_folder, *SMALL_CNN, "--val-fraction", "0.2", "--test-fraction", "0.2",
                              "--out", tmp_path / "run")
    assert code == 0, stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "splits.csv")))
    trained_on = sum(r["split"] in ("train", "val") for r in rows)
    assert 0 < trained_on < len(rows) == 12
    code, _, stderr = run_cli("evaluate", tmp_path / "run" / "model")  # a bundle keeps no splits
    assert code == 2 and "pass DATA" in stderr and "Traceback" not in stderr
    code, stdout, stderr = run_cli("evaluate", tmp_path / "run", image_folder, "--json")  # every file, some seen
    assert code == 0, stderr
    assert f"{trained_on} of 12 images were in this run's training/validation split; these scores are " \
           "optimistic" in stderr
    assert json.loads(stdout)["seen_in_training"] == trained_on


def _copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="module")
def run_with_copies(tmp_path_factory):
    """A small_cnn run on a split folder where two files have byte-identical copies in another split, and one
    file is not an image."""
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("copies")
    data = base / "data"
    write_image_folder(data / "train", n_per_class=8, classes=("cat", "dog"), size=(24, 24), seed=1)
    write_image_folder(data / "test", n_per_class=4, classes=("cat", "dog"), size=(24, 24), seed=2)
    _copy_file(data / "train" / "cat" / "cat_000.png", data / "test" / "cat" / "renamed_copy.png")
    _copy_file(data / "train" / "dog" / "dog_001.png", data / "test" / "dog" / "another_copy.png")
    (data / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, stderr = run_cli("train", data, *SMALL_CNN, "--out", base / "run", "--cache-dir", base / "cache")
    assert code == 0, stderr
    return data, base / "run", stderr


def test_copies_across_splits_are_counted_and_warned_about(run_with_copies):
    data, run, stderr = run_with_copies
    assert "2 groups of byte-identical files (4 files) sit in more than one split (2 across train/test); copies " \
           "across train and test inflate every number" in stderr
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    for record in (config["data_summary"]["duplicates_across_splits"], metrics["duplicates_across_splits"]):
        assert record["groups"] == 2 and record["files"] == 4 and record["by_splits"] == {"train/test": 2}
        assert sorted(Path(p).name for group in record["examples"] for p in group) == \
            ["another_copy.png", "cat_000.png", "dog_001.png", "renamed_copy.png"]
    assert "byte-identical" in (run / "report.md").read_text()


def test_a_clean_split_reports_no_copies(fmnist_tiny):
    from headstart.data.checks import content_digests, cross_split_copies

    paths = sorted(str(p) for p in fmnist_tiny.rglob("*.png"))
    splits = [Path(p).parts[-3] for p in paths]
    assert cross_split_copies(paths, splits, content_digests(paths))["groups"] == 0


# ----------------------------------------------------------------------------- finding the mistakes


def test_test_predictions_csv_has_one_row_per_scored_image(run_with_copies):
    data, run, _ = run_with_copies
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    rows = list(csv.DictReader(open(run / "test_predictions.csv", newline="")))
    assert len(rows) == metrics["n_images"] == 10  # the broken file is skipped, not scored
    assert list(rows[0]) == ["path", "true", "predicted", "probability", "correct", "class1", "probability1",
                             "class2", "probability2"]
    assert {Path(r["path"]).parent.parent for r in rows} == {data / "test"}
    assert all(r["true"] == Path(r["path"]).parent.name for r in rows)
    assert all(r["predicted"] == r["class1"] and r["probability"] == r["probability1"] for r in rows)
    assert all(float(r["probability1"]) >= float(r["probability2"]) for r in rows)
    assert sum(int(r["correct"]) for r in rows) / len(rows) == metrics["accuracy"]
    assert sum(r["true"] != r["predicted"] for r in rows) == sum(
        n for i, row in enumerate(metrics["confusion_matrix"]) for j, n in enumerate(row) if i != j)
    assert not list(run.glob(".*.tmp"))


def test_report_states_the_run_and_links_its_plots(run_with_copies):
    import re

    data, run, _ = run_with_copies
    config = json.loads((run / "config.json").read_text())
    text = (run / "report.md").read_text()
    assert text.startswith(f"# headstart run {run.name}")
    for fact in (str(data), "train/val/test folders", "27 in 2 classes (train 15, val 1, test 11)",
                 "readable and used: train 15, val 1, test 10",
                 "feature-extraction (asked: feature-extraction; head linear)", "asked for (--strategy)",
                 "small_cnn", config["weights"]["source"], "32 px (asked for)",
                 f"{config['engine']['engine']}, {config['engine']['precision']} on cpu",
                 "accuracy, 95% interval", "## Per class", "## Confusion matrix"):
        assert fact in text, fact
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert "confusion_matrix.png" in links and "worst_errors.png" in links and "test_predictions.csv" in links
    assert all(not Path(link).is_absolute() and (run / link).is_file() for link in links)
    skipped = json.loads((run / "skipped.json").read_text())
    assert [Path(s["path"]).name for s in skipped] == ["broken.png"]
    assert "## Skipped files" in text and f"| {skipped[0]['path']} | {skipped[0]['reason']} |" in text


def test_report_gives_auto_strategy_reasons(tmp_path):
    from headstart.reports.markdown import render_markdown, run_summary

    config = {"data_summary": {"root": "/d", "layout": "classes", "classes": ["a", "b"], "n_images": 10,
                               "splits": {"train": 8, "val": 1, "test": 1}}, "labels": None,
              "strategy": "auto", "resolved_strategy": "feature-extraction", "head": "linear",
              "strategy_decision": {"reasons": ["only 8 training images"]}, "backbone": "mobilenet_v2",
              "weights": {"source": "package x", "kind": "imagenet"}, "image_size": 96,
              "image_size_reason": "96 px: median image side 24 px", "engine": {
                  "engine": "onnxruntime", "precision": "fp32", "device": "cpu", "reason": "the rule"}}
    metrics = {"n_train": 8, "n_val": 1, "n_test": 1, "wall_seconds": 3.0, "val_accuracy": None}
    text = render_markdown(run_summary(name="r", config=config, metrics=metrics, skipped=[], files=[]))
    assert "feature-extraction (asked: auto" in text and "only 8 training images" in text
    assert "96 px (96 px: median image side 24 px)" in text and "No test split" in text
    assert "None: every file found was used." in text


def test_evaluate_runs_the_engine_and_precision_the_run_was_trained_with(image_folder, tmp_path):
    """Not only the automatic engine: a run trained with engine torch and fp32 (never the automatic choice, which
    is a converted engine) is evaluated through them, and says so, unless evaluate is told otherwise."""
    run = headstart.train(image_folder, strategy="feature-extraction", backbone="small_cnn", weights="none",
                          image_size=32, workers=0, engine="torch", precision="fp32", out=tmp_path / "run",
                          cache_dir=tmp_path / "cache", test_fraction=0.3)
    assert run.config["engine"]["engine"] == "torch"
    own = headstart.evaluate(tmp_path / "run", cache_dir=tmp_path / "cache")
    assert own["engine"]["engine"] == "torch" and own["engine"]["precision"] == "fp32"
    assert own["accuracy"] == run.metrics["test"]["accuracy"]
    asked = headstart.evaluate(tmp_path / "run", engine="onnxruntime", cache_dir="none")
    assert asked["engine"]["engine"] == "onnxruntime"


def test_train_from_python_shows_the_clis_lines_and_speaks_python(image_folder, tmp_path):
    """A script or notebook with no logging set up sees the run's progress and summary on stderr, and
    `verbose=False` silences them; an error names Python keywords, not flags."""
    import subprocess
    import sys

    script = (f"import headstart\n"
              f"headstart.train({str(image_folder)!r}, strategy='feature-extraction', backbone='small_cnn', "
              f"weights='none', image_size=32, workers=0, cache_dir='none', out={str(tmp_path / 'run')!r}, "
              f"overwrite=True, verbose=VERBOSE)\n")
    for verbose in ("None", "False"):
        done = subprocess.run([sys.executable, "-c", script.replace("VERBOSE", verbose)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        shown = "[headstart] data " in done.stderr and "[headstart] run written to" in done.stderr
        assert shown is (verbose == "None"), done.stderr
    with pytest.raises(headstart.errors.HeadstartError) as refused:
        headstart.train(image_folder, out=tmp_path / "run", verbose=False)
    assert "pass another `out` or `overwrite=True`" in str(refused.value)
    code, _, stderr = run_cli("train", image_folder, "--out", tmp_path / "run")
    assert code == 2 and "pass another --out or --overwrite" in stderr
