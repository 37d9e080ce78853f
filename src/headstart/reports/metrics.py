"""Classification metrics from two arrays, and the selection of the worst mistakes.

Everything works from `y_true` (class indices into `class_names`) and `proba`
(n, n_classes), whose columns follow `class_names`, as `predict_proba` does for
`classes_`. The per-class table and the confusion matrix cover every class in
`class_names`, so an evaluation set in which some classes are missing still shows them;
averages over classes (macro-F1, balanced accuracy) cover only the classes that have
images in it, and `classes_without_test_images` names the others. Counting such a class
as F1 0 gave a 3-image class split 2/1/0 a macro-F1 of 0.7444 where the other four classes
averaged 0.93 (issue 29). The text reports are in `tables`, the figures in `plots`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)



def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    top_k: Iterable[int] = (1, 3, 5),
    skipped: Iterable[dict] = (),
) -> dict:
    """Return a JSON-ready dict of classification metrics.

    Keys: accuracy, accuracy_ci95 ([low, high], the Wilson interval), balanced_accuracy,
    macro_f1, top_k_accuracy ({"3": ...} for each 1 < k < n_classes), n_images, classes,
    classes_without_test_images, per_class, confusion_matrix, skipped.

    The per-class table and the confusion matrix cover every class in `class_names`.
    A class with no images in `y_true` has no recall or F1 (nothing to find) and its
    precision could only count mistakes: its row has support 0 and None (JSON null) for
    the three scores, and it is named in `classes_without_test_images`. Macro-F1 and
    balanced accuracy are the means over the classes present in `y_true`; a class that is
    present but never predicted scores precision 0 (zero_division=0), as it should.
    """
    y_true, proba = _check_inputs(y_true, proba, class_names)
    n_classes = len(class_names)
    labels = list(range(n_classes))
    y_pred = proba.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = [i for i in labels if support[i] > 0]  # never empty: y_true holds at least one image
    score = lambda values, i: float(values[i]) if support[i] > 0 else None  # noqa: E731
    per_class = [
        {
            "class": str(name),
            "precision": score(precision, i),
            "recall": score(recall, i),
            "f1": score(f1, i),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": wilson_interval(int((y_pred == y_true).sum()), len(y_true)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(np.mean(f1[present])),
        "classes_without_test_images": [str(class_names[i]) for i in labels if support[i] == 0],
        "top_k_accuracy": _top_k_accuracy(y_true, proba, top_k),
        "n_images": int(len(y_true)),
        "classes": [str(name) for name in class_names],
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "skipped": [_json_ready(dict(item)) for item in skipped],
    }


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of an accuracy of `correct` out of `n`.

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or n
    correct: 19 of 20 gives [0.764, 0.991], so a 20-image test set cannot tell 0.80 from 0.95.
    """
    if n <= 0:
        return [0.0, 1.0]
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def _check_inputs(y_true, proba, class_names) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = len(class_names)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError(
            "cannot compute metrics on an empty evaluation set (0 images); "
            "check that the evaluation folder holds readable images"
        )
    if proba.shape != (len(y_true), n_classes):
        raise ValueError(
            f"proba must have shape (n_images, n_classes) = ({len(y_true)}, {n_classes}), "
            f"got {proba.shape}; its columns must follow class_names"
        )
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(
            f"y_true holds class indices outside 0..{n_classes - 1} "
            f"(min {y_true.min()}, max {y_true.max()})"
        )
    if not np.isfinite(proba).all():
        raise ValueError("proba contains NaN or infinite values; the model output is broken")
    return y_true, proba


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # sklearn already drops classes with no true images, but warns when a prediction
    # names one of them, or when only one class is left at all (its confusion matrix, inside
    # balanced_accuracy_score, takes no labels); both are expected on a subset: noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'")
        return float(balanced_accuracy_score(y_true, y_pred))


def _top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, top_k: Iterable[int]) -> dict:
    # k=1 is plain accuracy, and k >= n_classes is always 1.0: neither says anything.
    n_classes = proba.shape[1]
    return {
        str(k): float(
            top_k_accuracy_score(y_true, proba, k=k, labels=list(range(n_classes)))
        )
        for k in sorted(set(int(k) for k in top_k))
        if 1 < k < n_classes
    }


def _json_ready(item: dict) -> dict:
    # Skipped entries often carry Path objects; the metrics dict must dump as-is.
    return {
        key: os.fspath(value) if isinstance(value, os.PathLike) else value
        for key, value in item.items()
    }



def worst_errors(
    paths: Sequence[str | os.PathLike],
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    n: int = 16,
) -> list[tuple[Any, str, str, float]]:
    """The `n` misclassified images with the highest probability on the wrong class."""
    y_true, proba = _check_inputs(y_true, proba, class_names)
    if len(paths) != len(y_true):
        raise ValueError(f"got {len(paths)} paths for {len(y_true)} labels")
    y_pred = proba.argmax(axis=1)
    confidence = proba[np.arange(len(y_pred)), y_pred]
    wrong = np.flatnonzero(y_pred != y_true)
    # Stable sort: equally confident mistakes keep their input order.
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    return [
        (paths[i], str(class_names[y_true[i]]), str(class_names[y_pred[i]]), float(confidence[i]))
        for i in order
    ]

