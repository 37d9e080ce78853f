"""Training a run: `train` and its steps, each a named function (data, image size, weights, engine,
features, skipped files, strategy, model, test scores, outputs).

The run directory's life (built aside and published, its log, checkpoints, resume) is
rundir.py's; the settings and their rules are settings.py's. A published run directory
holds the resolved config, metrics, splits, skipped files, model bundle, test predictions,
plots, report and log of a finished run.

Under torchrun (distributed.py) every rank calls `train`: the ranks share the extraction and the
fine-tuning, rank 0 runs every step and writes the run, and the other ranks run `help_rank`'s
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
from pathlib import Path

import numpy as np
import PIL
import sklearn
import torch
import torchvision

from . import distributed, memory
from ._version import __version__
from .backbones import get_backbone
from .bundle import Model, load
from .bundle import save as save_bundle
from .data import ImageData, check_input, load_data
from .engine import choose_engine, make_engine
from . import rundir
from .errors import DataError, HeadstartError
from .datachecks import content_digests, cross_split_copies, warn_cross_split_copies
from .features import FeatureCache, cache_root_of, extract, image_key, make_namespace
from .fileio import write_json, write_text
from .heads import cross_validate, make_head, softmax
from .images import load_image
from .metrics import compute_metrics
from .plots import plot_confusion_matrix, plot_training_curve, plot_worst_errors
from .predict import features_of
from .quantize import Int8Source, calibration_from
from .report_html import write_reports
from .reporting import format_report
from .runreport import write_test_predictions
from .loop import HistoryCSV, TensorBoard, check_tensorboard
from .text import count
from .weights import load_backbone
from .finetune_run import backbone_identity, run_fine_tune
from .auto import choose_strategy, choose_tta
from .imagesize import RULE as IMAGE_SIZE_RULE
from .imagesize import auto_image_size, median_side
from .settings import SCRATCH_DEFAULTS, STRATEGIES, Runtime, TrainConfig  # noqa: F401 (public here too)

log = logging.getLogger("headstart")

__all__ = ["train", "resume", "Run", "TrainConfig", "STRATEGIES", "auto_image_size"]


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
            "pillow": PIL.__version__, "platform": platform.platform()}


def train(data: str | os.PathLike, **settings) -> Run | None:
    """Train a model on an image folder (or labels CSV) and write its run directory.

    Settings are the fields of TrainConfig (backbone, head, image_size, seed, out, ...);
    `finetune` takes a FineTuneSettings or a dict of its fields. Under torchrun, rank 0 returns
    the run and the other ranks None.
    """
    cfg = TrainConfig(data=os.fspath(data), **settings).validate()
    with distributed.session(cfg.device):
        return _train_or_help(cfg)


def _train_or_help(cfg: TrainConfig) -> Run | None:
    if cfg.strategy == "ensemble" and distributed.world_size() > 1:
        raise HeadstartError("--strategy ensemble trains its members one after the other in one process; run it "
                             "without torchrun, or train --strategy fine-tune under torchrun.")
    if cfg.finetune is not None:
        from .distributed_training import check_supported

        check_supported(cfg.finetune)  # --bn-update under torchrun on CPU is refused before any work
    entry = resolve_backbone(cfg)
    if cfg.tensorboard:
        check_tensorboard()  # before anything is written
    check_input(cfg.data, cfg.labels)  # a wrong path is named before anything (runs/ included) is created
    cache_root = cache_root_of(cfg.cache_dir)
    final = rundir.choose(cfg.out, cfg.overwrite)
    final = distributed.broadcast_object(final, "agreeing on the run directory")  # runs/<time> is rank 0's
    rundir.check_outside(cfg.data, cfg.labels, final, cache_root)  # before anything is written
    if not distributed.is_main():
        help_rank(cfg, entry, cache_root, final)
        return None
    with rundir.building(final) as out:
        run = _train(cfg, entry, cache_root, out, final)
    log.info("run written to %s", final)
    return run


def resume(run_dir: str | os.PathLike) -> Run:
    """Continue an interrupted fine-tuning run from its last checkpoint, with the settings it was started with."""
    saved, source = rundir.resume_settings(run_dir)
    cfg = TrainConfig.from_saved(saved, source)  # a clear message if this version cannot read them
    settings = cfg.to_dict()
    settings.update(out=os.fspath(Path(run_dir).expanduser().absolute()), resume=True)
    return train(settings.pop("data"), **settings)


def resolve_backbone(cfg: TrainConfig):
    """The backbone entry, with the rules that depend on it: blocks to fine-tune, the default unfreeze."""
    entry = get_backbone(cfg.backbone)
    if not entry.blocks:  # a timm model that cannot be cut into blocks (timm_backbones.py)
        if cfg.strategy != "auto" and cfg.strategy != "feature-extraction":
            raise HeadstartError(f"{entry.name} has no blocks to fine-tune; use --strategy feature-extraction.")
        if cfg.strategy == "auto":
            log.info("strategy auto -> feature-extraction: %s has no blocks to fine-tune", entry.name)
        cfg.strategy, cfg.finetune = "feature-extraction", None
    ft = cfg.finetune
    if ft is not None:
        if ft.unfreeze is None:
            ft.unfreeze = min(entry.default_unfreeze, len(entry.blocks))
        if ft.unfreeze != "all" and not 0 <= int(ft.unfreeze) <= len(entry.blocks):
            raise HeadstartError(f"--unfreeze {ft.unfreeze}: {entry.name} has {len(entry.blocks)} blocks "
                                 f"({', '.join(entry.blocks)}); use 0..{len(entry.blocks)} or 'all'.")
    return entry


def _train(cfg: TrainConfig, entry, cache_root: Path | None, out: Path, final: Path, member: bool = False) -> Run:
    """The run's steps, writing into `out` (the partial directory that becomes `final`); an ensemble's
    `member` (whose strategy may be auto) trains one model, never an ensemble of its own."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data, bad_rows, summary = load_run_data(cfg, cache_root)
    ensemble_decision = None
    if cfg.strategy in ("ensemble", "auto") and not member:  # a fine-tuned and a scratch member, averaged (ensemble_run.py)
        from .ensemble_run import plan_ensemble, train_ensemble

        ensemble_decision = plan_ensemble(cfg, data, median_side(data) if cfg.strategy == "auto" else None)
        if ensemble_decision["ensemble"]:
            config, metrics, model, skipped = train_ensemble(cfg, ensemble_decision, data, cache_root, out, final,
                                                             t_start, run_member)
            return Run(run_dir=final, config=config, metrics=metrics, model=model, skipped=skipped)
    image_size, size_reason = choose_image_size(cfg, entry, data)
    prep = entry.preprocessing.scaled(image_size)
    log.info("image size %d (%s); resize %d, crop %d", image_size, size_reason, prep.resize_size, prep.crop_size)
    backbone, winfo = load_weights(cfg, entry)
    choice, engine = build_engine(cfg, backbone, cache_root, data, prep)
    feats = extract_features(cfg, entry, winfo, prep, choice, engine, data, cache_root)
    memory.note("features extracted")
    skipped = check_skipped(cfg, bad_rows, data, feats.ext)
    check_training_classes(data, feats)

    fitted = fit_strategy(cfg, entry, engine, prep, feats, out, final)
    bundle = save_model(cfg, entry, engine, prep, winfo, fitted, out)
    tta_decision = choose_test_views(cfg, fitted, feats, bundle, out)
    # From here on the run uses the saved model, loaded as `evaluate` loads it, and scores its test split
    # through the same feature path and engine settings: metrics.json's numbers are what evaluate gives.
    memory.note("model saved")
    test_paths, y_test, proba = score_test_split(bundle, cfg, feats, fitted.cols)
    memory.note("test split scored")
    metrics = run_metrics(fitted, feats, engine, summary, y_test, proba, time.perf_counter() - t_start)
    resolved = resolved_config(cfg, entry, (image_size, size_reason), prep, winfo, choice, feats, fitted, data,
                               summary, final)
    resolved.update(resolved_tta=bundle.tta, tta_decision=tta_decision)  # what --tta became, and why
    if ensemble_decision is not None and resolved["strategy_decision"] is not None:  # auto: why no ensemble
        resolved["strategy_decision"]["ensemble"] = ensemble_decision
    write_outputs(out, final, resolved, metrics, skipped, data, feats, fitted, test_paths, y_test, proba)
    return Run(run_dir=final, config=resolved, metrics=metrics, model=bundle, skipped=skipped)


