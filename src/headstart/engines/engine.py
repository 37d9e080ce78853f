"""Inference engines for the frozen backbone, and the fixed rule that picks one.

The rule looks only at what is installed and at the CPU's flags, never at a timing taken
at run time, so the same machine always makes the same choice (and the same cache key).
`--engine` and `--precision` override it; both are recorded in the run.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import logging
import math
import os
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart import cpu, memory
from headstart.cpu import cpu_flags  # noqa: F401  (re-exported: callers read the flags from here)
from headstart.errors import HeadstartError
from headstart.data.pixels import Normalize
from headstart.quiet import quiet
from headstart.settings import ENGINES, PRECISIONS

log = logging.getLogger(__name__)

# int8 runs only as a quantised ONNX model (quantize.py), so only on the converted engines.
INT8_ENGINES = ("onnxruntime", "openvino")

# torch.onnx.export keeps global state ("GLOBALS.in_onnx_export"): two exports at once, from two runs
# or models in two threads of one process, fail. One export at a time (export.py takes it too).
ONNX_EXPORT_LOCK = threading.Lock()


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


def installed(engine: str) -> bool:
    if engine == "torch":
        return True
    import importlib.util

    return importlib.util.find_spec(engine) is not None


def choose_engine(device: str = "auto", engine: str = "auto", precision: str = "auto") -> EngineChoice:
    """The fixed rule (README "Speed" and benchmarks/results-<kind>.md have the measurements behind it).

    CUDA: torch. CPU: OpenVINO in bf16 where the CPU has native bf16 (fastest measured there),
    else ONNX Runtime fp32 (6.9x plain PyTorch on MobileNetV2 at 224 px on an AVX2 CPU, 2.3x on
    ResNet-50, ahead of OpenVINO fp32), else OpenVINO fp32, else torch, which always works.

    Precision `auto` is bf16 only on a CPU with native bf16 and an engine that runs it (OpenVINO,
    torch); ONNX Runtime gets fp32. It is never int8: int8 is adopted by default only where it is
    faster and keeps FMNIST-TL test accuracy within 0.3 points of fp32; on the AVX2 kind it kept
    accuracy (README "int8": 0.8690 against 0.8717) but was not shown faster (0.9x at load 17);
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
            x = _needs(normalize)(x)
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


ONNX_OPSET = 17

# Images per call into a converted engine: the power of two nearest this many pixels, 1 to 64. A batch of 64
# runs as calls of that many images (in order, so features do not depend on anything else), whose activations
# stay in the cores' caches. MobileNetV2 on 2 cores of the AMX machine, 2 one-thread streams (2026-12-01),
# images/s against whole batches of 64: OpenVINO bf16 at 96 px 16 images per call 5,346 against 4,174,
# at 128 px 8 3,089 against 2,273, at 160 px 4 1,771 against 1,379, at 224 px 2 932 against 622;
# ONNX Runtime fp32 at 128 px 8 1,335 against 1,016, at 160 px 4 887 against 593, at 224 px 2 424 against 293.
# One size either side was within a few percent and not always behind (bf16 at 160 px, 8 per call: 1,874 in
# one run, 1,583-1,689 against 4's 1,717-1,795 in another). The same budget serves both precisions: bf16's
# halved activations did not make twice the pixels pay (96 px: 32 per call 3,880-4,396 against 16's
# 4,720-4,901). ResNet-50 at 224 px (compute-bound) is the same from 2 to 64 images per call (46-48).
CALL_PIXELS = 8 * 128 * 128


