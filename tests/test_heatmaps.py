"""Heatmaps (issue 31): CAM's exactness, Grad-CAM against pytorch-grad-cam, the map put back onto each image,
flips, ensembles, one answer per input, `headstart explain`'s files; and, on scenes with the evidence at a
known place (heatmap_scenes.py), that the default model's map points at the item, and at a shortcut."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import headstart
from headstart.errors import HeadstartError
from headstart.heatmaps import cam
from headstart.heatmaps.explain import Member, explain
from headstart.heatmaps.overlay import write_overlay
from headstart.heatmaps.placement import place
from headstart.learn.heads import LinearHead
from headstart.learn.head_modules import MLP
from headstart.models.ensemble import Ensemble
from headstart.nets.registry import get_backbone, list_backbones
from headstart.nets.spec import Preprocessing

import heatmap_scenes as scenes
from conftest import MEASURED, tree_digest, write_image_folder
from test_cli import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TORCH = dict(engine="torch", cache_dir="none", workers=0)


# --- the feature map every backbone entry names ---------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg16" else n  # 138M parameters
                                  for n in list_backbones()] + ["timm:resnet18"])
def test_the_feature_map_mean_is_the_backbones_features(name):
    entry = get_backbone(name)
    torch.manual_seed(0)
    net = entry.create().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = cam.FeatureMapNet(entry, net)(x)
        want = net(x)
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, entry.feature_dim) and fmap.shape[2] * fmap.shape[3] > 1
    torch.testing.assert_close(cam.pooled(fmap), want, rtol=1e-5, atol=1e-5)


def test_a_network_without_a_pooled_map_is_refused_with_advice():
    entry = get_backbone("timm:vit_tiny_patch16_224")
    with pytest.raises(HeadstartError, match="does not end in global average pooling.*convolutional backbone"):
        cam.FeatureMapNet(entry, entry.create())


# --- CAM and Grad-CAM ------------------------------------------------------------------------------

def test_cam_mean_is_the_logit_minus_the_folded_bias():
    """The linear head folds its feature scaler into the torch module (heads.to_torch): the logit CAM adds up
    to is the folded module's, and the bias to take off is the folded bias, not the estimator's intercept_."""
    rng = np.random.default_rng(0)
    C, K = 16, 3
    fmaps = torch.as_tensor(rng.gamma(2.0, 1.5, (40, C, 5, 4)) + np.arange(C)[:, None, None], dtype=torch.float32)
    feats = cam.pooled(fmaps).numpy()
    y = np.arange(40) % K
    feats[:, 0] += 3 * y  # something to learn
    fmaps[:, 0] += torch.as_tensor(3.0 * y)[:, None, None]
    head = LinearHead(Cs=(1.0,)).fit(feats, y)
    module = head.to_torch()
    target = torch.as_tensor(rng.integers(0, K, 40))
    means = cam.class_map(module, fmaps, target).mean(dim=(1, 2)).double()
    logits = head.logits(feats)  # the estimator's own logits (float64 NumPy): the module's, same numbers
    folded_bias = module[0].bias.double()[target]
    rows = torch.arange(40)
    torch.testing.assert_close(means, torch.as_tensor(logits)[rows, target] - folded_bias, rtol=1e-4, atol=1e-4)
    unfolded = torch.as_tensor(logits)[rows, target] - head.intercept_.double()[target]
    assert (means - unfolded).abs().max() > 0.1  # the estimator's intercept_ is not the bias of the map's logit
    assert cam.method_of(module) == "cam"


def test_grad_cam_of_a_linear_head_is_the_positive_part_of_cam():
    torch.manual_seed(0)
    linear = nn.Linear(8, 3)
    fmaps, target = torch.randn(4, 8, 3, 3), torch.tensor([0, 1, 2, 1])
    not_plain = nn.Sequential(linear, nn.Identity())  # not recognised as linear: Grad-CAM's path
    assert cam.method_of(not_plain) == "grad-cam"
    torch.testing.assert_close(cam.class_map(not_plain, fmaps, target),
                               torch.relu(cam.class_map(nn.Sequential(linear), fmaps, target)))


def test_grad_cam_matches_pytorch_grad_cam_at_the_last_feature_block():
    """Through the head alone (cam.py) the map is pytorch-grad-cam's GradCAM with the block before the pooling
    as target layer, which backpropagates through the whole network; compared on the grid, both min-max scaled
    as the package scales them."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    entry = get_backbone("small_cnn")
    torch.manual_seed(0)
    net = entry.create().eval()
    head = MLP(entry.feature_dim, 4, hidden=32, dropout=0.5).eval()
    fmap_net = cam.FeatureMapNet(entry, net)
    whole = nn.Sequential(net, head).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fmap = fmap_net(x)
    target = torch.tensor([0, 3, 1])

    class OnTheGrid(GradCAM):  # the package resizes to the input; keep its map at the grid's size
        def get_target_width_height(self, input_tensor):
            return fmap.shape[3], fmap.shape[2]

    with OnTheGrid(model=whole, target_layers=[net.features[-1]]) as reference:
        theirs = reference(x, targets=[ClassifierOutputTarget(int(t)) for t in target])
    ours = cam.class_map(head, fmap, target).numpy()
    ours = (ours - ours.min(axis=(1, 2), keepdims=True))
    ours = ours / (1e-7 + ours.max(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(ours, theirs, atol=1e-3)  # float32 sums in another order


# --- where the map lands on the image ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["center", "squash"])
@pytest.mark.parametrize("size", [(90, 60), (60, 90), (64, 64)])
def test_crop_box_says_where_the_network_input_lies(mode, size):
    """An image whose red channel is its x coordinate and green its y: the decoded crop's pixels tell which
    image coordinates they came from; crop_box must say the same."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    img = Image.fromarray(np.stack([xs * 255 / (w - 1), ys * 255 / (h - 1), np.zeros_like(xs)], -1).astype(np.uint8))
    pre = Preprocessing(crop_size=32, resize_size=40, crop_mode=mode)
    crop = pre.transform().decode(img).numpy().astype(np.float64)  # (3, 32, 32)
    left, top, right, bottom = pre.crop_box(w, h)
    j = np.arange(8, 24)  # away from the edges, where antialiasing bends the ramp
    expect_x = (left + (j + 0.5) / 32 * (right - left)) * w - 0.5
    expect_y = (top + (j + 0.5) / 32 * (bottom - top)) * h - 0.5
    np.testing.assert_allclose(crop[0, 16, j] * (w - 1) / 255, expect_x, atol=1.0)
    np.testing.assert_allclose(crop[1, j, 16] * (h - 1) / 255, expect_y, atol=1.0)


def test_place_puts_the_grid_on_the_crop_and_nan_outside():
    pre = Preprocessing(crop_size=32, resize_size=40)
    grid = np.zeros((4, 4))
    grid[1, 3] = 1.0  # second row, last column
    out = place(grid, pre, (100, 50), (200, 100))  # decoded at half the size: placed by fractions
    left, top, right, bottom = pre.crop_box(100, 50)
    assert out.shape == (100, 200) and out.dtype == np.float32
    cols = np.flatnonzero(np.isfinite(out[50]))
    rows = np.flatnonzero(np.isfinite(out[:, 100]))
    assert abs(cols[0] - left * 200) <= 1 and abs(cols[-1] + 1 - right * 200) <= 1
    assert abs(rows[0] - top * 100) <= 1 and abs(rows[-1] + 1 - bottom * 100) <= 1
    y, x = np.unravel_index(np.nanargmax(out), out.shape)
    cell_w, cell_h = (right - left) * 200 / 4, (bottom - top) * 100 / 4
    assert abs(x + 0.5 - (left * 200 + 3.5 * cell_w)) <= cell_w / 2 and abs(y + 0.5 - (top * 100 + 1.5 * cell_h)) <= 1
    assert np.nanmin(out) == 0 and np.nanmax(out) == pytest.approx(1.0, abs=0.05)  # pixel centres miss the cell's
    assert np.allclose(place(np.full((4, 4), 2.5), pre, (100, 50), (100, 50))[np.isfinite(out[::2, ::2])], 2.5)


# --- Model.explain ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    base = tmp_path_factory.mktemp("explain-images")
    write_image_folder(base, n_per_class=2, classes=("ant", "bee", "cow"), size=(48, 36), seed=3)
    return sorted(str(p) for p in base.rglob("*.png"))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mlp-run")
    data = write_image_folder(base / "data", n_per_class=8, classes=("ant", "bee", "cow"), size=(12, 10))
    headstart.train(data, out=base / "run", strategy="feature-extraction", backbone="small_cnn", weights="none",
                    head="mlp", image_size=32, workers=0, cache_dir="none", test_fraction=0.25)
    return base / "run"


def test_explain_answers_every_input_in_order_with_predicts_classes(small_run, images, tmp_path):
    model = headstart.load(small_run)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    missing = str(tmp_path / "missing.png")
    pil = Image.open(images[1])
    inputs = [str(broken), images[0], missing, pil, images[2]]
    out = model.explain(inputs, **TORCH)
    assert [e.input for e in out] == [str(broken), images[0], missing, "<image 3>", images[2]]
    assert [e.ok for e in out] == [False, True, False, True, True]
    assert "not an image" in out[0].error and "cannot read" in out[2].error and out[0].map is None
    preds = model.predict([images[0], pil, images[2]], **TORCH)
    for e, p in zip([out[1], out[3], out[4]], preds):
        assert e.method == "cam" and e.label == e.class_ == p.label
        assert e.probability == pytest.approx(p.top[0][1], abs=1e-5)
        assert e.map.shape == (36, 48) and e.map.dtype == np.float32
    alone = model.explain(images[2], **TORCH)[0]
    np.testing.assert_allclose(alone.map, out[4].map, rtol=1e-5, atol=1e-6)  # the bad inputs moved nothing


def test_the_fast_engine_draws_the_torch_engines_map(small_run, images):
    model = headstart.load(small_run)
    a = model.explain(images[:2], **TORCH)
    b = model.explain(images[:2], **{**TORCH, "engine": "onnxruntime"})
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.map, y.map, rtol=1e-4, atol=1e-4 * np.nanmax(np.abs(x.map)))


def test_explain_draws_the_class_asked_for_and_names_an_unknown_one(small_run, images):
    model = headstart.load(small_run)
    proba = model.predict_proba(images[:3], **TORCH)
    out = model.explain(images[:3], class_="bee", **TORCH)
    assert [e.class_ for e in out] == ["bee"] * 3
    np.testing.assert_allclose([e.probability for e in out], proba[:, model.classes.index("bee")], atol=1e-5)
    with pytest.raises(HeadstartError, match="'wasp' is not one of the model's classes \\(ant, bee, cow\\)"):
        model.explain(images[:1], class_="wasp", **TORCH)


def test_the_map_has_the_size_of_the_image_as_the_user_sees_it(small_run, tmp_path):
    """A JPEG turned by its EXIF orientation and decoded at 1/8 scale for a 32 px network (draft mode): the map
    is still the full image's, turned."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (400, 640, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "turned.jpg"
    img.save(path, exif=exif.tobytes(), quality=90)
    e = headstart.load(small_run).explain(str(path), **TORCH)[0]
    assert e.ok and e.map.shape == (640, 400)
    assert np.isnan(e.map[:100]).all() and np.isfinite(e.map[320]).all()  # the centre crop of a tall image


def test_flips_average_the_mirror_images_map_flipped_back(small_run, tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))  # 42 x 32 after resizing: crop centred
    plain = headstart.load(small_run)
    flipped = dataclasses.replace(plain, tta="flip")
    both = flipped.explain(img, **TORCH)[0]
    a = plain.explain(img, class_=both.class_, **TORCH)[0].map
    b = plain.explain(img.transpose(Image.FLIP_LEFT_RIGHT), class_=both.class_, **TORCH)[0].map[:, ::-1]
    np.testing.assert_allclose(both.map, (a + b) / 2, rtol=1e-5, atol=1e-5)
    assert both.probability == pytest.approx(flipped.predict_proba([img], **TORCH).max(), abs=1e-6)


def test_an_mlp_head_gets_grad_cam(mlp_run, images):
    out = headstart.load(mlp_run).explain(images[:2], **TORCH)
    assert all(e.method == "grad-cam" and np.nanmin(e.map) >= 0 for e in out)


def test_an_ensemble_averages_its_members_maps_each_scaled(small_run, mlp_run, images):
    members = [headstart.load(small_run), headstart.load(mlp_run)]
    ensemble = Ensemble(members, names=["linear", "mlp"])
    out = ensemble.explain(images[:3], **TORCH)
    proba = ensemble.predict_proba(images[:3], **TORCH)
    assert [e.label for e in out] == [ensemble.classes[i] for i in proba.argmax(1)]
    assert out[0].method == "mean of cam, grad-cam"
    for i, e in enumerate(out):
        parts = [m.explain(images[i], class_=e.class_, **TORCH)[0].map for m in members]
        np.testing.assert_allclose(e.map, np.mean([p / np.nanmax(p) for p in parts], axis=0), rtol=1e-5, atol=1e-6)
        assert e.probability == pytest.approx(proba[i].max(), abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "mlp", "ensemble"])
