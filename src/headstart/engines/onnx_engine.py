"""The converted engines' shared part, an ONNX export of the frozen backbone made once per input shape, and
ONNX Runtime, the default engine on CPUs without native bf16."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart import memory
from headstart.data.pixels import Normalize
from headstart.engines.choice import EngineChoice
from headstart.engines.signal_stack import keep_signal_stack
from headstart.engines.torch_engine import needs_normalize
from headstart.errors import HeadstartError
from headstart.quiet import quiet

log = logging.getLogger(__name__)

# torch.onnx.export keeps global state ("GLOBALS.in_onnx_export"): two exports at once, from two runs
# or models in two threads of one process, fail. One export at a time (export.py takes it too).
ONNX_EXPORT_LOCK = threading.Lock()


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
        pixels = needs_normalize(normalize) if x.dtype == torch.uint8 else None
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