def run_member(cfg: TrainConfig, cache_root: Path | None, out: Path) -> Run:
    """An ensemble's member: an ordinary run written into `out` (inside the ensemble's partial run)."""
    return _train(cfg, resolve_backbone(cfg), cache_root, out, out, member=True)


def run_metrics(fitted: Fitted, feats: Features, engine, summary: dict, y_test, proba, wall: float) -> dict:
    """metrics.json: the strategy's own numbers, the test split's scores, counts and timings."""
    metrics = fitted.metrics
    if y_test is not None and len(y_test):  # some test image scored
        metrics["test"] = compute_metrics(y_test, proba, fitted.classes)
        log.info("test accuracy %.4f (95%% interval %.4f-%.4f, balanced %.4f, macro-F1 %.4f) on %d images",
                 metrics["test"]["accuracy"], *metrics["test"]["accuracy_ci95"], metrics["test"]["balanced_accuracy"],
                 metrics["test"]["macro_f1"], metrics["test"]["n_images"])
    elif not feats.te.any():
        log.warning("no test split: pass --test-fraction > 0 or a test/ folder to measure the model.")
    ext = feats.ext
    metrics.update({
        "wall_seconds": round(wall, 2),
        "duplicates_across_splits": summary["duplicates_across_splits"],
        "extraction": {"images": len(feats.paths), "from_cache": ext.n_cached, "computed": ext.n_computed,
                       "failed": len(ext.failures), "seconds": round(ext.seconds, 2),
                       "images_per_second": round(ext.n_computed / ext.seconds, 1) if ext.n_computed else None,
                       "network_images": engine.n_images},
        "head_seconds": round(fitted.head_seconds, 2),
        "n_train": int(feats.tr.sum()), "n_val": int(feats.va.sum()), "n_test": int(feats.te.sum()),
    })
    return metrics


