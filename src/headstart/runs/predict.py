"""Using a trained model: features of new images, prediction on files and folders, evaluation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from headstart.models.bundle import load
from headstart.data.folders import collect_images, load_data
from headstart.data.checks import read_splits, seen_in_training
from headstart.errors import DataError
from headstart.models.ensemble import Ensemble, is_model
from headstart.models.model import Model, features_of
from headstart.engines.features import cache_root_of
from headstart.runs.rundir import read_run_config, run_dir_of
from headstart.progress import console
from headstart.settings import Runtime

log = logging.getLogger(__name__)


def expand_inputs(inputs: Sequence, ignored: list[dict] | None = None) -> list[str]:
    """Predict's inputs as image paths: folders searched recursively (sorted), anything else kept as
    given, so that a missing or unusable file is reported in its place like any other bad input. What a
    folder holds that is not an image (a notes.txt) goes into `ignored` as {path, reason}."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        paths.extend(collect_images([p], ignored) if p.is_dir() else [os.fspath(p.absolute())])
    return paths


def predict_files(model: Model, inputs: Sequence, *, top_k: int = 1, runtime: Runtime | None = None,
                  **kw) -> tuple[list[dict], list[dict]]:
    """Top-k predictions for files and folders: rows of {path, predictions:[{class, probability}]} in
    input order, and the unusable inputs as {path, reason} (each warned about once, by extraction).

    `runtime` runs the backbone; its fields may also be given as keywords (device, engine, ...)."""
    runtime = Runtime.of(runtime, **kw)
    ignored: list[dict] = []
    paths = expand_inputs(list(inputs), ignored)
    for item in ignored:  # every input that is not predicted is accounted for, named inputs and folders alike
        log.warning("skipping %s: %s", item["path"], item["reason"])
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}.")
    rows, skipped = [], list(ignored)
    for pred in model.predict(paths, top_k=top_k, runtime=runtime, desc="predict"):
        if pred.ok:
            rows.append({"path": pred.input, "predictions": [{"class": c, "probability": p} for c, p in pred.top]})
        else:
            skipped.append({"path": pred.input, "reason": pred.error})
    return rows, skipped


def engine_used(model: Model | Ensemble, runtime: Runtime | None = None, **kw) -> dict:
    """The engine, precision and device that compute `model`'s numbers under `runtime` (the engine
    `predict_files` and `evaluate` run with the same runtime), as predict's JSON and CSV state them: on a
    CPU with native bf16 the automatic precision is bf16, whose probabilities differ from fp32's by more
    than rounding, so a probability is only reproducible with its engine and precision known."""
    rt = Runtime.of(runtime, **kw)
    engines = model.engine(rt.device, rt.engine, rt.precision, cache_root_of(rt.cache_dir))  # built once, then reused
    return describe_engines([e.choice for e in (engines if isinstance(engines, list) else [engines])])


def describe_engines(choices: Sequence) -> dict:
    """{"engine", "precision", "device"} of the EngineChoices of a model, one per ensemble member: a field the
    members differ in (a member trained on int8 features keeps int8) gives each one's value, joined by "+"."""
    out = {}
    for key in ("engine", "precision", "device"):
        values = [getattr(c, key) for c in choices]
        out[key] = values[0] if len(set(values)) == 1 else "+".join(values)
    return out


def evaluation_samples(model: Model, data, labels=None, untrained=()):
    """The images of `data` to evaluate on, their label indices in the model's classes, and unusable rows.

    A folder with train/val/test splits is evaluated on its test split; any other folder on all of it.
    Images of `untrained` classes (the run saw them but had no training images) are left out with a
    warning, as the run left them out of its own test scores; any other class the model lacks is an error.
    """
    d, bad = load_data(data, labels=labels, val_fraction=0.0, test_fraction=0.0)
    samples = d.split("test") if d.layout != "classes" and d.split("test") else d.samples
    pairs = _known(model, [(s.path, d.classes[s.label]) for s in samples], untrained, data)
    index = {c: i for i, c in enumerate(model.classes)}
    return [p for p, _ in pairs], np.array([index[c] for _, c in pairs], dtype=np.int64), bad


