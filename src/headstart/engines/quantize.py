"""int8: post-training static quantisation of the frozen backbone, calibrated on the user's own images.

ONNX Runtime's `quantize_static` turns the fp32 ONNX export (onnx_engine.py) into a QDQ model:
weights int8 per output channel, activations uint8 with ranges measured (min-max) on
CALIBRATION_IMAGES training images, chosen evenly over the sorted training paths so the
same data always gives the same model. Both converted engines run that file: ONNX Runtime
directly, OpenVINO through its low-precision transformations.

The weight type depends on the CPU, as ONNX Runtime's quantisation guide advises: without
VNNI (the AVX2 kind) u8 x s8 products are summed pairwise in int16 (VPMADDUBSW) and saturate,
so weights are uint8 too (U8U8, which has no such step); with VNNI (the AVX-512 kind) U8S8
accumulates in int32 and is the fast path. Measured on MobileNetV2 at 128 px, FMNIST-TL
calibration images, correlation of int8 with fp32 features on the AVX2 kind: U8S8 0.74,
U8S8 with 7-bit weights (reduce_range) 0.89, U8U8 0.94 (percentile calibration instead of
min-max: 0.90 and 10x slower to calibrate).

The calibration decides the features, so its digest (the images' cache keys and the options
below) goes into the feature cache's namespace and the converted model's file name, and a
bundle carries the quantised model itself (`Int8Source.onnx`): predicting never needs the
calibration images again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from headstart import cpu
from headstart.errors import HeadstartError
from headstart.data.images import ImageError, load_image

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def options() -> dict:
    """How the backbone is quantised on this CPU (recorded with the features: another CPU kind may differ)."""
    vnni = bool(VNNI_FLAGS & cpu.cpu_flags())
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "calibration_method": "minmax", "activations": "uint8", "weights": "int8" if vnni else "uint8"}


@dataclass(frozen=True)
class Int8Source:
    """Where an int8 backbone comes from: calibration images (training) or a quantised model already made
    (a bundle). `digest` names the calibration either way."""

    digest: str
    images: np.ndarray | None = None  # (N, 3, H, W) float32, preprocessed as the network sees them
    onnx: bytes | None = None  # the quantised model, as saved in a bundle

    def identity(self) -> dict:
        """What the feature cache keys on."""
        return {"calibration": self.digest, **options()}


def calibration_paths(paths: Sequence[str], n: int = CALIBRATION_IMAGES) -> list[str]:
    """`n` paths spread evenly over the sorted list (class folders sort together, so all classes are in)."""
    ordered = sorted(paths)
    if len(ordered) <= n:
        return ordered
    return [ordered[int(i)] for i in np.linspace(0, len(ordered) - 1, n).round().astype(int)]


def calibration_from(paths: Sequence[str], transform: Callable, key_of: Callable[[str], str],
                     n: int = CALIBRATION_IMAGES) -> Int8Source:
    """Decode the calibration images among `paths` (unreadable ones are passed over) into an Int8Source."""
    from headstart.data.decoding import decode_side

    chosen, images = [], []
    for p in calibration_paths(paths, n):
        try:
            images.append(transform(load_image(p, decode_side(transform))))
            chosen.append(p)
        except (ImageError, OSError):
            continue
    if not images:
        raise HeadstartError("--precision int8 needs readable training images to calibrate on; none were found.")
    h = hashlib.sha256(json.dumps(options(), sort_keys=True).encode())
    for p in chosen:
        h.update(key_of(p).encode())
    return Int8Source(h.hexdigest()[:24], images=torch.stack(images).numpy())


def quantize(fp32_model: Path, out: Path, source: Int8Source) -> None:
    """Write the int8 model for `source` to `out` (from its calibration images, or its saved bytes)."""
    if source.onnx is not None:
        out.write_bytes(source.onnx)
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = source.images

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(images):
                return None
            batch = images[self.start:self.start + 32]
            self.start += 32
            return {"image": np.ascontiguousarray(batch, dtype=np.float32)}

    prepared = out.with_name(out.name + ".pre.onnx")
    try:
        # Folds and infers shapes so that every convolution gets quantised (ONNX Runtime's advice).
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        weights = QuantType.QInt8 if options()["weights"] == "int8" else QuantType.QUInt8
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weights)
    finally:
        prepared.unlink(missing_ok=True)
    log.info("quantised the backbone to int8 on %d calibration images: %s", len(images), out)