def resolved_config(cfg: TrainConfig, entry, size: tuple[int, str], prep, winfo, choice, feats: Features,
                    fitted: Fitted, data: ImageData, summary: dict, final: Path) -> dict:
    """config.json: the settings as given, and what each "auto" became."""
    return {
        **cfg.to_dict(),
        "image_size": size[0], "image_size_reason": size[1],
        "image_size_rule": IMAGE_SIZE_RULE if cfg.image_size == "auto" else None,
        "resolved_strategy": fitted.strategy, "strategy_decision": fitted.decision, "unused_settings": fitted.unused,
        "out": str(final), "cache_dir": str(feats.cache.dir.parent.parent) if feats.cache.dir else None,
        "cache_namespace": feats.cache.key,
        "preprocessing": prep.to_dict(), "weights": winfo.to_dict(), "engine": choice.to_dict(),
        "head_settings": fitted.head.config(), "classes": data.classes, "data_summary": summary,
        # what evaluate uses for this run unless told otherwise, so it scores as the run did
        "requested_engine": {"device": cfg.device, "engine": cfg.engine, "precision": cfg.precision},
        "feature_dim": entry.feature_dim, "versions": _versions(), "command": sys.argv,
        # what --ft-precision became, and why (finetune_precision.choose); None without phase 2
        "finetune_precision": (fitted.metrics.get("fine_tune") or {}).get("precision"),
    }


def help_rank(cfg: TrainConfig, entry, cache_root: Path | None, final: Path) -> None:
    """A rank other than 0 under torchrun: `_train`'s steps up to its share of the extraction and of the
    fine-tuning (the collectives rank 0 meets there); rank 0 saves, scores and writes the run."""
    torch.manual_seed(cfg.seed)
    data, bad_rows, _ = load_run_data(cfg, cache_root)
    image_size, _ = choose_image_size(cfg, entry, data)
    prep = entry.preprocessing.scaled(image_size)
    backbone, winfo = load_weights(cfg, entry)
    choice, engine = build_engine(cfg, backbone, cache_root, data, prep)
    feats = extract_features(cfg, entry, winfo, prep, choice, engine, data, cache_root)
    check_skipped(cfg, bad_rows, data, feats.ext)
    check_training_classes(data, feats)
    if cfg.strategy != "feature-extraction":  # auto may fine-tune: it follows rank 0's choice
        fit_strategy(cfg, entry, engine, prep, feats, None, final)