def test_several_classes_per_image_from_one_pass_are_explains_maps(kind, small_run, mlp_run, images, tmp_path):
    """explain_classes (report.html's worst errors: the predicted and the true class) gives, per input, the map
    explain draws for each class asked for, from one backbone pass per batch; an unusable input its error twice."""
    model = {"linear": lambda: headstart.load(small_run), "mlp": lambda: headstart.load(mlp_run),
             "ensemble": lambda: Ensemble([headstart.load(small_run), headstart.load(mlp_run)])}[kind]()
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    inputs = [images[0], str(broken), images[3]]
    asked = [["bee", None], ["ant", "cow"], ["cow", "ant"]]
    engines = [m.engine for m in model.heatmap_members(headstart.Runtime(**TORCH))]  # each model keeps its own
    before = [e.n_images for e in engines]
    out = model.explain_classes(inputs, asked, **TORCH)
    assert [e.n_images - n for e, n in zip(engines, before)] == [2] * len(engines)  # the 2 usable images, once
    assert [len(e) for e in out] == [2, 2, 2]
    assert all(not e.ok and "not an image" in e.error for e in out[1])
    for e, image, classes in zip((out[0], out[2]), (images[0], images[3]), (asked[0], asked[2])):
        for got, class_ in zip(e, classes):
            want = model.explain(image, class_=class_, **TORCH)[0]
            assert got.class_ == want.class_ and got.label == want.label and got.method == want.method
            # batched with another image, not alone: the convolutions' float sums differ in the last digits
            np.testing.assert_allclose(got.map, want.map, rtol=1e-4, atol=1e-4 * np.nanmax(np.abs(want.map)))
        assert not np.allclose(np.nan_to_num(e[0].map), np.nan_to_num(e[1].map))  # two classes, two maps
    assert out[0][1].class_ == out[0][1].label  # None: the predicted class


