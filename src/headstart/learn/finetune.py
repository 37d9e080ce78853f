"""Fine-tuning phase 2: the top blocks of the backbone and the head, trained together at low rates.

Phase 1 (the head on the frozen base) is the feature-extraction pipeline; its head enters
here through `to_torch()`. This module then splits the backbone's forward sequence into
a frozen bottom and a trainable top:

- the frozen bottom runs in eval mode under `torch.no_grad()` (not inference mode: its
  outputs feed trainable blocks), and `FineTuneNet.train()` keeps it in eval mode, so a
  per-epoch `model.train()` cannot re-enable its BatchNorm statistics;
- BatchNorm inside the trainable top keeps its ImageNet statistics too unless
  `bn_update` is set (Keras's transfer-learning guide); its scale and shift still train;
- with augmentation off, the frozen bottom's outputs (the boundary activations) are
  computed once and each epoch runs only the top and the head. They are held in 16 bits
  (`Boundary`, the one place their storage type is decided) and turned into float32 one
  batch at a time: the default run on FMNIST-TL peaked at 3.97 GB resident with them in
  float32 (plain and mirrored, built from lists by torch.cat). fp16 keeps 11 significant bits;
  bf16 (8 bits, fp32's range) is used only for a set whose values fp16 cannot represent.

The loop is plain functions with explicit arguments: the sampler order comes from
(seed, epoch), augmentation from (seed, epoch, index), and a checkpoint after every epoch
holds everything needed to resume to the same final weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart import distributed, faults, progress
from headstart.nets.registry import Backbone, Preprocessing, sequence
from headstart.engines.onnx_engine import model_digest
from headstart.errors import HeadstartError
from headstart.fileio import atomic_path
from headstart.learn.precision import FineTunePrecision
from headstart.data.decoding import decode_side, default_streams, map_batches
from headstart.data.images import ImageError, load_image
from headstart.data.pixels import Normalize
from headstart.learn.loop import EarlyStopping, History, OnEpochEnd, TimeBudget, run_epochs
from headstart.settings import AUGMENTS, BOUNDARY_AUGMENTS, SCHEDULES, FineTuneSettings  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class FineTuneNet(nn.Module):
    """Frozen bottom -> trainable top blocks -> head. Shares its modules with the backbone it was cut from."""

    def __init__(self, entry: Backbone, backbone: nn.Module, head: nn.Module, unfreeze: int | str,
                 bn_update: bool = False):
        super().__init__()
        layers = sequence(entry, backbone)
        named = [i for i, (name, _) in enumerate(layers) if name]
        n = len(named) if unfreeze == "all" else int(unfreeze)
        if not 0 <= n <= len(named):
            raise HeadstartError(f"--unfreeze {unfreeze}: {entry.name} has {len(named)} blocks "
                                 f"({', '.join(entry.blocks)}); use 0..{len(named)} or 'all'.")
        # The first trainable layer: the bottom-most unfrozen block, or just past the last block when none is.
        cut = named[len(named) - n] if n else named[-1] + 1
        self.frozen = nn.Sequential(*[m for _, m in layers[:cut]])
        self.top = nn.Sequential(*[m for _, m in layers[cut:]])
        self.head = head
        self.top_names = [name for name, _ in layers[cut:]]  # block name or None, per module of `top`
        self.trainable_blocks = [name for name in self.top_names if name]
        self.bn_update = bn_update
        # Optional: a faster engine (engines/) running a converted copy of `frozen`; outputs agree
        # with it within the engines' parity tolerance. None runs `frozen` itself.
        self.frozen_engine: Callable | None = None
        self.frozen.requires_grad_(False)
        self.top.requires_grad_(True)
        self.head.requires_grad_(True)
        self.train(False)

    def train(self, mode: bool = True) -> "FineTuneNet":
        super().train(mode)
        self.frozen.eval()  # always: frozen BatchNorm must never see training batches
        if not self.bn_update:
            for m in self.top.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def boundary(self, x: torch.Tensor, threads: int | None = None, normalize: Normalize | None = None
                 ) -> torch.Tensor:
        """The frozen bottom's output: no gradient, eval mode; `threads`: the engine's threads for this call
        (extraction's streams; None: its default). `x` is a normalised batch, or uint8 pixels and the
        `normalize` that makes them one, which a converted engine runs in its own graph (pixels.py)."""
        if self.frozen_engine is not None and len(self.frozen):
            return self.frozen_engine(x, threads=threads, normalize=normalize)
        if x.dtype == torch.uint8:
            x = normalize(x)
        if len(self.frozen) == 0:
            return x
        with torch.no_grad():
            return self.frozen(x.contiguous(memory_format=torch.channels_last))

    def from_boundary(self, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.top(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_boundary(self.boundary(x))

    def param_groups(self, s: FineTuneSettings) -> list[dict]:
        """The head at lr_head; top blocks at lr, each block further down times lr_decay (named groups)."""
        groups = [{"name": "head", "params": [p for p in self.head.parameters() if p.requires_grad],
                   "lr": s.lr_head}]
        blocks = [(name, [p for p in m.parameters() if p.requires_grad])
                  for name, m in zip(self.top_names, self.top) if name]
        for depth, (name, params) in enumerate(reversed(blocks)):
            groups.append({"name": name, "params": params, "lr": s.lr * s.lr_decay ** depth})
        return [g for g in groups if g["params"]]


def train_transform(prep: Preprocessing, augment: str) -> Callable:
    """Training-time transform: the backbone's own preprocessing, plus augmentation when asked."""
    from torchvision.transforms import v2

    if augment == "none":
        return prep.transform()
    if augment == "flip":
        return v2.Compose([prep.transform(), v2.RandomHorizontalFlip()])
    scale = (0.8, 1.0) if augment == "light" else (0.5, 1.0)
    ops = [v2.PILToTensor(), v2.RandomResizedCrop(prep.crop_size, scale=scale, antialias=True,
                                                  interpolation=v2.InterpolationMode(prep.interpolation)),
           v2.RandomHorizontalFlip()]
    if augment == "standard":
        ops.append(v2.ColorJitter(0.2, 0.2, 0.2))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]
    return v2.Compose(ops)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63)


