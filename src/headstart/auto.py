"""`--strategy auto`: feature extraction or fine-tuning, chosen from what is cheap to measure.

The rule, applied after phase 1 (the head on frozen features, which both strategies need):
1. fewer than MIN_PER_CLASS training images in some class -> feature extraction: too little
   data to move pretrained blocks without overfitting them;
2. the frozen features already separate the classes (linear-probe validation accuracy at
   least SEPARATED) -> feature extraction: fine-tuning has almost nothing left to win;
3. a --time-budget that the fine-tuning estimate exceeds -> feature extraction;
4. otherwise fine-tuning.
Behind the thresholds (README, "--strategy auto"): on FMNIST-TL (1,000 images per class,
probe validation accuracy 0.874) fine-tuning the top 4 / 8 blocks raised test accuracy
from 0.872 to 0.888 / 0.903; on 30 images per class it moved nothing reliably.
"""

from __future__ import annotations

import numpy as np

MIN_PER_CLASS = 100
SEPARATED = 0.98


def choose_strategy(y_train: np.ndarray, probe_val_accuracy: float | None, n_images: int,
                    extraction_rate: float | None, epochs: int, time_budget: float | None) -> dict:
    """{"strategy", "reasons", "measurements"}: the choice and why, for the log and config.json."""
    counts = np.bincount(y_train)
    per_class = int(counts[counts > 0].min())
    measured = {"min_train_images_per_class": per_class, "probe_val_accuracy": probe_val_accuracy,
                "time_budget_seconds": time_budget}
    # Upper bound: every image through the whole network once more, then each epoch forward + backward (3x).
    estimate = None
    if extraction_rate:
        estimate = n_images / extraction_rate + epochs * 3 * int(len(y_train)) / extraction_rate
        measured["fine_tune_estimate_seconds"] = round(estimate, 1)
    if per_class < MIN_PER_CLASS:
        return _choice("feature-extraction", f"{per_class} training images in the smallest class, under "
                       f"{MIN_PER_CLASS}: too few to fine-tune pretrained blocks safely", measured)
    if probe_val_accuracy is not None and probe_val_accuracy >= SEPARATED:
        return _choice("feature-extraction", f"frozen features already separate the classes (linear probe "
                       f"validation accuracy {probe_val_accuracy:.3f} >= {SEPARATED})", measured)
    if time_budget and estimate and estimate > time_budget:
        return _choice("feature-extraction", f"fine-tuning is estimated at {estimate:.0f}s, over the time budget "
                       f"of {time_budget:.0f}s", measured)
    reason = (f"{per_class}+ training images per class and a linear probe at "
              f"{probe_val_accuracy:.3f} on validation leave room for fine-tuning" if probe_val_accuracy is not None
              else f"{per_class}+ training images per class")
    return _choice("fine-tune", reason, measured)


def _choice(strategy: str, reason: str, measured: dict) -> dict:
    return {"strategy": strategy, "reasons": [reason], "measurements": measured}
