"""Metrics, a terminal report, a Markdown report and plots for an image classifier.

Everything works from two arrays: `y_true` (class indices into `class_names`) and `proba`
(n, n_classes), whose columns follow `class_names`, as `predict_proba` does for
`classes_`. Metrics always run over every class in `class_names` (labels=range(n)), so
an evaluation set in which some classes are missing still gives a full per-class table
and a full confusion matrix.

Plots are drawn on a bare `matplotlib.figure.Figure` and saved as PNG, which renders with
the Agg backend without pyplot: nothing here changes the global backend (a notebook
user keeps theirs), and no figure is left open in pyplot's registry. Every file is
written atomically through `headstart.fileio`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from headstart.fileio import atomic_path, write_text

# Keeps the confusion matrix of a 10-class report inside a 120-column terminal.
REPORT_WIDTH = 120


# --------------------------------------------------------------------------- metrics


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
    per_class, confusion_matrix, skipped.

    Per-class scores, macro-F1 and the confusion matrix cover every class in
    `class_names`; a class absent from `y_true` and never predicted scores 0
    (zero_division=0), which lowers macro-F1. Balanced accuracy is the mean recall over
    the classes present in `y_true` only, since recall is undefined for a class with no
    images.
    """
    y_true, proba = _check_inputs(y_true, proba, class_names)
    n_classes = len(class_names)
    labels = list(range(n_classes))
    y_pred = proba.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = [
        {
            "class": str(name),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": wilson_interval(int((y_pred == y_true).sum()), len(y_true)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
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
    # names one of them; that is expected on a subset, so the warning is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
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


# --------------------------------------------------------------------------- text reports


def format_report(metrics: dict) -> str:
    """Plain-text report: summary, per-class table and confusion matrix."""
    sections = [
        _format_summary(metrics),
        _format_per_class(metrics["per_class"]),
        _format_confusion(metrics["confusion_matrix"], metrics["classes"]),
    ]
    return "\n\n".join(sections) + "\n"


def _summary_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [
        ("images", str(metrics["n_images"])),
        ("accuracy", f"{metrics['accuracy']:.4f}"),
    ]
    if "accuracy_ci95" in metrics:  # metrics saved before the interval was added have none
        low, high = metrics["accuracy_ci95"]
        rows.append(("accuracy, 95% interval", f"{low:.4f} - {high:.4f}"))
    rows += [
        ("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"),
        ("macro F1", f"{metrics['macro_f1']:.4f}"),
    ]
    rows += [(f"top-{k} accuracy", f"{v:.4f}") for k, v in metrics["top_k_accuracy"].items()]
    if metrics["skipped"]:
        rows.append(("skipped images", str(len(metrics["skipped"]))))
    return rows


def _format_summary(metrics: dict) -> str:
    rows = _summary_rows(metrics)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _format_per_class(per_class: list[dict]) -> str:
    name_w = max(len("class"), *(len(row["class"]) for row in per_class))
    lines = [f"{'class':<{name_w}}  precision  recall      f1  support"]
    for row in per_class:
        lines.append(
            f"{row['class']:<{name_w}}  {row['precision']:9.4f}  {row['recall']:6.4f}"
            f"  {row['f1']:6.4f}  {row['support']:7d}"
        )
    return "\n".join(lines)


def _format_confusion(cm: list[list[int]], classes: list[str]) -> str:
    corner = "true \\ pred"
    label_w = min(max(len(corner), *(len(c) for c in classes)), 16)
    count_w = len(str(max(max(row) for row in cm)))
    # Share what is left of the line between the columns; names shorter than that stay whole.
    fit_w = (REPORT_WIDTH - label_w) // len(classes) - 1
    cell_w = max(count_w, min(max(len(c) for c in classes), max(fit_w, 3)))

    header = f"{corner:<{label_w}} " + " ".join(f"{c[:cell_w]:>{cell_w}}" for c in classes)
    lines = ["confusion matrix (rows = true, columns = predicted)", header]
    for name, row in zip(classes, cm):
        cells = " ".join(f"{count:>{cell_w}}" for count in row)
        lines.append(f"{name[:label_w]:<{label_w}} {cells}")
    return "\n".join(lines)


def write_report_markdown(metrics: dict, path: str | os.PathLike, title: str = "Evaluation report") -> None:
    """Write a Markdown report (summary, per-class table, confusion matrix) atomically."""
    parts = [f"# {title}", *markdown_sections(metrics)]
    if metrics["skipped"]:
        parts.append(markdown_skipped(metrics["skipped"]))
    write_text(path, "\n\n".join(parts) + "\n")


def markdown_sections(metrics: dict, level: int = 2) -> list[str]:
    """The summary, per-class and confusion-matrix sections of a report, headed at `level`."""
    parts = [_markdown_summary(metrics), _markdown_per_class(metrics), _markdown_confusion(metrics)]
    return ["#" * (level - 2) + part for part in parts]


def _md(text: Any) -> str:
    # A "|" inside a class name or path would split the table cell.
    return str(text).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]], align: list[str]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |")
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_summary(metrics: dict) -> str:
    rows = [list(row) for row in _summary_rows(metrics)]
    return "## Summary\n\n" + markdown_table(["metric", "value"], rows, ["l", "r"])