def load_run_data(cfg: TrainConfig, cache_root: Path | None = None) -> tuple[ImageData, list[dict], dict]:
    """The images, their classes and splits; unusable CSV rows; the summary config.json records.
    File digests (copies across splits) are kept in `cache_root` for the next run."""
    data, bad_rows = load_data(cfg.data, labels=cfg.labels, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction)
    summary = data.summary()
    log.info("data %s: %s in %s (train %d, val %d, test %d)", data.root, count(summary["n_images"], "image"),
             count(len(data.classes), "class"), summary["splits"]["train"], summary["splits"]["val"],
             summary["splits"]["test"])
    for item in data.ignored:
        log.warning("skipping %s: %s", item["path"], item["reason"])
    all_paths = [s.path for s in data.samples]
    summary["duplicates_across_splits"] = cross_split_copies(all_paths, [s.split for s in data.samples],
                                                             content_digests(all_paths, cache_root=cache_root))
    warn_cross_split_copies(summary["duplicates_across_splits"])
    if len(data.classes) < 2:
        raise DataError(f"{data.root} has a single class ({data.classes[0]}); a classifier needs at least two "
                        "class folders.")
    return data, bad_rows, summary


def choose_image_size(cfg: TrainConfig, entry, data: ImageData) -> tuple[int, str]:
    """The crop size of the run and why: asked for, or `auto_image_size` of the data for the run's strategy."""
    if cfg.image_size == "auto":
        return auto_image_size(data, entry.input_size, cfg.strategy)
    return int(cfg.image_size), "asked for"


def load_weights(cfg: TrainConfig, entry):
    """The backbone network with its weights (ImageNet's, a file, or a seeded random init) and where they came from."""
    backbone, winfo = load_backbone(entry, cfg.weights, seed=cfg.seed)
    log.info("backbone %s, weights: %s", entry.name, winfo.source)
    return backbone, winfo


def build_engine(cfg: TrainConfig, backbone, cache_root: Path | None, data: ImageData, prep):
    """The engine choice (engine.choose_engine's rule, or what was asked for) and the engine running `backbone`;
    int8 is calibrated on the training split (`_int8_calibration`)."""
    rt = cfg.runtime
    choice = choose_engine(rt.device, rt.engine, rt.precision)
    log.info("engine %s, precision %s on %s (%s)", choice.engine, choice.precision, choice.device, choice.reason)
    return choice, make_engine(backbone, choice, cache_root, _int8_calibration(cfg, choice, data, prep))


@dataclass
class Features:
    """The run's images through the frozen backbone: features and labels of the readable ones, by split."""

    ext: object  # features.Extraction: keys, failures, counts and timing
    cache: FeatureCache
    classes: list[str]  # the data's classes; `y` indexes them
    paths: list[str]  # every image of the data, readable or not
    samples: list  # the readable images (data.Sample), in data order
    X: np.ndarray  # (n_readable, feature_dim)
    y: np.ndarray  # class index in data.classes
    tr: np.ndarray  # split masks over `samples`
    va: np.ndarray
    te: np.ndarray


def extract_features(cfg: TrainConfig, entry, winfo, prep, choice, engine, data: ImageData,
                     cache_root: Path | None) -> Features:
    """Features of every image through the feature cache (computed only where missing)."""
    int8 = getattr(engine, "int8", None)  # the calibration decides int8 features
    cache = FeatureCache(cache_root, make_namespace(entry.name, winfo.identity(), prep, choice, int8))
    paths = [s.path for s in data.samples]
    ext = extract(engine, prep.transform(), paths, cache, batch_size=cfg.batch_size, workers=cfg.workers,
                  desc="extracting", sharded=True)  # under torchrun each rank computes its share
    samples = [s for s, good in zip(data.samples, ext.ok) if good]
    X = cache.get([k for k in ext.keys if k is not None])
    y = np.array([s.label for s in samples], dtype=np.int64)
    split = np.array([s.split for s in samples])
    return Features(ext, cache, data.classes, paths, samples, X, y, split == "train", split == "val", split == "test")


def check_skipped(cfg: TrainConfig, bad_rows: list[dict], data: ImageData, ext) -> list[dict]:
    """Every file not used, with why; with --strict, any of them stops the run."""
    # Unusable CSV rows, non-image files and links the scan passed over (hidden files are not data
    # and are not listed), and images that could not be decoded.
    skipped = bad_rows + data.ignored + [{"path": p, "reason": r} for p, r in ext.failures.items()]
    if skipped and cfg.strict:
        listing = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
        raise DataError(f"--strict: {len(skipped)} unusable files, nothing trained (drop --strict to skip them "
                        f"and go on):\n{listing}")
    return skipped


