"""Reliability (issue 6), a messy folder: unusable files are skipped and reported, nothing in the
folder is touched, and `--strict` stops before training.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart.strategies.fitting
import headstart
from headstart.data.images import load_image

from conftest import MEASURED, tree_digest, write_image_folder
from reliability_helpers import BOMBS, TINY, _png, _rgb
from test_cli import run_cli


def _truncated(fmt: str) -> bytes:
    arr = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def add_junk(class_dir: Path, tag: str) -> dict[Path, str]:
    """Unusable files of every kind in `class_dir`, and hidden ones: {listed path: expected reason words}."""
    junk: dict[Path, str] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (class_dir / name).write_bytes(data)
        junk[class_dir / name] = reason

    put(f"{tag} empty.jpg", b"", "empty file")
    put(f"{tag}-truncated.jpg", _truncated("JPEG"), "truncated")
    put(f"{tag}-truncated.png", _truncated("PNG"), "truncated")
    put(f"{tag} page.jpg", b"<html><body>Sign in to download</body></html>", "not an image")
    put(f"{tag} notes.txt", b"labelled by Bob", "not an image file extension")
    put(f"{tag} bomb.png", BOMBS["png_10_gigapixel.png"], "too many pixels")
    os.symlink(f"{tag} gone.png", class_dir / f"{tag} dangling.png")
    junk[class_dir / f"{tag} dangling.png"] = "cannot read file"
    os.symlink(f"{tag} loop.png", class_dir / f"{tag} loop.png")
    junk[class_dir / f"{tag} loop.png"] = "cannot read file"
    os.mkfifo(class_dir / f"{tag} pipe.png")
    junk[class_dir / f"{tag} pipe.png"] = "not a regular file"
    os.symlink("..", class_dir / f"{tag} up")
    junk[class_dir / f"{tag} up"] = "not followed"
    # Hidden: not data, so neither used nor listed.
    (class_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0\0")
    (class_dir / "._resource_fork.png").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    _png(class_dir / ".ipynb_checkpoints" / "a-checkpoint.png")
    return junk


def reencode_same_pixels(path: Path, kind: str) -> None:
    """Rewrite a grayscale image in an odd encoding that decodes to exactly the same RGB pixels.

    The name stays, so the hash split and the file order stay: only the bytes on disk change.
    """
    arr = np.asarray(Image.open(path).convert("L"))
    im = Image.fromarray(arr, "L")
    buf = io.BytesIO()
    if kind == "png16":
        Image.fromarray(arr.astype(np.uint16) * 257).save(buf, "PNG")  # 16-bit, scaled back to arr exactly
    elif kind == "palette":
        p = Image.fromarray(arr, "P")
        p.putpalette([v for i in range(256) for v in (i, i, i)])
        p.save(buf, "PNG")
    elif kind == "la":
        im.convert("LA").save(buf, "PNG")  # alpha 255 everywhere
    elif kind == "rgba":
        im.convert("RGBA").save(buf, "PNG")
    elif kind == "tiff-pages":
        im.save(buf, "TIFF", save_all=True, append_images=[Image.new("L", im.size, 255)])
    elif kind == "gif-animated":
        im.save(buf, "GIF", save_all=True, append_images=[Image.new("L", im.size, 0)], duration=40)
    elif kind == "webp":
        im.convert("RGB").save(buf, "WEBP", lossless=True)
    elif kind == "bmp":
        im.save(buf, "BMP")
    elif kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 3  # stored upside down, displayed the right way up
        Image.fromarray(np.ascontiguousarray(arr[::-1, ::-1]), "L").save(buf, "PNG", exif=exif)
    else:
        raise AssertionError(kind)
    original = _rgb(load_image(path))
    path.write_bytes(buf.getvalue())
    assert np.array_equal(_rgb(load_image(path)), original), kind  # the premise: same pixels


ODD_ENCODINGS = ["png16", "palette", "la", "rgba", "tiff-pages", "gif-animated", "webp", "bmp", "exif-rotated"]


@pytest.mark.slow
def test_messy_folder_trains_like_the_clean_one_names_every_bad_file_and_is_not_touched(
        fmnist_small, tmp_path, one_torch_thread):
    import shutil

    messy = tmp_path / "messy"
    shutil.copytree(fmnist_small, messy)
    junk: dict[Path, str] = {}
    for k, class_dir in enumerate(sorted((messy / "train").iterdir()) + sorted((messy / "test").iterdir())):
        for j, image in enumerate(sorted(class_dir.iterdir())[:3]):
            reencode_same_pixels(image, ODD_ENCODINGS[(3 * k + j) % len(ODD_ENCODINGS)])
        if k % 3 == 0:
            junk.update(add_junk(class_dir, f"k{k}"))
    (messy / "train" / "stray.png").write_bytes((messy / "train" / "Bag" / sorted(
        os.listdir(messy / "train" / "Bag"))[5]).read_bytes())
    junk[messy / "train" / "stray.png"] = "class level"
    _png(messy / "__MACOSX" / "train" / "Bag" / "._00001.png")
    (messy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    before = tree_digest(messy)

    args = ("--strategy", "feature-extraction", "--image-size", "32", "--workers", "0", "--cache-dir",
            tmp_path / "cache")
    code, _, stderr = run_cli("train", fmnist_small, *args, "--out", tmp_path / "clean")
    assert code == 0, stderr
    code, _, stderr = run_cli("train", messy, *args, "--out", tmp_path / "messy-run")
    assert code == 0, stderr
    assert "Traceback" not in stderr

    skipped = json.loads((tmp_path / "messy-run" / "skipped.json").read_text())
    assert sorted(s["path"] for s in skipped) == sorted(map(str, junk))  # every unusable file, nothing else
    log = (tmp_path / "messy-run" / "train.log").read_text()
    for s in skipped:
        assert junk[Path(s["path"])] in s["reason"], s
        assert f"skipping {s['path']}: {s['reason']}" in log

    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    dirty = json.loads((tmp_path / "messy-run" / "metrics.json").read_text())
    assert (dirty["n_train"], dirty["n_val"], dirty["n_test"]) == (clean["n_train"], clean["n_val"], clean["n_test"])
    assert clean["test"]["accuracy"] > 0.5
    MEASURED.append(f"messy folder (real Fashion-MNIST subset, {len(ODD_ENCODINGS)} odd encodings, {len(junk)} "
                    f"unusable files): test accuracy {dirty['test']['accuracy']:.4f}, clean "
                    f"{clean['test']['accuracy']:.4f} (MobileNetV2, 32 px)")
    # The same pixels in the same splits give the same model; only a last-bit difference in a feature
    # (a batch holding other images) could move a single borderline test image.
    assert abs(dirty["test"]["accuracy"] - clean["test"]["accuracy"]) <= 1 / clean["n_test"]

    # Evaluating and predicting on the messy folder skip the same files and write nothing there either.
    code, stdout, stderr = run_cli("evaluate", tmp_path / "messy-run", messy, "--json", "--cache-dir",
                                   tmp_path / "cache")
    assert code == 0, stderr
    evaluated = json.loads(stdout)
    assert evaluated["accuracy"] == dirty["test"]["accuracy"]
    assert sorted(s["path"] for s in evaluated["skipped"]) == sorted(
        str(p) for p in junk if p.parent.parent == messy / "test" and junk[p] != "not followed"
        and junk[p] != "not an image file extension")
    code, stdout, stderr = run_cli("predict", tmp_path / "messy-run", messy / "test" / "Bag", "--json")
    assert code == 0, stderr
    assert tree_digest(messy) == before  # not one byte, name, mode or mtime changed in the data folder


def test_strict_stops_before_training_and_lists_every_skipped_file(tmp_path, monkeypatch):
    import headstart.runs.train

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    junk = add_junk(data / "cat", "j")
    (data / "stray.txt").write_text("at the class level")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "lenient")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "lenient" / "skipped.json").read_text())
    assert len(skipped) == len(junk) + 1

    fits = []
    real = headstart.strategies.fitting.make_head
    monkeypatch.setattr(headstart.strategies.fitting, "make_head", lambda *a, **k: fits.append(1) or real(*a, **k))
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and "Traceback" not in stderr
    message = stderr[stderr.index("headstart: error: --strict"):]
    # Only images stop a --strict run: the notes and the stray text file are no images by their extension.
    others = [s for s in skipped if s["path"].endswith(".txt")]
    assert len(others) == 2
    images = [s for s in skipped if s not in others]
    assert f"{len(images)} unusable image files, nothing trained (2 other files, not images by extension" in message
    for s in images:
        assert f"  {s['path']}: {s['reason']}" in message
    for s in others:
        assert s["path"] not in message
    assert fits == [] and not (tmp_path / "strict").exists()


def test_strict_does_not_refuse_a_folder_for_its_readme(tmp_path):
    """Issue 29: --strict refused a folder because of a README.txt in a class folder. Which files are images is
    decided by extension first; the others are listed as skipped, with their reason, and never stop the run."""
    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    (data / "cat" / "README.txt").write_text("photos from the garden")
    (data / "dog" / "notes.csv").write_text("name,colour\n")
    (data / "LICENSE").write_text("CC-BY")  # at the class level, no extension
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "strict", "--strict", "--cache-dir", "none")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "strict" / "skipped.json").read_text())
    assert sorted(s["path"] for s in skipped) == sorted(str(p) for p in (
        data / "cat" / "README.txt", data / "dog" / "notes.csv", data / "LICENSE"))
    assert {s["reason"] for s in skipped} == {"not an image file extension", "file at the class level (not inside a "
                                                                              "class folder)"}
    # an image that cannot be read still stops it, named alone
    (data / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "strict2", "--strict", "--cache-dir", "none")
    assert code == 2 and "--strict: 1 unusable image file, nothing trained (3 other files" in stderr
    assert f"  {data / 'dog' / 'broken.jpg'}: " in stderr and not (tmp_path / "strict2").exists()
