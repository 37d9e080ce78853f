"""Using a trained model: features of new images, prediction on files and folders, evaluation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import load
from .data import collect_images, load_data
from .errors import DataError
from .evaluation import compute_metrics
from .model import Model

log = logging.getLogger(__name__)


def features_of(model: Model, images: Sequence, **kw) -> tuple[np.ndarray, dict[str, str]]:
    """Features of the usable inputs (rows in input order, unusable ones left out) and, for each
    unusable one, why: `Model.features` in the shape evaluation wants."""
    feats, reasons = model.features(images, **kw)
    ok = np.array([r is None for r in reasons], dtype=bool)
    names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"<image {i}>" for i, im in enumerate(images)]
    return feats[ok], {n: r for n, r in zip(names, reasons) if r is not None}


def expand_inputs(inputs: Sequence) -> list[str]:
    """Predict's inputs as image paths: folders searched recursively (sorted), anything else kept as
    given, so that a missing or unusable file is reported in its place like any other bad input."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        paths.extend(collect_images([p]) if p.is_dir() else [os.fspath(p.absolute())])
    return paths


def predict_files(model: Model, inputs: Sequence, *, top_k: int = 1, **kw) -> tuple[list[dict], list[dict]]:
    """Top-k predictions for files and folders: rows of {path, predictions:[{class, probability}]} in
    input order, and the unusable inputs as {path, reason} (each warned about once, by extraction)."""
    paths = expand_inputs(list(inputs))
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}.")
    rows, skipped = [], []
    for pred in model.predict(paths, top_k=top_k, desc="predict", **kw):
        if pred.ok:
            rows.append({"path": pred.input, "predictions": [{"class": c, "probability": p} for c, p in pred.top]})
        else:
            skipped.append({"path": pred.input, "reason": pred.error})
    return rows, skipped


def evaluation_samples(model: Model, data, labels=None):
    """The images of `data` to evaluate on, their label indices in the model's classes, and unusable rows.

    A folder with train/val/test splits is evaluated on its test split; any other folder on all of it.
    """
    d, bad = load_data(data, labels=labels, val_fraction=0.0, test_fraction=0.0)
    samples = d.split("test") if d.layout != "classes" and d.split("test") else d.samples
    present = sorted({d.classes[s.label] for s in samples})
    unknown = [c for c in present if c not in model.classes]
    if unknown:
        raise DataError(f"{data} has classes the model does not know: {unknown}. The model's classes are "
                        f"{model.classes}; evaluate on a folder whose class folders use those names.")
    missing = [c for c in model.classes if c not in present]
    if missing:
        log.warning("%s has no images of classes %s; per-class scores for them are 0 and not meaningful.",
                    data, missing)
    index = {c: i for i, c in enumerate(model.classes)}
    y = np.array([index[d.classes[s.label]] for s in samples], dtype=np.int64)
    return [s.path for s in samples], y, bad


def evaluate(model: Model | str | os.PathLike, data, *, labels=None, **kw) -> dict:
    """Metrics of `model` on a folder (or labels CSV): accuracy, per class, confusion matrix, skipped files."""
    model = model if isinstance(model, Model) else load(model)
    paths, y, bad = evaluation_samples(model, data, labels)
    feats, failures = features_of(model, paths, desc="evaluate", **kw)
    keep = np.array([p not in failures for p in paths], dtype=bool)
    if not keep.any():
        raise DataError(f"none of the {len(paths)} images in {data} could be read.")
    skipped = bad + [{"path": p, "reason": r} for p, r in failures.items()]
    metrics = compute_metrics(y[keep], model.proba_from_features(feats), model.classes, skipped=skipped)
    return metrics