def check_training_classes(data: ImageData, feats: Features) -> None:
    """Warn about classes that lost every training image; refuse fewer than two classes to train on."""
    y, tr = feats.y, feats.tr
    lost = sorted({data.classes[s.label] for s in data.split("train")} - {data.classes[i] for i in y[tr]})
    if lost:
        log.warning("classes %s have no readable training image left (see the skipped files); the model "
                    "cannot predict them.", lost)
    if len(np.unique(y[tr])) < 2:
        raise DataError("the training split has fewer than two classes with readable images; add images or "
                        "lower --val-fraction/--test-fraction.")


@dataclass
class Fitted:
    """What the strategy step trained: the head (and, fine-tuned, the backbone changed in place)."""

    head: object  # the scikit-learn-style head of phase 1
    head_module: torch.nn.Module  # the head as torch, possibly fine-tuned
    classes: list[str]  # the head's classes (columns)
    cols: np.ndarray  # head output column of each readable image; -1 for a class the head lacks
    strategy: str  # the strategy used ("auto" resolved)
    decision: dict | None  # auto's choice and reasons
    unused: dict  # fine-tuning settings given but not used (auto chose feature extraction)
    metrics: dict
    identity: str | None  # what the feature cache keys a fine-tuned backbone on; None: the weights' identity
    history: dict | None  # epoch history for the training curve
    head_seconds: float


def fit_strategy(cfg: TrainConfig, entry, engine, prep, feats: Features, out: Path | None, final: Path) -> Fitted:
    """Phase 1 (a head on the frozen features), auto's choice, --cv, then phase 2 if the strategy has one."""
    epoch_logs = _epoch_logs(cfg, out, "head")
    t_head = time.perf_counter()
    head = fit_head(cfg, feats, epoch_logs)
    strategy, decision, unused = cfg.strategy, None, {}
    if cfg.strategy == "auto":
        strategy, decision, unused, head = choose_auto(cfg, feats, head)
    head_seconds = time.perf_counter() - t_head
    X, y, tr, va = feats.X, feats.y, feats.tr, feats.va
    classes = [feats.classes[i] for i in head.classes_]
    label_to_col = {c: i for i, c in enumerate(classes)}
    fitted = Fitted(head=head, head_module=head.to_torch(), classes=classes,
                    cols=np.array([label_to_col.get(feats.classes[i], -1) for i in y]), strategy=strategy,
                    decision=decision, unused=unused, metrics={"val_accuracy": getattr(head, "val_accuracy_", None)},
                    identity=None, history=getattr(head, "history_", None), head_seconds=head_seconds)
    if cfg.cv is not None and out is not None:  # a helper rank (out None) reports nothing
        fitted.metrics["cv"] = _cross_validate(cfg, X[tr | va], y[tr | va], strategy)
    if strategy == "scratch":
        reset_head(cfg, fitted.head_module)
    if strategy != "feature-extraction":  # scratch trains with the same loop as fine-tuning
        fine_tune_step(cfg, entry, engine, prep, feats, fitted, epoch_logs, final)
    for cb in epoch_logs:
        getattr(cb, "close", lambda: None)()  # TensorBoard's writer, before the run directory is renamed
    return fitted


def _fit_args(feats: Features) -> tuple:
    X, y, tr, va = feats.X, feats.y, feats.tr, feats.va
    return X[tr], y[tr], X[va] if va.any() else None, y[va] if va.any() else None


def fit_head(cfg: TrainConfig, feats: Features, epoch_logs: list):
    """Phase 1: the head on the frozen features of the training split, validated on the validation split."""
    # Fine-tuning validates on the validation split next, so its phase-1 head must not have seen it.
    head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed,
                     refit=cfg.strategy == "feature-extraction")
    head.fit(*_fit_args(feats), **({"callbacks": epoch_logs} if cfg.head == "mlp" else {}))  # linear: no epochs
    return head