def call_batch(height: int, width: int) -> int:
    """Images per converted-engine call at this input size (CALL_PIXELS)."""
    return int(min(64, max(1, 2 ** round(math.log2(CALL_PIXELS / (height * width))))))


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a module's tensors (names and bytes): what a converted model is cached under."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _ConvertedEngine:
    """An engine that runs an ONNX export of the frozen backbone, made once per input shape.

    The export is cached as `<cache>/engines/<hash>.onnx`, the hash covering the backbone's
    tensors, the input shape, the opset and the torch version; without a cache it goes to a
    temporary folder that lives as long as the engine.
    """

    def __init__(self, model: nn.Module, choice: EngineChoice, cache_root: str | os.PathLike | None = None,
                 int8=None):
        if choice.precision == "int8" and int8 is None:
            raise HeadstartError("--precision int8 needs calibration images (quantize.Int8Source): train with "
                                 "--precision int8, or use a model trained that way.")
        self.choice = choice
        self.int8 = int8 if choice.precision == "int8" else None
        self.model = model.eval().requires_grad_(False)
        self.n_images = 0
        self.n_batches = 0
        self._cache_root = Path(cache_root) if cache_root is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._digest: str | None = None
        self._runners: dict[tuple[int, int, int], object] = {}  # (height, width, threads)
        # Held while a runner is made: two threads meeting a new shape convert and compile it once.
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, threads: int | None = None, normalize: Normalize | None = None
                 ) -> torch.Tensor:
        """Features of the batch `x`, run `call_batch` images at a time; `threads`: the intra-op threads this
        call's runner uses (default: torch's budget), one runner per (shape, threads). Extraction's streams
        run 1-thread calls side by side. `x` is a normalised float batch, or uint8 pixels (1 or 3 channels)
        that `normalize` makes one: then a model with `normalize` as its first nodes runs (pixels.py)."""
        shape = (int(x.shape[2]), int(x.shape[3]))
        threads = self.threads() if threads is None else max(1, int(threads))
        pixels = _needs(normalize) if x.dtype == torch.uint8 else None
        key = (*shape, threads, pixels)
        with self._lock:
            self.n_images += x.shape[0]
            self.n_batches += 1
            if key not in self._runners:
                self._runners[key] = self._compile(self._onnx_file(shape, pixels), threads)
            runner = self._runners[key]
        if pixels is not None:  # a gray batch's one channel is each of the three the model reads
            x = np.ascontiguousarray(x.detach().cpu().expand(-1, 3, -1, -1).numpy())
        else:
            x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        step = call_batch(*shape)
        out = [np.asarray(self._run(runner, x[i:i + step]), dtype=np.float32) for i in range(0, len(x), step)]
        return torch.from_numpy(out[0] if len(out) == 1 else np.concatenate(out))

    def release(self) -> None:
        """Free the compiled sessions (ONNX Runtime keeps a CPU arena sized for the largest batch's activations:
        about 0.4 GB for MobileNetV2 at 128 px); the next call compiles again from the cached export."""
        with self._lock, keep_signal_stack():  # an OpenVINO plugin freed here resets this thread's stack
            self._runners.clear()
        memory.trim()

    @staticmethod
    def threads() -> int:
        return torch.get_num_threads()  # the same budget torch would use (tests pin it to 1)

    def _onnx_file(self, shape: tuple[int, int], normalize: Normalize | None = None) -> Path:
        """The model the runner loads: the fp32 export, or its int8 quantisation for this calibration; with
        `normalize`, one that takes uint8 pixels and runs it first (pixels.py)."""
        if self.int8 is None:
            return self._fp32_file(shape, normalize)
        from headstart.fileio import atomic_path
        from headstart.engines.quantize import quantize

        path = self._fp32_file(shape)  # quantised as exported (calibrated on normalised images)
        int8_path = path.with_name(f"{path.stem}-int8-{self.int8.digest}.onnx")
        if not int8_path.exists():
            with atomic_path(int8_path) as tmp:
                quantize(path, tmp, self.int8)
        if normalize is None:
            return int8_path
        pixels_path = int8_path.with_name(f"{int8_path.stem}-pixels-{normalize.tag}.onnx")
        if not pixels_path.exists():
            with atomic_path(pixels_path) as tmp:
                normalize.in_front_of(int8_path, tmp)
        return pixels_path

    def int8_onnx(self, shape: tuple[int, int]) -> bytes:
        """The quantised model's bytes, for a bundle to carry."""
        with self._lock:
            return self._onnx_file(shape).read_bytes()

    def _fp32_file(self, shape: tuple[int, int], normalize: Normalize | None = None) -> Path:
        if self._digest is None:
            self._digest = model_digest(self.model)
        key = hashlib.sha256(f"{self._digest}|{shape}|{ONNX_OPSET}|{torch.__version__}".encode()).hexdigest()[:24]
        folder = self._engines_dir()
        path = folder / (f"{key}.onnx" if normalize is None else f"{key}-pixels-{normalize.tag}.onnx")
        if path.exists():
            return path
        from headstart.fileio import atomic_path

        net = copy.deepcopy(self.model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
        example = torch.zeros(2, 3, *shape)
        if normalize is not None:  # uint8 pixels in: the normalising operations become the graph's first nodes
            net, example = nn.Sequential(normalize.module(), net), example.to(torch.uint8)
        name = "image" if normalize is None else "pixels"
        # quiet(), not catch_warnings: this runs in a stream thread while the other one decodes images.
        with ONNX_EXPORT_LOCK, atomic_path(path) as tmp, quiet():
            # The TorchScript exporter: ~1 s for MobileNetV2 against ~15 s for the dynamo one (export.py).
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              do_constant_folding=True, input_names=[name], output_names=["features"],
                              dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}})
        log.info("converted the backbone for %s at %dx%d%s: %s", self.choice.engine, *shape,
                 "" if normalize is None else " (uint8 pixels in)", path)
        return path

    def _engines_dir(self) -> Path:
        if self._cache_root is not None:
            d = self._cache_root / "engines"
            try:
                d.mkdir(parents=True, exist_ok=True)
                return d
            except OSError as exc:
                log.warning("cannot cache converted models in %s (%s); using a temporary folder", d, exc)
                self._cache_root = None
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="headstart-engine-")
        return Path(self._tmp.name)


