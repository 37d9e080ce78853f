"""`headstart train --cv K`: K-fold accuracy of the feature-extraction head from the cached features."""

from __future__ import annotations

import json

import numpy as np
import pytest

import headstart
from headstart.errors import HeadstartError

from conftest import MEASURED
from test_cli import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ("--strategy", "feature-extraction", "--image-size", "32", "--workers", "0")


@pytest.mark.slow
def test_cv_reports_k_fold_accuracy_on_a_real_folder(fmnist_tiny, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", fmnist_tiny, *FAST, "--cv", "3", "--out", out,
                                   "--cache-dir", tmp_path / "cache")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    cv = metrics["cv"]
    assert cv["k"] == 3 and len(cv["folds"]) == 3
    assert cv["n_images"] == metrics["n_train"] + metrics["n_val"]
    assert cv["accuracy_mean"] == pytest.approx(np.mean(cv["folds"]))
    assert cv["accuracy_std"] == pytest.approx(np.std(cv["folds"])) and cv["accuracy_std"] >= 0
    assert all(0.0 <= a <= 1.0 for a in cv["folds"]) and cv["accuracy_mean"] > 0.3  # 10 classes: chance is 0.1
    assert f"3-fold cross-validation (train + val, {cv['n_images']} images): accuracy {cv['accuracy_mean']:.4f}" \
        in stdout
    assert json.loads((out / "config.json").read_text())["cv"] == 3
    assert (out / "train.log").read_text().count("final fit") == 1  # the run's head; the folds' heads say nothing
    MEASURED.append(f"--cv 3 on the tiny Fashion-MNIST folder ({cv['n_images']} images, MobileNetV2, 32 px, linear "
                    f"head): accuracy {cv['accuracy_mean']:.4f} +- {cv['accuracy_std']:.4f}")


@pytest.mark.parametrize("strategy", ["fine-tune", "scratch"])
def test_cv_is_refused_for_strategies_that_train_the_network(strategy, image_folder, tmp_path):
    code, _, stderr = run_cli("train", image_folder, "--strategy", strategy, "--cv", "3", "--out", tmp_path / "r")
    assert code == 2 and "--cv" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r").exists()
    with pytest.raises(HeadstartError, match="--cv"):
        headstart.train(image_folder, strategy=strategy, cv=3, out=str(tmp_path / "r"))


def test_cv_needs_at_least_two_folds(image_folder, tmp_path):
    code, _, stderr = run_cli("train", image_folder, "--strategy", "feature-extraction", "--backbone", "small_cnn",
                              "--weights", "none", "--image-size", "32", "--workers", "0", "--cv", "1",
                              "--out", tmp_path / "r", "--cache-dir", "none")
    assert code == 2 and "2 <= K" in stderr and not (tmp_path / "r").exists()
