"""Training a head on frozen features, and the run directory that explains the result.

A run is built in `<out>.partial-<pid>` and renamed to `<out>` only when complete, so a
directory at `<out>` always holds the resolved config, metrics, splits, skipped files,
model bundle, test predictions, plots, report and log of a finished run.

The test split is scored by the saved bundle, loaded back as `evaluate` loads it, through
the same feature extraction and engine settings: scoring fine-tuned runs through the
training network on boundary activations instead gave 0.35 where `evaluate` gave 0.325
on a native-bf16 CPU (issue 10), and a run's number must be the one anyone can reproduce.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import sklearn
import torch
import torchvision

from ._version import __version__
from .backbones import get_backbone
from .bundle import Model, load
from .bundle import save as save_bundle
from .data import ImageData, check_input, load_data
from .engine import choose_engine, make_engine
from .errors import DataError, HeadstartError, Interrupted
from .datachecks import content_digests, cross_split_copies, warn_cross_split_copies
from .features import FeatureCache, cache_root_of, extract, make_namespace
from .fileio import write_json, write_text
from .heads import cross_validate, make_head
from .images import load_image
from .metrics import compute_metrics
from .plots import plot_confusion_matrix, plot_training_curve, plot_worst_errors
from .predict import features_of
from .report_html import write_reports
from .reporting import format_report
from .runreport import write_test_predictions
from .loop import HistoryCSV, TensorBoard, check_tensorboard
from .text import count
from .weights import load_backbone
from .finetune_run import backbone_identity, checkpoint_dir, resume_settings, run_fine_tune
from .finetune_run import finish as finish_fine_tune
from .finetune import FineTuneSettings
from .auto import choose_strategy

log = logging.getLogger("headstart")

STRATEGIES = ("feature-extraction", "fine-tune", "scratch", "auto")
# From scratch every block trains, at a from-scratch rate, and BatchNorm must learn its statistics.
SCRATCH_DEFAULTS = {"unfreeze": "all", "bn_update": True, "lr": 1e-3, "epochs": 15, "augment": "none"}


@dataclass
class TrainConfig:
    """Every setting of a run; config.json records them with what each "auto" became."""

    data: str
    labels: str | None = None
    backbone: str | None = None  # mobilenet_v2, or small_cnn for --strategy scratch
    strategy: str = "auto"
    head: str = "linear"
    weights: str | None = None  # None/"imagenet": search the sources; "none": random init; else a file
    image_size: int | str = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    class_weight: str | None = None
    seed: int = 0
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/headstart; "none": no disk cache
    out: str | None = None
    strict: bool = False
    overwrite: bool = False
    finetune: dict = field(default_factory=dict)  # FineTuneSettings fields, for --strategy fine-tune
    resume: bool = False  # continue an interrupted fine-tuning run at `out` from its last checkpoint
    cv: int | None = None  # K: also report K-fold accuracy of the feature-extraction head on train + val
    tensorboard: bool = False  # also write TensorBoard event files into <run>/tensorboard (needs tensorboard)


@dataclass
class Run:
    """What `train` returns: where the run is, what it measured, and the trained model."""

    run_dir: Path
    config: dict
    metrics: dict
    model: Model
    skipped: list[dict] = field(default_factory=list)


MAX_UPSAMPLE = 4


def auto_image_size(data: ImageData, default: int, sample: int = 64) -> tuple[int, str]:
    """The crop size for this data: the backbone's own, unless the images are much smaller.

    Compute grows with the pixel count while accuracy gains flatten (FMNIST-TL: 0.8681 at
    96 px, 0.8700 at 112, 0.8722 at 128; README, "Choosing the image size"), so images are
    upsampled at most MAX_UPSAMPLE times, rounded up to a multiple of 32, and never past
    the backbone's default.
    """
    paths = [s.path for s in data.samples[:: max(1, len(data.samples) // sample)]][:sample]
    sides = []
    for p in paths:
        if not os.path.isfile(p):  # opening a FIFO named like an image would wait forever
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a header's oddities are load_image's to report
                with PIL.Image.open(p) as im:
                    sides.append(min(im.size))
        except Exception:
            continue
    if not sides:
        return default, f"backbone default {default} px (image sizes unknown)"
    median = float(np.median(sides))
    size = int(min(default, max(64, math.ceil(median * MAX_UPSAMPLE / 32) * 32)))
    if size == default:
        return size, f"backbone default {default} px (median image side {median:.0f} px)"
    return size, f"{size} px: median image side {median:.0f} px, upsampled at most {MAX_UPSAMPLE}x"



def _versions() -> dict:
    return {"headstart": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "pillow": PIL.__version__, "platform": platform.platform()}


def _run_dir(out: str | None, overwrite: bool) -> Path:
    final = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    final = final.expanduser().absolute()
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise HeadstartError(f"run directory {final} already exists; pass another --out or --overwrite.")
    return final


def _make_partial(final: Path) -> Path:
    partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _publish(partial: Path, final: Path) -> None:
    """Rename the finished run into place; an overwritten run is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(partial, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # the earlier run goes back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_data_outside(data: str, labels: str | None, out: Path, cache: Path | None) -> None:
    given = Path(labels or data).resolve()  # checked to exist by check_input
    root = given.parent if labels else given  # a labels CSV: its folder holds the data
    for what, p in (("--out", out), ("--cache-dir", cache)):
        if p is not None and (p.resolve() == root or root in p.resolve().parents):
            raise HeadstartError(f"{what} {p} is inside the data folder {root}; headstart never writes into "
                                 "your data. Choose a folder outside it.")


def train(data: str | os.PathLike, **settings) -> Run:
    """Train a model on an image folder (or labels CSV) and write its run directory.

    Settings are the fields of TrainConfig (backbone, head, image_size, seed, out, ...).
    """
    cfg = TrainConfig(data=os.fspath(data), **settings)
    if cfg.strategy not in STRATEGIES:
        raise HeadstartError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {cfg.strategy!r}.")
    if cfg.strategy == "feature-extraction" and cfg.finetune:
        raise HeadstartError(f"fine-tuning settings ({', '.join(sorted(cfg.finetune))}) apply to strategy "
                             "fine-tune, scratch or auto only; drop them, or choose one of those strategies.")
    given_finetune = sorted(cfg.finetune)  # what the caller set, before defaults fill the rest in
    if cfg.strategy == "scratch":
        if cfg.weights not in (None, "none"):
            raise HeadstartError("--strategy scratch trains from a random initialisation; drop --weights.")
        cfg.weights = "none"
        cfg.backbone = cfg.backbone or "small_cnn"
        cfg.finetune = {**SCRATCH_DEFAULTS, **cfg.finetune}
    cfg.backbone = cfg.backbone or "mobilenet_v2"
    entry = get_backbone(cfg.backbone)
    if not entry.blocks:  # a timm model that cannot be cut into blocks (timm_backbones.py)
        if cfg.strategy != "auto" and cfg.strategy != "feature-extraction":
            raise HeadstartError(f"{entry.name} has no blocks to fine-tune; use --strategy feature-extraction.")
        if cfg.strategy == "auto":
            log.info("strategy auto -> feature-extraction: %s has no blocks to fine-tune", entry.name)
        cfg.strategy = "feature-extraction"
    if cfg.strategy != "feature-extraction":
        ft = FineTuneSettings(**cfg.finetune).validate()
        if ft.unfreeze is None:
            ft.unfreeze = min(entry.default_unfreeze, len(entry.blocks))
        cfg.finetune = ft.to_dict()
    unfreeze = cfg.finetune.get("unfreeze", "all")
    if unfreeze != "all" and not 0 <= int(unfreeze) <= len(entry.blocks):
        raise HeadstartError(f"--unfreeze {unfreeze}: {entry.name} has {len(entry.blocks)} blocks "
                             f"({', '.join(entry.blocks)}); use 0..{len(entry.blocks)} or 'all'.")
    if cfg.cv is not None and cfg.strategy in ("fine-tune", "scratch"):
        raise HeadstartError(f"--cv cross-validates the head on cached features; it does not apply to --strategy "
                             f"{cfg.strategy} (each fold would train the network again). Drop --cv, or use "
                             "--strategy feature-extraction.")
    if cfg.tensorboard:
        check_tensorboard()  # before anything is written
    check_input(cfg.data, cfg.labels)  # a wrong path is named before anything (runs/ included) is created
    cache_root = cache_root_of(cfg.cache_dir)
    final = _run_dir(cfg.out, cfg.overwrite)
    _check_data_outside(cfg.data, cfg.labels, final, cache_root)  # before anything is written
    root = logging.getLogger("headstart")
    level = root.level
    partial = handler = None
    created = [p for p in final.parents if not p.exists()]  # folders that creating the run adds, deepest first
    try:
        partial = _make_partial(final)
        handler = logging.FileHandler(partial / "train.log", encoding="utf-8", errors="surrogateescape")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        if root.getEffectiveLevel() > logging.INFO:  # from Python with logging unset: the log still gets INFO
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        run = _train(cfg, entry, cache_root, partial, final, given_finetune)
        _detach(root, handler, level)
        _publish(partial, final)
        finish_fine_tune(final)
        log.info("run written to %s", final)
        return run
    except BaseException as exc:
        if handler is not None:
            _detach(root, handler, level)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        for folder in created:  # a failed first run leaves no empty runs/ behind
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):  # a full disk, a permission, a vanished file: the environment, not a bug
            raise _environment_error(exc, final) from exc
        ckpt = checkpoint_dir(final) / "last.pt"
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted) and ckpt.is_file():
            raise Interrupted(f"fine-tuning checkpoints of the last finished epoch are kept in {ckpt.parent}; "
                              f"continue with: headstart train --resume {final}") from exc
        raise


