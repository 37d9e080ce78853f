"""int8: the frozen backbone quantised with ONNX Runtime, calibrated on the training images (quantize.py)."""

import json

import numpy as np
import pytest

from headstart.nets.registry import get_backbone
from headstart.data.folders import scan_folder
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import ENGINES, choose_engine, make_engine
from headstart.errors import HeadstartError
from headstart.engines.features import FeatureCache, extract, image_key, make_namespace, namespace_key
from headstart.engines.quantize import calibration_from, calibration_paths
from headstart.nets.weights import load_backbone

from conftest import MEASURED

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTRY = get_backbone("mobilenet_v2")
PRE = ENTRY.preprocessing.scaled(64)
# Pearson correlation of int8 with fp32 features over these images: measured 0.96 on the tiny Fashion-MNIST
# set at 64 px (0.89 on FMNIST-TL at 128 px); a broken quantisation (no calibration, saturated products)
# measured 0.74 and below.
MIN_CORRELATION = 0.85


@pytest.fixture(scope="module")
def images(fmnist_tiny):
    return sorted(s.path for s in scan_folder(fmnist_tiny / "train").samples)


def _features(images, choice, int8, cache_root):
    model, info = load_backbone(ENTRY, None)
    engine = make_engine(model, choice, cache_root, int8)
    cache = FeatureCache(None, make_namespace(ENTRY.name, info.identity(), PRE, choice, int8))
    result = extract(engine, PRE.transform(), images, cache, batch_size=16, workers=0)
    return cache.get(result.keys), engine


@pytest.mark.slow
def test_int8_features_correlate_with_fp32(images, tmp_path):
    int8 = calibration_from(images, PRE.transform(), image_key)
    fp32, _ = _features(images, EngineChoice("onnxruntime", "fp32", "cpu", "test"), None, tmp_path)
    got, engine = _features(images, EngineChoice("onnxruntime", "int8", "cpu", "test"), int8, tmp_path)
    corr = float(np.corrcoef(fp32.ravel(), got.ravel())[0, 1])
    MEASURED.append(f"int8 vs fp32 features, MobileNetV2 64 px, {len(images)} images: correlation {corr:.3f}")
    assert corr > MIN_CORRELATION
    assert not np.allclose(got, fp32, atol=1e-3)  # it did run quantised
    # The quantised model is cached beside the fp32 export, named by its calibration.
    assert len(list((tmp_path / "engines").glob(f"*-int8-{int8.digest}.onnx"))) == 1
    # A bundle's copy of the quantised model (its bytes) gives the same features without the images.
    again, _ = _features(images, EngineChoice("onnxruntime", "int8", "cpu", "test"),
                         type(int8)(int8.digest, onnx=engine.int8_onnx((64, 64))), tmp_path / "other")
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-6)


def test_the_cache_key_covers_precision_and_calibration(images):
    _, info = load_backbone(ENTRY, None)
    a = calibration_from(images, PRE.transform(), image_key, n=8)
    b = calibration_from(images[1:], PRE.transform(), image_key, n=8)
    assert a.digest != b.digest
    fp32 = EngineChoice("onnxruntime", "fp32", "cpu", "t")
    int8 = EngineChoice("onnxruntime", "int8", "cpu", "t")
    keys = {namespace_key(make_namespace(ENTRY.name, info.identity(), PRE, fp32)),
            namespace_key(make_namespace(ENTRY.name, info.identity(), PRE, int8, a)),
            namespace_key(make_namespace(ENTRY.name, info.identity(), PRE, int8, b))}
    assert len(keys) == 3
    with pytest.raises(ValueError):
        make_namespace(ENTRY.name, info.identity(), PRE, int8)


def test_calibration_choice_is_deterministic_and_spans_the_classes(images):
    chosen = calibration_paths(list(reversed(images)), n=20)
    assert chosen == calibration_paths(images, n=20) and len(chosen) == 20
    assert {p.split("/")[-2] for p in chosen} == {p.split("/")[-2] for p in images}


@pytest.mark.parametrize("native", [False, True])
def test_the_rule_never_picks_int8_itself_and_routes_it_to_a_converted_engine(fake_cpu, native):
    fake_cpu(native)
    for engine in ["auto", *ENGINES]:
        assert choose_engine("cpu", engine).precision != "int8"
    assert choose_engine("cpu", precision="int8").engine == "onnxruntime"
    assert choose_engine("cpu", "openvino", "int8").precision == "int8"
    with pytest.raises(HeadstartError, match="int8"):
        choose_engine("cpu", "torch", "int8")
    fake_cpu(native, ("onnxruntime", "openvino"))
    with pytest.raises(HeadstartError, match="int8"):
        choose_engine("cpu", precision="int8")


@pytest.mark.slow
def test_a_bundle_predicts_with_int8(fmnist_tiny, tmp_path):
    import headstart
    from headstart.models.bundle import load

    run = headstart.train(fmnist_tiny / "train", strategy="feature-extraction", precision="int8", image_size=32,
                          workers=0, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["engine"]["precision"] == "int8"
    model = load(tmp_path / "run")
    assert model.int8 is not None
    test = sorted(str(p) for p in (fmnist_tiny / "test").rglob("*.png"))
    # Left to the rule, the bundle keeps int8: its head was fitted on int8 features.
    auto = model.predict_proba(test, cache_dir="none", workers=0)
    assert model.engine("cpu", cache_root=None).choice.precision == "int8"
    fp32 = model.predict_proba(test, cache_dir="none", workers=0, precision="fp32")
    int8 = model.predict_proba(test, cache_dir="none", workers=0, precision="int8")
    np.testing.assert_allclose(auto, int8, atol=1e-6)
    assert not np.allclose(auto, fp32, atol=1e-4)
    assert run is not None


def test_int8_is_for_feature_extraction_only(image_folder, tmp_path):
    import headstart

    with pytest.raises(HeadstartError, match="feature-extraction"):
        headstart.train(image_folder, strategy="fine-tune", precision="int8", image_size=32, workers=0,
                        out=tmp_path / "run", cache_dir="none")
    assert not (tmp_path / "run").exists()


def test_the_weight_type_follows_the_cpu_and_names_the_calibration(monkeypatch, images):
    """Without VNNI, u8 x s8 products saturate (quantize.py): weights are uint8 there, int8 with VNNI, and the
    two quantisations are different features, so different calibration digests."""
    from headstart import cpu
    from headstart.engines.quantize import options

    digests = {}
    for flags, weights in (({"avx2"}, "uint8"), ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "int8")):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert options()["weights"] == weights
        digests[weights] = calibration_from(images, PRE.transform(), image_key, n=4).digest
    assert digests["uint8"] != digests["int8"]