def choose_auto(cfg: TrainConfig, feats: Features, head):
    """Strategy auto: fine-tune or keep feature extraction (auto.choose_strategy), with its reasons.

    Returns (strategy, decision, unused settings, head): feature extraction refits the head on
    train + validation, as `--strategy feature-extraction` does, and lists the fine-tuning
    settings the caller gave that it does not use.
    """
    ext, ft = feats.ext, cfg.finetune
    rate = ext.n_computed / ext.seconds if ext.n_computed and ext.seconds else None
    decision = choose_strategy(feats.y[feats.tr], getattr(head, "val_accuracy_", None), len(feats.paths), rate,
                               ft.epochs, ft.time_budget)
    decision = distributed.broadcast_object(decision, "the auto strategy")  # under torchrun: rank 0's choice
    strategy, unused = decision["strategy"], {}
    log.info("strategy auto -> %s: %s", strategy, "; ".join(decision["reasons"]))
    if strategy == "feature-extraction":  # no phase 2 follows: refit the head on train + validation
        # The time budget took part in the choice; the other fine-tuning settings go unused.
        unused = {k: getattr(ft, k) for k in cfg.finetune_given if k != "time_budget"}
        if unused:
            log.warning("strategy auto chose feature extraction, so these fine-tuning settings are not used: "
                        "%s (recorded in config.json as unused_settings; pass --strategy fine-tune to "
                        "apply them)", ", ".join("--" + k.replace("_", "-") for k in unused))
        head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed).fit(*_fit_args(feats))
    return strategy, decision, unused, head


def reset_head(cfg: TrainConfig, head_module: torch.nn.Module) -> None:
    """From scratch, the head starts from PyTorch's own init, seeded.

    Phase 1's head was fitted to a random network's features, with its scaler folded in: weights
    sized for features that training is about to change completely (the first epoch's loss was
    in the thousands on FMNIST-TL).
    """
    torch.manual_seed(cfg.seed)
    for m in head_module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def fine_tune_step(cfg: TrainConfig, entry, engine, prep, feats: Features, fitted: Fitted, epoch_logs: list,
                   final: Path) -> None:
    """Phase 2: the top blocks and the head trained together (finetune_run.py); the backbone changes in place."""
    for cb in epoch_logs:
        cb.phase = fitted.strategy
    # Extraction is done (the test split is scored later by the saved model's own engine): its session's
    # arena would otherwise stay resident under all of fine-tuning (memory.py).
    engine.release()
    memory.note("fine-tuning starts")
    ft = run_fine_tune(cfg, entry, engine.model, fitted.head_module, prep, [s.path for s in feats.samples],
                       fitted.cols, feats.tr, feats.va, final, callbacks=epoch_logs)
    # The boundary activations, gradients and optimizer state are gone: hand their heap back before the saved
    # model is compiled again to measure flips and score the test split (the run's peak came there).
    memory.trim()
    memory.note("fine-tuning memory trimmed")
    fitted.identity = backbone_identity(engine.model)  # the backbone changed: its own features, its own cache
    fitted.metrics["phase1_val_accuracy"] = fitted.metrics.pop("val_accuracy")
    fitted.metrics["fine_tune"] = ft.summary
    fitted.metrics["val_accuracy"] = ft.summary["best_val_accuracy"]
    fitted.history = ft.history


def save_model(cfg: TrainConfig, entry, engine, prep, winfo, fitted: Fitted, out: Path) -> Model:
    """Save the bundle into the run and load it back, as `evaluate` will load it."""
    head, int8 = fitted.head, getattr(engine, "int8", None)
    if int8 is not None:  # the bundle carries the quantised backbone its head was fitted on
        int8 = Int8Source(int8.digest, onnx=engine.int8_onnx((prep.crop_size, prep.crop_size)))
    bundle = Model(entry=entry, backbone=engine.model, head=fitted.head_module, classes=fitted.classes,
                   preprocessing=prep, weights=winfo, int8=int8,
                   head_config={**head.config(), "in_features": entry.feature_dim, "n_classes": len(fitted.classes)},
                   strategy=fitted.strategy, backbone_identity=fitted.identity or winfo.identity())
    save_bundle(bundle, out / "model")
    return load(out / "model")


def choose_test_views(cfg: TrainConfig, fitted: Fitted, feats: Features, model: Model, out: Path) -> dict | None:
    """Set the saved model's test-time views (`--tta`) and return auto's decision (None when asked for).

    "auto" measures flips on the validation split (auto.choose_tta), and only for a network trained on
    mirror images (--augment flip, the fine-tuning default): only there did the user say that a mirrored
    image keeps its class. A model with flips is saved again: model.json says which views to average.
    """
    decision = None
    if cfg.tta != "auto":
        model.tta = cfg.tta
    else:
        decision = _measure_flips(cfg, fitted, feats, model)
        model.tta = decision["tta"]
        log.info("tta auto -> %s: %s", model.tta, "; ".join(decision["reasons"]))
    if model.tta != "none":
        save_bundle(model, out / "model")  # the same tensors, and the views in model.json
    return decision


