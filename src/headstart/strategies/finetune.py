"""Phase 2 of `--strategy fine-tune` inside a run: data for the loop, checkpoints, resume."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from headstart import distributed, memory
from headstart.learn import precision as finetune_precision
from headstart.nets.registry import count_parameters
from headstart.errors import HeadstartError
from headstart.engines.rule import choose_engine, make_engine
from headstart.data.decoding import default_workers
from headstart.engines.features import cache_root_of
from headstart.learn.heads import class_weights
from headstart.learn.finetune import (AugmentedImages, FineTuneNet, compute_boundary, evaluate_boundary, fit,
                       load_checkpoint, train_transform)
from headstart.learn.checkpoints import checkpoint_dir, start_checkpoints
from headstart.settings import BOUNDARY_AUGMENTS, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["run_fine_tune"]


@dataclass
class FineTuneOutcome:
    summary: dict
    history: dict


def run_fine_tune(ctx, head: nn.Module, cols: np.ndarray) -> FineTuneOutcome:
    """Phase 2 on the prepared run `ctx` (runs/context.py): its backbone (changed in place) and `head` trained
    on its images, `cols` the head column of each readable image (-1: a class the head lacks)."""
    cfg, entry, backbone, prep, final = ctx.cfg, ctx.entry, ctx.engine.model, ctx.prep, ctx.final
    paths, tr, va, callbacks = [s.path for s in ctx.feats.samples], ctx.feats.tr, ctx.feats.va, ctx.epoch_logs
    s, rt = cfg.finetune, cfg.runtime  # completed by strategies.configure
    known = cols >= 0
    tr, va = tr & known, va & known
    if not va.any():
        raise HeadstartError("fine-tuning needs a validation split for early stopping: use --val-fraction > 0 "
                             "or a val/ folder.")
    torch.manual_seed(cfg.seed)
    net = FineTuneNet(entry, backbone, head, s.unfreeze, bn_update=s.bn_update)
    log.info("fine-tuning %s (%d of %d blocks: %s), %d trainable parameters; frozen part in eval mode; "
             "world size %d", entry.name, len(net.trainable_blocks), len(entry.blocks),
             ", ".join(net.trainable_blocks) or "none", count_parameters(net, trainable_only=True),
             distributed.world_size())
    choice = choose_engine(rt.device, rt.engine, rt.precision)
    precision = finetune_precision.choose_precision(s.ft_precision, s.channels_last, choice.device)
    log.info("trained blocks and head in %s%s (%s)", precision.precision,
             ", channels-last" if precision.channels_last else "", precision.reason)
    if choice.engine != "torch" and len(net.frozen):
        # The frozen bottom never changes: run it on the extraction engine (2-3x torch on CPU).
        net.frozen_engine = make_engine(net.frozen, choice, cache_root_of(rt.cache_dir))
        log.info("frozen part runs on %s %s", choice.engine, choice.precision)
    # Passes of the frozen part over the images (the boundary) decode as extraction does; augmented epochs
    # keep one worker beside the training step (not measured against decoding in the main process).
    workers = default_workers(choice.device) if rt.workers is None else rt.workers
    epoch_workers = (1 if (os.cpu_count() or 1) >= 2 else 0) if rt.workers is None else rt.workers
    pick = lambda mask: ([p for p, m in zip(paths, mask) if m], cols[mask])  # noqa: E731
    plain = prep.transform()
    t_boundary = time.perf_counter()
    val = compute_boundary(net, *pick(va), plain, rt.batch_size, workers, "boundary (val)")
    if s.augment in BOUNDARY_AUGMENTS:
        # Frozen work done once: every epoch runs only the top blocks and the head on these activations
        # (with --augment flip, on those of each image or of its mirror image, chosen per epoch).
        train_data = compute_boundary(net, *pick(tr), plain, rt.batch_size, workers, "boundary (train)",
                                      flip=s.augment == "flip")
    else:
        train_data = AugmentedImages(*pick(tr), train_transform(prep, s.augment), cfg.seed)
    if s.augment in BOUNDARY_AUGMENTS and net.frozen_engine is not None:
        net.frozen_engine.release()  # the epochs run from the boundary activations: its arena is not needed
    boundary_seconds = time.perf_counter() - t_boundary
    memory.note("boundary activations held")
    rank_memory = _memory_per_rank(val, train_data)

    y_train = cols[tr]
    n_classes = int(cols.max()) + 1
    class_weight, sampler = class_weights(cfg.class_weight, y_train, n_classes), None
    if s.sampler == "balanced":
        counts = np.bincount(y_train, minlength=n_classes)
        sampler = torch.as_tensor(1.0 / counts[y_train], dtype=torch.double)

    ckpt = checkpoint_dir(final) / "last.pt"
    resume = None
    if cfg.resume:
        if not ckpt.is_file():
            raise HeadstartError(f"--resume: no checkpoint at {ckpt}; the run either finished or never reached "
                                 "its first epoch. Start it again without --resume.")
        resume = load_checkpoint(ckpt)
    main = distributed.is_main()  # under torchrun rank 0 writes the checkpoints; every rank reads them to resume
    if main:
        start_checkpoints(final, _resumable_config(cfg), cfg.resume)

    again = f"continue from the last checkpoint with the same torchrun command and: train --resume {final}"
    with distributed.collective("fine-tuning", again):  # a rank lost mid-step: DDP's all-reduce fails on the others
        result = fit(net, s, seed=cfg.seed, train_data=train_data, val=val, checkpoint=ckpt if main else None,
                     resume=resume, class_weight=class_weight, sampler_weights=sampler, workers=epoch_workers,
                     callbacks=callbacks, precision=precision)
    memory.note("fine-tuning done")
    vloss, vacc = evaluate_boundary(net, val)
    summary = {"settings": s.to_dict(), "trainable_blocks": net.trainable_blocks,
               "trainable_parameters": count_parameters(net, trainable_only=True),
               "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "stopped_by": result.stopped_by,
               "seconds": round(result.seconds, 2), "images_per_second": round(result.images_per_second, 1),
               "best_val_loss": vloss, "best_val_accuracy": vacc, "boundary_cache": s.augment in BOUNDARY_AUGMENTS,
               "boundary_seconds": round(boundary_seconds, 2), "world_size": distributed.world_size(),
               "memory_per_rank": rank_memory, "precision": precision.to_dict(),
               "history": result.history}
    log.info("fine-tuning: %d epochs in %.0fs (best epoch %d, stopped by %s), val accuracy %.4f",
             result.epochs_run, result.seconds, result.best_epoch, result.stopped_by, vacc)
    # The test split is scored by the run from the saved model, as `evaluate` scores it (training._train).
    return FineTuneOutcome(summary, {**result.history, "best_epoch": result.best_epoch})


def _memory_per_rank(val, train_data) -> list[dict]:
    """Each rank's boundary activations (each holds the whole set) and peak resident memory, in MiB."""
    import resource

    held = sum(t.numel() * t.element_size() for d in (val, train_data) for t in (getattr(d, "x", None),
                                                                                getattr(d, "x_flip", None))
               if t is not None)
    mine = {"rank": distributed.rank(), "boundary_mib": round(held / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    ranks = distributed.all_gather_object(mine, "memory report")
    for r in ranks:
        log.info("rank %d holds %.1f MiB of boundary activations; peak resident memory %.1f MiB", r["rank"],
                 r["boundary_mib"], r["peak_rss_mib"])
    return ranks


def _resumable_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d.pop("resume", None)
    return d
