"""Training a run: `train` and its steps, each a named function: prepare (runs/context.py), the strategy's
fit (its registry entry), save the model, test-time views, test scores, outputs (runs/outputs.py).

The run directory's life (built aside and published, its log, resume) is rundir.py's; the
settings and their rules are settings.py's and each strategy's entry's. A published run
directory holds the resolved config, metrics, splits, skipped files, model bundle, test
predictions, plots, report and log of a finished run.

Under torchrun (distributed.py) every rank calls `train`: the ranks share the extraction and the
fine-tuning, rank 0 runs every step and writes the run, and the other ranks run `train_other_rank`'s
steps only (the shared ones) and write nothing into it.

The test split is scored by the saved bundle, loaded back as `evaluate` loads it, through
the same feature extraction and engine settings: scoring fine-tuned runs through the
training network on boundary activations instead gave 0.35 where `evaluate` gave 0.325
on a native-bf16 CPU (issue 10), and a run's number must be the one anyone can reproduce.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import PIL
import sklearn
import torch
import torchvision

from headstart import distributed, memory, progress
from headstart._version import __version__, source_commit
from headstart.data.image_size import RULE as IMAGE_SIZE_RULE
from headstart.engines.features import cache_root_of
from headstart.engines.quantize import Int8Source
from headstart.learn.head_modules import softmax
from headstart.learn.loop import check_tensorboard
from headstart.models.bundle import Model, load
from headstart.models.bundle import save as save_bundle
from headstart.models.model import features_of
from headstart.reports.metrics import compute_metrics
from headstart.runs import rundir
from headstart.data.folders import check_input
from headstart.runs.datacheck import check_data
from headstart.runs.context import Place, RunContext, load_run_data, prepare, resolve_backbone, world_check
from headstart.runs.outputs import RunOutputs, TestScores, splits_csv, write_outputs
from headstart.settings import Runtime, TrainConfig
from headstart.strategies import auto_image_size, configure, get_strategy  # noqa: F401 (auto_image_size: public here)
from headstart.strategies.auto import choose_tta
from headstart.strategies.ensemble import train_ensemble
from headstart.strategies.fitting import Fitted

log = logging.getLogger("headstart")

__all__ = ["train", "resume", "Run", "TrainConfig", "auto_image_size"]


@dataclass
class Run:
    """What `train` returns: where the run is, what it measured, and the trained model."""

    run_dir: Path
    config: dict
    metrics: dict
    model: Model
    skipped: list[dict] = field(default_factory=list)


def _versions() -> dict:
    return {"headstart": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "pillow": PIL.__version__, "platform": platform.platform(),
            "headstart_commit": source_commit()}  # None unless headstart runs from a git checkout


def train(data: str | os.PathLike, *, verbose: bool | None = None, **settings) -> Run | None:
    """Train a model on an image folder (or labels CSV) and write its run directory.

    Settings are the fields of TrainConfig (backbone, strategy, head, image_size, seed, out, ...);
    `strategy` is any registered strategy (`headstart.strategies.list_strategies()`); `finetune`
    takes a FineTuneSettings or a dict of its fields. Under torchrun, rank 0 returns the run and
    the other ranks None. The CLI's progress and summary lines go to stderr through logging unless
    `verbose=False` (or logging was set up by the caller, whose handlers and levels then decide).
    """
    with progress.console(verbose):
        cfg = configure(TrainConfig(data=os.fspath(data), **settings))
        with distributed.session(cfg.device):
            return _train_or_help(cfg)


def _train_or_help(cfg: TrainConfig) -> Run | None:
    world_check(cfg)
    if cfg.finetune is not None:
        from headstart.learn.distributed import check_supported

        check_supported(cfg.finetune)  # --bn-update under torchrun on CPU is refused before any work
    entry = resolve_backbone(cfg)
    if cfg.tensorboard:
        check_tensorboard()  # before anything is written
    check_input(cfg.data, cfg.labels)  # a wrong path is named before anything (runs/ included) is created
    cache_root = cache_root_of(cfg.cache_dir)
    final = rundir.choose_run_dir(cfg.out, cfg.overwrite)
    final = distributed.broadcast_object(final, "agreeing on the run directory")  # runs/<time> is rank 0's
    rundir.check_not_interrupted(final, cfg.resume, cfg.overwrite)
    rundir.check_outside(cfg.data, cfg.labels, final, cache_root)  # before anything is written
    if not distributed.is_main():
        train_other_rank(cfg, entry, Place(None, final, cache_root))
        return None
    with rundir.building(final) as out:
        run = _train(cfg, entry, Place(out, final, cache_root))
    log.info("run written to %s", final)
    return run


def resume(run_dir: str | os.PathLike, *, verbose: bool | None = None) -> Run:
    """Continue an interrupted fine-tuning run from its last checkpoint, with the settings it was started with."""
    saved, source = rundir.resume_settings(run_dir)
    cfg = configure(TrainConfig.from_saved(saved, source))  # a clear message if this version cannot read them
    settings = cfg.to_dict()
    settings.update(out=os.fspath(Path(run_dir).expanduser().absolute()), resume=True)
    return train(settings.pop("data"), verbose=verbose, **settings)


def _train(cfg: TrainConfig, entry, place: Place, member: bool = False) -> Run:
    """The run's steps, writing into `place.out` (the partial directory that becomes `place.final`); an
    ensemble's `member` (whose strategy may be auto) trains one model, never an ensemble of its own."""
    t_start = time.perf_counter()
    started = datetime.now().astimezone().isoformat(timespec="seconds")  # the run's date, in its report
    torch.manual_seed(cfg.seed)
    loaded = load_run_data(cfg, place.cache_root)
    strategy = get_strategy(cfg.strategy)
    plan = None if member else strategy.plan_members(cfg, loaded[0])
    if plan is not None and plan["ensemble"]:  # members trained as runs of their own, then averaged
        return _train_members(cfg, plan, loaded[0], place, t_start)
    ctx = prepare(cfg, entry, place, loaded)
    memory.note("features extracted")
    data_check = check_data(ctx) if cfg.data_check else None  # likely label errors and leaks (runs/datacheck.py)
    fitted = strategy.fit(ctx)
    for cb in ctx.epoch_logs:
        getattr(cb, "close", lambda: None)()  # TensorBoard's writer, before the run directory is renamed
    bundle = save_model(ctx, fitted)
    tta_decision = choose_test_views(ctx, fitted, bundle)
    # From here on the run uses the saved model, loaded as `evaluate` loads it, and scores its test split
    # through the same feature path and engine settings: metrics.json's numbers are what evaluate gives.
    memory.note("model saved")
    test = score_test_split(bundle, cfg, ctx.feats, fitted.cols)
    memory.note("test split scored")
    metrics = run_metrics(ctx, fitted, test, time.perf_counter() - t_start)
    metrics["data_check"] = data_check
    resolved = resolved_config(ctx, fitted)
    resolved.update(resolved_tta=bundle.tta, tta_decision=tta_decision)  # what --tta became, and why
    resolved["started"] = started
    if plan is not None and resolved["strategy_decision"] is not None:  # auto: why no ensemble
        resolved["strategy_decision"]["ensemble"] = plan
    write_outputs(place.out, place.final.name, RunOutputs(resolved, metrics, ctx.skipped,
                                                          splits_csv(ctx.data, ctx.feats.ext), fitted.history, test))
    return Run(run_dir=place.final, config=resolved, metrics=metrics, model=bundle, skipped=ctx.skipped)


