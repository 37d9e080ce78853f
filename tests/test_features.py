"""Feature extraction through the frozen backbone, the on-disk cache, and the engine choice."""

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from headstart.engines import features as features_mod
from headstart.nets.registry import get_backbone
from headstart.cpu import cpu_flags
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import choose_engine, make_engine, native_bf16
from headstart.data.checks import content_digests
from headstart.errors import HeadstartError
from headstart.engines.features import FeatureCache, extract, make_namespace, namespace_key
from headstart.fileio import default_cache_dir
from headstart.runs.cache import cache_info, clear_cache
from headstart.data.images import load_image
from headstart.nets.weights import load_backbone

ENTRY = get_backbone("mobilenet_v2")
PRE = ENTRY.preprocessing.scaled(32)
FP32 = EngineChoice("torch", "fp32", "cpu", "tests")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def paths(tmp_path) -> list[str]:
    folder = write_image_folder(tmp_path / "data", n_per_class=5)
    found = sorted(str(p) for p in folder.rglob("*.png"))
    assert len(found) == 10
    return found


@pytest.fixture(scope="module")
def backbone():
    """A random-init MobileNetV2 (seed 0) and its weights info; engines put it in eval mode."""
    return load_backbone(ENTRY, "none", seed=0)


def _engine(backbone):
    model, _ = backbone
    return make_engine(model, FP32)


def _namespace(info, pre=PRE, choice=FP32) -> dict:
    return make_namespace(ENTRY.name, info.identity(), pre, choice)


def _extract(engine, paths, cache, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("workers", 0)
    return extract(engine, PRE.transform(), paths, cache, **kw)


def _assert_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> None:
    # A random-init MobileNetV2 in eval mode gives tiny pooled features (~1e-10), so an absolute
    # 1e-5 would pass anything: compare relative to the features' own scale.
    scale = float(np.abs(b).max())
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _rewrite(path: str, seed: int) -> None:
    """New pixels and a later mtime, as an edit in an image editor would leave."""
    before = os.stat(path).st_mtime_ns
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))


# --------------------------------------------------------------------------- the cache


def test_second_run_reads_everything_from_the_cache(backbone, paths, tmp_path):
    _, info = backbone
    ns = _namespace(info)
    first_engine = _engine(backbone)
    first = _extract(first_engine, paths, FeatureCache(tmp_path / "cache", ns))
    assert (first.n_computed, first.n_cached, first.failures) == (10, 0, {})
    assert first_engine.n_images == 10
    assert all(first.ok)
    feats = FeatureCache(tmp_path / "cache", ns)
    feats.refresh()
    computed = feats.get(first.keys)
    assert computed.shape == (10, ENTRY.feature_dim) and computed.dtype == np.float32
    assert np.isfinite(computed).all()

    engine = _engine(backbone)  # a fresh engine and a fresh cache object: only the disk is shared
    cache = FeatureCache(tmp_path / "cache", ns)
    second = _extract(engine, paths, cache)
    assert (second.n_computed, second.n_cached) == (0, 10)
    assert engine.n_images == 0 and engine.n_batches == 0
    assert second.keys == first.keys
    assert np.array_equal(cache.get(second.keys), computed)