class OnnxRuntimeEngine(_ConvertedEngine):
    # An InferenceSession's run() may be called from several threads at once (ONNX Runtime's docs); with one
    # intra-op thread each call runs on its caller's thread, so calls from 2 threads use 2 cores without the
    # barrier at the end of every parallel loop that 2 intra-op threads wait at (decoding.default_streams).
    parallel_calls = True

    def _compile(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def _run(self, session, x: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels" if x.dtype == np.uint8 else "image": x})[0]  # the export's input


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


class _SignalStack(ctypes.Structure):  # stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack():
    """Put back the calling thread's alternate signal stack after the block (Linux; elsewhere nothing).

    OpenVINO's CPU plugin, on Linux, mmaps an alternate signal stack for the thread that creates it (one
    plugin per `openvino.Core`) and, when freed, puts back the one it found and unmaps its own. Two plugins
    freed in the order they were made (A, then B) leave B putting back A's unmapped stack, and the next
    signal handled on it (Python's handlers run there, such as the DataLoader's SIGCHLD one) kills the
    process with SIGSEGV, silently (seen on the native-bf16 CPU kind, OpenVINO 2026.4). With the stack put
    back at once, every plugin finds, and later puts back, the same valid one (tests/test_engines.py).
    One Core for the whole process would avoid this too, but a child forked after OpenVINO has run
    (the tests' CLI children) then hangs in its first compile."""
    libc = _libc()
    saved = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        saved.ss_flags &= ~1  # SS_ONSTACK describes the query, it is not a flag to set
        libc.sigaltstack(ctypes.byref(saved), None)


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


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


def _needs(normalize: Normalize | None) -> Normalize:
    if normalize is None:
        raise ValueError("a uint8 batch is pixels: pass the normalize (pixels.Normalize) that makes it the "
                         "network's input")
    return normalize


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
