"""Using a trained model: features of new images, prediction on files and folders, evaluation."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from .bundle import Model, load
from .data import collect_images, load_data
from .errors import DataError
from .evaluation import compute_metrics
from .features import FeatureCache, cache_root_of, extract
from .images import to_rgb

log = logging.getLogger(__name__)


def features_of(model: Model, images: Sequence, *, batch_size: int = 64, cache_dir=None, device: str = "auto",
                engine: str = "auto", precision: str = "auto", workers: int | None = None,
                desc: str = "features") -> tuple[np.ndarray, dict[str, str]]:
    """Features of image paths (through the cache) or PIL images; paths that fail are returned with reasons.

    Rows follow the readable inputs in order; `failures` maps each unreadable path to why.
    """
    eng = model.engine(device, engine, precision, cache_root_of(cache_dir))
    transform = model.preprocessing.transform()
    if images and all(isinstance(im, (str, os.PathLike)) for im in images):
        paths = [os.fspath(p) for p in images]
        cache = FeatureCache(cache_root_of(cache_dir), model.namespace(eng.choice))
        result = extract(eng, transform, paths, cache, batch_size=batch_size, workers=workers, desc=desc)
        keys = [k for k in result.keys if k is not None]
        feats = cache.get(keys) if keys else np.zeros((0, model.entry.feature_dim), np.float32)
        return feats, result.failures
    # In-memory images (PIL): no cache key to give them, so straight through the network.
    batch = [transform(to_rgb(im)) for im in images]
    out = [eng(torch.stack(batch[i:i + batch_size])).numpy() for i in range(0, len(batch), batch_size)]
    return (np.concatenate(out) if out else np.zeros((0, model.entry.feature_dim), np.float32)), {}


def predict_files(model: Model, inputs: Sequence, *, top_k: int = 1, **kw) -> tuple[list[dict], list[dict]]:
    """Top-k predictions for files and folders: rows of {path, predictions:[{class, probability}]}, and skips."""
    paths = collect_images(list(inputs))
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}.")
    feats, failures = features_of(model, paths, desc="predict", **kw)
    proba = model.proba_from_features(feats) if len(feats) else np.zeros((0, len(model.classes)))
    ok_paths = [p for p in paths if p not in failures]
    k = max(1, min(top_k, len(model.classes)))
    rows = []
    for path, p in zip(ok_paths, proba):
        order = np.argsort(-p, kind="stable")[:k]
        rows.append({"path": path, "predictions": [{"class": model.classes[j], "probability": float(p[j])}
                                                   for j in order]})
    skipped = [{"path": p, "reason": r} for p, r in failures.items()]
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