def _train_members(cfg: TrainConfig, plan: dict, data, place: Place, t_start: float) -> Run:
    """An ensemble run: its members trained as runs (strategies/ensemble.py), written as any run is."""
    done = train_ensemble(cfg, plan, data, place, run_member)
    metrics = done["metrics"]
    metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    paths, y, proba = done["test"]
    write_outputs(place.out, place.final.name, RunOutputs(done["config"], metrics, done["skipped"], done["splits"],
                                                          None, TestScores(paths, y, proba, done["model"].classes)))
    return Run(run_dir=place.final, config=done["config"], metrics=metrics, model=done["model"],
               skipped=done["skipped"])


def run_member(cfg: TrainConfig, cache_root: Path | None, out: Path) -> Run:
    """An ensemble's member: an ordinary run written into `out` (inside the ensemble's partial run)."""
    return _train(cfg, resolve_backbone(cfg), Place(out, out, cache_root), member=True)


def train_other_rank(cfg: TrainConfig, entry, place: Place) -> None:
    """A rank other than 0 under torchrun: the preparation and its share of the extraction, then the strategy's
    fit when it trains the backbone (the collectives rank 0 meets there); rank 0 saves, scores and writes."""
    torch.manual_seed(cfg.seed)
    ctx = prepare(cfg, entry, place)
    strategy = get_strategy(cfg.strategy)
    if strategy.trains_backbone:  # auto may fine-tune: it follows rank 0's choice
        strategy.fit(ctx)


