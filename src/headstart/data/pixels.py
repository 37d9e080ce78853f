"""Decoded pixels to the network's input: torchvision's scaling and normalising, wherever it runs.

Images are decoded, resized and cropped to uint8 (backbone_spec.SplitClassification.decode); `Normalize`
turns a batch of them into the float32 tensor the network takes, with torchvision's operations in its order
(convert_image_dtype, then normalize), so bitwise its result. An engine is handed the uint8 batch and this
`Normalize` (engines/): torch runs it before the network; a converted engine (ONNX Runtime, OpenVINO) runs
the same operations as the first nodes of its own graph (exported with them, engine._ConvertedEngine; put
in front of an int8 model, `in_front_of`), where OpenVINO folds them into the first convolution. Measured on the AMX machine (2026-12-01, MobileNetV2 at
160 px, 64 gray FMNIST-sized images per batch, two 1-thread streams, a script, best of 3 x 4 s): OpenVINO bf16
took 1,753-1,803 images/s of uint8 pixels against 1,461-1,488 for torch normalising in the stream and the
engine taking floats (1,726-1,763 for floats alone); ONNX Runtime fp32, which runs the operations as they are,
721-731 against 693-735. Normalising on the decoding thread had cost 81 us of CPU per gray image (91 per
colour one), and `train` on FMNIST-TL extracted its 20,000 images in 14.8-14.9 s against 16.3-16.9. Both
engines gave features equal to the float path's there. The uint8 batch is also a quarter of the bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Normalize:
    """(..., 1 or 3, H, W) uint8 pixels -> (..., 3, H, W) float32: x / 255, minus mean, over std, per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):  # from lists (a bundle's JSON) or tuples alike: the same key for the same numbers
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        if batch.shape[-3] == 3:
            return (batch.to(torch.float32) / 255).sub_(mean).div_(std)
        # One gray channel (features.py keeps grayscale images in one channel up to here): the same
        # operations, element by element, so bitwise the RGB result, but scaled to [0, 1] once instead
        # of three times. A 256-entry lookup table was measured too and was slower (gathers: 105 us
        # per 128 px image on one core against 67 us for the three passes on all three channels).
        x = batch.to(torch.float32) / 255  # (..., 1, H, W)
        out = torch.empty((*batch.shape[:-3], 3, *batch.shape[-2:]), dtype=torch.float32)
        for c in range(3):
            torch.sub(x[..., 0, :, :], mean[c], out=out[..., c, :, :]).div_(std[c])
        return out

    @property
    def tag(self) -> str:
        """A short name for these numbers (the converted models that run them are named by it)."""
        return hashlib.sha256(repr((self.mean, self.std)).encode()).hexdigest()[:12]

    def module(self) -> nn.Module:
        """These operations on 3-channel pixels as a module, to export in front of a backbone."""
        return _Module(self)

    def onnx_model(self, height: int, width: int, like):
        """These operations as an ONNX model from input "pixels" ((batch, 3, height, width) uint8) to output
        "pixels_normalized", with the IR version and opsets of the model `like` it is put in front of."""
        from onnx import TensorProto, helper, numpy_helper

        consts = [numpy_helper.from_array(np.float32(255), "pixels_255"),
                  numpy_helper.from_array(np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1), "pixels_mean"),
                  numpy_helper.from_array(np.asarray(self.std, np.float32).reshape(1, 3, 1, 1), "pixels_std")]
        nodes = [helper.make_node("Cast", ["pixels"], ["pixels_float"], to=TensorProto.FLOAT),
                 helper.make_node("Div", ["pixels_float", "pixels_255"], ["pixels_unit"]),
                 helper.make_node("Sub", ["pixels_unit", "pixels_mean"], ["pixels_centred"]),
                 helper.make_node("Div", ["pixels_centred", "pixels_std"], ["pixels_normalized"])]
        shape = ["batch", 3, height, width]
        graph = helper.make_graph(
            nodes, "normalize", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, shape)],
            [helper.make_tensor_value_info("pixels_normalized", TensorProto.FLOAT, shape)], initializer=consts)
        return helper.make_model(graph, ir_version=like.ir_version, opset_imports=list(like.opset_import))

    def in_front_of(self, model_path, out_path, input_name: str = "image") -> None:
        """Write to `out_path` the ONNX model at `model_path` with these operations before its input
        `input_name` ((batch, 3, H, W) float32, H and W fixed): a model of uint8 pixels."""
        import onnx
        from onnx import compose

        net = onnx.load(str(model_path))
        dims = next(i for i in net.graph.input if i.name == input_name).type.tensor_type.shape.dim
        height, width = dims[2].dim_value, dims[3].dim_value
        merged = compose.merge_models(self.onnx_model(height, width, net), net,
                                      io_map=[("pixels_normalized", input_name)])
        onnx.save(merged, str(out_path))


class _Module(nn.Module):
    """`Normalize.module`: the constants are buffers, so the tracer exports them as they are (Normalize's own
    tensors made inside the call drew its warnings), and the operations are Normalize's on 3 channels."""

    def __init__(self, normalize: Normalize):
        super().__init__()
        self.register_buffer("mean", torch.tensor(normalize.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> float32
        return (pixels.to(torch.float32) / 255 - self.mean) / self.std