def test_the_log_says_plainly_when_every_feature_is_cached(backbone, paths, tmp_path, caplog):
    """Issue 29: with every image's features cached and two files that cannot be read (tried again on each run,
    since failures are not cached), the log said "computing 2" and then "0 computed (0 images/s)"."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    everything = paths + [str(tmp_path / "empty.png"), str(tmp_path / "cut.jpg")]
    ns = _namespace(backbone[1])
    with caplog.at_level(logging.INFO, logger="headstart.engines.features"):
        first = _extract(_engine(backbone), everything, FeatureCache(tmp_path / "cache", ns), desc="extracting")
    assert (first.n_computed, len(first.failures)) == (10, 2)
    assert "extracting: 0/12 from cache, 12 to read and compute" in caplog.text
    assert "extracting: 0/12 features from cache, 10 computed in " in caplog.text
    assert "images/s); 2 files could not be read" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headstart.engines.features"):
        second = _extract(_engine(backbone), everything, FeatureCache(tmp_path / "cache", ns), desc="extracting")
    assert (second.n_computed, second.n_cached, len(second.failures)) == (0, 10, 2)
    assert "extracting: all 10 features from cache; 2 files could not be read" in caplog.text
    assert "0 computed" not in caplog.text and "images/s" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headstart.engines.features"):
        _extract(_engine(backbone), paths, FeatureCache(tmp_path / "cache", ns), desc="extracting")
    assert "extracting: all 10 features from cache\n" in caplog.text + "\n" and "to read" not in caplog.text


def test_features_match_the_engine_in_input_order(backbone, paths):
    """The cache hands back each image's own features, whatever order the paths come in."""
    _, info = backbone
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)
    cache = FeatureCache(None, _namespace(info))
    result = _extract(_engine(backbone), shuffled, cache, batch_size=3)
    transform = PRE.transform()
    direct = _engine(backbone)(torch.stack([transform(load_image(p)) for p in shuffled])).numpy()
    _assert_close(cache.get(result.keys), direct)


def test_changed_image_is_recomputed_alone(backbone, paths, tmp_path):
    _, info = backbone
    ns = _namespace(info)
    first = _extract(_engine(backbone), paths, FeatureCache(tmp_path / "cache", ns))
    before = FeatureCache(tmp_path / "cache", ns)
    before.refresh()
    old = before.get(first.keys)

    _rewrite(paths[3], seed=99)
    engine = _engine(backbone)
    cache = FeatureCache(tmp_path / "cache", ns)
    second = _extract(engine, paths, cache)
    assert (second.n_computed, second.n_cached) == (1, 9)
    assert engine.n_images == 1
    assert second.keys[3] != first.keys[3]
    assert [k for i, k in enumerate(second.keys) if i != 3] == [k for i, k in enumerate(first.keys) if i != 3]
    new = cache.get(second.keys)
    assert np.array_equal(np.delete(new, 3, axis=0), np.delete(old, 3, axis=0))
    assert np.abs(new[3] - old[3]).max() > 1e-2 * np.abs(old).max()  # really new features, not a copy


def test_added_image_is_computed_alone(backbone, paths, tmp_path):
    _, info = backbone
    ns = _namespace(info)
    _extract(_engine(backbone), paths, FeatureCache(tmp_path / "cache", ns))
    extra = write_image_folder(tmp_path / "more", n_per_class=1, classes=("cat",), seed=5) / "cat" / "cat_000.png"
    engine = _engine(backbone)
    result = _extract(engine, [*paths, str(extra)], FeatureCache(tmp_path / "cache", ns))
    assert (result.n_computed, result.n_cached) == (1, 10)
    assert engine.n_images == 1


def test_extraction_leaves_the_backbone_frozen(paths):
    """Frozen means frozen: no parameter or BatchNorm buffer moves, even if handed over in train mode."""
    model, info = load_backbone(ENTRY, "none", seed=1)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in before)
    engine = make_engine(model, FP32)
    result = _extract(engine, paths, FeatureCache(None, _namespace(info)))
    assert result.n_computed == 10 and engine.n_images == 10
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_unreadable_images_are_reported_and_the_rest_extracted(backbone, paths, tmp_path):
    _, info = backbone
    corrupt = Path(paths[2])
    corrupt.write_bytes(b"this is not a png")
    missing = str(tmp_path / "data" / "cat" / "gone.png")
    cache = FeatureCache(None, _namespace(info))
    engine = _engine(backbone)
    result = _extract(engine, [*paths, missing], cache)
    assert set(result.failures) == {str(corrupt), missing}
    assert "not an image" in result.failures[str(corrupt)]
    assert "cannot read file" in result.failures[missing]
    assert result.ok.tolist() == [i != 2 for i in range(10)] + [False]
    assert result.keys[2] is None and result.keys[10] is None
    assert result.n_computed == 9 and result.n_cached == 0
    feats = cache.get([k for k in result.keys if k is not None])
    assert feats.shape == (9, ENTRY.feature_dim) and np.isfinite(feats).all()
    # Run again: the 9 good ones come from the cache, the bad ones are reported again, not counted.
    again = _extract(_engine(backbone), [*paths, missing], cache)
    assert (again.n_computed, again.n_cached) == (0, 9)
    assert set(again.failures) == {str(corrupt), missing}


