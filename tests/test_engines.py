"""The converted-model engines (ONNX Runtime, OpenVINO) against torch fp32, on real weights and images.

`make test` installs both engines, so a missing one fails here rather than skipping.
"""

import numpy as np
import pytest
import torch
from conftest import MEASURED

from headstart.backbones import get_backbone
from headstart.data import scan_folder
from headstart.engine import EngineChoice, make_engine
from headstart.features import FeatureCache, extract, make_namespace
from headstart.weights import load_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTRY = get_backbone("mobilenet_v2")
PRE = ENTRY.preprocessing.scaled(64)
# Relative to the largest feature: ONNX Runtime and OpenVINO fuse BatchNorm into the convolutions
# and reorder sums, so fp32 results differ from eager torch in the last bits (measured ~1e-6).
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images(fmnist_tiny):
    return sorted(s.path for s in scan_folder(fmnist_tiny / "train").samples)[:24]


@pytest.fixture(scope="module")
def reference(images):
    model, info = load_backbone(ENTRY, None)  # the real ImageNet weights
    engine = make_engine(model, EngineChoice("torch", "fp32", "cpu", "reference"))
    x = torch.stack([PRE.transform()(_rgb(p)) for p in images])
    return model, info, x, engine(x).numpy()


def _rgb(path):
    from headstart.images import load_image

    return load_image(path)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_engine_matches_torch_fp32(name, reference, tmp_path):
    model, _, x, want = reference
    engine = make_engine(model, EngineChoice(name, "fp32", "cpu", "test"), tmp_path / "cache")
    got = engine(x).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    MEASURED.append(f"{name} fp32 vs torch fp32, MobileNetV2 64 px, 24 real images: max relative diff {rel:.2e}")
    assert rel < FP32_TOLERANCE
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9  # the same strongest channel, nearly always
    # The converted model is cached: a second engine converts nothing.
    cached = sorted((tmp_path / "cache" / "engines").glob("*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = make_engine(model, EngineChoice(name, "fp32", "cpu", "test"), tmp_path / "cache")
    np.testing.assert_array_equal(again(x).numpy(), got)
    assert cached[0].stat().st_mtime_ns == mtime and len(list((tmp_path / "cache" / "engines").iterdir())) == 1


def test_converted_model_follows_the_weights(reference, tmp_path):
    """A changed backbone (fine-tuned) converts anew instead of reusing a stale export."""
    model, _, x, want = reference
    import copy

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).mul_(0.5)
    root = tmp_path / "cache"
    a = make_engine(model, EngineChoice("onnxruntime", "fp32", "cpu", "test"), root)(x).numpy()
    b = make_engine(changed, EngineChoice("onnxruntime", "fp32", "cpu", "test"), root)(x).numpy()
    assert len(list((root / "engines").glob("*.onnx"))) == 2
    assert np.abs(a - want).max() < 1e-3 < np.abs(b - want).max()


def test_extraction_through_onnxruntime_caches_features(reference, images, tmp_path):
    model, info, _, want = reference
    choice = EngineChoice("onnxruntime", "fp32", "cpu", "test")
    engine = make_engine(model, choice, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache", make_namespace(ENTRY.name, info.identity(), PRE, choice))
    result = extract(engine, PRE.transform(), images, cache, batch_size=8, workers=0)
    assert result.n_computed == len(images) and engine.n_images == len(images)
    got = cache.get(result.keys)
    assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE
