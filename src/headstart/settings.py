"""The settings of a run, one typed object per concern, validated once and shared by the API and the CLI.

- `TrainConfig`: what `train` was asked for (data, labels, splits, seed, backbone, weights,
  strategy, head, image size, out, ...). Its layout is config.json's, which `report`,
  `evaluate`, `compare` and `--resume` read back, so its fields stay flat.
- `FineTuneSettings`: phase 2 of fine-tuning (and the from-scratch baseline). The CLI's
  fine-tuning flags are generated from its fields; the help text is the field's metadata.
- `Runtime`: how the backbone runs (device, engine, precision, batch size, decoding workers,
  feature cache), taken by `evaluate`, `predict_files`, `Model.predict_proba` and the server.

The choices the CLI offers are this module's constants. A saved config (an older run's
config.json, an interrupted run's checkpoint config) is read back through `from_saved`,
which names the run, the key and what to do instead of failing with a TypeError.

This module imports nothing heavy (no torch), so `headstart --help` stays quick.
"""

from __future__ import annotations

import math
import numbers
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from headstart.errors import HeadstartError

HEADS = ("linear", "mlp")
CLASS_WEIGHTS = ("balanced",)
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("onnxruntime", "openvino", "torch")  # in the order the automatic rule tries them (engines/rule.py)
PRECISIONS = ("fp32", "bf16", "int8")  # int8: quantize.py, feature extraction on a converted engine
AUGMENTS = ("none", "flip", "light", "standard")
BOUNDARY_AUGMENTS = ("none", "flip")  # these keep the boundary cache: flips are computed once, too
SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("adam", "adamw")
EARLY_STOP_METRICS = ("val_loss", "val_accuracy")
SAMPLERS = ("balanced",)
FT_PRECISIONS = ("auto", "fp32", "bf16")  # fine-tuning's trainable part (finetune_precision.py)
TTAS = ("auto", "none", "flip")  # test-time views: auto (training.choose_test_views), the image, or it and its mirror


@dataclass(frozen=True)
class Limit:
    """The numbers a numeric setting accepts. The settings check them as they are made (`check`), the API's
    and the CLI's alike, before any folder is scanned; `words` is how the error and `--help` say it."""

    kind: type  # int (a whole number) or float
    low: float | None = None
    high: float | None = None
    high_open: bool = False  # `high` itself is refused
    positive: bool = False  # above `low` (0), not equal to it
    why: str = ""  # why the bound, where it is not obvious

    def words(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        if self.positive:
            return f"a positive {what[2:]}"
        if self.low is not None and self.high is not None:
            return f"{what} of at least {self.low} and {'below' if self.high_open else 'at most'} {self.high}"
        return f"{what} of at least {self.low}" if self.low is not None else what

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral if self.kind is int else numbers.Real)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.positive and value == self.low):
            return False
        return self.high is None or value < self.high or value == self.high and not self.high_open

    def check(self, name: str, value) -> None:
        if not self.accepts(value):
            why = f" ({self.why})" if self.why else ""
            raise HeadstartError(f"{_flag(name)} must be {self.words()}, not {value!r}{why}.")


# Every numeric setting's limits, by setting name (the same name in TrainConfig, FineTuneSettings, Runtime and
# the commands' flags): impossible values are refused before any work, with these words.
LIMITS = {
    "image_size": Limit(int, 16, 2048, why="16 px is the least a backbone runs at; they are trained at "
                                           "224-300 px, and memory grows with the square of the size"),
    "val_fraction": Limit(float, 0, 1, high_open=True),
    "test_fraction": Limit(float, 0, 1, high_open=True),
    "seed": Limit(int, 0, 2**32 - 1, why="NumPy's and scikit-learn's seeds"),
    "batch_size": Limit(int, 1),
    "workers": Limit(int, 0, 256, why="each is a process"),
    "cv": Limit(int, 2),
    "scratch_epochs": Limit(int, 1),
    "epochs": Limit(int, 1),
    "lr": Limit(float, 0, positive=True),
    "lr_head": Limit(float, 0, positive=True),
    "lr_decay": Limit(float, 0, positive=True),
    "weight_decay": Limit(float, 0),
    "label_smoothing": Limit(float, 0, 1, high_open=True),
    "patience": Limit(int, 1),
    "time_budget": Limit(float, 0, positive=True),
    "top_k": Limit(int, 1),
    "port": Limit(int, 1, 65535),
}


