"""The strategy registry: one entry per way of training, as the backbones have theirs.

A strategy is an object that says what it needs and how it fits (`Strategy`): its traits (does it
train the backbone, which image-size rule it follows, may it quantise to int8, may it run under
torchrun, which rows it adds to `compare`), how it completes a run's settings (`configure`), and
how it fits a model on a prepared run (`fit`, given the run context of runs/context.py). `train`,
`auto`, the image-size rule, `compare`, the CLI's choices and the docs' table all read the
registry, so a strategy added with `register` (the built-in ones in builtin.py, or a user's own
from a test file or a notebook) is trained, evaluated, predicted, served, exported and compared
without touching any other module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headstart.errors import HeadstartError

_REGISTRY: dict[str, "Strategy"] = {}


@dataclass(frozen=True)
class Strategy:
    """A way of training. Subclasses override `fit` (and `configure` or `sizing` where they differ)."""

    name: str
    summary: str  # one line: --help, `headstart strategies`, the docs' table
    trains_backbone: bool = False  # phase 2: blocks of the backbone train (fine-tuning settings apply)
    size_rule: str = "feature-extraction"  # the image-size rule it follows (data/image_size.py)
    int8: bool = False  # may run the frozen backbone quantised to int8 (--precision int8)
    torchrun: bool = True  # may run under torchrun (ranks share extraction and fine-tuning)
    # (row name, settings) pairs this strategy adds to `headstart compare`; empty: not compared
    compare: tuple = field(default=())

    def sizing(self, data) -> tuple[str, str]:
        """The image-size rule this strategy follows on `data`, and why (auto decides from the data)."""
        return self.size_rule, f"--strategy {self.name}"

    def configure(self, cfg, given: dict) -> dict:
        """Complete and check `cfg` for this strategy; return the fine-tuning settings it implies (`given`
        are the ones the caller set). The default: no fine-tuning settings apply."""
        if given and not self.trains_backbone:
            raise HeadstartError(f"fine-tuning settings ({', '.join(_flag(k) for k in sorted(given))}) apply to "
                                 f"--strategy {', '.join(n for n, s in _REGISTRY.items() if s.trains_backbone)} "
                                 "only; drop them, or choose one of those strategies.")
        return given

    def plan_members(self, cfg, data) -> dict | None:
        """Whether the run trains members as runs of their own and averages them (strategies/ensemble.py):
        None for a strategy that fits one model, else {"ensemble": bool, "reasons", "measurements"}."""
        return None

    def fit(self, ctx):
        """Train on the prepared run `ctx` (runs/context.py) and return its `Fitted` (strategies/fitting.py)."""
        raise NotImplementedError(f"strategy {self.name} does not say how it fits")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(strategy: Strategy) -> Strategy:
    """Add (or replace) a strategy under its name; returns it, so it can decorate an instance."""
    _REGISTRY[strategy.name] = strategy
    return strategy


def list_strategies() -> list[str]:
    """The registered strategies' names, in the order they were registered."""
    return list(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HeadstartError(f"--strategy must be one of {', '.join(_REGISTRY)}; got {name!r}.") from None


def auto_image_size(data, default: int, strategy: str = "fine-tune", sample: int = 64) -> tuple[int, str]:
    """`--image-size auto`: the crop size of `data` for `strategy` under a backbone of input size `default`,
    and why (the strategy names the rule, data/image_size.py applies it)."""
    from headstart.data.image_size import image_size_for

    return image_size_for(data, default, *get_strategy(strategy).sizing(data), sample=sample)


def configure(cfg):
    """`cfg` (a TrainConfig) checked and completed: the rules that need no strategy (`cfg.validate()`), then its
    strategy's (`Strategy.configure`), with the fine-tuning settings the strategy implies filled in."""
    from dataclasses import fields

    from headstart.settings import FineTuneSettings

    cfg.validate()
    strategy = get_strategy(cfg.strategy)
    given = cfg.finetune.to_dict() if isinstance(cfg.finetune, FineTuneSettings) else dict(cfg.finetune or {})
    given = strategy.configure(cfg, given)
    cfg.backbone = cfg.backbone or "mobilenet_v2"
    if not strategy.trains_backbone:
        cfg.finetune = None
        return cfg
    names = {f.name for f in fields(FineTuneSettings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise HeadstartError(f"unknown fine-tuning settings {unknown}; they are {', '.join(sorted(names))}.")
    cfg.finetune = FineTuneSettings(**given).validate()
    return cfg


def compare_rows() -> dict[str, dict]:
    """`headstart compare`'s rows: name -> train() settings, from every strategy that lists some."""
    return {row: {"strategy": s.name, **settings} for s in _REGISTRY.values() for row, settings in s.compare}