def test_members_with_other_crops_average_where_any_saw_the_image(small_run, images):
    base = headstart.load(small_run)
    engine = base.map_engine("cpu", "torch", "fp32")
    wide = Member(engine, base.head, base.preprocessing)
    narrow = Member(engine, base.head, dataclasses.replace(base.preprocessing, resize_size=64))  # sees the centre
    out = explain([wide, narrow], base.classes, [images[0]], ["x"])[0]
    only_wide = explain([wide], base.classes, [images[0]], ["x"], class_=out.class_)[0].map
    seen = np.isfinite(only_wide)
    assert np.isfinite(out.map[seen]).all() and np.isnan(out.map[~seen]).all()


# --- the overlay and `headstart explain` --------------------------------------------------------

def test_the_overlay_leaves_what_the_model_did_not_see_as_it_was(tmp_path):
    img = Image.new("RGB", (200, 100), (10, 200, 30))
    heatmap = np.full((100, 200), np.nan, np.float32)
    heatmap[:, 100:] = np.linspace(0, 1, 100)[None, :]
    write_overlay(img, heatmap, "title", tmp_path / "o.png")
    drawn = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    h, w = drawn.shape[:2]
    assert w == 600 and h > w / 2  # the image's aspect, and room for the title
    middle = drawn[h // 2]
    left_half = middle[int(w * 0.1):int(w * 0.4)]
    assert (np.abs(left_half - [10, 200, 30]).max(axis=1) <= 2).all()  # NaN: the image alone
    assert (np.abs(middle[int(w * 0.9)] - [10, 200, 30]).max() > 40)  # the map's top: coloured over


def test_a_thumbnail_overlay_blends_as_the_overlay_does_at_any_decoded_size():
    from headstart.heatmaps.overlay import ALPHA, thumbnail

    img = Image.new("RGB", (400, 200), (10, 200, 30))
    heatmap = np.full((200, 400), np.nan, np.float32)
    heatmap[:, 200:] = 1.0  # the right half at the map's top, the left unseen
    small = thumbnail(img, heatmap, 96)
    assert small.size == (96, 48)
    drawn = np.asarray(small).astype(int)
    assert (drawn[:, :48] == [10, 200, 30]).all()  # unseen: the image alone
    red = np.array([10, 200, 30]) * (1 - ALPHA) + np.array([127.5, 0, 0]) * ALPHA  # jet's top is (0.5, 0, 0)
    assert (np.abs(drawn[:, 48:] - red).max() <= 1)
    half = thumbnail(img.resize((100, 50)), heatmap, 96)  # a reduced decode: the map still covers it
    assert half.size == (96, 48) and (np.asarray(half)[:, :48] == [10, 200, 30]).all()


def test_explain_command_writes_a_picture_and_a_map_per_input_named_after_it(small_run, tmp_path):
    data = tmp_path / "data"
    for sub, colour in (("a", 0), ("b", 1)):
        write_image_folder(data / sub, n_per_class=1, classes=("x",), size=(40, 30), seed=colour)
        (data / sub / "x" / "x_000.png").rename(data / sub / "shoe.png")
    (data / "broken.jpg").write_text("not an image")
    before = tree_digest(data)
    out = tmp_path / "maps"
    code, stdout, stderr = run_cli("explain", small_run, data / "a" / "shoe.png", data / "broken.jpg",
                                   data / "b" / "shoe.png", "--out", out, "--json", "--engine", "torch",
                                   "--cache-dir", "none")
    assert code == 0, stderr
    assert "broken.jpg" in stderr and "not an image" in stderr
    result = json.loads(stdout)
    assert [r["path"] for r in result["explained"]] == [str(data / "a" / "shoe.png"), str(data / "b" / "shoe.png")]
    assert [Path(r["overlay"]) for r in result["explained"]] == [out / "a" / "shoe.png.png", out / "b" / "shoe.png.png"]
    assert result["skipped"] == [{"path": str(data / "broken.jpg"), "reason": result["skipped"][0]["reason"]}]
    for sub in ("a", "b"):
        assert np.load(out / sub / "shoe.png.npy").shape == (30, 40)
        assert Image.open(out / sub / "shoe.png.png").format == "PNG"
    assert tree_digest(data) == before  # nothing written into the data folder

    code, stdout, _ = run_cli("explain", small_run, data / "a" / "shoe.png", "--out", out / "flat", "--engine",
                              "torch", "--cache-dir", "none", "--class", "cow")
    assert code == 0 and (out / "flat" / "shoe.png.png").is_file() and (out / "flat" / "shoe.png.npy").is_file()
    assert stdout.split("\t")[1].startswith("cow ")

    code, _, stderr = run_cli("explain", small_run, data, "--out", data / "a" / "maps")
    assert code == 2 and "inside the input folder" in stderr
    code, _, stderr = run_cli("explain", small_run, data / "broken.jpg", "--out", out / "none")
    assert code == 2 and "none of the 1 inputs could be explained" in stderr


# --- the maps point at the evidence (real MobileNetV2 weights) -----------------------------------

@pytest.fixture(scope="module")
def scene_data(tmp_path_factory) -> Path:
    return scenes.write_scenes(tmp_path_factory.mktemp("scenes") / "scenes", train_per_class=60, test_per_class=30)


@pytest.mark.slow
def test_the_default_models_map_points_at_the_item_far_more_often_than_the_centre(scene_data, tmp_path):
    """The default feature-extraction model (MobileNetV2, 224 px, linear head: CAM). The pointing game: the
    map of the image's true class peaks inside the item's box grown by 15 px."""
    run = headstart.train(scene_data, out=tmp_path / "run", strategy="feature-extraction",
                          cache_dir=tmp_path / "cache")
    model = headstart.load(run.run_dir)
    rows = scenes.read_boxes(scene_data)
    by_class = {c: [r for r in rows if r["class"] == c] for c in scenes.CLASSES}
    out = {}
    for c, rs in by_class.items():
        for r, e in zip(rs, model.explain([r["path"] for r in rs], class_=c, cache_dir=tmp_path / "cache")):
            out[r["path"]] = e
    explained = [out[r["path"]] for r in rows]
    assert all(e.ok and e.method == "cam" for e in explained)
    on_item, centre = scenes.pointing_game(explained, rows)
    predicted = model.predict([r["path"] for r in rows], cache_dir=tmp_path / "cache")
    accuracy = np.mean([p.label == r["class"] for p, r in zip(predicted, rows)])
    MEASURED.append(f"pointing game, default feature-extraction model, {len(rows)} test scenes: map {on_item:.3f}, "
                    f"centre point {centre:.3f} (accuracy {accuracy:.3f})")
    assert on_item >= 0.55 and on_item >= centre + 0.3


@pytest.mark.slow  # trains the small CNN through the fine-tuning loop
def test_a_scratch_cnn_is_explained_on_its_own_trained_network(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("ant", "bee"), size=(40, 30))
    run = headstart.train(data, out=tmp_path / "run", strategy="scratch", image_size=32, workers=0, cache_dir="none",
                          test_fraction=0, finetune=dict(epochs=1))
    model = headstart.load(run.run_dir)
    path = str(next((data / "ant").iterdir()))
    e = model.explain(path, **TORCH)[0]
    assert e.ok and e.method == "cam" and e.map.shape == (30, 40)
    assert e.probability == pytest.approx(model.predict_proba([path], **TORCH).max(), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_fine_tuned_model_is_explained_on_its_fine_tuned_network(fmnist_tiny, tmp_path, head):
    run = headstart.train(fmnist_tiny, out=tmp_path / "run", strategy="fine-tune", head=head, image_size=64,
                          workers=0, cache_dir=tmp_path / "cache", finetune=dict(epochs=1, unfreeze=2))
    model = headstart.load(run.run_dir)
    paths = sorted(str(p) for p in (fmnist_tiny / "test").rglob("*.png"))[:4]
    out = model.explain(paths, cache_dir=tmp_path / "cache")
    preds = model.predict(paths, cache_dir=tmp_path / "cache")
    assert [e.method for e in out] == [{"linear": "cam", "mlp": "grad-cam"}[head]] * 4
    assert [e.label for e in out] == [p.label for p in preds] and all(e.map.shape == (28, 28) for e in out)


@pytest.mark.slow
def test_the_map_of_a_class_learnt_from_a_corner_mark_points_at_the_mark(tmp_path):
    """A shortcut: every scene of "Bag" carries a small logo near the corner and an item of any class, so the
    logo alone tells the class. The default model's map of "Bag" on held-out marked scenes peaks at the logo."""
    data = scenes.write_scenes(tmp_path / "marked", train_per_class=60, test_per_class=20, seed=1, marked="Bag")
    run = headstart.train(data, out=tmp_path / "run", strategy="feature-extraction", cache_dir=tmp_path / "cache")
    model = headstart.load(run.run_dir)
    rows = [r for r in scenes.read_boxes(data) if r["class"] == "Bag"]
    out = model.explain([r["path"] for r in rows], class_="Bag", cache_dir=tmp_path / "cache")
    at_mark = np.mean([scenes.hit(scenes.map_peak(e.map), scenes.MARK_BOX) for e in out])
    at_item = np.mean([scenes.hit(scenes.map_peak(e.map), r["box"]) for e, r in zip(out, rows)])
    MEASURED.append(f"shortcut: the map of the marked class peaks at the mark on {at_mark:.2f} of {len(rows)} held-out "
                    f"marked scenes, at the item on {at_item:.2f}")
    assert at_mark >= 0.7 and at_mark > at_item
