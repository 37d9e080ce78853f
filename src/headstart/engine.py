"""Inference engines for the frozen backbone, and the fixed rule that picks one.

The rule looks only at what is installed and at the CPU's flags, never at a timing taken
at run time, so the same machine always makes the same choice (and the same cache key).
`--engine` and `--precision` override it; both are recorded in the run.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import HeadstartError

log = logging.getLogger(__name__)

ENGINES = ("torch",)
PRECISIONS = ("fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """bf16 pays off only with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it is emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    precision: str
    device: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HeadstartError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise HeadstartError(f"--device must be auto, cpu or cuda, not {device!r}.")
    return device


def choose_engine(device: str = "auto", engine: str = "auto", precision: str = "auto") -> EngineChoice:
    device = resolve_device(device)
    reasons = []
    if engine == "auto":
        engine = "torch"
        reasons.append("engine torch: the only engine installed")
    elif engine not in ENGINES:
        raise HeadstartError(f"--engine must be one of auto, {', '.join(ENGINES)}; got {engine!r}.")
    else:
        reasons.append(f"engine {engine}: asked for")
    if precision == "auto":
        if device == "cpu" and native_bf16():
            precision = "bf16"
            reasons.append("precision bf16: the CPU has native bf16")
        else:
            precision = "fp32"
            reasons.append("precision fp32: " + ("no native bf16 on this CPU" if device == "cpu" else "CUDA default"))
    elif precision not in PRECISIONS:
        raise HeadstartError(f"--precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}.")
    else:
        reasons.append(f"precision {precision}: asked for")
    return EngineChoice(engine, precision, device, "; ".join(reasons))


class TorchEngine:
    """The frozen feature extractor in eval mode, without autograd: (B, 3, H, W) float -> (B, D) float32."""

    def __init__(self, model: nn.Module, choice: EngineChoice):
        self.choice = choice
        self.device = torch.device(choice.device)
        # channels-last lets oneDNN pick its blocked convolution kernels: 1.4x on MobileNetV2 here.
        self.model = model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.n_images = 0  # images through the network: lets tests and logs prove cache hits
        self.n_batches = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.n_images += x.shape[0]
        self.n_batches += 1
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.choice.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.model(x)
            else:
                out = self.model(x)
        return out.float().cpu()


def make_engine(model: nn.Module, choice: EngineChoice) -> TorchEngine:
    if choice.engine == "torch":
        return TorchEngine(model, choice)
    raise HeadstartError(f"engine {choice.engine!r} is not available")