def _markdown_per_class(metrics: dict) -> str:
    rows = [
        [r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
        for r in metrics["per_class"]
    ]
    header = ["class", "precision", "recall", "F1", "support"]
    return "## Per class\n\n" + markdown_table(header, rows, ["l", "r", "r", "r", "r"])


def _markdown_confusion(metrics: dict) -> str:
    classes = metrics["classes"]
    rows = [[name, *row] for name, row in zip(classes, metrics["confusion_matrix"])]
    table = markdown_table(["true \\ pred", *classes], rows, ["l"] + ["r"] * len(classes))
    return "## Confusion matrix\n\nRows are true classes, columns predicted classes.\n\n" + table


def markdown_skipped(skipped: list[dict]) -> str:
    rows = [[item.get("path", ""), item.get("reason", "")] for item in skipped]
    return "## Skipped images\n\n" + markdown_table(["path", "reason"], rows, ["l", "l"])


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    # A bare Figure renders through Agg on savefig: no pyplot, no global backend switch.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, path: str | os.PathLike) -> None:
    # The temporary name ends in .tmp, so the format must be given explicitly.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion_matrix(
    cm: np.ndarray | list[list[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
) -> None:
    """Heatmap of the confusion matrix (row-normalised recall by default), counts in cells."""
    counts = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n})")
    values = _row_normalise(counts) if normalize else counts

    side = max(5.0, 0.55 * n + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, label="recall (row share)" if normalize else "images")
    _annotate_counts(ax, counts, values, fontsize=max(5, 11 - n // 5))

    ax.set_xticks(range(n), [_shown(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(n), [_shown(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    _save_png(fig, path)


def _shown(name: Any) -> str:
    # A folder name that is not valid UTF-8 arrives with lone surrogates, which fonts cannot draw.
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _short(name: str, width: int = 32) -> str:
    # Keep the end of a long name: it holds the distinguishing number and the extension.
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _row_normalise(counts: np.ndarray) -> np.ndarray:
    # A class with no images has no recall; show its row as 0 rather than NaN.
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def _annotate_counts(ax, counts: np.ndarray, values: np.ndarray, fontsize: int) -> None:
    # White text on the dark half of the colour scale keeps every count legible.
    threshold = values.max() / 2 if values.max() > 0 else 1
    for i, j in np.ndindex(counts.shape):
        color = "white" if values[i, j] > threshold else "black"
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=fontsize)


def plot_training_curve(history: dict, path: str | os.PathLike) -> None:
    """Losses per epoch, and validation accuracy when recorded; best epoch dashed."""
    epochs = list(history.get("epoch", []))
    if not epochs:
        raise ValueError("training history has no epochs to plot")
    series = [key for key in ("train_loss", "val_loss", "val_accuracy") if key in history]
    for key in series:
        if len(history[key]) != len(epochs):
            raise ValueError(
                f"history[{key!r}] has {len(history[key])} values for {len(epochs)} epochs"
            )

    has_accuracy = "val_accuracy" in history
    fig = _new_figure(11 if has_accuracy else 6, 4)
    loss_ax = fig.add_subplot(1, 2 if has_accuracy else 1, 1)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if key in history:
            loss_ax.plot(epochs, history[key], marker="o", markersize=3, label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    axes = [loss_ax]

    if has_accuracy:
        acc_ax = fig.add_subplot(1, 2, 2)
        acc_ax.plot(epochs, history["val_accuracy"], marker="o", markersize=3, color="tab:green")
        acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
        axes.append(acc_ax)

    best = history.get("best_epoch")
    for ax in axes:
        if best is not None:
            ax.axvline(best, color="gray", linestyle="--", label=f"best epoch ({best})")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    _save_png(fig, path)


def plot_worst_errors(
    paths: Sequence[str | os.PathLike],
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    load_image: Callable[[Any], Any],
    n: int = 16,
) -> list[tuple[Any, str, str, float]]:
    """Grid of the `n` most confident mistakes; returns them as (path, true, pred, p).

    Confidence is the probability given to the wrong predicted class, highest first.
    `load_image(path) -> PIL.Image` is supplied by the caller, so this module never
    decodes files itself.
    """
    chosen = worst_errors(paths, y_true, proba, class_names, n)
    if not chosen:
        fig = _new_figure(4, 2)
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        _save_png(fig, path)
        return chosen

    ncols = min(math.ceil(math.sqrt(n)), len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = _new_figure(2.4 * ncols, 2.6 * nrows)
    for k, (image_path, true_name, pred_name, p) in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(_thumbnail(load_image(image_path)))
        # The file name first: the grid is for finding the images (a wrong label, a broken photo).
        ax.set_title(f"{_short(_shown(os.path.basename(os.fspath(image_path))))}\n"
                     f"true: {_shown(true_name)} / pred: {_shown(pred_name)} (p={p:.2f})", fontsize=7)
        ax.axis("off")
    fig.suptitle("Most confident mistakes")
    _save_png(fig, path)
    return chosen


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


def _thumbnail(image, size: int = 256) -> np.ndarray:
    # convert() copies, so the caller's image is untouched; thumbnail() bounds memory
    # when the grid holds 16 camera-sized photos.
    image = image.convert("RGB")
    image.thumbnail((size, size))
    return np.asarray(image)
