"""Class balance: images per class and split, and what the imbalance costs, from the label check's
out-of-fold probabilities (each image predicted by a head that never saw it).

The cost shows as recall: a head trained on few images of a class, and on many of the others, calls
fewer of that class's images by their class. Accuracy weighs classes by their size; balanced accuracy
(the mean recall) weighs them equally; the gap between the two is what the small classes lose.
"""

from __future__ import annotations

import numpy as np

RATIO_NOTE = 3.0  # largest over smallest class, from which the summary suggests --class-weight balanced


def class_balance(per_class: dict, classes: list[str], y: np.ndarray, proba: np.ndarray) -> dict:
    """Counts per class and split (`per_class`: data summary's), the imbalance ratio, out-of-fold recall per class."""
    counts = {c: sum(per_class[c].values()) for c in classes}
    train = {c: per_class[c]["train"] for c in classes}
    present = [n for n in train.values() if n > 0]
    ratio = max(present) / min(present) if present else None
    known = ~np.isnan(proba).any(axis=1)
    recall, accuracy, balanced = {}, None, None
    if known.any():
        pred = np.nanargmax(np.where(np.isnan(proba[known]), -1, proba[known]), axis=1)
        truth = y[known]
        for i, c in enumerate(classes):
            member = truth == i
            recall[c] = round(float((pred[member] == i).mean()), 4) if member.any() else None
        accuracy = round(float((pred == truth).mean()), 4)
        balanced = round(float(np.mean([r for r in recall.values() if r is not None])), 4)
    notes = []
    if ratio is not None and ratio >= RATIO_NOTE:
        small = min(train, key=train.get)
        notes.append(f"the largest training class has {ratio:.1f}x the images of the smallest ({small}, "
                     f"{train[small]}); out-of-fold recall of {small}: {recall.get(small)}. train --class-weight "
                     "balanced weighs the classes equally.")
    return {"per_class": per_class, "images_per_class": counts, "train_ratio_largest_to_smallest":
            round(ratio, 2) if ratio else None, "out_of_fold_recall": recall, "out_of_fold_accuracy": accuracy,
            "out_of_fold_balanced_accuracy": balanced, "notes": notes}
