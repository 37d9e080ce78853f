"""The steps the built-in strategies fit with, on a prepared run (runs/context.py's `RunContext`):
phase 1 (a head on the frozen features), auto's choice, --cv, and phase 2 (the top blocks and
the head trained together, finetune.py).

Each step reads the context it is given (settings, features, engine, the run's folders) and
returns or completes a `Fitted`, which `train` saves, scores and writes the same way for every
strategy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from headstart import distributed, memory
from headstart.learn.finetune import backbone_identity
from headstart.learn.heads import cross_validate, cv_folds, make_head
from headstart.strategies.auto import choose_strategy
from headstart.strategies.finetune import run_fine_tune

log = logging.getLogger("headstart")


@dataclass
class Fitted:
    """What a strategy trained: the head (and, fine-tuned, the backbone changed in place)."""

    head: object  # the scikit-learn-style head of phase 1 (its config() goes into the bundle)
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


def fit_args(feats) -> tuple:
    """(X_train, y_train, X_val, y_val) of the run's features; the validation pair None without a split."""
    X, y, tr, va = feats.X, feats.y, feats.tr, feats.va
    return X[tr], y[tr], X[va] if va.any() else None, y[va] if va.any() else None


def fitted_head(ctx, head, strategy: str, t_head: float) -> Fitted:
    """A `Fitted` for a head fitted on `ctx`'s features (a scikit-learn-style estimator with `classes_` and
    `to_torch()`), timed from `t_head`; a toy strategy of one's own builds its result with this too."""
    feats = ctx.feats
    classes = [feats.classes[i] for i in head.classes_]
    label_to_col = {c: i for i, c in enumerate(classes)}
    return Fitted(head=head, head_module=head.to_torch(), classes=classes,
                  cols=np.array([label_to_col.get(feats.classes[i], -1) for i in feats.y]), strategy=strategy,
                  decision=None, unused={}, metrics={"val_accuracy": getattr(head, "val_accuracy_", None)},
                  identity=None, history=getattr(head, "history_", None),
                  head_seconds=time.perf_counter() - t_head)


def phase1_head(ctx, refit: bool):
    """Phase 1: the configured head on the frozen features of the training split, validated on the validation
    split; `refit` refits it on train + validation once its settings are chosen (nothing validates later)."""
    cfg = ctx.cfg
    head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed, refit=refit,
                     **small_data_cv(cfg.head, ctx.feats))
    return head.fit(*fit_args(ctx.feats), **({"callbacks": ctx.epoch_logs} if cfg.head == "mlp" else {}))


def small_data_cv(head: str, feats) -> dict:
    """A linear head's `cv`: below heads.CV_BELOW train + validation images its C is chosen by K-fold
    cross-validation on them (used where they all join the final fit, `refit`), instead of one validation split."""
    return {"cv": cv_folds(int((feats.tr | feats.va).sum()))} if head == "linear" else {}


def frozen_head(ctx, strategy: str, refit: bool) -> Fitted:
    """Phase 1 as a strategy's result, with --cv's folds when asked."""
    t_head = time.perf_counter()
    fitted = fitted_head(ctx, phase1_head(ctx, refit), strategy, t_head)
    add_cv(ctx, fitted)
    return fitted


def auto(ctx) -> Fitted:
    """Strategy auto: phase 1, then fine-tuning or feature extraction (auto.choose_strategy), with its reasons.

    Feature extraction refits the head on train + validation, as `--strategy feature-extraction` does,
    and lists the fine-tuning settings the caller gave that it does not use.
    """
    cfg, feats, ft = ctx.cfg, ctx.feats, ctx.cfg.finetune
    t_head = time.perf_counter()
    head = phase1_head(ctx, refit=False)
    ext = feats.ext
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
        head = make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed, **small_data_cv(cfg.head, feats)).fit(
            *fit_args(feats))
    fitted = fitted_head(ctx, head, strategy, t_head)
    fitted.decision, fitted.unused = decision, unused
    add_cv(ctx, fitted)
    if strategy != "feature-extraction":
        train_backbone(ctx, fitted)
    return fitted


def add_cv(ctx, fitted: Fitted) -> None:
    """--cv K: K-fold accuracy of the configured head on the cached train + validation features."""
    cfg, feats = ctx.cfg, ctx.feats
    if cfg.cv is None or ctx.out is None:  # a helper rank (out None) reports nothing
        return
    both = feats.tr | feats.va
    cv = cross_validate(make_head(cfg.head, class_weight=cfg.class_weight, seed=cfg.seed), feats.X[both],
                        feats.y[both], cfg.cv, cfg.seed)
    log.info("%d-fold cross-validation of the %s head on %d train + val images: accuracy %.4f +- %.4f (folds %s)",
             cv["k"], cfg.head, cv["n_images"], cv["accuracy_mean"], cv["accuracy_std"],
             ", ".join(f"{a:.4f}" for a in cv["folds"]))
    if fitted.strategy != "feature-extraction":
        log.warning("--cv: the %d-fold accuracy is of the feature-extraction head; strategy auto chose %s, so "
                    "the saved model is not the one cross-validated.", cv["k"], fitted.strategy)
    fitted.metrics["cv"] = cv


def reset_head(cfg, head_module: torch.nn.Module) -> None:
    """From scratch, the head starts from PyTorch's own init, seeded.

    Phase 1's head was fitted to a random network's features, with its scaler folded in: weights
    sized for features that training is about to change completely (the first epoch's loss was
    in the thousands on FMNIST-TL).
    """
    torch.manual_seed(cfg.seed)
    for m in head_module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def train_backbone(ctx, fitted: Fitted) -> Fitted:
    """Phase 2: the top blocks and the head trained together (finetune.py); the backbone changes in place."""
    for cb in ctx.epoch_logs:
        cb.phase = fitted.strategy
    # Extraction is done (the test split is scored later by the saved model's own engine): its session's
    # arena would otherwise stay resident under all of fine-tuning (memory.py).
    ctx.engine.release()
    memory.note("fine-tuning starts")
    ft = run_fine_tune(ctx, fitted.head_module, fitted.cols)
    # The boundary activations, gradients and optimizer state are gone: hand their heap back before the saved
    # model is compiled again to measure flips and score the test split (the run's peak came there).
    memory.trim()
    memory.note("fine-tuning memory trimmed")
    fitted.identity = backbone_identity(ctx.engine.model)  # the backbone changed: its own features, its own cache
    fitted.metrics["phase1_val_accuracy"] = fitted.metrics.pop("val_accuracy")
    fitted.metrics["fine_tune"] = ft.summary
    fitted.metrics["val_accuracy"] = ft.summary["best_val_accuracy"]
    fitted.history = ft.history
    return fitted
