"""Eager PyTorch as the frozen backbone's engine: the reference every converted engine is checked against."""

from __future__ import annotations

import threading

import torch
from torch import nn

from headstart.data.pixels import Normalize
from headstart.engines.choice import EngineChoice


class TorchEngine:
    """The frozen feature extractor in eval mode, without autograd: (B, 3, H, W) float -> (B, D) float32.

    Every engine has this call signature, `model` (the torch module it runs, which fine-tuning
    trains further) and the counters `n_images` / `n_batches` (tests and logs prove cache hits).
    Every engine may be called from several threads at once (a Model serving requests):
    an eval-mode module under inference_mode keeps no state between calls.
    """

    parallel_calls = False  # torch's intra-op threads are one budget for the whole process: no streams

    def __init__(self, model: nn.Module, choice: EngineChoice):
        self.choice = choice
        self.device = torch.device(choice.device)
        # channels-last lets oneDNN pick its blocked convolution kernels: 1.4x on MobileNetV2 here.
        self.model = model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.n_images = 0
        self.n_batches = 0
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, normalize: Normalize | None = None) -> torch.Tensor:
        """Features of `x`: a normalised float batch, or uint8 pixels with the `normalize` that makes them one."""
        with self._lock:
            self.n_images += x.shape[0]
            self.n_batches += 1
        if x.dtype == torch.uint8:
            x = needs_normalize(normalize)(x)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.choice.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.model(x)
            else:
                out = self.model(x)
        return out.float().cpu()

    def release(self) -> None:
        """Nothing compiled to free (the same call as the converted engines')."""


def needs_normalize(normalize: Normalize | None) -> Normalize:
    if normalize is None:
        raise ValueError("a uint8 batch is pixels: pass the normalize (pixels.Normalize) that makes it the "
                         "network's input")
    return normalize