def check_limits(**values) -> None:
    """Each given setting against its LIMITS entry (None: not set, nothing to check)."""
    for name, value in values.items():
        if value is not None:
            LIMITS[name].check(name, value)


def parse_duration(value) -> float | None:
    """Seconds from 90, "90s", "10m" or "1h"; ValueError otherwise."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    units = {"s": 1, "m": 60, "h": 3600}
    text = str(value)
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass
class FineTuneSettings:
    # Defaults from FMNIST-TL measurements (docs/guides/fine-tuning.md): 8 MobileNetV2 blocks, up to 14
    # epochs, flips (which keep the boundary cache), label smoothing 0.1 and early stopping on
    # validation accuracy gave 0.9117 test accuracy in 12 min 24 s from a cold cache.
    # `help` is the flag's --help line; `default_words` says a default that is not a plain value.
    unfreeze: int | str | None = field(default=None, metadata=_help(
        "top blocks of the backbone to train, a number or 'all'",
        default_words="a number chosen for each backbone"))
    epochs: int = field(default=14, metadata=_help(
        "passes over the training images, at most (early stopping may end sooner)"))
    lr: float = field(default=1e-4, metadata=_help("learning rate of the unfrozen blocks (textbook: 1e-5)"))
    lr_head: float = field(default=1e-3, metadata=_help("learning rate of the head"))
    lr_decay: float = field(default=1.0, metadata=_help(
        "each block further down trains at this times the rate of the block above it (1: all alike)"))
    optimizer: str = field(default="adamw", metadata=_help("the optimizer", choices=OPTIMIZERS))
    weight_decay: float = field(default=1e-4, metadata=_help("weight decay (a pull of the weights towards 0)"))
    label_smoothing: float = field(default=0.1, metadata=_help(
        "share of each training label spread over the other classes (0: none)"))
    schedule: str = field(default="cosine", metadata=_help("how the learning rate changes over the epochs",
                                                           choices=SCHEDULES))
    # mirror images: right for photos and clothes; use "none" for text or digits
    augment: str = field(default="flip", metadata=_help(
        "random changes to training images: flip mirrors them (right for photos and clothes, wrong for text or "
        "digits); light and standard also crop, standard also changes colours", choices=AUGMENTS))
    bn_update: bool = field(default=False, metadata=_help(
        "let BatchNorm statistics in the unfrozen blocks adapt", default_words="off: keep ImageNet's"))
    early_stop_metric: str = field(default="val_accuracy", metadata=_help(
        "what early stopping watches on the validation images", choices=EARLY_STOP_METRICS))
    patience: int = field(default=4, metadata=_help("epochs without improvement before early stopping"))
    # The training batch; not a CLI flag: --batch-size is the extraction batch (Runtime).
    batch_size: int = field(default=64, metadata={"cli": False})
    time_budget: float | None = field(default=None, metadata=_help(
        "stop training after the epoch that passes this time, e.g. 90s, 10m, 1h", parse=parse_duration,
        default_words="none"))
    sampler: str | None = field(default=None, metadata=_help(
        "balanced: draw classes equally often", choices=SAMPLERS,
        default_words="none: every image once per epoch"))
    # The unfrozen blocks' and head's arithmetic: auto follows finetune_precision.choose_precision (fp32 until a
    # measurement on a native-bf16 CPU shows bf16 pays); bf16 is torch's CPU autocast.
    ft_precision: str = field(default="auto", metadata=_help(
        "arithmetic of the trained blocks and head; auto: fp32 unless bf16 was measured faster on this kind "
        "of CPU", choices=FT_PRECISIONS))
    channels_last: bool = field(default=False, metadata=_help(
        "run the trained blocks on channels-last activations (a memory layout; faster on some CPUs)",
        default_words="off"))

    def validate(self) -> "FineTuneSettings":
        if isinstance(self.unfreeze, str) and self.unfreeze != "all":
            try:
                self.unfreeze = int(self.unfreeze)
            except ValueError:
                raise HeadstartError(f"--unfreeze takes a number of blocks or 'all', not {self.unfreeze!r}.") from None
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                raise HeadstartError(f"{_flag(f.name)} must be one of {', '.join(choices)}, not {value!r}.")
        try:
            self.time_budget = parse_duration(self.time_budget)
        except ValueError:
            raise HeadstartError(f"--time-budget: not a duration: {self.time_budget!r} (use e.g. 90s, 10m, "
                                 "1h)") from None
        check_limits(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in LIMITS})
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def cli_fields(cls) -> list:
        """The fields that are `headstart train` flags, in declaration order."""
        return [f for f in fields(cls) if f.metadata.get("cli", True)]


@dataclass(frozen=True)
class Runtime:
    """How the backbone runs: the same settings for training, evaluate, predict and serve."""

    device: str = "auto"  # auto, cpu or cuda
    engine: str = "auto"  # auto or one of ENGINES; auto follows engines/rule.py's fixed rule
    precision: str = "auto"  # auto or one of PRECISIONS
    batch_size: int = 64  # images per network call
    workers: int | None = None  # image decoding processes; None fits the cores
    cache_dir: str | os.PathLike | None = None  # None: $XDG_CACHE_HOME/headstart; "none": no disk cache

    def __post_init__(self):
        if self.device not in DEVICES:  # engine.resolve_device's words
            raise HeadstartError(f"--device must be auto, cpu or cuda, not {self.device!r}.")
        for name, choices in (("engine", ("auto", *ENGINES)), ("precision", ("auto", *PRECISIONS))):
            if getattr(self, name) not in choices:
                raise HeadstartError(f"--{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}.")
        check_limits(batch_size=self.batch_size, workers=self.workers)

    @classmethod
    def of(cls, runtime: "Runtime | None" = None, **kw) -> "Runtime":
        """`runtime`, with any of its fields given as loose keywords (the older public signature) replacing
        its values; an unknown keyword is a TypeError, as for any function."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"runtime settings are {', '.join(sorted(names))}")
        base = runtime if runtime is not None else cls()
        return replace(base, **kw) if kw else base

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Every setting of a run; config.json records them with what each "auto" became."""

    # data
    data: str
    labels: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    # model
    backbone: str | None = None  # mobilenet_v2, or small_cnn for --strategy scratch
    strategy: str = "auto"
    head: str = "linear"
    weights: str | None = None  # None/"imagenet": search the sources; "none": random init; else a file
    image_size: int | str = "auto"
    class_weight: str | None = None
    # runtime (`runtime` gathers them)
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/headstart; "none": no disk cache
    # the run
    out: str | None = None
    strict: bool = False
    overwrite: bool = False
    # Phase 2 (strategy fine-tune, scratch, auto); None for feature extraction. Given as a dict of
    # FineTuneSettings fields or as FineTuneSettings; after validate(), always the latter (or None).
    finetune: FineTuneSettings | dict | None = None
    resume: bool = False  # continue an interrupted fine-tuning run at `out` from its last checkpoint
    cv: int | None = None  # K: also report K-fold accuracy of the feature-extraction head on train + val
    tensorboard: bool = False  # also write TensorBoard event files into <run>/tensorboard (needs tensorboard)
    tta: str = "auto"  # test-time views (TTAS); "auto": flips when they pay on validation (auto.choose_tta)
    # --strategy ensemble (and auto when it trains one): epochs of the scratch member; None: ENSEMBLE's
    scratch_epochs: int | None = None
    # `headstart inspect`'s issues.csv: its files are left out of the run (data/issues.py); exclude_kinds, comma
    # separated, keeps to those kinds of finding (None: every kind in the file)
    exclude: str | None = None
    exclude_kinds: str | None = None
    data_check: bool = True  # look for likely label errors and train/test leaks in the run's features (runs/datacheck.py)
    # The fine-tuning settings the caller set (before defaults filled the rest in): not a setting, not saved.
    finetune_given: tuple = field(default=(), repr=False, compare=False)

    @property
    def runtime(self) -> Runtime:
        return Runtime(device=self.device, engine=self.engine, precision=self.precision, batch_size=self.batch_size,
                       workers=self.workers, cache_dir=self.cache_dir)

    def validate(self) -> "TrainConfig":
        """Check every rule that needs no backbone, data or strategy (the strategy's own rules and what it
        implies are its entry's: strategies.registry.configure applies both)."""
        if self.head not in HEADS:
            raise HeadstartError(f"--head must be one of {', '.join(HEADS)}; got {self.head!r}.")
        if self.tta not in TTAS:
            raise HeadstartError(f"--tta must be one of {', '.join(TTAS)}; got {self.tta!r}.")
        if self.class_weight is not None and self.class_weight not in CLASS_WEIGHTS:
            raise HeadstartError(f"--class-weight must be {' or '.join(CLASS_WEIGHTS)}; got {self.class_weight!r}.")
        self.runtime  # noqa: B018 -- checks device, engine, precision, batch size and workers
        if isinstance(self.image_size, str) and self.image_size != "auto":
            try:
                self.image_size = int(self.image_size)
            except ValueError:
                raise HeadstartError(f"--image-size takes a number of pixels or 'auto', not {self.image_size!r}.") \
                    from None
        check_limits(image_size=None if self.image_size == "auto" else self.image_size,
                     val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed,
                     scratch_epochs=self.scratch_epochs)
        if self.val_fraction + self.test_fraction >= 1:
            raise HeadstartError(f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} "
                                 "leave no training images; their sum must be below 1.")
        given = self.finetune.to_dict() if isinstance(self.finetune, FineTuneSettings) else dict(self.finetune or {})
        self.finetune_given = tuple(sorted(given))
        if self.exclude_kinds and not self.exclude:
            raise HeadstartError("--exclude-kinds chooses rows of an issues.csv: pass the file with --exclude too.")
        if self.exclude is not None:
            self.exclude = os.fspath(self.exclude)
        if self.cv is not None and not LIMITS["cv"].accepts(self.cv):
            raise HeadstartError(f"--cv {self.cv}: K-fold cross-validation needs 2 <= K (and no more folds than "
                                 "train + validation images); pass --cv 2 or more.")
        return self

    def to_dict(self) -> dict:
        """config.json's layout: flat, with the fine-tuning settings as a dict ({} for feature extraction)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "finetune_given"}
        d["finetune"] = self.finetune.to_dict() if isinstance(self.finetune, FineTuneSettings) else dict(
            self.finetune or {})
        return d

    @classmethod
    def from_saved(cls, saved: dict, source: Path) -> "TrainConfig":
        """A config saved by an earlier run (validated again), or a HeadstartError naming `source` and the key."""
        if not isinstance(saved, dict):
            raise _saved_error(source, None, "is not a JSON object")
        fixed = dict(saved)
        check_saved(cls, fixed, source, skip=("finetune", "finetune_given"))
        ft = fixed.get("finetune") or {}
        if not isinstance(ft, dict):
            raise _saved_error(source, "finetune", f"should be an object, not {type(ft).__name__}")
        check_saved(FineTuneSettings, ft, source, prefix="finetune.")
        fixed.pop("finetune_given", None)
        try:
            return cls(**fixed).validate()
        except HeadstartError as exc:
            raise HeadstartError(f"{source}: {exc} The run was started with settings this version refuses; "
                                 "start it again without --resume.") from None


@dataclass(frozen=True)
class EnsembleSettings:
    """The members' epochs of `--strategy ensemble` (and of auto's ensemble), in one place.

    Issue 14: on FMNIST-TL the mean of the fine-tuned MobileNetV2's (0.9094) and the scratch small
    CNN's (0.9084) probabilities gave 0.9228 test accuracy; the two members must fit the default
    run's 15 minutes on 2 cores together, hence fewer epochs each than alone (14 and 15).
    """

    finetune_epochs: int = 8  # the fine-tuning member, unless --epochs is given
    scratch_epochs: int = 8  # the scratch member, unless --scratch-epochs is given


ENSEMBLE = EnsembleSettings()

# From scratch every block trains, at a from-scratch rate, and BatchNorm must learn its statistics.
SCRATCH_DEFAULTS = {"unfreeze": "all", "bn_update": True, "lr": 1e-3, "epochs": 15, "augment": "none"}


def _saved_error(source: Path, key: str | None, what: str) -> HeadstartError:
    where = f"key {key!r} " if key else ""
    return HeadstartError(f"{source}: {where}{what}. It was written by another version of headstart, or edited; "
                          f"fix that key in {source.name}, or train the run again.")


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any or origin is None and hint is object:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is os.PathLike:
        return isinstance(value, str)  # JSON holds paths as strings
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_saved(cls, saved: dict, source: Path, *, skip=(), prefix: str = "") -> None:
    """Unknown keys, missing required keys and values of the wrong type in a saved `cls`, as a HeadstartError.

    A key that an older version did not write takes its default: that is what the older version did.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in saved:
        if key not in known:
            raise _saved_error(source, prefix + key, f"is not a setting of this version ({cls.__name__} has "
                                                     f"{', '.join(known)})")
    for name, f in known.items():
        if name in skip:
            continue
        if name not in saved:
            if f.default is MISSING and f.default_factory is MISSING:
                raise _saved_error(source, prefix + name, "is missing")
            continue
        if not _type_ok(saved[name], hints[name]):
            raise _saved_error(source, prefix + name, f"should be {_type_name(hints[name])}, not "
                                                      f"{saved[name]!r}")


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