class AugmentedImages(torch.utils.data.Dataset):
    """Images through a random transform whose randomness is a function of (seed, epoch, index)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Callable, seed: int):
        self.paths, self.labels, self.transform, self.seed = list(paths), labels, transform, seed
        self.epoch = 0
        self.min_side = decode_side(transform)  # None for the augmenting transforms: they crop at random

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(image tensor or None, label, None or (path, reason)): `collate_readable` drops the failures."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_item_seed(self.seed, self.epoch, i))
            try:
                return self.transform(load_image(self.paths[i], self.min_side)), int(self.labels[i]), None
            except ImageError as exc:  # became unreadable since extraction
                return None, int(self.labels[i]), (self.paths[i], str(exc))


def collate_readable(items) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]:
    """AugmentedImages items as (images, labels, failures): an image that could not be read is left out of
    the batch (a placeholder of another size could not be stacked with the crops) and reported."""
    ok = [(x, y) for x, y, err in items if err is None]
    xs = torch.stack([x for x, _ in ok]) if ok else None
    return xs, torch.as_tensor([y for _, y in ok], dtype=torch.long), [err for _, _, err in items if err]


def _readable(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a `collate_readable` loader, each unreadable image logged, empty batches skipped."""
    for xs, ys, failed in loader:
        for path, reason in failed:
            log.warning("skipping %s in this epoch: %s", path, reason)
        if xs is not None:
            yield xs, ys


STORAGE_DTYPE = torch.float16  # boundary activations at rest; batches are float32 (Boundary.batch)
FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class Boundary:
    """Frozen-bottom activations of a set of images, computed once (augmentation off).

    `x` and `x_flip` are stored in `x.dtype` (STORAGE_DTYPE, or bf16 when a value is beyond
    fp16's range, or float32 when built by hand); `batch` hands out float32 rows.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_flip: torch.Tensor | None = None  # the same images mirrored left-right (--augment flip)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def batch(self, idx: torch.Tensor, mirrored: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows `idx`; where `mirrored` is True, those of the mirror images."""
        x = self.x[idx]
        if mirrored is not None:
            x = torch.where(mirrored[:, None, None, None], self.x_flip[idx], x)
        return x.float()


