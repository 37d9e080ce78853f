"""ONNX export of real trained runs (MobileNetV2, and EfficientNet-Lite0 for the JSON-only client; features + linear
head on real Fashion-MNIST images)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from headstart.engines.rule import native_bf16
from headstart.models.bundle import save as save_bundle
from headstart.errors import HeadstartError
from headstart.runs.export import export_onnx
from headstart.data.images import load_image
from headstart.runs.predict import features_of

from conftest import MEASURED
from test_cli import run_cli, trained  # noqa: F401  (the module-scoped training run)

import onnxruntime as ort  # a dependency of headstart (the default CPU engine): missing, the suite must fail


def _test_images(fmnist_small, per_class: int = 2) -> list:
    return [p for d in sorted((fmnist_small / "test").iterdir()) for p in sorted(d.iterdir())[:per_class]]


@pytest.fixture(scope="module")
def exported(trained, fmnist_small, tmp_path_factory):  # noqa: F811
    """The run's bundle, its logits on 20 real test images through headstart's own pipeline, and its export."""
    model = headstart.load(trained[0])
    paths = _test_images(fmnist_small)
    # The torch engine leaves the backbone channels-last: the export must work on a copy.
    # fp32 pinned: the export computes in fp32, and the rule's precision is bf16 on a native-bf16 CPU.
    feats, failures = features_of(model, paths, cache_dir="none", workers=0, engine="torch", precision="fp32")
    assert not failures
    path = export_onnx(model, tmp_path_factory.mktemp("export") / "onnx")
    return model, paths, model.logits_from_features(feats), path


@pytest.mark.slow
def test_onnx_runtime_agrees_with_the_bundle_on_real_images(exported):
    model, paths, want, path = exported
    transform = model.preprocessing.transform()
    x = torch.stack([transform(load_image(p)) for p in paths]).numpy()  # (20, 3, 64, 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, proba = session.run(["logits", "probabilities"], {"image": x})
    diff = float(np.abs(logits - want).max())
    agree = int((logits.argmax(1) == want.argmax(1)).sum())
    MEASURED.append(f"ONNX export (MobileNetV2 + linear head, 64 px): top-1 agrees with the bundle on {agree}/"
                    f"{len(paths)} real test images; max |logit difference| {diff:.2e}")
    assert agree == len(paths)
    assert diff < 1e-3
    assert np.allclose(proba, torch.softmax(torch.as_tensor(logits), dim=1).numpy(), atol=1e-6)
    # The export worked on a copy: the caller's backbone keeps the engine's channels-last layout.
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


# bf16 against fp32, where the CPU computes bf16 natively (on the AVX2 kind it is emulated, about 1 GFLOP/s,
# and the rule never picks it). The bounds were first set from bf16's format (8 significant bits: each rounding
# off by up to 2^-9 relative; oneDNN and OpenVINO accumulate in fp32) and published ImageNet results. Measured
# since: AVX512-BF16 (AMD EPYC, 2026-11-30/12-01) passed 0.1 (its value was not recorded); AMX (Intel Xeon,
# 2026-12-01): top-1 agreement 1.000 and max |logit difference| 0.164 of the largest logit, 200 real images
# (OpenVINO runs more of the network in bf16 with AMX's kernels). Per image, agreement is lower where two
# classes nearly tie (issue 10 saw 18 of 20 agree, torch bf16 against fp32), so 0.85 stays.
BF16_MIN_TOP1_AGREEMENT = 0.85
BF16_MAX_LOGIT_DIFF = 0.25  # relative to the largest |fp32 logit|: 1.5x the largest measured (AMX, 0.164)


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(), reason="bf16 is emulated on this CPU (no avx512_bf16/amx_bf16)")
def test_bf16_agrees_with_fp32_on_real_images(trained, fmnist_small):  # noqa: F811
    paths = [str(p) for p in _test_images(fmnist_small, per_class=20)]  # 200 real test images
    # OpenVINO in its own process (its thread pool's teardown crashed this long pytest process; test_engines).
    script = ("import sys, json, headstart; from headstart.runs.predict import features_of; "
              "m = headstart.load(sys.argv[1]); paths = json.loads(sys.argv[2]); "
              "out = {p: m.logits_from_features(features_of(m, paths, cache_dir='none', workers=0, "
              "engine='openvino', precision=p)[0]).tolist() for p in ('fp32', 'bf16')}; print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", script, str(trained[0]), json.dumps(paths)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32, bf16 = np.array(out["fp32"]), np.array(out["bf16"])
    agree = float((fp32.argmax(1) == bf16.argmax(1)).mean())
    diff = float(np.abs(bf16 - fp32).max() / np.abs(fp32).max())
    MEASURED.append(f"OpenVINO bf16 vs fp32 (MobileNetV2 + linear head, 64 px, 200 real images): top-1 agrees on "
                    f"{agree:.3f}; max |logit difference| {diff:.3g} of the largest logit")
    assert agree >= BF16_MIN_TOP1_AGREEMENT
    assert diff <= BF16_MAX_LOGIT_DIFF


@pytest.mark.slow
def test_json_states_classes_preprocessing_and_hashes(exported):
    model, _, _, path = exported
    meta = json.loads((path.parent / "model.onnx.json").read_text())
    assert meta["classes"] == model.classes
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["backbone"] == "mobilenet_v2"
    assert meta["weights_sha256"] == model.weights.sha256 == headstart.get_backbone("mobilenet_v2").weights.sha256
    assert meta["headstart_version"] == headstart.__version__
    assert meta["inputs"] == [{"name": "image", "shape": ["batch", 3, 64, 64], "dtype": "float32",
                               "description": meta["inputs"][0]["description"]}]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [("logits", ["batch", 10]),
                                                                  ("probabilities", ["batch", 10])]
    prep = meta["preprocessing"]
    assert prep["parameters"] == json.loads(json.dumps(model.preprocessing.to_dict()))
    resize, crop, scale, norm = prep["steps"]
    assert (resize["shorter_side"], resize["interpolation"], resize["antialias"]) == \
        (model.preprocessing.resize_size, model.preprocessing.interpolation, True)
    assert crop["height"] == crop["width"] == 64 and scale["range"] == [0.0, 1.0]
    assert norm["mean"] == list(model.preprocessing.mean) and norm["std"] == list(model.preprocessing.std)
    assert (prep["layout"], prep["channel_order"], prep["dtype"]) == ("NCHW", "RGB", "float32")
    assert meta["check"]["max_abs_logit_diff_vs_torch"] < 1e-3


@pytest.mark.slow
def test_dynamic_batch_takes_any_size_and_static_batch_only_one(exported, tmp_path):
    model, _, _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]
    for n in (1, 3):  # the export traced a batch of 2
        (logits,) = session.run(["logits"], {"image": np.zeros((n, 3, 64, 64), np.float32)})
        assert logits.shape == (n, 10)
    static = export_onnx(model, tmp_path / "static", dynamic_batch=False, opset=18)
    session = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    assert json.loads((static.parent / "model.onnx.json").read_text())["inputs"][0]["shape"] == [1, 3, 64, 64]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(["logits"], {"image": np.zeros((2, 3, 64, 64), np.float32)})


@pytest.mark.slow
def test_cli_export_and_refusal_to_overwrite(trained, tmp_path):  # noqa: F811
    out = tmp_path / "onnx"
    code, stdout, stderr = run_cli("export", trained[0], "--format", "onnx", "--out", out)
    assert code == 0, stderr
    assert (out / "model.onnx").is_file() and (out / "model.onnx.json").is_file()
    assert str(out / "model.onnx") in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temporary left behind
    before = (out / "model.onnx.json").read_text()
    code, _, stderr = run_cli("export", trained[0], "--out", out, "--static-batch")
    assert code == 2 and "not empty" in stderr and "--overwrite" in stderr and "Traceback" not in stderr
    assert (out / "model.onnx.json").read_text() == before
    code, _, stderr = run_cli("export", trained[0], "--out", out, "--opset", "5")
    assert code == 2 and "--opset 5" in stderr
    code, _, stderr = run_cli("export", trained[0], "--out", out, "--static-batch", "--overwrite")
    assert code == 0, stderr
    assert json.loads((out / "model.onnx.json").read_text())["inputs"][0]["shape"][0] == 1


def test_missing_onnx_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(HeadstartError, match=r"pip install 'headstart\[export\]'"):
        export_onnx(tmp_path / "no-run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a client from the JSON alone

CLIENT = Path(__file__).parent / "onnx_client.py"


def _client_images(folder: Path) -> list[Path]:
    """Large photos as JPEG (where draft decoding matters), transparency, greyscale, 16 bits, a palette."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1500, 0:2000] / 1500.0
    smooth = np.stack([128 + 100 * np.sin(6 * xx + k) * np.cos(4 * yy - k) for k in range(3)], axis=-1)
    photo = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)  # (1500, 2000, 3)
    out = []

    def save(name, im, **kw):
        im.save(folder / name, **kw)
        out.append(folder / name)

    save("large.jpg", Image.fromarray(photo), quality=90)
    save("portrait.jpg", Image.fromarray(photo[:, :1100]).transpose(Image.Transpose.ROTATE_90), quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees on display
    save("rotated.jpg", Image.fromarray(photo[:1200, :1600]), quality=92, exif=exif.tobytes())
    save("grey_large.jpg", Image.fromarray(photo[..., 1]), quality=90)
    save("small.jpg", Image.fromarray(photo[:50, :70]), quality=90)  # smaller than the resize: no draft
    rgba = np.dstack([photo[:900, :1200], (np.arange(1200) * 255 // 1199)[None, :].repeat(900, 0).astype(np.uint8)])
    save("alpha.png", Image.fromarray(rgba, mode="RGBA"))
    save("grey.png", Image.fromarray(photo[:700, :500, 0], mode="L"))
    save("grey16.png", Image.fromarray(photo[:300, :400, 2].astype(np.uint16) * 257))  # mode I;16
    palette = Image.fromarray(photo[:400, :600]).quantize(64)
    palette.info["transparency"] = 0
    save("palette.png", palette, transparency=0)
    return out


def _client(export_dir: Path, images: list[Path], *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(CLIENT), str(export_dir), *map(str, images), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def lite_run(fmnist_tiny, tmp_path_factory):
    """EfficientNet-Lite0 (real weights: bicubic, mean = std = 0.5, crop_pct 0.875 at 224 px, so 64 / 73 at 64 px)
    features + linear head at 64 px."""
    out = tmp_path_factory.mktemp("runs") / "lite0"
    code, _, stderr = run_cli("train", fmnist_tiny, "--out", out, "--backbone", "efficientnet_lite0",
                              "--strategy", "feature-extraction", "--image-size", "64", "--workers", "0",
                              "--cache-dir", "none")
    assert code == 0, stderr
    return out


@pytest.fixture
def client_case(request, tmp_path):
    """(bundle folder, its ONNX export) for the backbone named by the test's parameter."""
    if request.param == "mobilenet_v2":
        return request.getfixturevalue("trained")[0], request.getfixturevalue("exported")[3].parent
    if request.param == "mobilenet_v2-flip":
        # Test-time flips are computed inside the graph: the client feeds the images alone, unchanged.
        model = headstart.load(request.getfixturevalue("trained")[0])
        bundle = save_bundle(dataclasses.replace(model, tta="flip"), tmp_path / "flip")
        return bundle, export_onnx(headstart.load(bundle), tmp_path / "onnx").parent
    bundle = request.getfixturevalue("lite_run") / "model"
    if request.param == "efficientnet_lite0-squash":
        # No registered backbone squashes yet (timm's crop_mode="squash" models will); the same bundle with
        # its crop mode switched exercises that path of the JSON and the client. The head was trained on
        # centre crops, which does not matter here: only the two pipelines' agreement is checked.
        model = headstart.load(bundle)
        model = dataclasses.replace(model, preprocessing=dataclasses.replace(model.preprocessing, crop_mode="squash"))
        bundle = save_bundle(model, tmp_path / "squash")
    return bundle, export_onnx(headstart.load(bundle), tmp_path / "onnx").parent


@pytest.mark.slow
@pytest.mark.parametrize("client_case", ["mobilenet_v2", "mobilenet_v2-flip", "efficientnet_lite0",
                                         "efficientnet_lite0-squash"], indirect=True)
def test_a_client_written_from_the_json_alone_matches_predict(client_case, tmp_path):
    import ast

    bundle, export_dir = client_case
    model = headstart.load(bundle)
    prep = model.preprocessing
    spec = json.loads((export_dir / "model.onnx.json").read_text())["preprocessing"]
    assert (spec["crop_pct"], spec["crop_mode"], spec["interpolation"]) == (prep.crop_pct, prep.crop_mode,
                                                                           prep.interpolation)
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(ast.parse(CLIENT.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported == {"json", "sys", "numpy", "onnxruntime", "PIL"}
    images = _client_images(tmp_path / "images")
    got = _client(export_dir, images)
    assert got["modules"] == []  # no torch, torchvision or headstart in the client's process
    code, stdout, stderr = run_cli("predict", bundle, *images, "--precision", "fp32", "--json",
                                   "--top-k", len(model.classes), "--cache-dir", "none")
    assert code == 0, stderr
    rows = {r["path"]: {p["class"]: p["probability"] for p in r["predictions"]}
            for r in json.loads(stdout)["predictions"]}
    want = np.array([[rows[str(p)][c] for c in got["classes"]] for p in images])
    diff = np.abs(np.array(got["probabilities"]) - want).max(axis=1)
    # The control: decoding JPEGs at full size, as the JSON used not to say, misses by far more.
    full = _client(export_dir, images, "--no-draft")
    full_diff = float(np.abs(np.array(full["probabilities"]) - want).max())
    MEASURED.append(f"ONNX client from the JSON alone vs headstart predict --precision fp32, {model.entry.name} "
                    f"({prep.interpolation}, crop_mode {prep.crop_mode}, crop_pct {prep.crop_pct:.3f}), "
                    f"{len(images)} images (2000x1500 JPEGs, EXIF-rotated, RGBA, greyscale, 16-bit, palette): "
                    f"max |probability difference| {diff.max():.2e}; {full_diff:.2e} when JPEGs are decoded at full "
                    "size")
    assert diff.max() < 1e-5, dict(zip([p.name for p in images], diff))
    assert full_diff > 1e-4


@pytest.mark.slow
def test_the_json_holds_no_path_of_the_exporting_machine(exported, trained):  # noqa: F811
    import os
    import re

    model, _, _, path = exported
    meta = json.loads((path.parent / "model.onnx.json").read_text())
    text = json.dumps(meta)
    local = [str(path.parent), str(trained[0]), sys.prefix, os.path.expanduser("~"), model.weights.path]
    assert model.weights.path and not [p for p in local if p and p in text]

    def strings(x):
        if isinstance(x, dict):
            yield from (s for v in x.values() for s in strings(v))
        elif isinstance(x, list):
            yield from (s for v in x for s in strings(v))
        elif isinstance(x, str):
            yield x

    assert not [s for s in strings(meta) if re.search(r"(^|[\s'\"(=])(/[\w.-]+){2,}", s)]  # no absolute path
    assert meta["weights"]["path"] == os.path.basename(model.weights.path)
    assert meta["weights"]["sha256"] == model.weights.sha256
