"""The fixed rule that picks the engine for the frozen backbone, and the factory that builds it.

The rule looks only at what is installed and at the CPU's flags, never at a timing taken
at run time, so the same machine always makes the same choice (and the same cache key).
`--engine` and `--precision` override it; both are recorded in the run. The engines: torch_engine.py
(eager PyTorch), onnx_engine.py (the ONNX export every converted engine runs, and ONNX Runtime),
openvino_engine.py.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from headstart import cpu
from headstart.engines.choice import EngineChoice
from headstart.engines.onnx_engine import OnnxRuntimeEngine
from headstart.engines.openvino_engine import OpenVinoEngine
from headstart.engines.torch_engine import TorchEngine
from headstart.errors import HeadstartError
from headstart.settings import ENGINES, PRECISIONS

log = logging.getLogger(__name__)

# int8 runs only as a quantised ONNX model (quantize.py), so only on the converted engines.
INT8_ENGINES = ("onnxruntime", "openvino")


def native_bf16() -> bool:
    """bf16 pays off only with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it is emulated and slow."""
    return bf16_units() is not None


def bf16_units(flags: frozenset[str] | None = None) -> str | None:
    """What multiplies bf16 on this CPU (or one with `flags`): "amx" (tile units, AMX-BF16), "avx512_bf16"
    (vector dot products), or None (emulated). The engine rule treats both alike; fine-tuning's measurement
    differs between them."""
    flags = cpu.cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise HeadstartError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise HeadstartError(f"--device must be auto, cpu or cuda, not {device!r}.")
    return device


def installed(engine: str) -> bool:
    if engine == "torch":
        return True
    import importlib.util

    return importlib.util.find_spec(engine) is not None


def choose_engine(device: str = "auto", engine: str = "auto", precision: str = "auto") -> EngineChoice:
    """The fixed rule (docs/guides/speed.md and benchmarks/results-<kind>.md have the measurements behind it).

    CUDA: torch. CPU: OpenVINO in bf16 where the CPU has native bf16 (fastest measured there),
    else ONNX Runtime fp32 (6.9x plain PyTorch on MobileNetV2 at 224 px on an AVX2 CPU, 2.3x on
    ResNet-50, ahead of OpenVINO fp32), else OpenVINO fp32, else torch, which always works.

    Precision `auto` is bf16 only on a CPU with native bf16 and an engine that runs it (OpenVINO,
    torch); ONNX Runtime gets fp32. It is never int8: int8 is adopted by default only where it is
    faster and keeps FMNIST-TL test accuracy within 0.3 points of fp32; on the AVX2 kind it kept
    accuracy (docs/guides/speed.md, "int8": 0.8690 against 0.8717) but was not shown faster (0.9x at load 17);
    on the native-bf16 kind it was 1.10x bf16 end to end at -0.13 points, too little to make
    every user's features depend on a calibration. `--precision int8` asks for it (ONNX Runtime or OpenVINO, calibrated on the
    training images, quantize.py). So the rule never refuses a choice of its own: on a native-bf16
    CPU without OpenVINO (a plain pip install) the default is ONNX Runtime fp32. Only an explicit
    `--engine onnxruntime --precision bf16` is refused.
    """
    device = resolve_device(device)
    reasons = []
    if engine == "auto":
        if device != "cpu":
            engine = "torch"
            reasons.append(f"engine torch: device {device}")
        elif precision in ("auto", "bf16") and native_bf16() and installed("openvino"):
            engine = "openvino"
            reasons.append("engine openvino: installed, and the CPU has native bf16")
        else:
            able = [e for e in ENGINES if installed(e) and not (e == "onnxruntime" and precision == "bf16")
                    and not (precision == "int8" and e not in INT8_ENGINES)]
            if not able:
                raise HeadstartError("--precision int8 needs ONNX Runtime or OpenVINO; pip install onnxruntime.")
            engine = able[0]
            reasons.append(f"engine {engine}: the first installed of {', '.join(ENGINES)}"
                           + (f" able to run {precision}" if precision in ("bf16", "int8") else ""))
    elif engine not in ENGINES:
        raise HeadstartError(f"--engine must be one of auto, {', '.join(ENGINES)}; got {engine!r}.")
    elif not installed(engine):
        raise HeadstartError(f"--engine {engine} is not installed; pip install {engine}, or use --engine torch.")
    elif engine != "torch" and device != "cpu":
        raise HeadstartError(f"--engine {engine} runs on the CPU here; use --engine torch with --device {device}.")
    else:
        reasons.append(f"engine {engine}: asked for")
    if precision == "auto":
        if device == "cpu" and native_bf16() and engine != "onnxruntime":
            precision = "bf16"
            reasons.append("precision bf16: the CPU has native bf16")
        else:
            precision = "fp32"
            reasons.append("precision fp32: " + ("CUDA default" if device != "cpu" else
                                                 "ONNX Runtime has no bf16 CPU kernels" if native_bf16()
                                                 else "no native bf16 on this CPU"))
    elif precision not in PRECISIONS:
        raise HeadstartError(f"--precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}.")
    else:
        reasons.append(f"precision {precision}: asked for")
    if precision == "int8" and engine not in INT8_ENGINES:
        raise HeadstartError(f"--precision int8 runs a quantised ONNX model, which --engine {engine} cannot; use "
                             "--engine onnxruntime or --engine openvino.")
    if engine == "onnxruntime" and precision == "bf16":
        raise HeadstartError("ONNX Runtime has no bf16 CPU kernels for these models; use --engine openvino or "
                             "--engine torch with --precision bf16.")
    return EngineChoice(engine, precision, device, "; ".join(reasons))


def make_engine(model: nn.Module, choice: EngineChoice, cache_root: str | os.PathLike | None = None, int8=None):
    """The engine `choice` names, running `model`; converted models are cached under `cache_root`.
    `int8` (a quantize.Int8Source) is what an int8 choice is calibrated on."""
    if choice.engine == "torch":
        return TorchEngine(model, choice)
    if choice.engine == "onnxruntime":
        return OnnxRuntimeEngine(model, choice, cache_root, int8)
    if choice.engine == "openvino":
        return OpenVinoEngine(model, choice, cache_root, int8)
    raise HeadstartError(f"engine {choice.engine!r} is not available")
