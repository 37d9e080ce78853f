"""`headstart inspect` and acting on it: the searches, the checks, the outputs, train --exclude, train's data check.

Small constructed sets: synthetic features and pictures for the parts, a small random-weights CNN for the
mechanics of the command, and (slow) real MobileNetV2 features of a Fashion-MNIST subset with planted
wrong labels, a copy and a stray.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tree_digest, write_image_folder
from headstart.data.issues import COLUMNS, exclusions, parse_kinds, read_issues
from headstart.data.looks import COPY_SIM, Look, look, spectrum_similarity, unit_spectra
from headstart.errors import DataError, HeadstartError
from headstart.inspection.copies import PROPOSE_SIM, mutual_best, near_copies, pair_similarities
from headstart.learn import neighbours
from headstart.learn.neighbours import nearest

SMALL = dict(backbone="small_cnn", weights="none", image_size=32, workers=0)


# --------------------------------------------------------------------------- nearest neighbours


def test_nearest_leaves_each_row_itself_out_and_agrees_with_numpy(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    X[7] = X[3]  # an exact copy: its own row and the copy tie at similarity 1
    sims, idx = nearest(X, 4)
    assert idx.shape == (300, 4) and not (idx == np.arange(300)[:, None]).any()
    assert idx[3, 0] == 7 and idx[7, 0] == 3 and sims[3, 0] == pytest.approx(1.0, abs=1e-5)
    monkeypatch.setattr(neighbours, "_faiss", lambda: None)  # the NumPy path, as without faiss installed
    sims_np, idx_np = nearest(X, 4)
    clear = sims[:, 0] - sims[:, 1] > 1e-5  # rows whose nearest is not tied (with the copied row)
    assert np.allclose(sims, sims_np, atol=1e-5) and (idx[clear, 0] == idx_np[clear, 0]).all() and clear.sum() > 250


def test_the_inverted_index_finds_what_the_exact_search_finds():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32))
    X = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))).astype(np.float32)
    exact = nearest(X, 1)[1][:, 0]
    approx = nearest(X, 1, exact_up_to=1000)[1][:, 0]  # 4,000 rows: past the exact limit given
    assert (exact == approx).mean() > 0.95


# --------------------------------------------------------------------------- issues.csv


def test_issues_csv_is_read_and_its_kinds_checked(tmp_path):
    f = tmp_path / "issues.csv"
    f.write_text("path,split,kind,score,given_label,suggested_label,partner\n"
                 "a/1.png,train,label,0.9,a,b,\na/2.png,test,leak,0.99,a,,a/3.png\na/1.png,train,stray,0.5,a,,\n")
    rows = read_issues(f)
    assert exclusions(rows, "/d", None) == {"/d/a/1.png": ["label", "stray"], "/d/a/2.png": ["leak"]}
    assert exclusions(rows, "/d", parse_kinds("leak")) == {"/d/a/2.png": ["leak"]}
    with pytest.raises(DataError, match="unknown kind labels"):
        parse_kinds("labels,leak")
    with pytest.raises(DataError, match="no such file"):
        read_issues(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("file,class\nx,y\n")
    with pytest.raises(DataError, match="not an issues.csv"):
        read_issues(tmp_path / "other.csv")


# --------------------------------------------------------------------------- pictures: copies and checks


def _picture(seed: int, size: int = 48) -> Image.Image:
    """A grey picture of a few random blobs: lookalikes of each other, never the same picture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    a = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(3, 9)]
        a += rng.uniform(60, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _look(image: Image.Image, path: Path, **save) -> Look:
    image.save(path, **save)
    return look(str(path))


def test_a_resaved_resized_or_shifted_copy_is_the_same_picture_and_a_lookalike_is_not(tmp_path):
    original = _look(_picture(0), tmp_path / "o.png")
    arr = np.asarray(_picture(0))
    copies = [_look(_picture(0), tmp_path / "c.jpg", quality=90),
              _look(_picture(0).resize((72, 72), Image.BILINEAR), tmp_path / "r.png"),
              _look(Image.fromarray(np.roll(arr, 2, axis=1)), tmp_path / "s.png"),
              _look(_picture(0).crop((3, 3, 45, 45)), tmp_path / "k.png")]
    others = [_look(_picture(s), tmp_path / f"x{s}.png") for s in range(1, 9)]
    spectra = unit_spectra(np.stack([x.finger for x in [original, *copies, *others]]))
    sims = spectrum_similarity(np.repeat(spectra[:1], len(spectra) - 1, axis=0), spectra[1:])
    assert (sims[:4] >= COPY_SIM).all(), sims[:4]
    assert (sims[4:] < COPY_SIM).all(), sims[4:]


def test_fingerprints_are_whole_grey_levels_and_their_spectra_the_same_in_chunks(tmp_path):
    """A fingerprint is kept as uint8, losing nothing (Pillow resizes a grey picture to whole grey levels): a
    quarter of float32's 12 KB a file, 0.6 GB at 200,000 files instead of 2.4 (benchmarks/inspect_scale.py).
    unit_spectra goes in chunks (its Fourier transforms' temporaries held GBs at 200,000 files at once) and
    gives what one go gives."""
    finger = _look(_picture(0), tmp_path / "o.png").finger
    assert finger.dtype == np.uint8 and finger.shape[0] == 3 and finger.std() > 0
    fingers = np.random.default_rng(0).integers(0, 256, (50, 3, 32, 32)).astype(np.uint8)
    fingers[1] = finger
    whole = unit_spectra(fingers, chunk=len(fingers))
    assert whole.dtype == np.float32 and whole.shape[:2] == (50, 3)
    assert np.allclose(unit_spectra(fingers, chunk=7), whole, atol=1e-6)
    assert np.allclose(unit_spectra(fingers.astype(np.float32)), whole, atol=1e-6)
    assert unit_spectra(fingers[:0]).shape == (0, 3, whole.shape[2])


@pytest.mark.parametrize("how", ["jpeg", "resize", "shift", "crop"])
def test_near_copies_pairs_a_copy_with_its_original_and_not_a_lookalike_too(tmp_path, how):
    arr = np.asarray(_picture(0))
    copy = {"jpeg": _picture(0), "resize": _picture(0).resize((72, 72), Image.BILINEAR),
            "shift": Image.fromarray(np.roll(arr, 2, axis=1)), "crop": _picture(0).crop((3, 3, 45, 45))}[how]
    # a lookalike of the original: the same blobs with a fifth of another picture in them
    alike = Image.fromarray((0.8 * arr + 0.2 * np.asarray(_picture(20))).astype(np.uint8))
    files = {"test/o.png": _picture(0), f"train/copy.{'jpg' if how == 'jpeg' else 'png'}": copy,
             "train/alike.png": alike, **{f"train/x{s}.png": _picture(s) for s in range(1, 7)}}
    (tmp_path / "test").mkdir()
    (tmp_path / "train").mkdir()
    looks = [_look(im, tmp_path / name, quality=90) if name.endswith(".jpg") else _look(im, tmp_path / name)
             for name, im in files.items()]
    names = list(files)
    fingers = np.stack([x.finger for x in looks])
    spectra = unit_spectra(fingers)
    assert spectrum_similarity(spectra[:1], spectra[2:3])[0] >= PROPOSE_SIM  # the lookalike is proposed
    found = near_copies(fingers.reshape(len(names), -1), fingers, [n.split("/")[0] for n in names], names,
                        [str(tmp_path / n) for n in names])
    assert [(names[p], names[q], kind) for p, q, kind, _ in found["rows"]] == [("test/o.png", names[1], "leak")]


def test_candidate_pairs_are_compared_in_chunks_as_in_one_go():
    """near_copies compares its candidate pairs' spectra a chunk at a time (all at once held 2.4 GB for the
    820,000 pairs of 50,000 images): the same similarities as one spectrum_similarity of all of them."""
    rng = np.random.default_rng(2)
    spectra = unit_spectra(rng.integers(0, 256, (40, 3, 32, 32)).astype(np.uint8))
    pairs = np.unique(np.sort(rng.integers(0, 40, (300, 2)), axis=1), axis=0)
    one_go = spectrum_similarity(spectra[pairs[:, 0]], spectra[pairs[:, 1]])
    assert np.array_equal(pair_similarities(spectra, pairs, chunk=17), one_go)
    assert pair_similarities(spectra, pairs[:0]).shape == (0,)


def test_each_file_keeps_its_mutual_best_partner_only():
    # 0 and 1 are each other's best; 2's best is 0, but 0's best is 1; 3 and 4 are each other's only partner
    pairs = np.array([[0, 1], [0, 2], [1, 2], [3, 4]])
    sims = np.array([0.99, 0.98, 0.95, 0.96], np.float32)
    assert mutual_best(pairs, sims).tolist() == [True, False, False, True]
    assert mutual_best(np.zeros((0, 2), int), np.zeros(0, np.float32)).tolist() == []


def test_cleanvisions_checks_flag_a_black_and_a_tiny_image_only(tmp_path):
    from headstart.data.looks import check_scores, check_threshold

    paths = []
    for i in range(30):
        paths.append(tmp_path / f"p{i}.png")
        _picture(i).convert("RGB").save(paths[-1])
    Image.new("RGB", (48, 48), (3, 3, 3)).save(tmp_path / "black.png")
    Image.new("RGB", (48, 6), (120, 30, 200)).save(tmp_path / "strip.png")
    from headstart.data.looks import look_all

    looks, failed = look_all([str(p) for p in paths] + [str(tmp_path / "black.png"), str(tmp_path / "strip.png")])
    assert not failed
    scores = check_scores(looks)
    flagged = {c: set(np.flatnonzero(s < check_threshold(c, s))) for c, s in scores.items()}
    assert 30 in flagged["dark"] and not flagged["dark"] - {30}
    assert flagged["odd-aspect-ratio"] == {31}


# --------------------------------------------------------------------------- labels and strays on features


def _clusters(n_per_class=60, k=4, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(k, d))
    y = np.repeat(np.arange(k), n_per_class)
    X = centres[y] + rng.normal(size=(len(y), d))
    return X.astype(np.float32), y, rng


def test_the_principal_components_are_scikit_learns():
    from sklearn.decomposition import PCA

    from headstart.inspection.labels import reduced

    rng = np.random.default_rng(2)
    X = (rng.normal(size=(500, 40)) @ rng.normal(size=(40, 300)) + rng.normal(size=(500, 300))).astype(np.float32)
    Z = reduced(X, dims=20)
    ref = PCA(20, svd_solver="full").fit_transform(X)
    assert Z.shape == (500, 20) and np.allclose(np.abs(Z), np.abs(ref), atol=2e-2 * np.abs(ref).max())


def test_out_of_fold_probabilities_find_moved_labels_and_suggest_the_class():
    from headstart.inspection.labels import label_issues

    X, y, rng = _clusters()
    moved = rng.choice(len(y), 12, replace=False)
    true = y.copy()
    y = y.copy()
    y[moved] = (y[moved] + rng.integers(1, 4, len(moved))) % 4
    found = label_issues(X, y, ["a", "b", "c", "d"], folds=5)
    hit = set(found["flagged"].tolist()) & set(moved.tolist())
    assert len(hit) >= 11 and len(found["flagged"]) <= 14
    sug = dict(zip(found["flagged"].tolist(), found["suggested"].tolist()))
    assert all(sug[i] == true[i] for i in hit)
    assert not np.isnan(found["proba"]).any()


def test_a_class_too_small_for_the_folds_is_left_out_with_a_note():
    from headstart.inspection.labels import label_issues

    X, y, _ = _clusters()
    X, y = np.concatenate([X, X[:3] + 50]), np.concatenate([y, [4, 4, 4]])
    found = label_issues(X, y, ["a", "b", "c", "d", "tiny"], folds=5)
    assert any("tiny" in n and "fewer images than the 5 folds" in n for n in found["notes"])
    assert np.isnan(found["proba"][-3:]).all() and not np.isin(found["flagged"], [len(y) - 3, len(y) - 2, len(y) - 1]).any()
    two = label_issues(X[y >= 3], y[y >= 3], ["a", "b", "c", "d", "tiny"], folds=5)
    assert any("skipped" in n for n in two["notes"]) and len(two["flagged"]) == 0


def test_strays_that_resemble_each_other_top_their_classes_list():
    from headstart.inspection.strays import stray_scores

    X, y, rng = _clusters(n_per_class=100)
    odd = rng.normal(0, 1, size=(1, X.shape[1])) * 6
    strays = (odd + 0.3 * rng.normal(size=(8, X.shape[1]))).astype(np.float32)  # alike, like no class
    X = np.concatenate([X, strays])
    y = np.concatenate([y, np.arange(8) % 4])
    found = stray_scores(X, y)
    top = np.argsort(-found["distance"])[:8]
    assert set(top.tolist()) == set(range(400, 408))
    assert set(range(400, 408)) <= set(found["listed"].tolist()) and len(found["listed"]) <= 20


# --------------------------------------------------------------------------- the command


def _plant(root: Path) -> dict:
    """A small folder (3 classes, train and test) with a copy of a test image in train and an unreadable file."""
    data = write_image_folder(root / "train", n_per_class=12, classes=("ant", "bee", "cow"), size=(24, 24))
    write_image_folder(root / "test", n_per_class=4, classes=("ant", "bee", "cow"), size=(24, 24), seed=1)
    src = root / "test" / "bee" / "bee_001.png"
    Image.open(src).resize((36, 36), Image.BILINEAR).save(root / "train" / "bee" / "copy.png")
    (root / "train" / "cow" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return {"copy": ("test/bee/bee_001.png", "train/bee/copy.png"), "broken": "train/cow/broken.png"}


def test_inspect_writes_its_three_files_reports_the_unreadable_and_never_touches_data(tmp_path):
    from headstart.inspection import inspect

    data = tmp_path / "data"
    planted = _plant(data)
    before = tree_digest(data)
    found = inspect(data, out=tmp_path / "out", cache_dir=tmp_path / "cache", folds=3, **SMALL)
    assert tree_digest(data) == before
    with open(found.out / "issues.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert {"path": planted["broken"], "kind": "unreadable"}.items() <= next(
        r for r in rows if r["kind"] == "unreadable").items()
    assert all(not os.path.isabs(r["path"]) and (data / r["path"]).exists() for r in rows)
    pairs = {(r["path"], r["partner"]) for r in rows if r["kind"] == "leak"}
    assert planted["copy"] in pairs  # the test image first, its train copy as partner
    summary = json.loads((found.out / "summary.json").read_text())
    assert summary["counts"] == {k: sum(r["kind"] == k for r in rows) for k in summary["counts"]}
    assert summary["unreadable"][planted["broken"]]
    assert summary["class_balance"]["images_per_class"] == {"ant": 16, "bee": 17, "cow": 17}  # files found
    page = (found.out / "inspect.html").read_text()
    assert "default-src 'none'" in page and "<script" not in page
    assert not re.search(r'src="(?!data:)', page) and not re.search(r"https?://", page)


def test_a_fold_head_on_principal_components_is_one_linear_layer_on_the_pooled_features():
    """The label check's head, moved onto the pooled features, gives the same logits: so its map is exact CAM."""
    from headstart.inspection.labels import principal_axes, project
    from headstart.inspection.overlays import feature_head
    from headstart.learn.heads import LinearHead

    X, y, _ = _clusters(n_per_class=40, k=3, d=30)
    axes = principal_axes(X, dims=8)
    Z = project(X, axes)
    head = LinearHead(random_state=0).fit(Z[y != 1], y[y != 1])  # a fold that lacks class 1
    linear = head.to_torch()[0]
    moved = feature_head(linear.weight.detach().numpy(), linear.bias.detach().numpy(), np.array([0, 2]), axes, 3)
    import torch

    with torch.no_grad():
        logits = moved(torch.as_tensor(X)).double().numpy()
    np.testing.assert_allclose(logits[:, [0, 2]], head.logits(Z), rtol=1e-4, atol=1e-3)
    assert (logits[:, 1] < -1e8).all()  # no weight, no chance


def _png(b64: str) -> Image.Image:
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


def test_a_likely_wrong_label_shows_the_maps_of_its_given_and_its_suggested_label(tmp_path):
    from headstart.data.images import load_image
    from headstart.inspection import inspect

    data = write_image_folder(tmp_path / "data" / "train", n_per_class=12, classes=("ant", "bee", "cow"),
                              size=(24, 24))
    shutil.move(data / "ant" / "ant_003.png", data / "bee" / "moved.png")  # an ant labelled bee
    found = inspect(tmp_path / "data", out=tmp_path / "out", cache_dir="none", folds=3, test_fraction=0, **SMALL)
    labels = [r for r in found.issues if r["kind"] == "label"]
    assert {"path": "train/bee/moved.png", "given_label": "bee", "suggested_label": "ant"}.items() <= next(
        r for r in labels if r["path"].endswith("moved.png")).items()
    page = (found.out / "inspect.html").read_text()
    assert found.summary["labels"]["heatmaps"] == {"drawn": len(labels), "of": len(labels),
                                                   "method": "cam of the fold head that held each file out"}
    section = page[page.index('<h2 id="label">'):page.index("</div>", page.index('<div class="grid">',
                                                                                page.index('<h2 id="label">')))]
    figures = re.findall(r"<figure[^>]*>(.*?)</figure>", page[page.index('<h2 id="label">'):], re.S)[:len(labels)]
    assert "where the head that judged it looked" in section
    for fig, r in zip(figures, sorted(labels, key=lambda r: -r["score"])):
        name = os.path.basename(r["path"])
        images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', fig)
        assert [alt for alt, _ in images] == [name, f"{name}: map of {r['given_label']}",
                                              f"{name}: map of {r['suggested_label']}"]
        assert "map: given" in fig and "map: suggested" in fig
        plain, given, suggested = (_png(b64) for _, b64 in images)
        small = load_image(str(tmp_path / "data" / r["path"]), min_side=96)
        small.thumbnail((96, 96))
        assert plain.size == given.size == suggested.size == small.size
        assert not np.array_equal(np.asarray(given), np.asarray(suggested))  # two labels, two maps
        assert not np.array_equal(np.asarray(given), np.asarray(plain.convert("RGB")))


def test_inspect_refuses_an_empty_folder_and_an_output_inside_the_data(tmp_path):
    from headstart.inspection import inspect

    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        inspect(tmp_path / "empty", out=tmp_path / "out", cache_dir="none", **SMALL)
    data = write_image_folder(tmp_path / "data")
    with pytest.raises(HeadstartError, match="inside the data folder"):
        inspect(data, out=data / "inspection", cache_dir="none", **SMALL)


def test_the_cli_runs_inspect_and_says_how_to_act(tmp_path, capsys):
    from headstart.cli import main

    data = write_image_folder(tmp_path / "data", n_per_class=10)
    assert main(["inspect", str(data), "--out", str(tmp_path / "out"), "--cache-dir", "none", "--folds", "2",
                 "--backbone", "small_cnn", "--weights", "none", "--image-size", "32", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "--exclude" in out and (tmp_path / "out" / "issues.csv").is_file()


# --------------------------------------------------------------------------- acting on it: train --exclude


def test_train_exclude_leaves_the_files_out_and_records_why(tmp_path):
    import headstart

    data = write_image_folder(tmp_path / "data", n_per_class=10, classes=("ant", "bee"), size=(16, 16))
    issues = tmp_path / "issues.csv"
    issues.write_text("path,split,kind,score,given_label,suggested_label,partner\n"
                      "ant/ant_000.png,train,label,0.9,ant,bee,\nbee/bee_001.png,train,stray,0.8,bee,,\n"
                      "gone/x.png,train,label,0.5,ant,bee,\n")
    before = tree_digest(data)
    run = headstart.train(data, out=tmp_path / "run", strategy="feature-extraction", cache_dir="none", test_fraction=0.2,
                          exclude=str(issues), exclude_kinds="label", **SMALL)
    assert tree_digest(data) == before
    excluded = run.config["data_summary"]["excluded"]
    assert excluded["n_files"] == 1 and excluded["files"][0]["path"] == "ant/ant_000.png"
    assert excluded["by_kind"] == {"label": 1} and excluded["not_in_data"] == 1 and excluded["kinds"] == ["label"]
    assert run.config["exclude_kinds"] == "label"
    splits = (tmp_path / "run" / "splits.csv").read_text()
    assert "ant_000.png" not in splits and "bee_001.png" in splits
    assert "Left out (--exclude)" in (tmp_path / "run" / "report.md").read_text()
    assert "Left out (--exclude)" in (tmp_path / "run" / "report.html").read_text()


def test_exclude_kinds_without_exclude_is_refused(tmp_path):
    import headstart

    with pytest.raises(HeadstartError, match="--exclude-kinds"):
        headstart.train(write_image_folder(tmp_path / "data"), exclude_kinds="label", cache_dir="none", **SMALL)


# --------------------------------------------------------------------------- train's data check


def test_the_data_check_warns_of_a_leak_with_the_command_and_can_be_switched_off(tmp_path, caplog):
    import headstart

    data = tmp_path / "data"
    write_image_folder(data / "train", n_per_class=10, classes=("ant", "bee"), size=(24, 24))
    write_image_folder(data / "test", n_per_class=3, classes=("ant", "bee"), size=(24, 24), seed=1)
    shutil.copy(data / "train" / "ant" / "ant_002.png", data / "test" / "ant" / "again.png")
    Image.open(data / "train" / "bee" / "bee_004.png").save(data / "test" / "bee" / "again.jpg", quality=95)
    with caplog.at_level("WARNING", logger="headstart"):
        run = headstart.train(data, out=tmp_path / "run", strategy="feature-extraction", cache_dir="none", **SMALL)
    check = run.metrics["data_check"]
    assert check["leaks"] >= 2 and {os.path.basename(e["image"]) for e in check["leak_examples"]} >= {"again.png",
                                                                                                     "again.jpg"}
    assert "headstart inspect" in caplog.text and "near copy in train" in caplog.text
    assert "Warning: data issues" in (tmp_path / "run" / "report.md").read_text()
    off = headstart.train(data, out=tmp_path / "run2", strategy="feature-extraction", cache_dir="none",
                          data_check=False, **SMALL)
    assert off.metrics["data_check"] is None


# --------------------------------------------------------------------------- real features (slow)


@pytest.mark.slow
def test_inspect_finds_moved_labels_a_leak_and_a_stray_in_fashion_mnist(fmnist_small, tmp_path):
    """30 train + 20 test images per class, MobileNetV2 features: 6 labels moved, a test image re-saved into
    train as a JPEG, and 4 digits-like strays."""
    from headstart.inspection import inspect

    data = tmp_path / "fm"
    shutil.copytree(fmnist_small, data)
    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in (data / "train").iterdir())
    train = sorted((data / "train").rglob("*.png"))
    moved = []
    for p in rng.choice(train, 6, replace=False):
        other = classes[(classes.index(p.parent.name) + 1 + int(rng.integers(0, 9))) % len(classes)]
        dest = data / "train" / other / p.name
        p.rename(dest)
        moved.append(dest.relative_to(data).as_posix())
    test_image = sorted((data / "test" / "Trouser").glob("*.png"))[0]
    Image.open(test_image).save(data / "train" / "Trouser" / "copy.jpg", quality=80)
    for i in range(4):  # a square ring: no garment
        a = np.zeros((28, 28), np.uint8)
        a[6 + i:22 - i, 6 + i:22 - i] = 255
        a[9 + i:19 - i, 9 + i:19 - i] = 0
        Image.fromarray(a).save(data / "train" / classes[i] / f"ring{i}.png")
    found = inspect(data, out=tmp_path / "out", cache_dir=tmp_path / "cache")
    rows = found.issues
    flagged = {r["path"] for r in rows if r["kind"] == "label"}
    assert len(flagged & set(moved)) >= 5, (flagged, moved)
    assert (test_image.relative_to(data).as_posix(), "train/Trouser/copy.jpg") in {
        (r["path"], r["partner"]) for r in rows if r["kind"] == "leak"}
    strays = [r["path"] for r in sorted((r for r in rows if r["kind"] == "stray"), key=lambda r: -r["score"])]
    assert sum(p.endswith(tuple(f"ring{i}.png" for i in range(4))) for p in strays[:12]) >= 3, strays[:12]