def run_metrics(ctx: RunContext, fitted: Fitted, test: TestScores, wall: float) -> dict:
    """metrics.json: the strategy's own numbers, the test split's scores, counts and timings."""
    feats, engine = ctx.feats, ctx.engine
    metrics = fitted.metrics
    if test.y is not None and len(test.y):  # some test image scored
        metrics["test"] = compute_metrics(test.y, test.proba, fitted.classes)
        log.info("test accuracy %.4f (95%% interval %.4f-%.4f, balanced %.4f, macro-F1 %.4f) on %d images",
                 metrics["test"]["accuracy"], *metrics["test"]["accuracy_ci95"], metrics["test"]["balanced_accuracy"],
                 metrics["test"]["macro_f1"], metrics["test"]["n_images"])
    elif not feats.te.any():
        log.warning("no test split: pass --test-fraction > 0 or a test/ folder to measure the model.")
    ext = feats.ext
    metrics.update({
        "wall_seconds": round(wall, 2),
        "duplicates_across_splits": ctx.summary["duplicates_across_splits"],
        "extraction": {"images": len(feats.paths), "from_cache": ext.n_cached, "computed": ext.n_computed,
                       "failed": len(ext.failures), "seconds": round(ext.seconds, 2),
                       "images_per_second": round(ext.n_computed / ext.seconds, 1) if ext.n_computed else None,
                       "network_images": engine.n_images},
        "head_seconds": round(fitted.head_seconds, 2),
        "n_train": int(feats.tr.sum()), "n_val": int(feats.va.sum()), "n_test": int(feats.te.sum()),
    })
    return metrics


def resolved_config(ctx: RunContext, fitted: Fitted) -> dict:
    """config.json: the settings as given, and what each "auto" became."""
    cfg, feats = ctx.cfg, ctx.feats
    return {
        **cfg.to_dict(),
        "image_size": ctx.image_size, "image_size_reason": ctx.size_reason,
        "image_size_rule": IMAGE_SIZE_RULE if cfg.image_size == "auto" else None,
        "resolved_strategy": fitted.strategy, "strategy_decision": fitted.decision, "unused_settings": fitted.unused,
        "out": str(ctx.final), "cache_dir": str(feats.cache.dir.parent.parent) if feats.cache.dir else None,
        "cache_namespace": feats.cache.key,
        "preprocessing": ctx.prep.to_dict(), "weights": ctx.winfo.to_dict(), "engine": ctx.choice.to_dict(),
        "head_settings": fitted.head.config(), "classes": ctx.data.classes, "data_summary": ctx.summary,
        # what evaluate uses for this run unless told otherwise, so it scores as the run did
        "requested_engine": {"device": cfg.device, "engine": cfg.engine, "precision": cfg.precision},
        "feature_dim": ctx.entry.feature_dim, "versions": _versions(), "command": sys.argv,
        # what --ft-precision became, and why (learn/precision.choose_precision); None without phase 2
        "finetune_precision": (fitted.metrics.get("fine_tune") or {}).get("precision"),
    }


