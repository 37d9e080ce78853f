"""OpenVINO as the frozen backbone's engine (the choice on CPUs with native bf16), and what it takes to run it
safely in threads and beside other plugins: one infer request per thread, the numpy bridge built once, the
thread's signal stack kept."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import numpy as np

from headstart.engines.onnx_engine import _ConvertedEngine
from headstart.engines.signal_stack import keep_signal_stack


class OpenVinoEngine(_ConvertedEngine):
    # Calls from several threads run side by side when the model is compiled with one OpenVINO stream per
    # caller: a `threads`-thread runner on a machine with more cores gets cores // threads streams of
    # `threads` threads each, and each calling thread's request runs on one of them. Compiled as one
    # 1-thread stream instead (the LATENCY hint), two such runners or two callers were pinned to the same
    # core: MobileNetV2 bf16 at 160 px on 2 cores, 2 callers 414-431 images/s against 757-811 for 1 caller
    # on 2 threads, and 808-842 for 2 callers on 2 streams.
    # Streams are not pinned to cores: a process that is one of several (torchrun's ranks, 1 thread
    # each) would pin its first stream to the same core as the others do (808-830 unpinned here).
    parallel_calls = True

    def _compile(self, path: Path, threads: int):
        # The precision hint is always explicit: left unset, the CPU plugin may choose bf16 on its own.
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.choice.precision == "bf16" else "f32"}
        streams = max(1, (os.cpu_count() or 1) // threads)
        if streams > 1:
            config.update({"NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams * threads,
                           "ENABLE_CPU_PINNING": False})
        else:
            config.update({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
        return _PerThreadRequests(openvino_compile(str(path), config))

    def _run(self, requests: "_PerThreadRequests", x: np.ndarray) -> np.ndarray:
        return requests.get().infer({0: x})[0]


def openvino_compile(model, config: dict):
    """`openvino.Core().compile_model(model, "CPU", config)`, with the thread's signal stack kept (below):
    every OpenVINO compile in headstart goes through here."""
    import openvino as ov

    with keep_signal_stack():
        compiled = ov.Core().compile_model(model, "CPU", config)
    _openvino_numpy_bridge()
    return compiled


@functools.lru_cache(maxsize=1)
def _openvino_numpy_bridge() -> None:
    """Make OpenVINO's first numpy array in this thread, before any two threads can make theirs together.

    OpenVINO's Python module builds its numpy bridge (pybind11's `npy_api`, a function-local static) on first
    use. Two threads that first use it at the same moment, as extraction's streams do with their first
    infer requests, can deadlock: one holds the static's guard and waits for the GIL, the other holds the GIL
    and waits for the guard. A fresh process scoring images through a saved model hung that way (AMX machine,
    2026-12-01); a script of two threads' first infers hung in 2 of 16 processes (8 of 12 with the GIL
    switching every microsecond), 0 of 16 after this. Called where every runner is compiled, under the
    engine's lock, so it runs before the model's first request (tests/test_streams.py).
    """
    import openvino as ov

    ov.Tensor(np.zeros(1, np.float32)).data  # noqa: B018  (the attribute access is the point)


class _PerThreadRequests:
    """One OpenVINO infer request per calling thread: a compiled model is shared safely, but an
    infer request holds its input and output buffers and must not run two inferences at once."""

    def __init__(self, compiled):
        self.compiled = compiled
        self._local = threading.local()

    def get(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request
