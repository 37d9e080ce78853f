"""Fine-tuning under torchrun: the trainable part in DistributedDataParallel, one global batch per step.

The epoch's order comes from (seed, epoch) as in one process, and each of its batches (the
one-process batch) is split between the ranks, so the global batch does not change with the
number of ranks. DDP averages gradients over the ranks, so each rank's loss is its summed
per-image losses times world / (the global batch's sum of class weights, or its size): the
average is then the one-process weighted mean's gradient, up to floating point, with class
weights too (per-rank means would weigh a rank's images by its share of the weights).

BatchNorm of the frozen part, and of the trained blocks by default, is in eval mode: there are
no statistics to sync. With --bn-update they are SyncBatchNorm, which PyTorch runs on CUDA only
(NCCL; untested here, these machines have no GPU): on CPU that combination is refused.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from headstart import distributed
from headstart.errors import HeadstartError

# finetune.py calls this module; what it needs from there comes in as arguments (no import cycle).

log = logging.getLogger(__name__)


def check_supported(s) -> None:
    """(`s`: FineTuneSettings) Refuse what cannot run on this process group, before any work is done."""
    if distributed.active() and s.bn_update and torch.distributed.get_backend() != "nccl":
        raise HeadstartError("--bn-update under torchrun syncs BatchNorm statistics with SyncBatchNorm, which "
                             "PyTorch runs on CUDA only; on CPU drop --bn-update (BatchNorm then keeps its "
                             "ImageNet statistics) or fine-tune in one process.")


class _FromBoundary(nn.Module):
    """The trainable part as a module of its own, for DDP: boundary activations -> logits."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.net.from_boundary(b)


class DataParallel:
    """`batches()` yields this rank's part of each global batch; `loss()` runs it through DDP.

    `net` is a FineTuneNet and `s` its FineTuneSettings; with `boundary_batch` (finetune._boundary_batch)
    the training data are boundary activations, else images read with `collate` (finetune.collate_readable).
    """

    def __init__(self, net: nn.Module, s, class_weight: torch.Tensor | None, boundary_batch: Callable | None,
                 collate: Callable):
        self.world, self.batch_size, self.class_weight = distributed.world_size(), s.batch_size, class_weight
        self.loss_sum = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=s.label_smoothing, reduction="sum")
        self.net, self.boundary_batch, self.collate = net, boundary_batch, collate
        if s.bn_update:  # CUDA only (check_supported): BatchNorm statistics over the global batch
            net.top = nn.SyncBatchNorm.convert_sync_batchnorm(net.top)
        module = _FromBoundary(net) if boundary_batch is not None else net
        with distributed.collective("setting up DistributedDataParallel"), warnings.catch_warnings():
            # broadcast_buffers=False: BatchNorm buffers do not change in eval mode (SyncBatchNorm syncs its own).
            # torch 2.14 calls it deprecated, but its replacement cannot yet say the same (its own warning).
            warnings.simplefilter("ignore", FutureWarning)
            self.ddp = DistributedDataParallel(module, broadcast_buffers=False)
        self.last_size, self._denominator = 0, 1.0  # of the global batch the last yielded part belongs to
        self._shape: tuple[int, ...] | None = None

    def batches(self, train_data, order: torch.Tensor, seed: int, epoch: int, workers: int) -> Iterator:
        labels = train_data.y if self.boundary_batch is not None else torch.as_tensor(train_data.labels)
        parts = []
        for idx in order.split(self.batch_size):
            mine = distributed.share(len(idx), 1)
            y = labels[idx]
            denominator = float(self.class_weight[y].sum()) if self.class_weight is not None else float(len(idx))
            parts.append((idx[mine.start:mine.stop], len(idx), denominator))
        if self.boundary_batch is not None:
            for part, size, denominator in parts:
                self.last_size, self._denominator = size, denominator
                yield self.boundary_batch(train_data, part, seed, epoch)
            return
        train_data.epoch = epoch
        loader = torch.utils.data.DataLoader(train_data, batch_sampler=[p.tolist() for p, _, _ in parts],
                                             num_workers=workers, collate_fn=self.collate)
        for (part, size, denominator), (xs, ys, failed) in zip(parts, loader):
            for path, reason in failed:
                log.warning("skipping %s in this epoch: %s", path, reason)
            if xs is None:  # nothing readable in this rank's part: it still takes the step with the others
                xs = torch.zeros((0, *(self._shape or (3, 1, 1))))
            self._shape = tuple(xs.shape[1:])
            self.last_size, self._denominator = size, denominator
            yield xs, ys

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(self.ddp(xb), yb) * (self.world / self._denominator)

    def close(self) -> None:
        """Back to plain BatchNorm, so the saved and exported backbone has no SyncBatchNorm in it."""
        self.net.top = _revert_sync_batchnorm(self.net.top)


def _revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        return plain
    for name, child in module.named_children():
        module.add_module(name, _revert_sync_batchnorm(child))
    return module
