"""`--strategy auto` (headstart/auto.py): each branch of choose_strategy's rule at its thresholds, the order
the branches are tried in, and the fine-tuning time estimate. Plain arrays and numbers: nothing trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from headstart.strategies.auto import MIN_PER_CLASS, SEPARATED, choose_strategy

ROOM = SEPARATED - 0.1  # a probe accuracy that leaves room for fine-tuning


def labels(*per_class: int) -> np.ndarray:
    """Training labels with per_class[k] images of class k."""
    return np.repeat(np.arange(len(per_class)), per_class)


def choose(y, probe=ROOM, n_images=None, rate=None, epochs=5, budget=None) -> dict:
    return choose_strategy(y, probe, len(y) if n_images is None else n_images, rate, epochs, budget)


def test_documented_thresholds():
    # docs/guides/strategies.md ("--strategy auto") states both; a change here must change it with its measurements.
    readme = (Path(__file__).parents[1] / "docs" / "guides" / "strategies.md").read_text()
    assert (MIN_PER_CLASS, SEPARATED) == (100, 0.98)
    assert f"fewer than {MIN_PER_CLASS}" in readme and f"reaches {SEPARATED} validation accuracy" in readme


# ----------------------------------------------------------------- 1. too few images in the smallest class


def test_one_image_under_min_per_class_in_one_class_means_feature_extraction():
    decision = choose(labels(MIN_PER_CLASS + 500, MIN_PER_CLASS - 1, MIN_PER_CLASS + 500))
    assert decision["strategy"] == "feature-extraction"
    assert decision["measurements"]["min_train_images_per_class"] == MIN_PER_CLASS - 1
    assert decision["reasons"] == [f"{MIN_PER_CLASS - 1} training images in the smallest class, under "
                                   f"{MIN_PER_CLASS}: too few to fine-tune pretrained blocks safely"]


def test_exactly_min_per_class_is_enough():
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS + 1))
    assert decision["strategy"] == "fine-tune"
    assert decision["measurements"]["min_train_images_per_class"] == MIN_PER_CLASS


def test_a_label_with_no_training_images_is_not_the_smallest_class():
    # Labels 0 and 2 only (1 went to validation or test): its zero count is not a class of size 0.
    y = np.concatenate([np.zeros(MIN_PER_CLASS, int), np.full(MIN_PER_CLASS, 2)])
    decision = choose(y)
    assert decision["measurements"]["min_train_images_per_class"] == MIN_PER_CLASS
    assert decision["strategy"] == "fine-tune"


def test_too_few_images_is_decided_before_the_probe_and_the_budget():
    # Separated features and a blown budget too: the reason given is still the first rule's.
    decision = choose(labels(MIN_PER_CLASS - 1, MIN_PER_CLASS), probe=1.0, rate=1.0, budget=1.0)
    assert decision["strategy"] == "feature-extraction"
    assert len(decision["reasons"]) == 1 and "too few to fine-tune" in decision["reasons"][0]


# ----------------------------------------------------------------- 2. frozen features already separate the classes


def test_probe_at_separated_means_feature_extraction():
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), probe=SEPARATED)
    assert decision["strategy"] == "feature-extraction"
    assert decision["reasons"] == [f"frozen features already separate the classes (linear probe validation "
                                   f"accuracy {SEPARATED:.3f} >= {SEPARATED})"]
    assert decision["measurements"]["probe_val_accuracy"] == SEPARATED


def test_probe_just_under_separated_leaves_room_for_fine_tuning():
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), probe=SEPARATED - 0.001)
    assert decision["strategy"] == "fine-tune"
    assert decision["reasons"] == [f"{MIN_PER_CLASS}+ training images per class and a linear probe at "
                                   f"{SEPARATED - 0.001:.3f} on validation leave room for fine-tuning"]


def test_no_probe_accuracy_skips_the_second_rule():
    # No validation split, so no probe accuracy: the choice rests on the class sizes (and the budget).
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), probe=None)
    assert decision["strategy"] == "fine-tune"
    assert decision["reasons"] == [f"{MIN_PER_CLASS}+ training images per class"]
    assert decision["measurements"]["probe_val_accuracy"] is None


def test_separated_features_are_decided_before_the_budget():
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), probe=SEPARATED, rate=1.0, budget=1.0)
    assert "separate the classes" in decision["reasons"][0]


# ----------------------------------------------------------------- 3. the time budget and the estimate behind it


def test_estimate_is_one_more_pass_over_every_image_then_three_passes_per_epoch_over_the_training_set():
    y = labels(150, 250)  # 400 training images
    decision = choose(y, n_images=1_000, rate=100.0, epochs=2)
    # 1,000 images / 100 per s = 10 s, then 2 epochs x 3 (forward + backward) x 400 / 100 per s = 24 s.
    assert decision["measurements"]["fine_tune_estimate_seconds"] == 34.0
    assert decision["measurements"]["time_budget_seconds"] is None
    # Rounded to a tenth of a second for the log and config.json.
    odd = choose(y, n_images=1_000, rate=300.0, epochs=2)
    assert odd["measurements"]["fine_tune_estimate_seconds"] == round(1_000 / 300 + 2 * 3 * 400 / 300, 1) == 11.3


@pytest.mark.parametrize("budget, strategy", [(33.9, "feature-extraction"), (34.0, "fine-tune"),
                                              (35.0, "fine-tune"), (None, "fine-tune")])
def test_budget_under_the_estimate_means_feature_extraction(budget, strategy):
    decision = choose(labels(150, 250), n_images=1_000, rate=100.0, epochs=2, budget=budget)
    assert decision["strategy"] == strategy
    assert decision["measurements"]["time_budget_seconds"] == budget
    if strategy == "feature-extraction":
        assert decision["reasons"][0].startswith("fine-tuning is estimated at 34s, over the time budget of ")


@pytest.mark.parametrize("rate", [None, 0.0])
def test_without_an_extraction_rate_there_is_no_estimate_and_the_budget_cannot_decide(rate):
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), rate=rate, budget=0.001)
    assert "fine_tune_estimate_seconds" not in decision["measurements"]
    assert decision["strategy"] == "fine-tune"


def test_more_epochs_can_push_the_estimate_over_the_budget():
    y = labels(MIN_PER_CLASS, MIN_PER_CLASS)
    few, many = (choose(y, rate=50.0, epochs=e, budget=60.0) for e in (1, 10))
    assert few["measurements"]["fine_tune_estimate_seconds"] < 60 < many["measurements"]["fine_tune_estimate_seconds"]
    assert (few["strategy"], many["strategy"]) == ("fine-tune", "feature-extraction")


# ----------------------------------------------------------------- the decision's shape (config.json, the log)


def test_decision_is_json_ready():
    decision = choose(labels(MIN_PER_CLASS, MIN_PER_CLASS), rate=100.0, budget=600.0)
    assert set(decision) == {"strategy", "reasons", "measurements"}
    assert set(decision["measurements"]) == {"min_train_images_per_class", "probe_val_accuracy",
                                             "time_budget_seconds", "fine_tune_estimate_seconds"}
    assert json.loads(json.dumps(decision)) == decision
    assert type(decision["measurements"]["min_train_images_per_class"]) is int  # not numpy's, for json
