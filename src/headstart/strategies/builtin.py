"""The built-in strategies, each one registry entry (registry.py): feature extraction, fine-tuning,
from scratch, the ensemble and auto.

What each needs is in its traits; what it implies for a run's settings is in `configure` (the
rules config.json's readers rely on: scratch means the small CNN with random weights, the
ensemble's members get their own epochs, --cv only where the head alone is the model); how it
fits is in `fit` (_fitting().py holds the steps they share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headstart.errors import HeadstartError
from headstart.settings import ENSEMBLE, SCRATCH_DEFAULTS
from headstart.strategies.auto import MIN_PER_CLASS
from headstart.strategies.registry import Strategy, register


def _fitting():
    from headstart.strategies import fitting  # deferred: torch and scikit-learn, not needed to list strategies

    return fitting


def _no_scratch_epochs(cfg) -> None:
    if cfg.scratch_epochs is not None:
        raise HeadstartError("--scratch-epochs sets the scratch member of --strategy ensemble (or auto); drop "
                             "it, or choose one of those strategies.")


def _scratch_epochs(cfg) -> None:
    cfg.scratch_epochs = ENSEMBLE.scratch_epochs if cfg.scratch_epochs is None else cfg.scratch_epochs
    if isinstance(cfg.scratch_epochs, bool) or not isinstance(cfg.scratch_epochs, int) or cfg.scratch_epochs < 1:
        raise HeadstartError(f"--scratch-epochs must be a whole number of at least 1, not {cfg.scratch_epochs!r}.")


def _no_cv(cfg, name: str) -> None:
    if cfg.cv is not None:
        raise HeadstartError(f"--cv cross-validates the head on cached features; it does not apply to --strategy "
                             f"{name} (each fold would train the network again). Drop --cv, or use "
                             "--strategy feature-extraction.")


@dataclass(frozen=True)
class FeatureExtraction(Strategy):
    def configure(self, cfg, given: dict) -> dict:
        _no_scratch_epochs(cfg)
        return super().configure(cfg, given)

    def fit(self, ctx):
        # No phase 2 follows: the head is refitted on train + validation once its settings are chosen.
        return _fitting().frozen_head(ctx, self.name, refit=True)


@dataclass(frozen=True)
class FineTune(Strategy):
    def configure(self, cfg, given: dict) -> dict:
        _no_scratch_epochs(cfg)
        _no_cv(cfg, self.name)
        return given

    def fit(self, ctx):
        # Fine-tuning validates on the validation split next, so its phase-1 head must not have seen it.
        fitted = _fitting().frozen_head(ctx, self.name, refit=False)
        return _fitting().train_backbone(ctx, fitted)


@dataclass(frozen=True)
class Scratch(Strategy):
    def configure(self, cfg, given: dict) -> dict:
        _no_scratch_epochs(cfg)
        _no_cv(cfg, self.name)
        if cfg.weights not in (None, "none"):
            raise HeadstartError("--strategy scratch trains from a random initialisation; drop --weights.")
        cfg.weights = "none"
        cfg.backbone = cfg.backbone or "small_cnn"
        return {**SCRATCH_DEFAULTS, **given}

    def fit(self, ctx):
        fitted = _fitting().frozen_head(ctx, self.name, refit=False)
        _fitting().reset_head(ctx.cfg, fitted.head_module)  # the head starts from PyTorch's init, seeded
        return _fitting().train_backbone(ctx, fitted)  # scratch trains with the same loop as fine-tuning


@dataclass(frozen=True)
class Auto(Strategy):
    """Feature extraction or fine-tuning, chosen after phase 1 (auto.py's rule); an ensemble with a scratch
    member first when the images are small (ensemble.py)."""

    def sizing(self, data) -> tuple[str, str]:
        counts = np.bincount([s.label for s in data.samples if s.split == "train"], minlength=len(data.classes))
        smallest = int(counts.min()) if len(counts) else 0
        if smallest < MIN_PER_CLASS:
            return "feature-extraction", (f"--strategy auto will extract features ({smallest} training images in "
                                          f"the smallest class, under {MIN_PER_CLASS})")
        return "fine-tune", "--strategy auto may fine-tune (decided after phase 1)"

    def configure(self, cfg, given: dict) -> dict:
        _scratch_epochs(cfg)
        return given

    def plan_members(self, cfg, data) -> dict:
        from headstart.data.image_size import median_side
        from headstart.strategies.ensemble import plan_ensemble

        return plan_ensemble(cfg, data, median_side(data))

    def fit(self, ctx):
        return _fitting().auto(ctx)


@dataclass(frozen=True)
class EnsembleStrategy(Strategy):
    """Members trained as runs of their own (ensemble.py) and averaged: `plan_members` always says so, so the
    run never asks it to `fit` one model."""

    def configure(self, cfg, given: dict) -> dict:
        _scratch_epochs(cfg)
        _no_cv(cfg, self.name)
        if cfg.resume or cfg.weights == "none":
            raise HeadstartError("--strategy ensemble trains a fine-tuned member on pretrained weights and a "
                                 "scratch member; it has no --resume and no --weights none. Start it again "
                                 "without them.")
        return {"epochs": ENSEMBLE.finetune_epochs, **given}  # the fine-tuning member's, unless --epochs says

    def plan_members(self, cfg, data) -> dict:
        from headstart.strategies.ensemble import plan_ensemble

        return plan_ensemble(cfg, data, None)


# Registered in the order `compare` lists them after auto (the baseline first), as --help shows them.
register(Auto(
    "auto", "phase 1, then feature extraction or fine-tuning by what it measures (and an ensemble on small images)",
    trains_backbone=True, size_rule="fine-tune"))
register(Scratch(
    "scratch", "the small CNN trained from a random initialisation (the baseline)",
    trains_backbone=True, size_rule="fine-tune", compare=(("scratch", {"image_size": "auto"}),)))
register(FeatureExtraction(
    "feature-extraction", "the backbone frozen; a linear or MLP head on its cached features",
    int8=True, compare=(("feature-extraction-linear", {"head": "linear"}), ("feature-extraction-mlp", {"head": "mlp"}))))
register(FineTune(
    "fine-tune", "a head on the frozen features, then the top blocks and the head trained together",
    trains_backbone=True, size_rule="fine-tune", compare=(("fine-tune", {}),)))
register(EnsembleStrategy(
    "ensemble", "a fine-tuned backbone and a scratch CNN trained one after the other, probabilities averaged",
    trains_backbone=True, size_rule="fine-tune", torchrun=False))
