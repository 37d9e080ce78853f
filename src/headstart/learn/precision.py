"""The precision of fine-tuning's trainable part (unfrozen blocks and head), by a fixed rule.

`--ft-precision bf16` runs the unfrozen blocks and the head under torch's bf16 autocast on
the CPU (weights, gradients and the optimizer stay fp32; autocast computes convolutions and
matrix products in bf16); `--channels-last` also lays their activations out channels-last,
which lets oneDNN pick its blocked kernels. `auto` (the default) follows `choose`:

- bf16 only on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX, engine.bf16_units):
  elsewhere torch emulates it, and `make bench` ran MobileNetV2 with bf16 autocast at 96 px
  6x slower than fp32 on such a CPU (2x faster at 224 px), so the small late-stage tensors
  fine-tuning trains may not pay even there;
- and only where a measurement on CPUs with the same bf16 units says it pays: `MEASURED[units]`, the
  fp32/bf16 epoch-time ratio of `make bench`'s `finetune_bf16` section, at least `PAYS` (issue 15:
  1.5x at test accuracy within 0.3 points). The measured recipe is taken whole: where it was bf16
  with channels-last, `auto` also lays the trained blocks out channels-last.
  AVX512-BF16 (AMD EPYC, 2 cores, FMNIST-TL, 2 epochs each, 2026-12-01): bf16 autocast 1.05x, bf16
  with channels-last 1.32x, both +0.24-0.25 points; a second `make bench` that day: 1.21x and 1.26x,
  -0.09 and -0.13 points. Under 1.5x either time: fp32.
  AMX (Intel Xeon, 2 cores, same task, 2026-12-01): bf16 autocast 1.22x, bf16 with channels-last
  1.55x, +0.19 and +0.09 points; a second run that day: 1.38x and 1.71x, the same accuracies. Two
  more runs later that day, once engine calls took call_batch images and fine-tuning's frozen pass ran
  in streams: 1.05x and 1.28x, then 1.07x and 1.31x, the same accuracies; the bf16 epochs stayed at
  19-21 s while fp32's came down from 30-35 s to 26-28 s (by hand, the same fp32 run twice each way,
  alternating: 27.4-31.4 s per epoch before the change, 25.4-26.6 after). The slower run is under 1.5x: fp32.

The choice and its reason are recorded in the run (metrics.json's fine_tune, config.json's
finetune_precision), as every automatic choice is.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass

import torch

from headstart.engines.rule import bf16_units, native_bf16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    """The best bf16 recipe `make bench` measured on CPUs with one kind of bf16 units (FMNIST-TL defaults)."""
    speedup: float  # fp32 epoch seconds over bf16 epoch seconds
    channels_last: bool  # the recipe ran the trained blocks channels-last
    accuracy_change: float  # test accuracy, points against fp32
    source: str


# Per engine.bf16_units(): the better recipe of `make bench`'s finetune_bf16 (benchmarks/results-<kind>.json).
# AVX512-BF16: the run that favoured bf16 of two (1.32x, 1.26x); AMX: the slower of the two runs of the code as
# it is (1.28x, 1.31x; 1.55x and 1.71x before engine calls took call_batch images, module docstring). Neither
# pays. A CPU whose units are missing here has no measurement: fp32.
MEASURED: dict[str, Measured] = {
    "avx512_bf16": Measured(1.32, True, +0.24, "make bench 2026-12-01, AMD EPYC with AVX512-BF16, 2 cores"),
    "amx": Measured(1.28, True, +0.09, "make bench 2026-12-01, Intel Xeon with AMX, 2 cores"),
}
PAYS = 1.5
ACCURACY_POINTS = 0.3


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


def choose_precision(requested: str = "auto", channels_last: bool = False, device: str = "cpu",
           measured: Measured | None = None) -> FineTunePrecision:
    """The fixed rule (module docstring). `measured` defaults to MEASURED for this CPU's bf16 units."""
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
    units = bf16_units()
    if units is None:
        return FineTunePrecision("fp32", channels_last, "fp32: no native bf16 on this CPU")
    measured = MEASURED.get(units) if measured is None else measured
    if measured is None:
        return FineTunePrecision("fp32", channels_last, f"fp32: the CPU has native bf16 ({units}), but no measurement "
                                 "of bf16 fine-tuning on such a CPU exists yet (make bench, section finetune_bf16)")
    recipe = "bf16 with channels-last" if measured.channels_last else "bf16"
    found = f"{recipe} fine-tuning measured {measured.speedup:.2f}x fp32 on a CPU with {units}"
    if measured.speedup < PAYS:
        return FineTunePrecision("fp32", channels_last, f"fp32: {found}, under the {PAYS}x that pays")
    if abs(measured.accuracy_change) > ACCURACY_POINTS:
        return FineTunePrecision("fp32", channels_last, f"fp32: {found} but moved test accuracy "
                                 f"{measured.accuracy_change:+.2f} points (more than {ACCURACY_POINTS})")
    return FineTunePrecision("bf16", channels_last or measured.channels_last,
                             f"bf16: {found} (at least {PAYS}x, test accuracy {measured.accuracy_change:+.2f} "
                             f"points; {measured.source})")