def _known(model: Model, pairs: list[tuple[str, str]], untrained, where) -> list[tuple[str, str]]:
    """(path, class) pairs of classes the model knows; warns about left-out and absent classes."""
    present = sorted({c for _, c in pairs})
    unknown = [c for c in present if c not in model.classes and c not in untrained]
    if unknown:
        raise DataError(f"{where} has classes the model does not know: {unknown}. The model's classes are "
                        f"{model.classes}; evaluate on a folder whose class folders use those names.")
    left_out = [c for c in present if c not in model.classes]
    if left_out:
        n = sum(c in left_out for _, c in pairs)
        log.warning("%d images of %s belong to classes %s that had no training images; they are left out of the "
                    "scores, as the run left them out.", n, where, left_out)
        pairs = [(p, c) for p, c in pairs if c in model.classes]
    missing = [c for c in model.classes if c not in present]
    if missing:
        log.warning("%s has no images of classes %s; they have no per-class scores and are left out of macro-F1 "
                    "and balanced accuracy (listed as classes_without_test_images).", where, missing)
    return pairs


def run_test_split(model: Model, run_dir: Path, untrained=()):
    """The test split a run recorded in its splits.csv, as evaluation_samples returns it."""
    rows = read_splits(run_dir)
    if rows is None:
        raise DataError(f"{run_dir} holds no splits.csv, so its test split is unknown (a bundle folder keeps "
                        "only the model); pass DATA, a folder or --labels CSV to evaluate on.")
    pairs = _known(model, [(r["path"], r["class"]) for r in rows if r["split"] == "test"], untrained,
                   f"the test split of {run_dir}")
    if not pairs:
        raise DataError(f"the run {run_dir} has no test split; pass DATA to evaluate on.")
    index = {c: i for i, c in enumerate(model.classes)}
    return [p for p, _ in pairs], np.array([index[c] for _, c in pairs], dtype=np.int64), []


def evaluate(model: Model | Ensemble | str | os.PathLike, data=None, *, labels=None, runtime: Runtime | None = None,
             verbose: bool | None = None, **kw) -> dict:
    """Metrics of `model` on a folder (or labels CSV): accuracy, per class, confusion matrix, skipped files.

    Without `data`, a run directory is evaluated on its own test split (from its splits.csv). A run's
    engine settings are used unless others are given, so the numbers are the run's own. Files the run
    trained or validated on are counted ("seen_in_training") and warned about. `runtime` runs the
    backbone; its fields may also be given as keywords (device, engine, precision, batch_size, ...).
    The CLI's progress and warning lines go to stderr through logging unless `verbose=False` (or
    logging was set up by the caller, whose handlers and levels then decide).
    """
    with console(verbose):
        return _evaluate(model, data, labels=labels, runtime=runtime, **kw)


def _evaluate(model: Model | Ensemble | str | os.PathLike, data=None, *, labels=None, runtime: Runtime | None = None,
             **kw) -> dict:
    """`evaluate` without the console (see there)."""
    runtime = Runtime.of(runtime, **kw)
    run_dir = run_dir_of(model)
    config = read_run_config(run_dir)
    model = model if is_model(model) else load(model)
    runtime = Runtime.of(runtime, **{name: value for name, value in config.get("requested_engine", {}).items()
                                     if getattr(runtime, name) == "auto"})
    untrained = [c for c in config.get("classes", []) if c not in model.classes]
    if data is None and labels is not None:  # the CSV's paths are relative to its folder
        data = os.path.dirname(os.path.abspath(labels))
    if data is None:
        if run_dir is None:
            raise DataError("no DATA given and the model is not a run directory with a splits.csv (a bundle "
                            "keeps no splits); pass DATA, a folder or --labels CSV to evaluate on.")
        paths, y, bad = run_test_split(model, run_dir, untrained)
        where = f"the test split of {run_dir}"
    else:
        paths, y, bad = evaluation_samples(model, data, labels, untrained)
        where = os.fspath(data)
    seen = None  # unknown: a bundle alone does not know what it was trained on
    if run_dir is not None:
        seen = 0 if data is None else seen_in_training(paths, read_splits(run_dir) or [])
        if seen:
            log.warning("%d of %d images were in this run's training/validation split; these scores are "
                        "optimistic.", seen, len(paths))
    feats, failures = features_of(model, paths, runtime, desc="evaluate")
    keep = np.array([p not in failures for p in paths], dtype=bool)
    if not keep.any():
        raise DataError(f"none of the {len(paths)} images in {where} could be read.")
    skipped = bad + [{"path": p, "reason": r} for p, r in failures.items()]
    from headstart.reports.metrics import compute_metrics  # scikit-learn: imported by evaluation only, not by prediction

    metrics = compute_metrics(y[keep], model.proba_from_features(feats), model.classes, skipped=skipped)
    metrics["seen_in_training"] = seen
    # Which engine computed these numbers: the run's own unless others were asked for (`requested_engine`).
    metrics["engine"] = engine_used(model, runtime)
    return metrics