def storage_dtype(x: torch.Tensor) -> torch.dtype:
    """STORAGE_DTYPE unless `x` holds a value fp16 cannot represent (then bf16: fp32's range)."""
    if STORAGE_DTYPE == torch.float16 and x.numel() and float(x.detach().abs().max()) > FP16_MAX:
        return torch.bfloat16
    return STORAGE_DTYPE


class _Store:
    """Rows written into one preallocated tensor: no list of batches and no torch.cat copy of the set."""

    def __init__(self, capacity: int):
        self.capacity, self.n, self.t = capacity, 0, None

    def add(self, out: torch.Tensor) -> None:
        dtype = storage_dtype(out)
        if self.t is None:
            self.t = torch.empty((self.capacity, *out.shape[1:]), dtype=dtype)
        elif self.t.dtype != dtype and dtype == torch.bfloat16:  # fp16 overflowed: the whole set moves to bf16
            self.t = self.t.to(torch.bfloat16)
        self.t[self.n:self.n + len(out)] = out  # converted (and made contiguous) on the copy
        self.n += len(out)

    def result(self) -> torch.Tensor:
        if self.t is None:
            return torch.empty(0, dtype=STORAGE_DTYPE)
        return self.t[:self.n] if self.n == self.capacity else self.t[:self.n].clone()


def compute_boundary(net: FineTuneNet, paths: Sequence[str], labels: np.ndarray, transform: Callable,
                     batch_size: int, workers: int, desc: str, flip: bool = False) -> Boundary:
    """The frozen bottom's outputs for the readable images of `paths` (the unreadable ones are left out).

    Under torchrun each rank computes a share of whole batches (the batches one process would run) and
    the shares are gathered in order, so every rank holds the whole set, as one process would."""
    mine = distributed.share(len(paths), batch_size)
    outs, flips, keep = _Store(len(mine)), _Store(len(mine)) if flip else None, []
    # As extraction runs its engine: calls side by side while this thread decodes (decoding.map_batches).
    streams = 1 if workers else default_streams("cpu", net.frozen_engine)

    def run(x: torch.Tensor, threads: int | None = None, normalize: Normalize | None = None):
        return (net.boundary(x, threads, normalize),
                net.boundary(x.flip(-1), threads, normalize) if flip else None)

    with progress.bar(len(mine), desc) as pbar, contextlib.closing(
            map_batches(paths[mine.start:mine.stop], transform, batch_size, workers, run, streams)) as batches:
        for batch, out in batches:
            if out is not None:
                outs.add(out[0])
                if flip:
                    flips.add(out[1])
                keep.extend(mine.start + i for i in batch.indices)
            pbar.update(batch.size)
    x, x_flip = outs.result(), flips.result() if flip else None
    if x_flip is not None and x_flip.dtype != x.dtype:  # one overflowed fp16: both in bf16
        x, x_flip = x.to(torch.bfloat16), x_flip.to(torch.bfloat16)
    if distributed.active():
        what = f"{desc} (gathering every rank's share)"
        keep = [i for part in distributed.all_gather_object(keep, what) for i in part]
        x = distributed.all_gather_tensors(x, what)
        x_flip = distributed.all_gather_tensors(x_flip, what) if flip else None
    return Boundary(x, torch.as_tensor(np.asarray(labels)[keep], dtype=torch.long), x_flip)