def save_model(ctx: RunContext, fitted: Fitted) -> Model:
    """Save the bundle into the run and load it back, as `evaluate` will load it."""
    engine, prep, winfo, entry = ctx.engine, ctx.prep, ctx.winfo, ctx.entry
    head, int8 = fitted.head, getattr(engine, "int8", None)
    if int8 is not None:  # the bundle carries the quantised backbone its head was fitted on
        int8 = Int8Source(int8.digest, onnx=engine.int8_onnx((prep.crop_size, prep.crop_size)))
    bundle = Model(entry=entry, backbone=engine.model, head=fitted.head_module, classes=fitted.classes,
                   preprocessing=prep, weights=winfo, int8=int8,
                   head_config={**head.config(), "in_features": entry.feature_dim, "n_classes": len(fitted.classes)},
                   strategy=fitted.strategy, backbone_identity=fitted.identity or winfo.identity())
    save_bundle(bundle, ctx.out / "model")
    return load(ctx.out / "model")


def choose_test_views(ctx: RunContext, fitted: Fitted, model: Model) -> dict | None:
    """Set the saved model's test-time views (`--tta`) and return auto's decision (None when asked for).

    "auto" measures flips on the validation split (auto.choose_tta), and only for a network trained on
    mirror images (--augment flip, the fine-tuning default): only there did the user say that a mirrored
    image keeps its class. A model with flips is saved again: model.json says which views to average.
    """
    cfg, decision = ctx.cfg, None
    if cfg.tta != "auto":
        model.tta = cfg.tta
    else:
        decision = _measure_flips(cfg, fitted, ctx.feats, model)
        model.tta = decision["tta"]
        log.info("tta auto -> %s: %s", model.tta, "; ".join(decision["reasons"]))
    if model.tta != "none":
        save_bundle(model, ctx.out / "model")  # the same tensors, and the views in model.json
    return decision


def _measure_flips(cfg: TrainConfig, fitted: Fitted, feats, model: Model) -> dict:
    known = feats.va & (fitted.cols >= 0)
    reason = None
    if fitted.strategy == "feature-extraction" or cfg.finetune is None or cfg.finetune.augment != "flip":
        reason = "the network was not trained on mirror images (--augment flip); pass --tta flip to average them"
    elif not known.any():
        reason = "no validation images to measure flips on"
    if reason:
        return {"tta": "none", "reasons": [reason], "measurements": {}}
    model.tta = "flip"  # both views, from which each choice's probabilities follow
    paths = [s.path for s, k in zip(feats.samples, known) if k]
    runtime = Runtime.of(cfg.runtime, cache_dir=cfg.cache_dir if feats.cache.dir is not None else "none")
    t0 = time.perf_counter()
    both, failures = features_of(model, paths, runtime, desc="val views")
    # Both views of every validation image went through the network (a trained backbone's features are new):
    # half of that is what a flip adds to each predicted image.
    seconds_per_view = (time.perf_counter() - t0) / max(1, 2 * len(paths))
    y_val = fitted.cols[known][[p not in failures for p in paths]]
    image_only = softmax(model.logits_from_features(both[:, :model.entry.feature_dim]))
    return choose_tta(y_val, image_only, model.proba_from_features(both), seconds_per_view)


def score_test_split(model: Model, cfg: TrainConfig, feats, cols: np.ndarray) -> TestScores:
    """Paths, labels (head columns) and probabilities of the test images whose class the model knows."""
    te = feats.te
    y_test = cols[te]
    known = y_test >= 0
    if not known.all():
        log.warning("%d test images belong to classes with no training images and are left out of the "
                    "test metrics.", int((~known).sum()))
    paths = [s.path for s, t in zip(feats.samples, te) if t]
    paths, y_test = [p for p, k in zip(paths, known) if k], y_test[known]
    if not paths:
        return TestScores([], None, None, model.classes)
    # A cache that failed has been warned about once; the test split then goes without it too.
    runtime = Runtime.of(cfg.runtime, cache_dir=cfg.cache_dir if feats.cache.dir is not None else "none")
    feats_test, failures = features_of(model, paths, runtime, desc="test")
    keep = np.array([p not in failures for p in paths], dtype=bool)
    for p, reason in failures.items():  # read once already: it changed during the run
        log.warning("test image %s became unreadable during the run and is left out: %s", p, reason)
    return TestScores([p for p, k in zip(paths, keep) if k], y_test[keep], model.proba_from_features(feats_test),
                      model.classes)