def _detach(root: logging.Logger, handler: logging.Handler, level: int) -> None:
    root.removeHandler(handler)
    root.setLevel(level)
    handler.close()


def _environment_error(exc: OSError, final: Path) -> HeadstartError:
    full = "free some space, or pass --out and --cache-dir on another disk"
    allowed = "check that you may read the data and write --out and --cache-dir"
    hint = {errno.ENOSPC: full, errno.EDQUOT: full, errno.EACCES: allowed, errno.EPERM: allowed,
            errno.EROFS: "pass --out and --cache-dir on a writable disk"}.get(exc.errno, "check the path named")
    where = f" ({exc.filename})" if exc.filename else ""
    kept = "The earlier run there is untouched." if final.exists() else "Nothing was left there."
    return HeadstartError(f"run {final} was not completed: {exc.strerror or exc}{where}; {hint}. {kept}")


def resume(run_dir: str | os.PathLike) -> Run:
    """Continue an interrupted fine-tuning run from its last checkpoint, with the settings it was started with."""
    settings = resume_settings(run_dir)
    settings.update(out=os.fspath(Path(run_dir).expanduser().absolute()), resume=True)
    return train(settings.pop("data"), **settings)


def _train(cfg: TrainConfig, entry, cache_root: Path | None, out: Path, final: Path,
           given_finetune: list[str] = ()) -> Run:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
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

    if cfg.image_size == "auto":
        image_size, size_reason = auto_image_size(data, entry.input_size)
    else:
        image_size, size_reason = int(cfg.image_size), "asked for"
    prep = entry.preprocessing.scaled(image_size)
    log.info("image size %d (%s); resize %d, crop %d", image_size, size_reason, prep.resize_size, prep.crop_size)

    model, winfo = load_backbone(entry, cfg.weights, seed=cfg.seed)
    log.info("backbone %s, weights: %s", entry.name, winfo.source)
    choice = choose_engine(cfg.device, cfg.engine, cfg.precision)
    log.info("engine %s, precision %s on %s (%s)", choice.engine, choice.precision, choice.device, choice.reason)
    engine = make_engine(model, choice, cache_root)
    namespace = make_namespace(entry.name, winfo.identity(), prep, choice)
    cache = FeatureCache(cache_root, namespace)

    paths = [s.path for s in data.samples]
    ext = extract(engine, prep.transform(), paths, cache, batch_size=cfg.batch_size, workers=cfg.workers,
                  desc="extracting")
    # Every file not used, with why: unusable CSV rows, non-image files and links the scan passed over
    # (hidden files are not data and are not listed), and images that could not be decoded.
    skipped = bad_rows + data.ignored + [{"path": p, "reason": r} for p, r in ext.failures.items()]
    if skipped and cfg.strict:
        listing = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
        raise DataError(f"--strict: {len(skipped)} unusable files, nothing trained (drop --strict to skip them "
                        f"and go on):\n{listing}")

    ok = ext.ok
    samples = [s for s, good in zip(data.samples, ok) if good]
    keys = [k for k in ext.keys if k is not None]
    X = cache.get(keys)
    y = np.array([s.label for s in samples], dtype=np.int64)
    split = np.array([s.split for s in samples])
    tr, va, te = (split == "train"), (split == "val"), (split == "test")
    lost = sorted({data.classes[s.label] for s in data.split("train")} - {data.classes[i] for i in y[tr]})
    if lost:
        log.warning("classes %s have no readable training image left (see the skipped files); the model "
                    "cannot predict them.", lost)
    if len(np.unique(y[tr])) < 2:
        raise DataError("the training split has fewer than two classes with readable images; add images or "
                        "lower --val-fraction/--test-fraction.")

    fine_tune = cfg.strategy != "feature-extraction"  # scratch trains with the same loop; auto may
    # Fine-tuning validates on the validation split next, so its phase-1 head must not have seen it.
    head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed, refit=not fine_tune)
    t_head = time.perf_counter()
    fit_args = (X[tr], y[tr], X[va] if va.any() else None, y[va] if va.any() else None)
    epoch_logs = _epoch_logs(cfg, out, "head")
    head.fit(*fit_args, **({"callbacks": epoch_logs} if cfg.head == "mlp" else {}))  # the linear head has no epochs
    strategy, decision, unused = cfg.strategy, None, {}
    if cfg.strategy == "auto":
        rate = ext.n_computed / ext.seconds if ext.n_computed and ext.seconds else None
        decision = choose_strategy(y[tr], getattr(head, "val_accuracy_", None), len(paths), rate,
                                   cfg.finetune["epochs"], cfg.finetune["time_budget"])
        strategy = decision["strategy"]
        log.info("strategy auto -> %s: %s", strategy, "; ".join(decision["reasons"]))
        if strategy == "feature-extraction":  # no phase 2 follows: refit the head on train + validation
            fine_tune = False
            # The time budget took part in the choice; the other fine-tuning settings go unused.
            unused = {k: cfg.finetune[k] for k in given_finetune if k != "time_budget"}
            if unused:
                log.warning("strategy auto chose feature extraction, so these fine-tuning settings are not used: "
                            "%s (recorded in config.json as unused_settings; pass --strategy fine-tune to "
                            "apply them)", ", ".join("--" + k.replace("_", "-") for k in unused))
            head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed).fit(*fit_args)
    head_seconds = time.perf_counter() - t_head
    cv = _cross_validate(cfg, X[tr | va], y[tr | va], strategy) if cfg.cv is not None else None
    head_classes = [data.classes[i] for i in head.classes_]
    label_to_col = {c: i for i, c in enumerate(head_classes)}
    cols = np.array([label_to_col.get(data.classes[i], -1) for i in y])  # head output column of each image

    metrics: dict = {"val_accuracy": getattr(head, "val_accuracy_", None)}
    if cv is not None:
        metrics["cv"] = cv
    head_module, identity, ft_history = head.to_torch(), winfo.identity(), None
    if strategy == "scratch":
        # Phase 1's head was fitted to a random network's features, with its scaler folded in: weights
        # sized for features that training is about to change completely (the first epoch's loss was
        # in the thousands on FMNIST-TL). From scratch, the head starts from PyTorch's own init too.
        torch.manual_seed(cfg.seed)
        for m in head_module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    if fine_tune:
        for cb in epoch_logs:
            cb.phase = strategy
        ft = run_fine_tune(cfg, entry, engine.model, head_module, prep, [s.path for s in samples], cols, tr, va,
                           final, callbacks=epoch_logs)
        identity = backbone_identity(engine.model)  # the backbone changed: its own features, its own cache
        metrics["phase1_val_accuracy"] = metrics.pop("val_accuracy")
        metrics["fine_tune"] = ft.summary
        metrics["val_accuracy"] = ft.summary["best_val_accuracy"]
        ft_history = ft.history

    for cb in epoch_logs:
        getattr(cb, "close", lambda: None)()  # TensorBoard's writer, before the run directory is renamed
    bundle = Model(entry=entry, backbone=engine.model, head=head_module, classes=head_classes,
                   preprocessing=prep, weights=winfo, head_config={**head.config(), "in_features": entry.feature_dim,
                                                                   "n_classes": len(head_classes)},
                   strategy=strategy, backbone_identity=identity)
    save_bundle(bundle, out / "model")
    # From here on the run uses the saved model, loaded as `evaluate` loads it, and scores its test split
    # through the same feature path and engine settings: metrics.json's numbers are what evaluate gives.
    bundle = load(out / "model")

    # A cache that failed has been warned about once; the test split then goes without it too.
    test_paths, y_test, proba = _score_test_split(bundle, cfg, samples, te, cols,
                                                  cfg.cache_dir if cache.dir is not None else "none")
    if test_paths:
        metrics["test"] = compute_metrics(y_test, proba, head_classes)
        log.info("test accuracy %.4f (95%% interval %.4f-%.4f, balanced %.4f, macro-F1 %.4f) on %d images",
                 metrics["test"]["accuracy"], *metrics["test"]["accuracy_ci95"], metrics["test"]["balanced_accuracy"],
                 metrics["test"]["macro_f1"], metrics["test"]["n_images"])
    elif not te.any():
        log.warning("no test split: pass --test-fraction > 0 or a test/ folder to measure the model.")

    wall = time.perf_counter() - t_start
    metrics.update({
        "wall_seconds": round(wall, 2),
        "duplicates_across_splits": summary["duplicates_across_splits"],
        "extraction": {"images": len(paths), "from_cache": ext.n_cached, "computed": ext.n_computed,
                       "failed": len(ext.failures), "seconds": round(ext.seconds, 2),
                       "images_per_second": round(ext.n_computed / ext.seconds, 1) if ext.n_computed else None,
                       "network_images": engine.n_images},
        "head_seconds": round(head_seconds, 2),
        "n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum()),
    })
    resolved = {
        **dataclasses.asdict(cfg),
        "image_size": image_size, "image_size_reason": size_reason,
        "resolved_strategy": strategy, "strategy_decision": decision, "unused_settings": unused,
        "out": str(final), "cache_dir": str(cache.dir.parent.parent) if cache.dir else None,
        "cache_namespace": cache.key,
        "preprocessing": prep.to_dict(), "weights": winfo.to_dict(), "engine": choice.to_dict(),
        "head_settings": head.config(), "classes": data.classes, "data_summary": summary,
        # what evaluate uses for this run unless told otherwise, so it scores as the run did
        "requested_engine": {"device": cfg.device, "engine": cfg.engine, "precision": cfg.precision},
        "feature_dim": entry.feature_dim, "versions": _versions(), "command": sys.argv,
    }
    write_json(out / "config.json", resolved)
    write_json(out / "metrics.json", metrics)
    write_json(out / "skipped.json", skipped)
    _write_splits(out / "splits.csv", data, ext)
    _write_plots(out, ft_history or getattr(head, "history_", None), metrics, test_paths, head_classes, y_test, proba)
    if "test" in metrics:
        write_test_predictions(out / "test_predictions.csv", test_paths, y_test, proba, head_classes)
        write_text(out / "report.txt", format_report(metrics["test"]) + "\n")
    # report.md and report.html from the files just written, as `headstart report` rebuilds them
    write_reports(out, name=final.name)
    return Run(run_dir=final, config=resolved, metrics=metrics, model=bundle, skipped=skipped)