def _scheduler(opt, s: FineTuneSettings, steps_per_epoch: int):
    total = max(1, s.epochs * steps_per_epoch)
    if s.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total, pct_start=0.25)
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total)
                                                                                          / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _rng_state() -> dict:
    """Every random state, as types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.as_tensor(internal, dtype=torch.int64), gauss_next]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss_next))


@dataclass
class FineTuneResult:
    history: dict = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_by: str = ""
    seconds: float = 0.0
    images_per_second: float = 0.0


def _boundary_batch(data: Boundary, idx: torch.Tensor, seed: int, epoch: int):
    if data.x_flip is None:
        return data.batch(idx), data.y[idx]
    # Which images are mirrored this epoch: a function of (seed, epoch, index), like the other augmentations.
    flipped = torch.rand(len(data.y), generator=torch.Generator().manual_seed(_item_seed(seed, epoch, 0)))[idx] < 0.5
    return data.batch(idx, flipped), data.y[idx]


def trainable_state(net: FineTuneNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("frozen.")}


def fit(net: FineTuneNet, s: FineTuneSettings, *, seed: int, train_data, val: Boundary | None,
        checkpoint: Path | None = None, resume: dict | None = None,
        val_fn: Callable[[FineTuneNet], tuple[float, float]] | None = None,
        class_weight: torch.Tensor | None = None, sampler_weights: torch.Tensor | None = None,
        workers: int = 0, callbacks: Sequence = (), precision: FineTunePrecision | None = None) -> FineTuneResult:
    """Train the top and head for `s.epochs` (or until early stopping or the time budget).

    `train_data` is a Boundary (augmentation off) or an AugmentedImages data set. Returns the
    history; the best weights (by `s.early_stop_metric`) are loaded into `net` at the end.
    `callbacks` (loop.py: history.csv, TensorBoard) see every epoch, those before a resume too.
    `precision` (finetune_precision.choose_precision; default fp32) is the training forward pass's autocast and
    layout; validation runs in fp32, as the saved model is scored.
    """
    t0 = time.perf_counter()
    precision = precision or FineTunePrecision("fp32", False, "fp32: default")
    if precision.channels_last:
        net.top.to(memory_format=torch.channels_last)
    n = len(train_data.y) if isinstance(train_data, Boundary) else len(train_data)
    steps = math.ceil(n / s.batch_size)
    opt_cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    groups = net.param_groups(s)
    opt = opt_cls(groups, weight_decay=s.weight_decay if s.optimizer == "adamw" else 0.0)
    sched = _scheduler(opt, s, steps)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=s.label_smoothing)
    world = distributed.world_size()
    history = History(("epoch", "train_loss", "val_loss", "val_accuracy", "seconds", "lr"))
    # No validation score (NaN): the last epoch counts as the best.
    stopper = EarlyStopping("val_loss" if s.early_stop_metric == "val_loss" else "val_accuracy",
                            "min" if s.early_stop_metric == "val_loss" else "max", s.patience,
                            lambda: trainable_state(net), nan_is_best=True, best_state=trainable_state(net))
    start = 0
    if resume is not None:
        net.load_state_dict({**net.state_dict(), **resume["model"]})
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        history.history, start = resume["history"], int(resume["epoch"])
        history.history.setdefault("lr", [])
        stopper.load_state(resume)
        _set_rng_state(resume["rng"])
        log.info("resumed fine-tuning after epoch %d", start)
        for i, epoch in enumerate(history.history["epoch"]):  # the epochs before: into history.csv, TensorBoard
            logs = {k: v[i] for k, v in history.history.items() if i < len(v)}
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
    images = 0
    if world > 1:  # after a resume's weights are loaded: DDP starts every rank from rank 0's
        from headstart.learn.distributed import DataParallel

        parallel = DataParallel(net, s, class_weight, _boundary_batch if isinstance(train_data, Boundary) else None,
                                collate_readable)

    def train_one_epoch(epoch: int) -> dict:
        nonlocal images
        t_epoch = time.perf_counter()
        net.train()
        order = _epoch_order(n, seed, epoch - 1, sampler_weights)
        total = 0.0
        if world > 1:  # each global batch (the one-process batch) split between the ranks
            batches, forward = parallel.batches(train_data, order, seed, epoch - 1, workers), parallel.loss
        elif isinstance(train_data, Boundary):
            batches = (_boundary_batch(train_data, idx, seed, epoch - 1) for idx in order.split(s.batch_size))
            forward = lambda xb, yb: loss_fn(net.from_boundary(xb), yb)  # noqa: E731
        else:
            train_data.epoch = epoch - 1
            batches = _readable(torch.utils.data.DataLoader(
                train_data, batch_size=s.batch_size, sampler=order.tolist(), num_workers=workers,
                collate_fn=collate_readable))
            forward = lambda xb, yb: loss_fn(net(xb), yb)  # noqa: E731
        with progress.bar(n, f"fine-tune epoch {epoch}/{s.epochs}") as pbar:
            for xb, yb in batches:
                opt.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss = forward(precision.layout(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                faults.point("step")
                # Under torchrun: this rank's part of the global batch's mean loss, times that batch's size.
                total += float(loss.detach()) * (parallel.last_size / world if world > 1 else len(yb))
                images += len(yb)
                pbar.update(len(yb))
        if world > 1:
            total, = distributed.all_reduce_sum([total], "the training loss")
        vloss, vacc = val_fn(net) if val_fn else evaluate_boundary(net, val) if val is not None else (math.nan,
                                                                                                       math.nan)
        logs = {"epoch": epoch, "train_loss": total / n, "val_loss": vloss, "val_accuracy": vacc,
                "seconds": round(time.perf_counter() - t_epoch, 2), "lr": opt.param_groups[0]["lr"]}
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f (%.0fs)", epoch, s.epochs,
                 total / n, vloss, vacc, logs["seconds"])
        return logs

    def save(epoch: int, logs: dict) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "model": trainable_state(net), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history.history, "epoch": epoch, **stopper.state(), "rng": _rng_state()})
        faults.point("epoch", epoch)

    # The checkpoint comes after early stopping's update (it holds that state) and before any stop.
    stopped_by = run_epochs(range(start + 1, s.epochs + 1), train_one_epoch,
                            [history, stopper, OnEpochEnd(save), *callbacks, TimeBudget(s.time_budget, t0)])
    if stopped_by == "time budget":
        log.warning("time budget of %.0fs reached after epoch %d", s.time_budget, history.history["epoch"][-1])
    if world > 1:
        parallel.close()
    history = history.history
    best = {"epoch": stopper.best_epoch, "state": stopper.best_state}
    net.load_state_dict({**net.state_dict(), **best["state"]})
    net.top.to(memory_format=torch.contiguous_format)  # what export and the bundle expect
    net.train(False)
    seconds = time.perf_counter() - t0
    return FineTuneResult(history, best["epoch"], len(history["epoch"]), stopped_by, seconds,
                          images / seconds if seconds else 0.0)


def _epoch_order(n: int, seed: int, epoch: int, weights: torch.Tensor | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(_item_seed(seed, epoch, 0))
    if weights is not None:  # balanced sampler: draw n indices with replacement by class weight
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def evaluate_boundary(net: FineTuneNet, data: Boundary, batch_size: int = 256) -> tuple[float, float]:
    """Validation loss and accuracy from boundary activations (net in eval mode).

    Under torchrun each rank scores a share and the sums are all-reduced: every rank gets the same
    numbers, so early stopping decides the same everywhere."""
    if not distributed.active():
        logits = predict_boundary(net, data, batch_size)
        loss = float(nn.functional.cross_entropy(logits, data.y))
        return loss, float((logits.argmax(1) == data.y).float().mean())
    mine = distributed.share(len(data.y), batch_size)
    y = data.y[mine.start:mine.stop]
    sums = [0.0, 0.0]
    if len(y):
        logits = predict_boundary(net, Boundary(data.x[mine.start:mine.stop], y), batch_size)
        sums = [float(nn.functional.cross_entropy(logits, y, reduction="sum")), float((logits.argmax(1) == y).sum())]
    loss_sum, correct = distributed.all_reduce_sum(sums, "validation")
    return loss_sum / len(data.y), correct / len(data.y)


def predict_boundary(net: FineTuneNet, data: Boundary, batch_size: int = 256) -> torch.Tensor:
    was_training = net.training
    net.train(False)
    with torch.no_grad():
        out = torch.cat([net.from_boundary(xb.float()) for xb in data.x.split(batch_size)])
    net.train(was_training)
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HeadstartError(f"checkpoint {path} cannot be read ({type(exc).__name__}); start the run again "
                             "without --resume.") from None


def backbone_identity(backbone: nn.Module) -> str:
    """A hash of the backbone's tensors: what the feature cache keys on once fine-tuning changed them."""
    return "finetuned-" + model_digest(backbone)


