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
}


@pytest.mark.parametrize("name", list(STRATEGIES))
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