def _measure_flips(cfg: TrainConfig, fitted: Fitted, feats: Features, model: Model) -> dict:
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


def write_outputs(out: Path, final: Path, resolved: dict, metrics: dict, skipped: list[dict], data: ImageData,
                  feats: Features, fitted: Fitted, test_paths, y_test, proba) -> None:
    """config.json, metrics.json, skipped.json, splits.csv, the plots, test predictions and the reports."""
    write_json(out / "config.json", resolved)
    write_json(out / "metrics.json", metrics)
    write_json(out / "skipped.json", skipped)
    write_splits(out / "splits.csv", data, feats.ext)
    _write_plots(out, fitted.history, metrics, test_paths, fitted.classes, y_test, proba)
    if "test" in metrics:
        write_test_predictions(out / "test_predictions.csv", test_paths, y_test, proba, fitted.classes)
        write_text(out / "report.txt", format_report(metrics["test"]) + "\n")
    # report.md and report.html from the files just written, as `headstart report` rebuilds them
    write_reports(out, name=final.name)


def _epoch_logs(cfg: TrainConfig, out: Path | None, phase: str) -> list:
    """The per-epoch logs of the run: history.csv, and TensorBoard event files with --tensorboard."""
    if out is None:  # a helper rank under torchrun writes no logs
        return []
    return [HistoryCSV(out / "history.csv", phase)] + ([TensorBoard(out / "tensorboard", phase)]
                                                       if cfg.tensorboard else [])


def _int8_calibration(cfg: TrainConfig, choice, data: ImageData, prep) -> Int8Source | None:
    """The calibration images of an int8 run: CALIBRATION_IMAGES of the training split (quantize.py)."""
    if choice.precision != "int8":
        return None
    if cfg.strategy != "feature-extraction":
        raise HeadstartError(f"--precision int8 quantises the frozen backbone, so it is for --strategy "
                             f"feature-extraction; --strategy {cfg.strategy} trains the backbone in fp32. Pass "
                             "--strategy feature-extraction, or another --precision.")
    return calibration_from([s.path for s in data.split("train")], prep.transform(), image_key)


def _cross_validate(cfg: TrainConfig, X: np.ndarray, y: np.ndarray, strategy: str) -> dict:
    """K-fold accuracy of the configured head on the cached train + validation features."""
    cv = cross_validate(make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed), X, y, cfg.cv, cfg.seed)
    log.info("%d-fold cross-validation of the %s head on %d train + val images: accuracy %.4f +- %.4f (folds %s)",
             cv["k"], cfg.head, cv["n_images"], cv["accuracy_mean"], cv["accuracy_std"],
             ", ".join(f"{a:.4f}" for a in cv["folds"]))
    if strategy != "feature-extraction":
        log.warning("--cv: the %d-fold accuracy is of the feature-extraction head; strategy auto chose %s, so "
                    "the saved model is not the one cross-validated.", cv["k"], strategy)
    return cv


def score_test_split(model: Model, cfg: TrainConfig, feats: Features, cols: np.ndarray):
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
        return [], None, None
    # A cache that failed has been warned about once; the test split then goes without it too.
    runtime = Runtime.of(cfg.runtime, cache_dir=cfg.cache_dir if feats.cache.dir is not None else "none")
    feats_test, failures = features_of(model, paths, runtime, desc="test")
    keep = np.array([p not in failures for p in paths], dtype=bool)
    for p, reason in failures.items():  # read once already: it changed during the run
        log.warning("test image %s became unreadable during the run and is left out: %s", p, reason)
    return [p for p, k in zip(paths, keep) if k], y_test[keep], model.proba_from_features(feats_test)


def write_splits(path: Path, data: ImageData, ext) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "class", "split", "status"])
    for s, key in zip(data.samples, ext.keys):
        w.writerow([s.path, data.classes[s.label], s.split, "ok" if key is not None else "skipped"])
    write_text(path, buf.getvalue())


def _write_plots(out: Path, history: dict | None, metrics: dict, test_paths, classes, y_test, proba) -> None:
    if history:
        plot_training_curve(history, out / "training_curve.png")
    if "test" in metrics:
        plot_confusion_matrix(metrics["test"]["confusion_matrix"], classes, out / "confusion_matrix.png")
        plot_worst_errors(test_paths, y_test, proba, classes, out / "worst_errors.png", load_image)
