"""The matrix-multiply peak each engine row is reported against ("of peak"), per precision.

One `torch.mm` fp32 product at n = 2048 is not an upper bound: on the AVX2 kind ONNX Runtime
ran ResNet-50 at 101-106% of it, on the AVX-512+bf16 kind OpenVINO bf16 at 387% of the fp32
figure (issue 15). So the peak of a precision is the best of several GEMM sizes and libraries
in that precision (torch, numpy, ONNX Runtime; OpenVINO for bf16), and never below the
theoretical figure at the nominal clock:

    cores x clock (cpuinfo "cpu MHz") x FLOPs per cycle per core (vector lanes x 2 FMA units x 2)

The nominal clock understates a CPU that boosts (this VM's EPYC reports 2,445 MHz and its
GEMMs run above that figure), which is why the measured best is kept when higher. Callers
measure again after their engine rows and keep the best (`Peaks.update`), so a machine that
got quieter mid-run does not leave an engine above its peak.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from headstart.cpu import cpu_flags
from headstart.engines.openvino_engine import openvino_compile
from headstart.engines.rule import installed, native_bf16

PRECISIONS = ("fp32", "bf16", "int8")


def _rate(fn: Callable, flops: float, seconds: float) -> float:
    fn()  # warm-up: thread pools, packing buffers
    k, t0 = 0, time.perf_counter()
    while k < 3 or time.perf_counter() - t0 < seconds:
        fn()
        k += 1
    return flops * k / (time.perf_counter() - t0) / 1e9


def flops_per_cycle(precision: str, flags: frozenset[str] | None = None) -> int:
    """Per core: vector lanes x 2 (FMA) x 2 FMA units; an upper figure for the kinds we run on."""
    flags = cpu_flags() if flags is None else flags
    fp32 = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32 *= 2 * 2
    if precision == "fp32":
        return fp32
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024  # AMX tile multiply: 16x32 bf16 products into 16x16 fp32 per cycle
        return 2 * fp32 if "avx512_bf16" in flags else fp32  # VDPBF16PS: 2 bf16 products per fp32 lane
    if precision == "int8":
        if "amx_int8" in flags:
            return 2048
        return 4 * fp32  # VNNI / vpmaddubsw: 4 int8 products per 32-bit lane
    raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def nominal_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else 0.0
    except OSError:
        return 0.0


def theoretical(precision: str) -> float:
    """GFLOP/s: cores x nominal clock x FLOPs per cycle per core (0 when the clock is unknown)."""
    return (os.cpu_count() or 1) * nominal_ghz() * flops_per_cycle(precision)


def _onnx_gemm(n: int, precision: str) -> Callable:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if precision == "int8":  # u8 x s8 -> int32, the product ONNX Runtime's int8 kernels use
        a_t, b_t, out_t, op = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger"
        a = np.random.default_rng(0).integers(0, 255, (n, n), dtype=np.uint8)
        b = np.random.default_rng(1).integers(-127, 127, (n, n), dtype=np.int8)
    else:
        a_t = b_t = out_t = TensorProto.FLOAT
        op = "MatMul"
        a, b = (np.random.default_rng(i).random((n, n), dtype=np.float32) for i in (0, 1))
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", a_t, [n, n]),
                               helper.make_tensor_value_info("b", b_t, [n, n])],
                              [helper.make_tensor_value_info("c", out_t, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def _openvino_gemm(n: int, precision: str) -> Callable:
    import openvino as ov
    import openvino.opset13 as ops

    a, b = ops.parameter([n, n], np.float32), ops.parameter([n, n], np.float32)
    model = ov.Model([ops.matmul(a, b, False, False)], [a, b])
    compiled = openvino_compile(model, {"INFERENCE_PRECISION_HINT": precision.replace("fp", "f")})
    x = [np.random.default_rng(i).random((n, n), dtype=np.float32) for i in (0, 1)]
    request = compiled.create_infer_request()
    return lambda: request.infer(x)


def gemms(precision: str, smoke: bool = False) -> dict[str, tuple[Callable[[], None], float]]:
    """name -> (callable, FLOPs per call): the GEMMs measured for `precision`."""
    sizes = [256] if smoke else [512, 1024, 2048]
    if precision == "bf16" and not native_bf16():
        sizes = [256] if smoke else [256, 512]  # emulated bf16: a 2048 product takes half a minute here
    out = {}
    for n in sizes:
        flops = 2.0 * n ** 3
        if precision == "fp32":
            x, y = torch.randn(n, n), torch.randn(n, n)
            xn, yn = x.numpy(), y.numpy()
            out[f"torch.mm {n}"] = (lambda x=x, y=y: torch.mm(x, y), flops)
            out[f"numpy {n}"] = (lambda x=xn, y=yn: x @ y, flops)
            out[f"onnxruntime {n}"] = (_onnx_gemm(n, "fp32"), flops)
        elif precision == "bf16":
            x, y = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
            out[f"torch.mm {n}"] = (lambda x=x, y=y: torch.mm(x, y), flops)
            if native_bf16() and installed("openvino"):
                out[f"openvino {n}"] = (_openvino_gemm(n, "bf16"), flops)
        elif precision == "int8":
            out[f"onnxruntime {n}"] = (_onnx_gemm(n, "int8"), flops)
        else:
            raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return out


@dataclass
class Peaks:
    """The best GFLOP/s measured per precision, and which GEMM gave it; `peak(p)` is the bound used."""

    measured: dict[str, float] = field(default_factory=dict)
    best_of: dict[str, str] = field(default_factory=dict)
    smoke: bool = False
    seconds: float = 1.0

    def update(self, precisions=PRECISIONS) -> "Peaks":
        """Measure (again) and keep the best of everything measured so far."""
        for p in precisions:
            for name, (fn, flops) in gemms(p, self.smoke).items():
                r = _rate(fn, flops, self.seconds)
                if r > self.measured.get(p, 0.0):
                    self.measured[p], self.best_of[p] = r, name
        return self

    def peak(self, precision: str) -> float:
        """GFLOP/s an engine in `precision` cannot exceed: the best GEMM measured, or the theoretical
        figure at the nominal clock when that is higher."""
        if precision not in self.measured:
            self.update([precision])
        return max(self.measured[precision], theoretical(precision))

    def to_dict(self) -> dict:
        return {p: {"gflops": round(self.peak(p), 1), "measured": round(self.measured[p], 1),
                    "best_of": self.best_of[p], "theoretical_nominal": round(theoretical(p), 1)}
                for p in self.measured}
