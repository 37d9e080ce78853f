"""The figures of a run and of a compare, and the two helpers every figure goes through.

Plots are drawn on a bare `matplotlib.figure.Figure` with an Agg canvas and saved as PNG,
without pyplot: nothing here changes the global backend (a notebook user keeps theirs),
and no figure is left open in pyplot's registry. Every file is written atomically
through `headstart.fileio`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from headstart.fileio import atomic_path
from headstart.reports.metrics import worst_errors


def new_figure(width: float, height: float, *, dpi: int = 100, layout: str | None = "constrained"):
    """A bare Figure (inches, dots per inch) with an Agg canvas, saved by `save_png` at the same dpi.

    The canvas is attached at once so a caller can measure text before saving (compare
    places its labels that way); `layout=None` leaves the layout to the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG at its own dpi, atomically."""
    # The temporary name ends in .tmp, so the format must be given explicitly; the dpi too,
    # since savefig would otherwise follow the user's rcParams["savefig.dpi"].
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)

CONFUSION_MAX_INCHES = 24.0  # 2,400 pixels a side at 100 dpi
CONFUSION_MAX_COUNTS = 40  # classes up to which each cell shows its count
CONFUSION_MAX_LABELS = 100  # classes up to which the axes name them


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

    # Growing with the classes unbounded, 100 classes drew a 57-inch figure with 10,000 counts: 1.0 GB more resident
    # and minutes of a second `train`'s output writing (issue 15, scale). Above these limits the heatmap stays and the
    # counts are left to metrics.json and the reports.
    side = min(CONFUSION_MAX_INCHES, max(5.0, 0.55 * n + 2.5))
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, label="recall (row share)" if normalize else "images")
    if n <= CONFUSION_MAX_COUNTS:
        _annotate_counts(ax, counts, values, fontsize=max(5, 11 - n // 5))
    if n <= CONFUSION_MAX_LABELS:
        fontsize = min(10.0, 72 * side / n * 0.6)  # points: at most 60% of a cell
        ax.set_xticks(range(n), [_shown(c) for c in class_names], rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), [_shown(c) for c in class_names], fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    save_png(fig, path)


def _shown(name: Any) -> str:
    # A folder name that is not valid UTF-8 arrives with lone surrogates, which fonts cannot draw.
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_path(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """A test image as a caption names it: its path relative to the data folder `root`, so `IMG_1056.jpg` in
    four class folders reads as four files; the whole path when it lies elsewhere (a labels CSV's) or no root."""
    path = os.fspath(path)
    if root:
        rel = os.path.relpath(path, root)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel
    return path


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
    fig = new_figure(11 if has_accuracy else 6, 4)
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
    save_png(fig, path)


def plot_worst_errors(
    paths: Sequence[str | os.PathLike],
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    load_image: Callable[[Any], Any],
    n: int = 16,
    root: str | os.PathLike | None = None,
) -> list[tuple[Any, str, str, float]]:
    """Grid of the `n` most confident mistakes, each captioned with its path relative to the data folder
    `root`; returns them as (path, true, pred, p).

    Confidence is the probability given to the wrong predicted class, highest first.
    `load_image(path) -> PIL.Image` is supplied by the caller, so this module never
    decodes files itself.
    """
    chosen = worst_errors(paths, y_true, proba, class_names, n)
    if not chosen:
        fig = new_figure(4, 2)
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        save_png(fig, path)
        return chosen

    ncols = min(math.ceil(math.sqrt(n)), len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = new_figure(2.4 * ncols, 2.6 * nrows)
    for k, (image_path, true_name, pred_name, p) in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(_thumbnail(load_image(image_path)))
        ax.set_xticks([]), ax.set_yticks([])  # no tick to place: with them, placing the titles took half the time
        # The file first: the grid is for finding the images (a wrong label, a broken photo). Its end holds the
        # name and the folders nearest it; 40 characters fill the 2.4-inch column at 7 points.
        ax.set_title(f"{_short(_shown(shown_path(image_path, root)), 40)}\n"
                     f"true: {_shown(true_name)} / pred: {_shown(pred_name)} (p={p:.2f})", fontsize=7)
        ax.axis("off")
    fig.suptitle("Most confident mistakes")
    save_png(fig, path)
    return chosen


def _thumbnail(image, size: int = 256) -> np.ndarray:
    # convert() copies, so the caller's image is untouched; thumbnail() bounds memory
    # when the grid holds 16 camera-sized photos.
    image = image.convert("RGB")
    image.thumbnail((size, size))
    return np.asarray(image)