def test_memory_cache_writes_nothing(backbone, paths, tmp_path):
    _, info = backbone
    ns = _namespace(info)
    default_dir = default_cache_dir()
    before = sorted(default_dir.rglob("*")) if default_dir.exists() else []  # other tests share this folder
    cache = FeatureCache(None, ns)
    assert cache.dir is None
    result = _extract(_engine(backbone), paths, cache)
    assert result.n_computed == 10
    assert cache.get(result.keys).shape == (10, ENTRY.feature_dim)
    assert (sorted(default_dir.rglob("*")) if default_dir.exists() else []) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # A second in-memory cache shares nothing with the first.
    assert _extract(_engine(backbone), paths, FeatureCache(None, ns)).n_computed == 10


def test_unwritable_cache_location_falls_back_to_memory(backbone, paths, tmp_path, caplog):
    _, info = backbone
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="headstart.engines.features"):
        cache = FeatureCache(blocker / "cache", _namespace(info))
    assert cache.dir is None
    assert "not writable" in caplog.text
    result = _extract(_engine(backbone), paths, cache)
    assert result.n_computed == 10
    assert cache.get(result.keys).shape == (10, ENTRY.feature_dim)
    assert blocker.read_text() == "not a folder"


def test_cache_that_fails_mid_run_keeps_what_was_written(backbone, paths, tmp_path, monkeypatch, caplog):
    """A disk that fills up after the first shard: the run finishes and every feature is still readable."""
    _, info = backbone
    monkeypatch.setattr(features_mod, "CHUNK", 4)  # shards of 4 images, so the failure lands mid-run
    real_save = features_mod.save_file
    calls = []

    def save_once(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(features_mod, "save_file", save_once)
    cache = FeatureCache(tmp_path / "cache", _namespace(info))
    with caplog.at_level(logging.WARNING, logger="headstart.engines.features"):
        result = _extract(_engine(backbone), paths, cache, batch_size=4)
    assert result.n_computed == 10
    assert "cannot write to feature cache" in caplog.text
    feats = cache.get(result.keys)
    assert feats.shape == (10, ENTRY.feature_dim) and np.isfinite(feats).all()
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no half-written shard left behind


def _key_with(monkeypatch, change) -> str:
    """The namespace key of the test's reference inputs after `change(monkeypatch)`; undone afterwards."""
    with monkeypatch.context() as m:
        change(m)
        return namespace_key(make_namespace(ENTRY.name, "imagenet-sha256", PRE, FP32))


def _version(m, module_name: str, value: str) -> None:
    import importlib

    m.setattr(importlib.import_module(module_name), "__version__", value)


def _dist_version(m, dist: str, value: str) -> None:
    from importlib import metadata

    real = metadata.version
    m.setattr(metadata, "version", lambda name: value if name == dist else real(name))


def _decoder_option(m, key: str, value) -> None:
    m.setitem(features_mod.DECODER_OPTIONS, key, value)


def test_namespace_key_covers_what_changes_the_features(monkeypatch):
    """Every input the README lists for the namespace ("backbone, full weights SHA-256 (or the seed of a
    random init), preprocessing and image size, engine, precision, device, decoder options and library
    versions") changes the key on its own."""
    import dataclasses

    ns = lambda **kw: namespace_key(make_namespace(**{"backbone": ENTRY.name, "weights_identity": "imagenet-sha256",  # noqa
                                                       "preprocessing": PRE, "choice": FP32, **kw}))
    base = ns()
    assert ns() == base and _key_with(monkeypatch, lambda m: None) == base
    keys = {
        "backbone": ns(backbone="resnet18"),
        "weights hash": ns(weights_identity="imagenet-other-sha256"),
        "seed of a random init": ns(weights_identity="random-seed-1"),
        "image size": ns(preprocessing=PRE.scaled(48)),
        "resize size": ns(preprocessing=dataclasses.replace(PRE, resize_size=PRE.resize_size + 1)),
        "interpolation": ns(preprocessing=dataclasses.replace(PRE, interpolation="bicubic")),
        "mean": ns(preprocessing=dataclasses.replace(PRE, mean=(0.5, 0.5, 0.5))),
        "std": ns(preprocessing=dataclasses.replace(PRE, std=(0.5, 0.5, 0.5))),
        "engine onnxruntime": ns(choice=EngineChoice("onnxruntime", "fp32", "cpu", "tests")),
        "engine openvino": ns(choice=EngineChoice("openvino", "fp32", "cpu", "tests")),
        "precision": ns(choice=EngineChoice("torch", "bf16", "cpu", "tests")),
        "device": ns(choice=EngineChoice("torch", "fp32", "cuda", "tests")),
        "torch version": _key_with(monkeypatch, lambda m: _version(m, "torch", "0.0.1")),
        "torchvision version": _key_with(monkeypatch, lambda m: _version(m, "torchvision", "0.0.1")),
        "headstart version": _key_with(monkeypatch, lambda m: _version(m, "headstart._version", "0.0.1")),
        "Pillow version": _key_with(monkeypatch, lambda m: _version(m, "PIL", "0.0.1")),
        "onnxruntime version": _key_with(monkeypatch, lambda m: _dist_version(m, "onnxruntime", "0.0.1")),
        "openvino version": _key_with(monkeypatch, lambda m: _dist_version(m, "openvino", "0.0.1")),
        "JPEG draft decoding": _key_with(monkeypatch, lambda m: _decoder_option(m, "jpeg_draft", "off")),
        "alpha background": _key_with(monkeypatch, lambda m: _decoder_option(m, "alpha_background", [0, 0, 0])),
        "pixel limit": _key_with(monkeypatch, lambda m: _decoder_option(m, "max_pixels", 10**6)),
        "EXIF rotation": _key_with(monkeypatch, lambda m: _decoder_option(m, "exif_transpose", False)),
        "animation frame": _key_with(monkeypatch, lambda m: _decoder_option(m, "first_frame", False)),
        "normalise path": _key_with(monkeypatch, lambda m: m.setitem(features_mod.PIPELINE, "normalize",
                                                                    "torchvision")),
    }
    for what, key in keys.items():
        assert key != base, f"changing the {what} does not change the cache namespace"
    assert len(set(keys.values())) == len(keys)
    assert _key_with(monkeypatch, lambda m: None) == base  # every change was undone
    # The reason the engines' versions matter: they compute the features on CPU by default.
    assert {"onnxruntime", "openvino"} <= set(make_namespace(ENTRY.name, "x", PRE, FP32)["versions"])


def test_namespace_key_ignores_the_engine_choice_reason():
    """The reason text is for people: the same engine chosen for another reason reuses the cache."""
    other = EngineChoice("torch", "fp32", "cpu", "--engine torch")
    assert namespace_key(make_namespace(ENTRY.name, "x", PRE, other)) == \
        namespace_key(make_namespace(ENTRY.name, "x", PRE, FP32))


def test_workers_and_batch_size_do_not_change_features(backbone, paths):
    _, info = backbone
    ns = _namespace(info)

    def run(**kw):
        cache = FeatureCache(None, ns)
        result = _extract(_engine(backbone), paths, cache, **kw)
        assert result.n_computed == 10
        return cache.get(result.keys)

    in_process = run(workers=0, batch_size=4)
    assert np.array_equal(run(workers=1, batch_size=4), in_process)
    for batch_size in (1, 10):
        _assert_close(run(workers=0, batch_size=batch_size), in_process)


def test_cache_info_and_clear_cache(backbone, paths, tmp_path):
    _, info = backbone
    root = tmp_path / "cache"
    root.mkdir()
    assert cache_info(root) == {"path": str(root), "exists": True, "bytes": 0, "parts": dict.fromkeys(
        ("features", "engines", "downloads", "digests", "other"), 0), "namespaces": [], "converted_models": 0}
    cache = FeatureCache(root, _namespace(info))
    _extract(_engine(backbone), paths, cache)
    report = cache_info(root)
    assert report["path"] == str(root)
    [space] = report["namespaces"]
    assert space["namespace"] == cache.key
    assert (space["backbone"], space["image_size"], space["engine"], space["precision"]) == (
        "mobilenet_v2", 32, "torch", "fp32")
    assert space["shards"] >= 1
    on_disk = sum(f.stat().st_size for f in (root / "features").rglob("*") if f.is_file())
    assert report["bytes"] == space["bytes"] == report["parts"]["features"] == on_disk > 10 * ENTRY.feature_dim * 4

    assert clear_cache(root)["bytes"] == on_disk
    assert not (root / "features").exists()
    assert cache_info(root)["namespaces"] == []
    assert all(Path(p).is_file() for p in paths)  # the images themselves are untouched


def test_cache_commands_see_the_whole_cache_folder(backbone, paths, tmp_path):
    """features/ was all they saw: `cache info` said 8 MB of 34, and `clear` left the converted backbones
    (and, later, the file digests of digests/)."""
    from test_cli import run_cli

    model, info = backbone
    root = tmp_path / "cache"
    choice = EngineChoice("onnxruntime", "fp32", "cpu", "tests")  # converts the backbone into root/engines
    _extract(make_engine(model, choice, root), paths, FeatureCache(root, _namespace(info, choice=choice)))
    (root / "downloads").mkdir()
    (root / "downloads" / "t10k-labels-idx1-ubyte.gz").write_bytes(os.urandom(5000))
    (root / "notes.txt").write_text("not headstart's")  # reported, never removed
    content_digests(paths, cache_root=root)  # what a run keeps so the next one need not hash every file again
    assert list((root / "digests").glob("*.json"))
    on_disk = {part: sum(f.stat().st_size for f in (root / part).rglob("*") if f.is_file())
               for part in ("features", "engines", "downloads", "digests")}
    assert on_disk["engines"] > on_disk["features"] > 0  # MobileNetV2 converted: megabytes
    report = cache_info(root)
    assert report["parts"] == {**on_disk, "other": len("not headstart's")}
    assert report["bytes"] == sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert report["converted_models"] == 1
    code, stdout, _ = run_cli("cache", "info", "--cache-dir", root)
    assert code == 0 and f"{report['bytes'] / 1e6:.1f} MB" in stdout and "1 converted backbone" in stdout
    code, stdout, _ = run_cli("cache", "clear", "--cache-dir", root)
    freed = sum(on_disk.values())
    assert code == 0 and f"{freed / 1e6:.1f} MB freed" in stdout
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    assert all(Path(p).is_file() for p in paths)


@pytest.mark.parametrize("action", ["info", "clear"])
def test_a_missing_cache_dir_is_named_not_reported_empty(tmp_path, action):
    from test_cli import run_cli

    code, stdout, stderr = run_cli("cache", action, "--cache-dir", tmp_path / "typo")
    assert code == 2 and stdout == "" and f"--cache-dir {tmp_path / 'typo'} does not exist" in stderr
    (tmp_path / "file").write_text("x")
    with pytest.raises(HeadstartError, match="is not a folder"):
        cache_info(tmp_path / "file")
    # The default folder may simply not exist yet: that is an empty cache, not an error.
    os.environ["XDG_CACHE_HOME"], saved = str(tmp_path / "fresh"), os.environ["XDG_CACHE_HOME"]
    try:
        code, stdout, _ = run_cli("cache", action)
    finally:
        os.environ["XDG_CACHE_HOME"] = saved
    assert code == 0 and str(tmp_path / "fresh" / "headstart") in stdout


# --------------------------------------------------------------------------- the engine choice


def test_choose_engine_follows_the_cpu_flags():
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    choice = choose_engine(device="cpu")
    # make test installs both converted-model engines; the rule picks by CPU flags alone.
    assert choice.engine == ("openvino" if native_bf16() else "onnxruntime")
    assert choice.device == "cpu"
    assert choice.precision == ("bf16" if native_bf16() else "fp32")
    assert choice.reason
    assert choose_engine(device="cpu") == choice  # a fixed rule: same machine, same choice
    assert choose_engine(device="cpu", precision="fp32").precision == "fp32"
    assert choose_engine(device="cpu", engine="torch", precision="bf16").precision == "bf16"
    # ONNX Runtime has no bf16 path here: asking for bf16 alone moves the rule on to an engine that has one.
    assert choose_engine(device="cpu", precision="bf16").engine in ("openvino", "torch")
    if not torch.cuda.is_available():
        assert choose_engine().device == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engine": "onnx"}, "--engine"),
        ({"engine": "onnxruntime", "precision": "bf16"}, "no bf16"),
        ({"precision": "fp16"}, "--precision"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_invalid_engine_settings_are_refused(kwargs, match):
    with pytest.raises(HeadstartError, match=match):
        choose_engine(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(HeadstartError, match="--device cpu"):
        choose_engine(device="cuda")


@pytest.mark.parametrize("size, crop_mode", [((28, 28), "center"), ((100, 60), "center"), ((30, 45), "squash"),
                                             ((640, 480), "center"), ((300, 500), "center")])
def test_split_transform_equals_torchvision(size, crop_mode):
    """decode is torchvision's resize and center_crop, and normalize its convert_image_dtype and normalize
    on a whole batch (backbone_spec.PIPELINE): bitwise torchvision's result."""
    import dataclasses

    import torchvision.transforms.functional as F
    from PIL import Image

    pre = dataclasses.replace(ENTRY.preprocessing.scaled(128), crop_mode=crop_mode)
    t = pre.transform()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    resize = t.resize_size if crop_mode == "center" else t.resize_size * 2
    want = F.pil_to_tensor(F.center_crop(F.resize(img, resize, interpolation=t.interpolation), t.crop_size))
    got = t.decode(img)
    assert got.shape == want.shape == (3, 128, 128) and got.dtype == torch.uint8
    assert torch.equal(got, want)
    batch = torch.stack([got, want])
    reference = F.normalize(F.convert_image_dtype(batch, torch.float), mean=t.mean, std=t.std)
    assert torch.equal(t.normalize(batch), reference)


@pytest.mark.parametrize("cores, threads, device, expected", [
    (2, 2, "cpu", 0),  # the engine's threads hold every core: decode between its batches
    (8, 8, "cpu", 0),
    (8, 4, "cpu", 1),  # a core left over: one worker beside the engine
    (2, 2, "cuda", 1),  # the network runs on the GPU
    (1, 1, "cpu", 0),
])
def test_default_workers_decode_beside_the_engine_only_when_it_leaves_a_core(monkeypatch, cores, threads, device,
                                                                           expected):
    from headstart.data import decoding

    monkeypatch.setattr(decoding.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(decoding.torch, "get_num_threads", lambda: threads)
    assert decoding.default_workers(device) == expected
