"""timm as a backbone source: random-init timm models only (no download, never all of timm)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import headstart
from headstart.nets.registry import Preprocessing, get_backbone, list_backbones, sequence
from headstart.errors import BundleError, HeadstartError, WeightsNotFoundError
from headstart.nets.weights import load_backbone

from test_cli import run_cli

timm = pytest.importorskip("timm")

MODELS = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]


@pytest.mark.parametrize("name", MODELS)
def test_entry_follows_the_model_and_its_pretrained_cfg(name, one_torch_thread):
    entry = get_backbone(f"timm:{name}")
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    p = entry.preprocessing
    assert p.crop_size == cfg["input_size"][-1]
    assert p.resize_size == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    assert (p.interpolation, p.crop_mode, p.mean, p.std) == (cfg["interpolation"], cfg["crop_mode"],
                                                              tuple(cfg["mean"]), tuple(cfg["std"]))
    assert entry.preprocessing_source.startswith("timm pretrained_cfg")
    assert entry.weights is None and f"timm:{name}" not in list_backbones()  # the fixed list stays fixed

    torch.manual_seed(0)
    model = entry.create().eval()
    x = torch.randn(2, 3, 48, 48)
    out = model(x)
    assert out.shape == (2, entry.feature_dim) and torch.isfinite(out).all()
    # Every stage timm's feature_info names that holds parameters is a block; the sequence is the forward.
    stages = [f["module"] for f in model.feature_info]
    with_params = [s for s in stages if any(True for _ in model.get_submodule(s).parameters())]
    assert len(with_params) >= 4 and set(with_params) <= set(entry.blocks)
    y = x
    for _, m in sequence(entry, model):
        y = m(y)
    torch.testing.assert_close(y, out)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_name_and_fixed_sequence_models_say_what_to_do(one_torch_thread):
    with pytest.raises(HeadstartError, match="timm has no model 'resnet_nope'.*backbones --timm"):
        get_backbone("timm:resnet_nope")
    entry = get_backbone("timm:vit_tiny_patch16_224")
    model = entry.create().eval()
    # made for 224 px only: another size is refused with the fix, not with timm's assertion
    with pytest.raises(HeadstartError, match="224x224 images only.*--image-size 224"):
        model(torch.randn(1, 3, 48, 48))
    assert entry.blocks == ()
    with pytest.raises(HeadstartError, match="feature-extraction"):
        sequence(entry, model)
    with pytest.raises(HeadstartError, match="no blocks to fine-tune.*feature-extraction"):
        headstart.train("nowhere", backbone="timm:vit_tiny_patch16_224", strategy="fine-tune")


def test_offline_without_a_file_lists_the_places_tried():
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(get_backbone("timm:resnet18"))
    text = str(err.value)
    assert "torch hub cache" in text and "Hugging Face cache" in text and "--weights PATH" in text


def test_weights_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """A file where huggingface_hub caches it is found offline; its classifier weights are dropped."""
    pytest.importorskip("huggingface_hub")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, info = load_backbone(get_backbone("timm:resnet18"))
    assert "Hugging Face cache" in info.source and info.sha256
    torch.testing.assert_close(model.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"])
    code, out, _ = run_cli("backbones", "--timm", "resnet18")
    assert code == 0 and "timm:resnet18" in out and "found: " + str(snap / "model.safetensors") in out


def test_backbones_lists_timm_models_by_pattern():
    code, out, _ = run_cli("backbones", "--timm", "mobilenetv3_small*")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert "timm:mobilenetv3_small_050" in names and all(n.startswith("timm:mobilenetv3_small") for n in names)
    assert "not found" in out  # no weights in the test's private caches


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, one_torch_thread):
    """`--backbone timm:resnet18 --weights FILE` trained on a tiny folder (a full state dict, fc included)."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("timm")
    data = write_image_folder(root / "data", n_per_class=8)
    torch.manual_seed(0)
    weights = root / "resnet18_random.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    out = root / "run"
    code, _, err = run_cli("train", data, "--backbone", "timm:resnet18", "--weights", weights, "--strategy",
                           "feature-extraction", "--image-size", "32", "--workers", "0", "--out", out,
                           "--cache-dir", "none")
    assert code == 0, err
    return out, data, weights


def test_trains_with_a_local_state_dict_and_the_bundle_predicts(timm_run):
    out, data, weights = timm_run
    config = json.loads((out / "config.json").read_text())
    assert config["weights"]["kind"] == "file" and config["weights"]["path"] == str(weights)
    assert config["preprocessing"]["crop_size"] == 32 and config["preprocessing"]["interpolation"] == "bicubic"
    model = headstart.load(out)
    assert model.entry.name == "timm:resnet18" and model.preprocessing.crop_mode == "center"
    images = sorted((data / "cat").iterdir())[:2] + sorted((data / "dog").iterdir())[:2]
    proba = model.predict_proba(images, cache_dir="none", workers=0, engine="torch")
    assert proba.shape == (4, 2) and np.allclose(proba.sum(1), 1)


