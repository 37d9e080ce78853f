"""A prepared run: the data, its splits, the image size and why, the weights, the engine, the feature
cache and the features, made once by `prepare` and read by every later step.

`train`, the other ranks under torchrun (`train.help_rank`) and `headstart extract` prepare the
same way, so a feature `extract` caches is the one `train` finds, and a strategy's `fit`
(strategies/registry.py) reads everything from one `RunContext` instead of eleven parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart import distributed
from headstart.data.checks import content_digests, cross_split_copies, warn_cross_split_copies
from headstart.data.folders import ImageData, load_data
from headstart.engines.engine import choose_engine, make_engine
from headstart.engines.features import FeatureCache, extract, image_key, make_namespace
from headstart.engines.quantize import Int8Source, calibration_from
from headstart.errors import DataError, HeadstartError
from headstart.learn.loop import HistoryCSV, TensorBoard
from headstart.nets.registry import get_backbone
from headstart.nets.weights import load_backbone
from headstart.progress import count
from headstart.settings import TrainConfig
from headstart.strategies import auto_image_size, get_strategy

log = logging.getLogger("headstart")


@dataclass
class Place:
    """Where a run writes: `out` the partial folder being built (None on a helper rank under torchrun),
    `final` where it is published, `cache_root` the feature cache (None: no disk cache)."""

    out: Path | None
    final: Path
    cache_root: Path | None


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


@dataclass
class RunContext:
    """Everything prepared for a run's strategy: settings, data, size, weights, engine and features."""

    cfg: TrainConfig
    entry: object  # the backbone's registry entry (nets/spec.py)
    place: Place
    data: ImageData
    summary: dict  # the data summary config.json records
    image_size: int
    size_reason: str
    prep: object  # the backbone's preprocessing at image_size (nets/spec.py)
    winfo: object  # where the weights came from (nets/weights.py)
    choice: object  # the engine, precision and device, and why (engines/engine.py)
    engine: object
    feats: Features
    skipped: list[dict]  # every file not used, with why
    epoch_logs: list = field(default_factory=list)  # history.csv (and TensorBoard) of the epochs

    @property
    def out(self) -> Path | None:
        return self.place.out

    @property
    def final(self) -> Path:
        return self.place.final


def resolve_backbone(cfg: TrainConfig):
    """The backbone entry, with the rules that depend on it: blocks to fine-tune, the default unfreeze."""
    entry = get_backbone(cfg.backbone)
    if not entry.blocks:  # a timm model that cannot be cut into blocks (nets/timm_models.py)
        if cfg.strategy != "auto" and get_strategy(cfg.strategy).trains_backbone:
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
    """The crop size of the run and why: asked for, or the image-size rule of the run's strategy on the data."""
    if cfg.image_size == "auto":
        return auto_image_size(data, entry.input_size, cfg.strategy)
    return int(cfg.image_size), "asked for"


def load_weights(cfg: TrainConfig, entry):
    """The backbone network with its weights (ImageNet's, a file, or a seeded random init) and where they came from."""
    backbone, winfo = load_backbone(entry, cfg.weights, seed=cfg.seed)
    log.info("backbone %s, weights: %s", entry.name, winfo.source)
    return backbone, winfo


def build_engine(cfg: TrainConfig, backbone, cache_root: Path | None, data: ImageData, prep):
    """The engine choice (the automatic rule of engines/engine.py, or what was asked for) and the engine running
    `backbone`; int8 is calibrated on the training split (`int8_calibration`)."""
    rt = cfg.runtime
    choice = choose_engine(rt.device, rt.engine, rt.precision)
    log.info("engine %s, precision %s on %s (%s)", choice.engine, choice.precision, choice.device, choice.reason)
    return choice, make_engine(backbone, choice, cache_root, int8_calibration(cfg, choice, data, prep))


def int8_calibration(cfg: TrainConfig, choice, data: ImageData, prep) -> Int8Source | None:
    """The calibration images of an int8 run: CALIBRATION_IMAGES of the training split (quantize.py)."""
    if choice.precision != "int8":
        return None
    if not get_strategy(cfg.strategy).int8:
        raise HeadstartError(f"--precision int8 quantises the frozen backbone, so it is for --strategy "
                             f"feature-extraction; --strategy {cfg.strategy} trains the backbone in fp32. Pass "
                             "--strategy feature-extraction, or another --precision.")
    return calibration_from([s.path for s in data.split("train")], prep.transform(), image_key)


def run_features(cfg: TrainConfig, engine, cache: FeatureCache, transform, data: ImageData) -> Features:
    """Features of every image of `data` through `engine` and the feature cache (computed only where missing)."""
    paths = [s.path for s in data.samples]
    ext = extract(engine, transform, paths, cache, batch_size=cfg.batch_size, workers=cfg.workers,
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


def epoch_logs(cfg: TrainConfig, out: Path | None) -> list:
    """The per-epoch logs of the run: history.csv, and TensorBoard event files with --tensorboard."""
    if out is None:  # a helper rank under torchrun writes no logs
        return []
    return [HistoryCSV(out / "history.csv", "head")] + ([TensorBoard(out / "tensorboard", "head")]
                                                        if cfg.tensorboard else [])


def prepare(cfg: TrainConfig, entry, place: Place, loaded: tuple | None = None) -> RunContext:
    """The preparation every run shares, written once: data (or `loaded`, load_run_data's result), image size,
    weights, engine, features, the skipped files and the classes left to train on."""
    data, bad_rows, summary = loaded or load_run_data(cfg, place.cache_root)
    image_size, size_reason = choose_image_size(cfg, entry, data)
    prep = entry.preprocessing.scaled(image_size)
    log.info("image size %d (%s); resize %d, crop %d", image_size, size_reason, prep.resize_size, prep.crop_size)
    backbone, winfo = load_weights(cfg, entry)
    choice, engine = build_engine(cfg, backbone, place.cache_root, data, prep)
    int8 = getattr(engine, "int8", None)  # the calibration decides int8 features
    cache = FeatureCache(place.cache_root, make_namespace(entry.name, winfo.identity(), prep, choice, int8))
    feats = run_features(cfg, engine, cache, prep.transform(), data)
    skipped = check_skipped(cfg, bad_rows, data, feats.ext)
    check_training_classes(data, feats)
    return RunContext(cfg=cfg, entry=entry, place=place, data=data, summary=summary, image_size=image_size,
                      size_reason=size_reason, prep=prep, winfo=winfo, choice=choice, engine=engine, feats=feats,
                      skipped=skipped, epoch_logs=epoch_logs(cfg, place.out))


def world_check(cfg: TrainConfig) -> None:
    """The one place that refuses what torchrun cannot run: a strategy whose entry says it cannot."""
    if distributed.world_size() > 1 and not get_strategy(cfg.strategy).torchrun:
        raise HeadstartError(f"--strategy {cfg.strategy} trains its members one after the other in one process; "
                             "run it without torchrun, or train --strategy fine-tune under torchrun.")
