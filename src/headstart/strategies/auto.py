"""`--strategy auto`: feature extraction or fine-tuning, chosen from what is cheap to measure.

The rule, applied after phase 1 (the head on frozen features, which both strategies need):
1. fewer than MIN_PER_CLASS training images in some class -> feature extraction: too little
   data to move pretrained blocks without overfitting them;
2. the frozen features already separate the classes (linear-probe validation accuracy at
   least SEPARATED) -> feature extraction: fine-tuning has almost nothing left to win;
3. a --time-budget that the fine-tuning estimate exceeds -> feature extraction;
4. otherwise fine-tuning.
Behind the thresholds (docs/guides/strategies.md, "--strategy auto"): on FMNIST-TL (1,000 images per class,
probe validation accuracy 0.874) fine-tuning the top 4 / 8 blocks raised test accuracy
from 0.872 to 0.888 / 0.903; on 30 images per class it moved nothing reliably.

`--tta auto` (choose_tta), applied to the saved model after training: a network trained on
mirror images (--augment flip, the fine-tuning default) keeps test-time flips when they
lower the validation log loss without lowering validation accuracy; feature extraction and
networks trained without flips keep one view unless `--tta flip` asks (docs/guides/fine-tuning.md, "Test-time
flips", has the FMNIST-TL numbers behind this).

The ensemble (choose_ensemble, applied before anything is trained): when the images are small
(median shorter side <= ENSEMBLE_MAX_SIDE px) and every class has ENSEMBLE_MIN_PER_CLASS+
training images, auto trains its usual model and, if that fine-tunes, a scratch small CNN at the
images' native size beside it (cheap there: about 32 s an epoch on FMNIST-TL's 28 px, 2 cores),
and keeps their average only when it beats the fine-tuned member alone on validation
(keep_ensemble: lower log loss, accuracy not lower). Issue 14: on FMNIST-TL the average of the
two reached 0.9228 where each alone reached about 0.909. On photos the scratch CNN would have to
run at a large size, cost many times more and learn little from few images: no ensemble.

No backbone choice: on FMNIST-TL the frozen features of MobileNetV2, EfficientNet-Lite0 and
Lite1 gave 0.8720, 0.8720 and 0.8735 test accuracy (overlapping 95% intervals), the Lites
extracting at about half MobileNetV2's rate (docs/results.md, "Each real backbone on FMNIST-TL"):
no choice among them pays for its cost, so the default backbone stays MobileNetV2.
"""

from __future__ import annotations

import numpy as np

MIN_PER_CLASS = 100
SEPARATED = 0.98
ENSEMBLE_MAX_SIDE = 64  # px, median shorter side: the scratch member runs at native size
ENSEMBLE_MIN_PER_CLASS = 500  # a network learnt from nothing needs many images (FMNIST-TL: 900 per class)


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


def choose_tta(y_val: np.ndarray, proba_image: np.ndarray, proba_flip: np.ndarray,
               seconds_per_view: float | None = None) -> dict:
    """`--tta auto`: flips at test time only where they pay, measured on the validation split.

    A flip costs one more backbone pass per predicted image (twice the prediction time); it is
    kept when it lowers the validation log loss without lowering validation accuracy, so data
    whose mirror image means something else (text, digits) keeps one view. Issue 14 measured
    the gain on FMNIST-TL's test split: fine-tuned MobileNetV2 0.9094 -> 0.9126 (bf16 kind).
    """
    plain, flipped = val_scores(y_val, proba_image), val_scores(y_val, proba_flip)
    measured = {"val_image": plain, "val_flip": flipped, "n_val": int(len(y_val)),
                "cost": "flip: 2 backbone passes per predicted image instead of 1"}
    cost = "a second backbone pass per predicted image"
    if seconds_per_view is not None:  # as measured on the validation views, on this machine now
        measured["flip_seconds_per_1000_images"] = round(1000 * seconds_per_view, 2)
        cost += f" (+{1000 * seconds_per_view:.0f} s per 1,000 images here)"
    if flipped["log_loss"] < plain["log_loss"] and flipped["accuracy"] >= plain["accuracy"]:
        return {"tta": "flip", "measurements": measured,
                "reasons": [f"flips lower the validation log loss {plain['log_loss']:.4f} -> {flipped['log_loss']:.4f} "
                            f"(accuracy {plain['accuracy']:.4f} -> {flipped['accuracy']:.4f}), worth {cost}"]}
    return {"tta": "none", "measurements": measured,
            "reasons": [f"flips do not pay on validation (log loss {plain['log_loss']:.4f} -> "
                        f"{flipped['log_loss']:.4f}, accuracy {plain['accuracy']:.4f} -> {flipped['accuracy']:.4f})"]}


def choose_ensemble(median_side: float | None, per_class: int, world_size: int = 1) -> dict:
    """Auto: also train a scratch member and average it with the fine-tuned one? {"ensemble", "reasons",
    "measurements"} for the log and config.json (strategy_decision.ensemble)."""
    measured = {"median_image_side": median_side, "min_train_images_per_class": per_class,
                "max_side": ENSEMBLE_MAX_SIDE, "min_per_class": ENSEMBLE_MIN_PER_CLASS}
    if world_size > 1:
        reason = "no ensemble under torchrun (its members train one after the other on one process)"
    elif median_side is None:
        reason = "no ensemble: the image sizes are unknown"
    elif median_side > ENSEMBLE_MAX_SIDE:
        reason = (f"no ensemble: images of {median_side:.0f} px (median side) are over {ENSEMBLE_MAX_SIDE} px, "
                  "where a scratch network at native size is slow and weak")
    elif per_class < ENSEMBLE_MIN_PER_CLASS:
        reason = (f"no ensemble: {per_class} training images in the smallest class, under "
                  f"{ENSEMBLE_MIN_PER_CLASS}: too few for a network trained from scratch")
    else:
        return {"ensemble": True, "measurements": measured, "reasons": [
            f"images of {median_side:.0f} px (<= {ENSEMBLE_MAX_SIDE}) and {per_class}+ training images per class "
            "(>= {0}): a scratch CNN at native size is cheap; it is trained beside the fine-tuned model and "
            "kept if their average wins on validation".format(ENSEMBLE_MIN_PER_CLASS)]}
    return {"ensemble": False, "measurements": measured, "reasons": [reason]}


def keep_ensemble(member: dict, ensemble: dict) -> tuple[bool, str]:
    """Keep the average only when it lowers the fine-tuned member's validation log loss without lowering its
    accuracy; `member` and `ensemble` are {"accuracy", "log_loss"} on the same validation images."""
    change = (f"validation log loss {member['log_loss']:.4f} -> {ensemble['log_loss']:.4f}, accuracy "
              f"{member['accuracy']:.4f} -> {ensemble['accuracy']:.4f}")
    if ensemble["log_loss"] < member["log_loss"] and ensemble["accuracy"] >= member["accuracy"]:
        return True, f"the ensemble beats the fine-tuned member alone ({change}): both members kept"
    return False, f"the ensemble does not beat the fine-tuned member alone ({change}): the fine-tuned member kept alone"


def val_scores(y: np.ndarray, proba: np.ndarray) -> dict:
    """Accuracy and log loss of probabilities `proba` (n, n_classes) for labels `y` (column indices)."""
    picked = np.clip(proba[np.arange(len(y)), y], 1e-12, None)
    return {"accuracy": round(float((proba.argmax(1) == y).mean()), 6),
            "log_loss": round(float(-np.log(picked).mean()), 6)}