def test_timm_bundle_exports_to_onnx_with_crop_pct_mode_and_interpolation(timm_run, tmp_path):
    pytest.importorskip("onnx")
    from headstart.runs.export import export_onnx

    out, _, _ = timm_run
    path = export_onnx(out, tmp_path / "onnx")
    spec = json.loads((tmp_path / "onnx" / "model.onnx.json").read_text())["preprocessing"]
    cfg = timm.models.get_pretrained_cfg("resnet18")
    assert spec["crop_mode"] == "center" and spec["interpolation"] == cfg.interpolation
    # --image-size 32 keeps timm's crop fraction: resize floor(32 / 0.95 + 0.5) = 34
    assert spec["crop_pct"] == pytest.approx(32 / 34) and abs(spec["crop_pct"] - cfg.crop_pct) < 0.02
    assert path.is_file()


def test_fine_tunes_the_top_feature_info_blocks(tmp_path, one_torch_thread):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", n_per_class=6)
    out = tmp_path / "ft"
    code, _, err = run_cli("train", data, "--backbone", "timm:mobilenetv3_small_050", "--weights", "none",
                           "--strategy", "fine-tune", "--unfreeze", "2", "--epochs", "1", "--image-size", "32",
                           "--workers", "0", "--out", out, "--cache-dir", "none")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    blocks = get_backbone("timm:mobilenetv3_small_050").blocks
    assert metrics["fine_tune"]["trainable_blocks"] == list(blocks[-2:])
    assert headstart.load(out).entry.name == "timm:mobilenetv3_small_050"


def test_squash_crop_mode_ignores_the_aspect_ratio():
    from PIL import Image

    img = Image.fromarray(np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (40, 1))).convert("RGB")  # 80x40
    center = Preprocessing(crop_size=32, resize_size=32, crop_mode="center").transform().decode(img)
    squash = Preprocessing(crop_size=32, resize_size=32, crop_mode="squash").transform().decode(img)
    assert center.shape == squash.shape == (3, 32, 32)
    # center crops the middle of the gradient; squash keeps its whole width
    assert squash[0, 0, 0] < center[0, 0, 0] and squash[0, 0, -1] > center[0, 0, -1]
    with pytest.raises(HeadstartError, match="crop mode 'border'"):
        Preprocessing(crop_size=32, resize_size=32, crop_mode="border").transform()


def test_preprocessing_written_before_crop_mode_reads_as_center():
    old = {"crop_size": 224, "resize_size": 256, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225]}
    p = Preprocessing.from_dict(old)
    assert p.crop_mode == "center" and p.crop_pct == 224 / 256
    assert Preprocessing.from_dict(p.to_dict()) == p


def test_bundle_saved_before_this_change_still_loads_and_predicts(image_folder, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    code, _, err = run_cli("train", image_folder, "--backbone", "small_cnn", "--weights", "none", "--strategy",
                           "feature-extraction", "--workers", "0", "--out", out, "--cache-dir", "none")
    assert code == 0, err
    images = sorted((image_folder / "cat").iterdir())[:2]
    want = headstart.load(out).predict_proba(images, cache_dir="none", workers=0, engine="torch")
    meta_path = out / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["preprocessing"]["crop_mode"]  # as every bundle written before crop_mode existed
    meta_path.write_text(json.dumps(meta))
    old = headstart.load(out)
    assert old.preprocessing.crop_mode == "center"
    np.testing.assert_allclose(old.predict_proba(images, cache_dir="none", workers=0, engine="torch"), want)
    meta["preprocessing"]["crop_mode"] = "border"  # a mode headstart cannot apply is refused on load
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="crop_mode 'border'"):
        headstart.load(out)


def test_online_the_file_is_fetched_into_the_hugging_face_cache(tmp_path, monkeypatch):
    """The download step, with huggingface_hub's downloader replaced (tests never use the network)."""
    hub = pytest.importorskip("huggingface_hub")
    from safetensors.torch import save_file

    torch.manual_seed(2)
    full = timm.create_model("mobilenetv3_small_050", pretrained=False)
    fetched = []

    def fake_download(repo_id, filename, cache_dir):
        fetched.append((repo_id, filename, cache_dir))
        path = tmp_path / "downloaded" / filename
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = get_backbone("timm:mobilenetv3_small_050")
    with pytest.raises(WeightsNotFoundError, match="download: disabled"):  # HEADSTART_OFFLINE=1 in tests
        load_backbone(entry)
    assert not fetched
    monkeypatch.setenv("HEADSTART_OFFLINE", "0")
    model, info = load_backbone(entry)
    repo = timm.models.get_pretrained_cfg("mobilenetv3_small_050").hf_hub_id
    assert fetched == [(repo, "model.safetensors", str(tmp_path / "hub"))] and info.source.startswith("download")
    torch.testing.assert_close(model.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