def _epoch_logs(cfg: TrainConfig, out: Path, phase: str) -> list:
    """The per-epoch logs of the run: history.csv, and TensorBoard event files with --tensorboard."""
    return [HistoryCSV(out / "history.csv", phase)] + ([TensorBoard(out / "tensorboard", phase)]
                                                       if cfg.tensorboard else [])


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


def _score_test_split(model: Model, cfg: TrainConfig, samples, te: np.ndarray, cols: np.ndarray, cache_dir):
    """Paths, labels (head columns) and probabilities of the test images whose class the model knows."""
    y_test = cols[te]
    known = y_test >= 0
    if not known.all():
        log.warning("%d test images belong to classes with no training images and are left out of the "
                    "test metrics.", int((~known).sum()))
    paths = [s.path for s, t in zip(samples, te) if t]
    paths, y_test = [p for p, k in zip(paths, known) if k], y_test[known]
    if not paths:
        return [], None, None
    feats, failures = features_of(model, paths, batch_size=cfg.batch_size, cache_dir=cache_dir,
                                  device=cfg.device, engine=cfg.engine, precision=cfg.precision,
                                  workers=cfg.workers, desc="test")
    keep = np.array([p not in failures for p in paths], dtype=bool)
    for p, reason in failures.items():  # read once already: it changed during the run
        log.warning("test image %s became unreadable during the run and is left out: %s", p, reason)
    return [p for p, k in zip(paths, keep) if k], y_test[keep], model.proba_from_features(feats)


def _write_splits(path: Path, data: ImageData, ext) -> None:
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
