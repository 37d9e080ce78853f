"""The precision of fine-tuning's trainable part (unfrozen blocks and head), by a fixed rule.

`--ft-precision bf16` runs the unfrozen blocks and the head under torch's bf16 autocast on
the CPU (weights, gradients and the optimizer stay fp32; autocast computes convolutions and
matrix products in bf16); `--channels-last` also lays their activations out channels-last,
which lets oneDNN pick its blocked kernels. `auto` (the default) follows `choose`:

- bf16 only on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX, engine.native_bf16):
  elsewhere torch emulates it, and `make bench` ran MobileNetV2 with bf16 autocast at 96 px
  6x slower than fp32 on such a CPU (2x faster at 224 px), so the small late-stage tensors
  fine-tuning trains may not pay even there;
- and only where a measurement says it pays: `MEASURED_BF16_SPEEDUP`, the fp32/bf16 epoch-time
  ratio `make bench`'s `finetune_bf16` section measures on a native-bf16 CPU, at least
  `PAYS` (issue 15: 1.5x at test accuracy within 0.3 points). Measured on 2026-12-01 (AMD EPYC
  with AVX512-BF16, 2 cores, FMNIST-TL, 2 epochs each): bf16 autocast 1.05x, bf16 with
  channels-last 1.32x, both +0.24-0.25 points; a second `make bench` that day: 1.21x and 1.26x,
  -0.09 and -0.13 points. Under 1.5x either time, so `auto` is fp32 on every CPU.

The choice and its reason are recorded in the run (metrics.json's fine_tune, config.json's
finetune_precision), as every automatic choice is.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass

import torch

from .engine import native_bf16

log = logging.getLogger(__name__)

# fp32 epoch seconds over bf16 epoch seconds on a native-bf16 CPU, FMNIST-TL defaults, with test accuracy
# within 0.3 points (benchmarks/run.py `finetune_bf16`); the better of bf16 alone (1.05x) and bf16 with
# channels-last (1.32x), make bench on 2026-12-01; the higher of that day's two runs (the second, 1.26x, is
# in benchmarks/results-avx512_bf16.json), so the rule errs towards bf16. None: not measured.
MEASURED_BF16_SPEEDUP: float | None = 1.32
PAYS = 1.5


@dataclass(frozen=True)
class FineTunePrecision:
    precision: str  # "fp32" or "bf16"
    channels_last: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def autocast(self):
        """The context the trainable part's forward pass (and its loss) runs in."""
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the memory layout the trainable part runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def choose(requested: str = "auto", channels_last: bool = False, device: str = "cpu",
           measured_speedup: float | None = None) -> FineTunePrecision:
    """The fixed rule (module docstring). `measured_speedup` defaults to MEASURED_BF16_SPEEDUP."""
    measured = MEASURED_BF16_SPEEDUP if measured_speedup is None else measured_speedup
    if requested == "fp32":
        return FineTunePrecision("fp32", channels_last, "fp32: asked for")
    if requested == "bf16":
        if device != "cpu":
            reason = f"bf16: asked for (autocast on {device} is not run by headstart; CPU autocast is used)"
        elif native_bf16():
            reason = "bf16: asked for; the CPU has native bf16"
        else:
            reason = "bf16: asked for; this CPU has no native bf16, so torch emulates it (slower than fp32)"
            log.warning("--ft-precision bf16 on a CPU without native bf16: emulated, expect it slower than fp32")
        return FineTunePrecision("bf16", channels_last, reason)
    if device != "cpu":
        return FineTunePrecision("fp32", channels_last, f"fp32: the rule chooses bf16 only on CPUs, not {device}")
    if not native_bf16():
        return FineTunePrecision("fp32", channels_last, "fp32: no native bf16 on this CPU")
    if measured is None:
        return FineTunePrecision("fp32", channels_last, "fp32: the CPU has native bf16, but no measurement of bf16 "
                                 "fine-tuning exists yet (make bench, section finetune_bf16)")
    if measured < PAYS:
        return FineTunePrecision("fp32", channels_last, f"fp32: bf16 fine-tuning measured {measured:.2f}x fp32 on a "
                                 f"native-bf16 CPU, under the {PAYS}x that pays")
    return FineTunePrecision("bf16", channels_last, f"bf16: the CPU has native bf16 and bf16 fine-tuning measured "
                             f"{measured:.2f}x fp32 (at least {PAYS}x)")
