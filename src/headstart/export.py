"""Export a trained model to ONNX: `model.onnx` plus `model.onnx.json` describing how to feed it.

The ONNX graph is the whole classifier (backbone + head): a normalised image batch in,
`logits` and `probabilities` (softmax of the logits) out, columns in `classes` order.
Decoding and preprocessing stay outside the graph, as in headstart itself, and the JSON
states them step by step so another runtime can reproduce them exactly.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .bundle import Model, load
from .errors import HeadstartError
from .fileio import atomic_path, write_json
from .weights import sha256_file

log = logging.getLogger(__name__)

FORMAT = "headstart-onnx"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
META_FILE = ONNX_FILE + ".json"
INPUT, LOGITS, PROBABILITIES = "image", "logits", "probabilities"
DEFAULT_OPSET = 17  # run by every ONNX Runtime since 1.13 and by TensorRT 8.6+
MIN_OPSET, MAX_OPSET = 13, 20  # Softmax over one axis needs 13; 20 is the TorchScript exporter's newest


class _Classifier(nn.Module):
    """Backbone then head, returning logits and their softmax."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor):  # (B, 3, crop, crop) normalised RGB
        logits = self.head(self.backbone(image))  # (B, n_classes)
        return logits, torch.softmax(logits, dim=1)


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise HeadstartError(f"ONNX export needs the packages onnx and onnxruntime ({exc}); install them with "
                             f"pip install 'headstart[export]'.") from None
    return onnx, onnxruntime


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise HeadstartError(f"--out {out_dir} is a file; give a folder to write {ONNX_FILE} into.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HeadstartError(f"{out_dir} already exists and is not empty; choose another --out, or pass "
                             f"--overwrite (overwrite=True) to replace {ONNX_FILE} and {META_FILE} in it.")


def preprocessing_spec(model: Model) -> dict:
    """The input pipeline in words and numbers: what `Preprocessing.transform()` does to a PIL image."""
    p = model.preprocessing
    # crop_mode "squash" (some timm models) resizes both sides to resize_size, ignoring the aspect ratio.
    resize = ({"op": "resize", "shorter_side": p.resize_size, "interpolation": p.interpolation, "antialias": True,
               "longer_side": f"int({p.resize_size} * longer / shorter), truncated"} if p.crop_mode == "center" else
              {"op": "resize", "height": p.resize_size, "width": p.resize_size, "interpolation": p.interpolation,
               "antialias": True, "aspect_ratio": "not kept"})
    return {
        "decode": "RGB, 8 bits per channel; grayscale and palette images converted to RGB, transparency "
                  "composited onto white, EXIF orientation applied, first frame of animated files",
        # timm's names for them (pretrained_cfg): crop_pct = crop / resize, so resize = crop / crop_pct
        "crop_pct": p.crop_pct, "crop_mode": p.crop_mode, "interpolation": p.interpolation,
        "steps": [
            resize,
            {"op": "center_crop", "height": p.crop_size, "width": p.crop_size,
             "offset": "top = round((height - crop) / 2), left = round((width - crop) / 2)"},
            {"op": "scale", "divide_by": 255.0, "range": [0.0, 1.0]},
            {"op": "normalize", "mean": list(p.mean), "std": list(p.std), "formula": "(x - mean) / std per channel"},
        ],
        "layout": "NCHW",
        "channel_order": "RGB",
        "dtype": "float32",
        "torchvision": f"ImageClassification(crop_size={p.crop_size}, resize_size={p.resize_size}, "
                       f"interpolation=InterpolationMode.{p.interpolation.upper()}, mean={tuple(p.mean)}, "
                       f"std={tuple(p.std)}, antialias=True) applied to a PIL image"
                       + ("" if p.crop_mode == "center" else f", resizing to ({p.resize_size}, {p.resize_size})"),
        "parameters": p.to_dict(),
    }


def export_onnx(model_or_path: Model | str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, overwrite: bool = False) -> Path:
    """Write `out_dir/model.onnx` and `out_dir/model.onnx.json`; return the path of model.onnx.

    With `dynamic_batch=False` the batch size is fixed at 1.
    """
    onnx, ort = _require_onnx()
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise HeadstartError(f"--opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET} "
                             f"(default {DEFAULT_OPSET}).")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, overwrite)
    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)

    # A copy, so the caller's model keeps its device, dtype and (possibly channels-last) layout.
    backbone = copy.deepcopy(model.backbone).to("cpu", torch.float32, memory_format=torch.contiguous_format)
    head = copy.deepcopy(model.head).to("cpu", torch.float32)
    net = _Classifier(backbone, head).eval()
    crop, n_classes = model.preprocessing.crop_size, len(model.classes)
    batch = "batch" if dynamic_batch else 1
    example = torch.randn(2 if dynamic_batch else 1, 3, crop, crop, generator=torch.Generator().manual_seed(0))

    path = out_dir / ONNX_FILE
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False), not the default torch.export one: for these plain CNNs
        # (no data-dependent control flow, which is what tracing gets wrong) both give the same graph
        # numerically, but here the dynamo exporter takes ~15 s for MobileNetV2 and ~6 s for ResNet18
        # against ~1 s, and it needs onnxscript. torch 2.14 warns that this exporter is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (example,), str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT], output_names=[LOGITS, PROBABILITIES],
            dynamic_axes={n: {0: "batch"} for n in (INPUT, LOGITS, PROBABILITIES)} if dynamic_batch else None,
        )
        onnx.checker.check_model(str(tmp), full_check=True)
        max_diff = _compare(net, str(tmp), example, ort)
    if max_diff > 1e-3:
        log.warning("ONNX Runtime's logits differ from PyTorch's by up to %.3g on a random batch; check %s "
                    "before relying on it.", max_diff, path)

    write_json(out_dir / META_FILE, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "file": ONNX_FILE,
        "sha256": sha256_file(path),
        "headstart_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=False)",
        "opset": opset,
        "backbone": model.entry.name,
        "weights_sha256": model.weights.sha256,
        "weights": model.weights.to_dict(),
        "backbone_identity": model.backbone_identity or model.weights.identity(),
        "strategy": model.strategy,
        "head": model.head_config,
        "classes": list(model.classes),
        "inputs": [{"name": INPUT, "shape": [batch, 3, crop, crop], "dtype": "float32",
                    "description": "images preprocessed as in 'preprocessing'"}],
        "outputs": [
            {"name": LOGITS, "shape": [batch, n_classes], "dtype": "float32",
             "description": "columns follow 'classes'"},
            {"name": PROBABILITIES, "shape": [batch, n_classes], "dtype": "float32",
             "description": "softmax of the logits over the classes"},
        ],
        "preprocessing": preprocessing_spec(model),
        "check": {"onnxruntime_version": ort.__version__, "batch_size": int(example.shape[0]),
                  "max_abs_logit_diff_vs_torch": max_diff},
    })
    log.info("wrote %s and %s (%s, %d classes, %s batch)", path, out_dir / META_FILE, model.entry.name, n_classes,
             "dynamic" if dynamic_batch else "static")
    return path


def _compare(net: nn.Module, onnx_path: str, x: torch.Tensor, ort) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits on `x`."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run([LOGITS], {INPUT: x.numpy()})
    with torch.inference_mode():
        want = net(x)[0].numpy()
    return float(np.abs(got - want).max())
