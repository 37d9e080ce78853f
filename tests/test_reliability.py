"""Reliability (issue 6): the files and folders the wild produces, skip-and-report, nothing lost or
touched, interruptions at deterministic points, environment faults and untrusted model files.

Every odd file is built here, with PIL or raw bytes. Decoding cases that test_images.py already
covers (truncated files, alpha, 16-bit, 1-bit, EXIF, animated GIF, CMYK) are not repeated.
Interruptions use the HEADSTART_FAULT hook (headstart/faults.py), never a sleep and a kill.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart import fileio
from headstart import features as features_mod
from headstart.data import scan_folder, split_of
from headstart.errors import DataError
from headstart.images import MAX_PIXELS, ImageError, load_image

from conftest import MEASURED, count_network_batches, tree_digest, write_image_folder
from test_cli import run_cli

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
TINY = ("--strategy", "feature-extraction", "--backbone", "small_cnn", "--weights", "none", "--image-size", "32",
        "--workers", "0")


def _rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


# =========================================================================================== 1. odd image files


def test_html_file_named_jpg_is_refused(tmp_path):
    p = tmp_path / "page.jpg"
    p.write_text("<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body></body></html>\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(p)


def _ycck_jpeg(ink: tuple[int, int, int, int]) -> bytes:
    """A YCCK JPEG (Adobe APP14 transform=2) of one CMYK ink colour, which Pillow cannot write directly.

    libjpeg stores YCCK as the YCbCr of (C, M, Y) ink with K inverted, and Pillow writes the
    components of a CMYK image inverted (Adobe style). So a CMYK image holding 255 minus the
    wanted YCCK components, with its APP14 transform byte switched from 0 (CMYK) to 2 (YCCK),
    is a genuine YCCK file.
    """
    c, m, y, k = ink
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = 128 - 0.168736 * c - 0.331264 * m + 0.5 * y
    cr = 128 + 0.5 * c - 0.418688 * m - 0.081312 * y
    stored = [int(np.clip(round(v), 0, 255)) for v in (luma, cb, cr, 255 - k)]
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), tuple(255 - v for v in stored)).save(buf, "JPEG", quality=100)
    data = bytearray(buf.getvalue())
    app14 = data.index(b"\xff\xee")
    length = int.from_bytes(data[app14 + 2:app14 + 4], "big")
    assert data[app14 + 4:app14 + 9] == b"Adobe" and data[app14 + 2 + length - 1] == 0
    data[app14 + 2 + length - 1] = 2  # the transform flag: 0 = CMYK, 2 = YCCK
    return bytes(data)


def test_ycck_jpeg_loads_as_rgb(tmp_path):
    p = tmp_path / "ycck.jpg"
    p.write_bytes(_ycck_jpeg((0, 255, 255, 0)))  # red ink: no cyan, full magenta and yellow
    with Image.open(p) as raw:
        assert raw.mode == "CMYK" and raw.info["adobe_transform"] == 2  # really YCCK
    assert np.abs(_rgb(load_image(p)) - RED).max() <= 4


def test_multi_page_tiff_uses_the_first_page(tmp_path):
    p = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (5, 4), c) for c in (RED, BLUE, GREEN)]
    pages[0].save(p, save_all=True, append_images=pages[1:])
    with Image.open(p) as raw:
        assert raw.n_frames == 3
    assert (_rgb(load_image(p)) == RED).all()


def test_webp_lossless_with_alpha_and_lossy(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, :3, 3] = 255  # left half opaque blue, right half fully transparent
    p = tmp_path / "a.webp"
    Image.fromarray(rgba, "RGBA").save(p, lossless=True)
    px = _rgb(load_image(p))
    assert (px[:, :3] == BLUE).all() and (px[:, 3:] == WHITE).all()
    q = tmp_path / "lossy.webp"
    Image.new("RGB", (16, 16), (200, 100, 50)).save(q, quality=90)
    assert np.abs(_rgb(load_image(q)) - (200, 100, 50)).max() <= 6


@pytest.mark.parametrize("mode", ["RGB", "1", "P"])
def test_bmp(tmp_path, mode):
    arr = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    p = tmp_path / f"{mode}.bmp"
    im.save(p)
    assert np.array_equal(_rgb(load_image(p)), np.asarray(im.convert("RGB")))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), RED).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


BOMBS = {
    "png_10_gigapixel.png": _png_header_only(100_000, 100_000),
    "png_just_over.png": _png_header_only(9_460, 9_460),  # 89,491,600: just above MAX_PIXELS
    "jpeg.jpg": _jpeg_claiming(65_500, 65_500),
    "gif.gif": _gif_claiming(65_535, 65_535),
    "bmp.bmp": _bmp_claiming(100_000, 50_000),
}


def test_enormous_dimensions_are_refused_from_the_header(tmp_path, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # AssertionError is not an ImageError
    assert 9_460 * 9_460 > MAX_PIXELS
    for name, data in BOMBS.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ImageError, match="too many pixels") as err:
            load_image(p)
        assert f"{MAX_PIXELS:,}" in str(err.value), name
    # headstart's own check stands when Pillow's limit was lifted (by the user or another library).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="too many pixels: 9460x9460 is over the limit of 89,478,485"):
        load_image(tmp_path / "png_just_over.png")


def test_enormous_dimensions_keep_memory_bounded(tmp_path):
    """In a fresh process capped at 1 GiB of address space, loading every bomb peaks far below it.

    images.py imports only numpy and Pillow, so it is loaded alone (not via the package, which
    imports torch).
    """
    for name, data in BOMBS.items():
        (tmp_path / name).write_bytes(data)
    script = f"""
import importlib.util, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
spec = importlib.util.spec_from_file_location("images", {str(Path(headstart.__file__).parent / "images.py")!r})
images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(images)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in {sorted(BOMBS)!r}:
    try:
        images.load_image({str(tmp_path)!r} + "/" + name)
        sys.exit(name + " loaded")
    except images.ImageError as exc:
        assert "too many pixels" in str(exc), (name, str(exc))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert int(done.stdout) < 20_000  # KiB of peak growth; one decoded 9460 px RGB image alone is 262 MiB


def test_readme_states_the_pixel_limit_and_background():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"{MAX_PIXELS:,} pixels" in readme
    assert "composited onto white" in readme


def test_corrupt_exif_loads_quietly(tmp_path):
    """Pillow warns about damaged EXIF without naming the file; the pixels are fine, so the image is used."""
    import warnings

    p = tmp_path / "bad_exif.jpg"
    Image.new("RGB", (8, 6), RED).save(p, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Image.open(p) as raw:
            raw.getexif()
        assert any("Corrupt EXIF" in str(w.message) for w in seen)  # what Pillow alone prints
        seen.clear()
        px = _rgb(load_image(p))
    assert seen == [] and px.shape == (6, 8, 3) and np.abs(px - RED).max() <= 3


class Hung(BaseException):
    """Raised by an alarm: not an Exception, so no `except Exception` in the code under test eats it."""


@contextmanager
def fails_if_blocked(seconds: int, what: str):
    """Fail the test, rather than hang it, when the block takes longer than `seconds` (an open that blocks)."""
    def hung(*args):
        raise Hung

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    except Hung:
        pytest.fail(f"{what} blocked for {seconds} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    p = tmp_path / "pipe.png"
    os.mkfifo(p)
    with fails_if_blocked(10, "load_image on a FIFO"), pytest.raises(ImageError, match="not a regular file"):
        load_image(p)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_named_like_images_are_refused(tmp_path, device):
    """A link named x.jpg to a device is followed to the device, which is not a regular file: reading
    /dev/zero or /dev/urandom would never end, /dev/null reads as an empty stream."""
    link = tmp_path / "x.jpg"
    os.symlink(device, link)
    for path in (link, Path(device)):
        with fails_if_blocked(10, f"load_image on {path}"), pytest.raises(ImageError, match="not a regular file"):
            load_image(path)
    # In a class folder, the device is listed as skipped with that reason, and the rest is used.
    data = write_image_folder(tmp_path / "data", n_per_class=3, size=(8, 8))
    os.symlink(device, data / "cat" / "device.png")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--test-fraction", "0",
                              "--val-fraction", "0")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped == [{"path": str(data / "cat" / "device.png"), "reason": "not a regular file"}]


def test_automatic_image_size_does_not_open_a_fifo(tmp_path):
    from headstart.training import auto_image_size

    root = write_image_folder(tmp_path / "data", n_per_class=3, size=(20, 20))
    os.mkfifo(root / "cat" / "a pipe.png")
    data = scan_folder(root)
    assert any(s.path.endswith("a pipe.png") for s in data.samples)
    with fails_if_blocked(10, "auto_image_size opening the FIFO"):
        size, reason = auto_image_size(data, 224)
    assert size == 96 and "median image side 20 px" in reason  # 20 px upsampled 4x, to a multiple of 32


def test_one_pixel_images_go_through_the_backbone_transform(tmp_path):
    for mode, value in (("RGB", (1, 2, 3)), ("L", 7), ("1", 1), ("RGBA", (9, 9, 9, 0))):
        p = tmp_path / f"dot_{mode}.png"
        Image.new(mode, (1, 1), value).save(p)
        x = headstart.get_backbone("mobilenet_v2").preprocessing.scaled(32).transform()(load_image(p))
        assert tuple(x.shape) == (3, 32, 32) and bool(x.isfinite().all())


# =========================================================================================== 1. odd names, links


def _png(path: Path, colour=(10, 20, 30), size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


ODD_NAMES = ["my cat.png", "-rf.png", "--help.png", "café ü 猫.png", "cafe\u0301.png", "tab\there.png",
             "new\nline.png", "ends with space .png", os.fsdecode(b"latin1-caf\xe9.png")]


def test_odd_file_names_are_scanned_with_stable_splits(tmp_path):
    root = tmp_path / "d"
    for i, name in enumerate(ODD_NAMES):
        _png(root / ("-dash class" if i % 2 else "Ünïcode class") / name)
    data = scan_folder(root)
    assert data.classes == sorted(["-dash class", "Ünïcode class"])
    assert sorted(Path(s.path).name for s in data.samples) == sorted(ODD_NAMES)
    for s in data.samples:
        assert s.split == split_of(s.rel, 0.1, 0.1)
        assert load_image(s.path).size == (4, 3)


@pytest.mark.slow
def test_odd_names_train_and_predict_end_to_end(tmp_path):
    root = tmp_path / "d"
    for c, colour in (("-dash class", RED), (os.fsdecode(b"caf\xe9 class"), BLUE)):
        for i, name in enumerate(ODD_NAMES):
            _png(root / c / f"{i}{name}", colour, size=(8, 8))
    before = tree_digest(root)
    code, _, stderr = run_cli("train", root, *TINY, "--out", tmp_path / "run", "--test-fraction", "0.3")
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Logging error" not in stderr
    run = tmp_path / "run"
    assert json.loads((run / "skipped.json").read_text()) == []
    rows = (run / "splits.csv").read_bytes()
    assert b"latin1-caf\xe9.png" in rows  # the name's own bytes, not a replacement character
    assert json.loads((run / "config.json").read_text())["classes"] == sorted(["-dash class",
                                                                              os.fsdecode(b"caf\xe9 class")])
    dash = root / "-dash class" / "1-rf.png"
    code, stdout, stderr = run_cli("predict", run, "--json", "--", dash)
    assert code == 0, stderr
    assert json.loads(stdout)["predictions"][0]["path"] == str(dash)
    assert tree_digest(root) == before


def test_links_are_followed_to_files_and_loops_are_reported(tmp_path):
    root = tmp_path / "d"
    _png(root / "cat" / "a.png", RED)
    _png(root / "dog" / "b.png", BLUE)
    outside = _png(tmp_path / "elsewhere" / "c.png", GREEN)
    os.symlink(outside, root / "cat" / "linked.png")  # a link to an image: used
    os.symlink("gone.png", root / "cat" / "dangling.png")
    os.symlink("self.png", root / "cat" / "self.png")  # a link to itself (ELOOP)
    os.symlink("..", root / "cat" / "up")  # a folder link back to the data root: a loop
    os.symlink("../dog", root / "cat" / "dogs")  # a folder link inside a class: not followed
    os.symlink(".", root / "loop")  # a class-level link to the data root itself
    os.symlink(tmp_path / "elsewhere", root / "bird")  # a class folder kept elsewhere: followed
    data = scan_folder(root, val_fraction=0, test_fraction=0)
    assert data.classes == ["bird", "cat", "dog"]
    rels = sorted(s.rel for s in data.samples)
    assert rels == ["bird/c.png", "cat/a.png", "cat/dangling.png", "cat/linked.png", "cat/self.png", "dog/b.png"]
    ignored = {Path(i["path"]).name: i["reason"] for i in data.ignored}
    assert set(ignored) == {"up", "dogs", "loop"}
    assert "not followed" in ignored["up"] and "not followed" in ignored["dogs"]
    assert "loop" in ignored["loop"]
    assert load_image(root / "cat" / "linked.png").size == (4, 3)


def test_unlistable_folder_is_reported_not_fatal(tmp_path, monkeypatch):
    root = tmp_path / "d"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "locked" / "b.png")
    _png(root / "dog" / "c.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads everything: permission bits prove nothing
    data = scan_folder(root)
    assert sorted(s.rel for s in data.samples) == ["cat/a.png", "dog/c.png"]
    [entry] = data.ignored
    assert entry["path"].endswith("locked") and "Permission denied" in entry["reason"]


# =========================================================================================== 2. folder shapes


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Batch sizes through any backbone engine (torch or converted): proves whether any feature work was done."""
    return count_network_batches(monkeypatch)


def _case(tmp_path: Path, name: str) -> tuple[list, str]:
    """A user mistake: the command's arguments and the words its error must contain."""
    data = tmp_path / "data"
    if name == "missing path":
        return ["train", tmp_path / "nowhere"], "does not exist"
    if name == "path is a file":
        return ["train", _png(tmp_path / "one.png")], "is a file, not a folder"
    if name == "empty folder":
        data.mkdir()
        return ["train", data], "no images found"
    if name == "no image files":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "notes.txt").write_text("x")
        return ["train", data], "no images found"
    if name == "single class":
        _png(data / "cat" / "a.png")
        return ["train", data], "single class"
    if name == "labels csv missing":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--labels", tmp_path / "labels.csv"], "does not exist"
    if name == "labels csv with no usable row":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        (data / "labels.csv").write_text("path,label\ngone.png,cat\nok.png,\n")
        return ["train", data, "--labels", data / "labels.csv"], "no usable image"
    if name == "fractions":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--val-fraction", "0.7", "--test-fraction", "0.5"], "fraction"
    if name == "out inside the data":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--out", data / "run"], "inside the data folder"
    if name == "cache inside the data":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        return ["train", data, "--cache-dir", data / "cache"], "inside the data folder"
    if name == "no data argument":
        return ["train"], "needs a DATA folder"
    if name == "corrupt weights file":
        write_image_folder(data, n_per_class=2, size=(4, 4))
        (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not really a zip")
        return ["train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "w.pth"], "w.pth"
    if name == "weights of another model":
        import torch

        write_image_folder(data, n_per_class=2, size=(4, 4))
        torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
        return ["train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "linear.pth"], "does not fit"
    raise AssertionError(name)


USER_MISTAKES = ["missing path", "path is a file", "empty folder", "no image files", "single class",
                 "labels csv missing", "labels csv with no usable row", "fractions", "out inside the data",
                 "cache inside the data", "no data argument", "corrupt weights file", "weights of another model"]


@pytest.mark.parametrize("name", USER_MISTAKES)
def test_user_mistakes_stop_before_any_work_with_exit_2(tmp_path, name, forward_calls, monkeypatch):
    args, words = _case(tmp_path, name)
    data = tmp_path / "data"
    before = tree_digest(data) if data.exists() else None
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where the default --out, runs/<timestamp>, would go
    code, stdout, stderr = run_cli(*args, "--image-size", "32", "--workers", "0")
    assert code == 2, stderr
    assert "headstart: error: " in stderr and words in stderr[stderr.index("headstart: error: "):]
    assert "Traceback" not in stderr and stdout == ""
    assert forward_calls == []  # no image went through a network
    assert os.listdir(tmp_path / "cwd") == []  # no run folder, partial or not, not even runs/
    if before is not None:
        assert tree_digest(data) == before


def test_a_class_without_usable_images_warns_and_goes_on(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b"), size=(8, 8))
    (data / "c").mkdir()
    for i in range(4):
        (data / "c" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    (data / "d").mkdir()
    (data / "d" / "readme.txt").write_text("images coming soon")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--val-fraction", "0",
                              "--test-fraction", "0")
    assert code == 0, stderr
    assert "classes ['c'] have no readable training image left" in stderr
    assert "class folders ['d'] hold no image files" in stderr
    skipped = {Path(s["path"]).name: s["reason"] for s in json.loads((tmp_path / "run" / "skipped.json").read_text())}
    assert set(skipped) == {"broken0.png", "broken1.png", "broken2.png", "broken3.png", "readme.txt"}
    assert headstart.load(tmp_path / "run").classes == ["a", "b"]


@pytest.mark.slow
def test_train_and_test_folders_with_different_classes(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", n_per_class=6, classes=("a", "b", "c"), size=(8, 8))
    write_image_folder(data / "test", n_per_class=3, classes=("a", "b", "d"), size=(8, 8))
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert "classes ['d'] have no training images" in stderr
    assert "3 test images belong to classes with no training images" in stderr
    run = headstart.load(tmp_path / "run")
    assert run.classes == ["a", "b", "c"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["n_images"] == 6  # a and b; d is left out of the scores


def test_labels_csv_rows_with_unknown_paths_or_empty_labels_are_skipped_and_reported(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b"), size=(8, 8))
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in "ab" for i in range(6) if (c, i) not in (("b", 0), ("b", 1))]
    rows += ["a/ghost.png,a", "b/b_000.png,", "b/b_001.png,   "]
    (data / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, stderr = run_cli("train", "--labels", data / "labels.csv", *TINY, "--out", tmp_path / "run",
                              "--test-fraction", "0")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped == [{"path": str(data / "a" / "ghost.png"), "reason": "labels.csv line 12: file not found"},
                       {"path": str(data / "b" / "b_000.png"), "reason": "labels.csv line 13: empty label"},
                       {"path": str(data / "b" / "b_001.png"), "reason": "labels.csv line 14: empty label"}]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "ghost.png: labels.csv line 12: file not found" in log
    # The rows with empty labels were not trained on at all.
    splits = (tmp_path / "run" / "splits.csv").read_text()
    assert "ghost.png" not in splits and f"{data}/b/b_000.png" not in splits and f"{data}/b/b_001.png" not in splits


def test_labels_csv_oddities(tmp_path):
    from headstart.data import read_labels_csv

    for i in range(3):
        _png(tmp_path / f"{i}.png")
    long_name, nul = "x" * 300 + ".png", "2.p\x00ng"
    (tmp_path / "l.csv").write_text(f"0.png,a\n1.png,b\n0.png,b\n./x/../0.png,b\n~no_such_user_xyz/2.png,a\n"
                                    f"{long_name},a\n{nul},a\n")
    data, bad = read_labels_csv(tmp_path / "l.csv")
    assert sorted(s.rel for s in data.samples) == ["0.png", "1.png"]
    assert [b["reason"].split(": ", 1)[1] for b in bad] == [
        "listed again (first on line 1); only the first row is used"] * 2 + ["file not found"] * 3
    assert data.classes[[s for s in data.samples if s.rel == "0.png"][0].label] == "a"  # the first row wins
    (tmp_path / "l.csv").write_bytes(b"0.png,caf\xe9\n")  # Latin-1, as a spreadsheet may save it
    with pytest.raises(DataError, match="cannot be read as CSV.*UTF-8"):
        read_labels_csv(tmp_path / "l.csv")


def test_exit_codes_are_documented():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in table


@pytest.mark.slow
def test_a_bug_is_exit_1_with_its_traceback(tmp_path):
    """An unexpected exception is not dressed up as a user error: `python -m headstart.cli` (the console
    script runs the same main) lets it propagate, so Python prints the traceback and exits 1."""
    data = write_image_folder(tmp_path / "d", n_per_class=1)
    script = ("import runpy, sys, headstart.training\n"
              "def bug(*args, **kwargs):\n"
              "    raise ZeroDivisionError('a deliberate bug')\n"
              "headstart.training.train = bug\n"
              f"sys.argv = ['headstart', 'train', {str(data)!r}, '--out', {str(tmp_path / 'run')!r}]\n"
              "runpy.run_module('headstart.cli', run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: a deliberate bug"
    assert 'headstart/cli.py", line' in done.stderr and "in main" in done.stderr  # raised through the CLI
    assert "headstart: error" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "run").exists()


# =========================================================================================== 3-4. a messy folder


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
    import headstart.training

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    junk = add_junk(data / "cat", "j")
    (data / "stray.txt").write_text("at the class level")
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "lenient")
    assert code == 0, stderr
    skipped = json.loads((tmp_path / "lenient" / "skipped.json").read_text())
    assert len(skipped) == len(junk) + 1

    fits = []
    real = headstart.training.make_head
    monkeypatch.setattr(headstart.training, "make_head", lambda *a, **k: fits.append(1) or real(*a, **k))
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and "Traceback" not in stderr
    message = stderr[stderr.index("headstart: error: --strict"):]
    assert f"{len(skipped)} unusable files, nothing trained" in message
    for s in skipped:
        assert f"  {s['path']}: {s['reason']}" in message
    assert fits == [] and not (tmp_path / "strict").exists()


# =========================================================================================== 5. interruptions


class CliChild:
    """`headstart ARGS` in a child process forked from this one, so torch is not imported again (about
    7 s a process here). It is a real process with its own pid, so real signals kill or interrupt it.
    One torch thread, as in this process, so both run the same kernels: features compare bitwise.
    """

    def __init__(self, tmp_path: Path, *args, fault: str | None = None, new_session: bool = False):
        import tempfile

        self.out = Path(tempfile.mkstemp(dir=tmp_path, prefix=".stdout-")[1])
        self.err = Path(tempfile.mkstemp(dir=tmp_path, prefix=".stderr-")[1])
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                import signal

                # A fresh interpreter's Ctrl-C behaviour, whatever handler an earlier test left in pytest.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if new_session:
                    os.setsid()  # its own process group, as a shell gives a foreground command
                os.dup2(os.open(self.out, os.O_WRONLY), 1)
                os.dup2(os.open(self.err, os.O_WRONLY), 2)  # decoding workers write here too
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                os.environ.pop("HEADSTART_FAULT", None)
                if fault:
                    os.environ["HEADSTART_FAULT"] = fault
                from headstart import cli, faults

                faults._counts.clear()
                import torch

                torch.set_num_threads(1)
                code = cli.main([str(a) for a in args])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        import time

        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"headstart child did not finish in {timeout}s: {self.err.read_text()}")
            time.sleep(0.05)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out, err = self.out.read_text(errors="replace"), self.err.read_text(errors="replace")
        self.out.unlink()
        self.err.unlink()
        return code, out, err


def cache_contents(cache_root: Path) -> dict[str, np.ndarray]:
    """Every (image key -> feature vector) in every shard under a cache folder."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for shard in sorted(cache_root.rglob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            keys, block = json.loads(f.metadata()["keys"]), f.get_tensor("features")
        for k, row in zip(keys, block):
            assert k not in out or np.array_equal(out[k], row), "one image, two different features"
            out[k] = row
    return out


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """900 tiny images: more than 3 cache chunks of 256."""
    assert features_mod.CHUNK == 256
    return write_image_folder(tmp_path_factory.mktemp("many") / "data", n_per_class=450, size=(8, 8))


@pytest.fixture(scope="module")
def reference_run(many_images, tmp_path_factory, one_torch_thread):
    """One uninterrupted run in this process: its cache and metrics are what interrupted runs must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    code, _, stderr = run_cli("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", base / "cache",
                              "--out", base / "run")
    assert code == 0, stderr
    return cache_contents(base / "cache"), json.loads((base / "run" / "metrics.json").read_text())


@pytest.mark.slow
def test_extraction_killed_after_the_third_chunk_resumes_to_identical_features(many_images, reference_run,
                                                                               tmp_path, one_torch_thread):
    features, metrics = reference_run
    assert len(features) == 900
    args = ("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "run")
    code, _, stderr = CliChild(tmp_path, *args, fault="chunk:3").finish()
    assert code == -signal.SIGKILL, stderr
    assert not (tmp_path / "run").exists()  # only a .partial-<pid> folder, which does not look finished
    assert [p.name.split(".partial-")[0] for p in tmp_path.glob("run.partial-*")] == ["run"]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert len(cache_contents(tmp_path / "cache")) == 3 * 256

    code, _, stderr = run_cli(*args)  # started again, as a user would, with nothing else changed
    assert code == 0, stderr
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["extraction"]["from_cache"] == 768 and again["extraction"]["computed"] == 132
    assert again["extraction"]["network_images"] == 132  # only the unfinished images went through the network
    resumed = cache_contents(tmp_path / "cache")
    assert resumed.keys() == features.keys()
    assert all(np.array_equal(resumed[k], features[k]) for k in features)  # bitwise
    assert again["val_accuracy"] == metrics["val_accuracy"]


@pytest.mark.slow
def test_two_processes_sharing_one_cache_at_once(many_images, reference_run, tmp_path):
    features, metrics = reference_run
    procs = [CliChild(tmp_path, "train", many_images, *TINY, "--test-fraction", "0", "--cache-dir",
                      tmp_path / "cache", "--out", tmp_path / f"run{i}") for i in range(2)]
    results = [p.finish() for p in procs]
    for code, _, stderr in results:
        assert code == 0, stderr
        assert "ignoring unreadable cache shard" not in stderr
    shared = cache_contents(tmp_path / "cache")  # also checks no key has two different vectors
    assert shared.keys() == features.keys()
    assert all(np.array_equal(shared[k], features[k]) for k in features)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    for i in range(2):
        assert json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["val_accuracy"] == \
            metrics["val_accuracy"]
    code, _, stderr = run_cli("train", many_images, *TINY, "--test-fraction", "0", "--cache-dir", tmp_path / "cache",
                              "--out", tmp_path / "after")  # a third run reads the shared cache whole
    assert code == 0, stderr
    assert json.loads((tmp_path / "after" / "metrics.json").read_text())["extraction"]["network_images"] == 0


def test_ctrl_c_stops_cleanly_with_a_message(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=150, size=(8, 8))
    # SIGINT to the whole process group after the first chunk, as a terminal does: the decoding worker
    # (--workers 1) gets it too.
    proc = CliChild(tmp_path, "train", data, "--strategy", "feature-extraction", "--backbone", "small_cnn",
                    "--weights", "none", "--workers", "1", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run",
                    fault="sigint-chunk:1", new_session=True)
    code, _, stderr = proc.finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "headstart: interrupted; nothing partial was kept."
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run.partial-*"))
    assert len(cache_contents(tmp_path / "cache")) == 256  # the finished chunk stays for the next run


@pytest.mark.slow
def test_fine_tuning_killed_mid_epoch_resumes_to_the_same_final_metrics(tmp_path, one_torch_thread):
    data = write_image_folder(tmp_path / "data", n_per_class=70, classes=("a", "b"), size=(12, 12))
    args = ("train", data, "--strategy", "scratch", "--epochs", "3", "--patience", "5", "--workers", "0",
            "--cache-dir", "none", "--json")
    code, whole, stderr = run_cli(*args, "--out", tmp_path / "whole")
    assert code == 0, stderr
    steps = json.loads(whole)["fine_tune"]["history"]
    # 2 steps an epoch (batch 64): the 3rd step is the first of epoch 2, the kill lands mid-epoch.
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["n_train"] in range(65, 129)
    code, _, stderr = CliChild(tmp_path, *args, "--out", tmp_path / "cut", fault="step:3").finish()
    assert code == -signal.SIGKILL, stderr
    assert "epoch 1/3" in stderr and "epoch 2/3" not in stderr
    assert not (tmp_path / "cut").exists()
    import torch

    assert torch.load(tmp_path / "cut.checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    code, resumed, stderr = run_cli("train", "--resume", tmp_path / "cut", "--json")
    assert code == 0, stderr
    assert "resumed fine-tuning after epoch 1" in stderr
    a, b = json.loads(whole), json.loads(resumed)
    assert b["fine_tune"]["history"] == steps | {"seconds": b["fine_tune"]["history"]["seconds"]}
    assert b["test"] == a["test"] and b["val_accuracy"] == a["val_accuracy"]
    assert not (tmp_path / "cut.checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_during_fine_tuning_keeps_the_checkpoints_and_resumes(tmp_path, one_torch_thread):
    """Ctrl-C mid-epoch (the terminal's SIGINT to the process group): exit 130 with one line, no run
    folder, and the checkpoint of the last finished epoch kept, from which --resume finishes the run."""
    data = write_image_folder(tmp_path / "data", n_per_class=70, classes=("a", "b"), size=(12, 12))
    args = ("train", data, "--strategy", "scratch", "--epochs", "3", "--patience", "5", "--workers", "0",
            "--cache-dir", "none", "--json")
    # 2 steps an epoch (batch 64): the 3rd step is the first of epoch 2.
    code, _, stderr = CliChild(tmp_path, *args, "--out", tmp_path / "cut", fault="sigint-step:3",
                               new_session=True).finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("headstart: interrupted")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "epoch 1/3" in stderr and "epoch 2/3" not in stderr
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob("cut.partial-*"))
    import torch

    assert torch.load(tmp_path / "cut.checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    code, resumed, stderr = run_cli("train", "--resume", tmp_path / "cut", "--json")
    assert code == 0, stderr
    assert "resumed fine-tuning after epoch 1" in stderr
    assert json.loads(resumed)["fine_tune"]["epochs_run"] == 3
    assert headstart.load(tmp_path / "cut").classes == ["a", "b"]
    assert not (tmp_path / "cut.checkpoints").exists()


# =========================================================================================== 6. environment faults


def _failing(real, target: str, exc: OSError):
    """Wrap an atomic_path so that writing `target` fails after its temporary file exists."""
    from contextlib import contextmanager

    @contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            if Path(path).name == target:
                raise exc
            yield tmp

    return atomic_path


FAULTS = {
    "ENOSPC writing metrics.json": ("metrics.json", OSError(errno.ENOSPC, "No space left on device")),
    "EACCES writing the bundle": ("model.safetensors", PermissionError(errno.EACCES, "Permission denied")),
    "ENOSPC writing a plot": ("confusion_matrix.png", OSError(errno.ENOSPC, "No space left on device")),
    "EROFS renaming the run into place": ("publish", OSError(errno.EROFS, "Read-only file system")),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_write_failure_gives_a_clear_message_and_keeps_the_earlier_run(tmp_path, monkeypatch, fault):
    import headstart.bundle
    import headstart.plots
    import headstart.training

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    out = tmp_path / "run"
    code, _, stderr = run_cli("train", data, *TINY, "--out", out, "--test-fraction", "0.3")
    assert code == 0, stderr
    earlier = tree_digest(out)
    target, exc = FAULTS[fault]
    if target == "publish":
        real_replace = os.replace

        def replace(src, dst):
            if ".partial-" in os.fspath(src) and Path(dst) == out:
                raise OSError(exc.errno, exc.strerror, os.fspath(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(headstart.training.os, "replace", replace)
    else:
        exc.filename = str(tmp_path / "somewhere" / target)
        for module in (fileio, headstart.bundle, headstart.plots):
            monkeypatch.setattr(module, "atomic_path", _failing(module.atomic_path, target, exc))
    code, _, stderr = run_cli("train", data, *TINY, "--out", out, "--test-fraction", "0.3", "--overwrite",
                              "--seed", "1")
    assert code == 2, stderr
    message = stderr[stderr.index("headstart: error: "):]
    assert exc.strerror in message and f"run {out} was not completed" in message
    assert "The earlier run there is untouched." in message and "Traceback" not in stderr
    assert tree_digest(out) == earlier  # the earlier run, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no partial, no .old, no temp file
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("weights", ["truncated", "another model's"])
def test_bad_weights_file_keeps_the_earlier_run(tmp_path, weights):
    import torch

    data = write_image_folder(tmp_path / "data", n_per_class=6, size=(8, 8))
    out = tmp_path / "run"
    code, _, stderr = run_cli("train", data, *TINY, "--out", out)
    assert code == 0, stderr
    earlier = tree_digest(out)
    small = headstart.get_backbone("small_cnn").create().state_dict()
    torch.save(small, tmp_path / "w.pth")
    if weights == "truncated":
        (tmp_path / "w.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:5000])
    code, _, stderr = run_cli("train", data, "--backbone", "mobilenet_v2", "--weights", tmp_path / "w.pth",
                              "--image-size", "32", "--workers", "0", "--out", out, "--overwrite")
    assert code == 2 and "Traceback" not in stderr and str(tmp_path / "w.pth") in stderr
    assert ("cannot read weights file" if weights == "truncated" else "does not fit backbone mobilenet_v2") in stderr
    assert tree_digest(out) == earlier and sorted(os.listdir(tmp_path)) == ["data", "run", "w.pth"]


@pytest.mark.parametrize("where", ["creating the cache folder", "writing a chunk"])
def test_unwritable_cache_warns_once_and_the_run_completes_without_it(tmp_path, monkeypatch, where):
    data = write_image_folder(tmp_path / "data", n_per_class=150, size=(8, 8))  # 2 chunks
    cache = tmp_path / "cache"
    denied = PermissionError(errno.EACCES, "Permission denied")
    if where == "creating the cache folder":
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if cache in (self, *self.parents):
                raise denied
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        def save_file(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(features_mod, "save_file", save_file)
    code, _, stderr = run_cli("train", data, *TINY, "--out", tmp_path / "run", "--cache-dir", cache)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "feature cache" in line]
    assert len(warnings) == 1 and str(cache / "features") in warnings[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert config["cache_dir"] is None and metrics["extraction"]["computed"] == 300
    assert not list(cache.rglob("*.safetensors")) and not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_oserror_outside_train_is_exit_2_not_a_traceback(tmp_path, monkeypatch):
    import shutil

    def rmtree(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    (tmp_path / "cache" / "features").mkdir(parents=True)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, _, stderr = run_cli("cache", "clear", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "Permission denied" in stderr and str(tmp_path / "cache" / "features") in stderr
    assert "Traceback" not in stderr


# =========================================================================================== 7. untrusted bundles


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bundle")
    data = write_image_folder(base / "data", n_per_class=5, classes=("ant", "bee", "cow"), size=(8, 8))
    code, _, stderr = run_cli("train", data, *TINY, "--out", base / "run", "--test-fraction", "0")
    assert code == 0, stderr
    return base / "run" / "model"


@pytest.fixture
def copy_of(bundle, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "model"))


_UNPICKLED: list | None = None  # while a no_unpickling block runs: every class a pickle asked for
_KEPT_ASIDE_UNPICKLER = pickle.Unpickler  # taken before any test patches it, for the control below


def _record_find_class(event: str, args) -> None:
    if event == "pickle.find_class" and _UNPICKLED is not None:
        _UNPICKLED.append(args)


sys.addaudithook(_record_find_class)  # audit hooks cannot be removed: this one records only inside the block


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point raises: the pickle module's (C and pure-Python), torch.load at both its
    names and torch's weights-only unpickler; any class looked up by any unpickler is also recorded
    through Python's audit event, for a loader reached some other way."""
    import _pickle
    import pickle

    import torch
    import torch._weights_only_unpickler
    import torch.serialization

    global _UNPICKLED

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    paths = [(pickle, n) for n in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler")]
    paths += [(_pickle, n) for n in ("load", "loads", "Unpickler")]
    paths += [(torch, "load"), (torch.serialization, "load"), (torch.serialization, "_load"),
              (torch.serialization, "_legacy_load"), (torch._weights_only_unpickler, "load"),
              (torch._weights_only_unpickler, "Unpickler")]
    for module, name in paths:
        monkeypatch.setattr(module, name, refuse)
    _UNPICKLED = []
    yield _UNPICKLED
    _UNPICKLED = None


def test_the_unpickling_block_catches_each_way_in(no_unpickling, tmp_path):
    """Control for the test below: each loader, reached by its usual name, is stopped."""
    import _pickle

    import numpy
    import torch

    data = pickle.dumps({"x": 1})
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    numpy.save(tmp_path / "o.npy", numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    ways = {"pickle.loads": lambda: pickle.loads(data), "_pickle.loads": lambda: _pickle.loads(data),
            "pickle.Unpickler": lambda: pickle.Unpickler(io.BytesIO(data)).load(),
            "torch.load": lambda: torch.load(tmp_path / "w.pt", weights_only=True),
            "torch.serialization.load": lambda: torch.serialization.load(tmp_path / "w.pt"),
            "numpy.load": lambda: numpy.load(tmp_path / "o.npy", allow_pickle=True)}
    for way, call in ways.items():
        try:
            call()
        except AssertionError as exc:
            assert "unpickled" in str(exc), way
        else:
            pytest.fail(f"{way} was not blocked")
    # A loader the patches miss (the C unpickler, kept aside before the block) is caught by the record.
    assert _KEPT_ASIDE_UNPICKLER(io.BytesIO(pickle.dumps(Path("x")))).load() == Path("x")
    assert ("pathlib", "PosixPath") in no_unpickling


def test_bundle_loads_without_unpickling_anything(copy_of, no_unpickling, tmp_path):
    model = headstart.load(copy_of)
    assert model.classes == ["ant", "bee", "cow"]
    image = _png(tmp_path / "x.png", size=(8, 8))
    # workers=0: a decoding worker's tensors come back pickled (its own IPC, not a file), which would cloud this.
    assert model.predict([image], cache_dir="none", workers=0)[0].top[0][0] in model.classes
    assert no_unpickling == []  # no class was looked up by any unpickler, however it was reached


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _edit_json(d: Path, change) -> None:
    meta = json.loads((d / "model.json").read_text())
    change(meta)
    (d / "model.json").write_text(json.dumps(meta))


def _edit_tensors(d: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    change(tensors)
    save_file(tensors, d / "model.safetensors")


def _damage(d: Path, how: str, tmp_path: Path) -> str:
    """Damage the bundle in `d`; return words the refusal must contain."""
    import torch

    if how == "truncated tensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "cannot be read"
    if how == "pickle posing as safetensors":
        torch.save({"head.0.weight": _Payload(str(tmp_path / "pwned"))}, d / "model.safetensors")
        return "cannot be read"
    if how == "tensors missing":
        (d / "model.safetensors").unlink()
        return "cannot be read"
    if how == "json not json":
        (d / "model.json").write_text("{'format': 'headstart-bundle',")
        return "not readable JSON"
    if how == "foreign json":
        (d / "model.json").write_text(json.dumps({"format": "keras", "layers": []}))
        return "not a headstart bundle"
    if how == "newer format version":
        _edit_json(d, lambda m: m.update(format_version=2))
        return "format version 2"
    if how == "one class fewer":
        _edit_json(d, lambda m: m.update(classes=m["classes"][:2]))
        return "shape mismatches"
    if how == "duplicate classes":
        _edit_json(d, lambda m: m.update(classes=["ant", "ant", "cow"]))
        return "distinct non-empty names"
    if how == "class that is not a name":
        _edit_json(d, lambda m: m.update(classes=["ant", 7, "cow"]))
        return "distinct non-empty names"
    if how == "100,000 classes":
        _edit_json(d, lambda m: m.update(classes=[f"c{i}" for i in range(10**5)]))  # checked on meta tensors
        return "shape mismatches"
    if how == "huge hidden layer":
        _edit_json(d, lambda m: m.update(head={"kind": "mlp", "hidden": 10**12, "dropout": 0.5}))
        return "missing keys"
    if how == "negative hidden layer":
        _edit_json(d, lambda m: m.update(head={"kind": "mlp", "hidden": -3, "dropout": 0.5}))
        return "incomplete or edited"
    if how == "unknown head kind":
        _edit_json(d, lambda m: m["head"].update(kind="forest"))
        return "unknown head kind"
    if how == "unknown backbone":
        _edit_json(d, lambda m: m.update(backbone="alexnet_9000"))
        return "incomplete or edited"
    if how == "preprocessing edited":
        _edit_json(d, lambda m: m["preprocessing"].update(crop_size=0))
        return "out of range"
    if how == "std of zero":
        _edit_json(d, lambda m: m["preprocessing"].update(std=[0.5, 0.0, 0.5]))
        return "std > 0"
    if how == "key missing from json":
        _edit_json(d, lambda m: m.pop("preprocessing"))
        return "incomplete or edited"
    if how == "tensor shape edited":
        _edit_tensors(d, lambda t: t.update({"head.0.weight": t["head.0.weight"][:, :64].contiguous()}))
        return "shape mismatches"
    if how == "extra tensor":
        _edit_tensors(d, lambda t: t.update({"optimizer.state": torch.zeros(3)}))
        return "unexpected tensors"
    if how == "another model's tensors":
        from safetensors.torch import save_file

        from headstart.backbones import seeded_init

        other = seeded_init(headstart.get_backbone("mobilenet_v2"), 0).state_dict()
        save_file({f"backbone.{k}": v.contiguous() for k, v in other.items()}, d / "model.safetensors")
        return "does not fit the small_cnn backbone"
    raise AssertionError(how)


DAMAGE = ["truncated tensors", "pickle posing as safetensors", "tensors missing", "json not json", "foreign json",
          "newer format version", "one class fewer", "duplicate classes", "class that is not a name",
          "100,000 classes", "huge hidden layer", "negative hidden layer", "unknown head kind", "unknown backbone",
          "preprocessing edited", "std of zero", "key missing from json", "tensor shape edited", "extra tensor",
          "another model's tensors"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_edited_or_foreign_bundle_is_refused_clearly(copy_of, tmp_path, how):
    from headstart.errors import BundleError

    words = _damage(copy_of, how, tmp_path)
    with pytest.raises(BundleError, match=words.replace("(", r"\(")) as err:
        headstart.load(copy_of)
    assert str(copy_of) in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    code, _, stderr = run_cli("predict", copy_of.parent, _png(tmp_path / "x.png"))
    assert code == 2 and "Traceback" not in stderr and words in stderr


class RealAllocations:
    """Element counts of the tensors torch's factory functions (what modules build their parameters and
    buffers with) create on a real device inside the block; an allocation that fails counts as "failed".

    A torch function mode, so it sees the call after `with torch.device("meta")` has set the device.
    """

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        made: list = []
        factories = {torch.empty, torch.zeros, torch.ones, torch.full, torch.empty_strided, torch.rand,
                     torch.randn}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                try:
                    out = func(*args, **(kwargs or {}))
                except RuntimeError:
                    if func in factories:
                        made.append("failed")
                    raise
                if func in factories and out.device.type != "meta":
                    made.append(out.numel())
                return out

        self.made, self.mode = made, Mode()

    def __enter__(self) -> list:
        self.mode.__enter__()
        return self.made

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("how", ["100,000 classes", "huge hidden layer"])
def test_sizes_edited_into_the_json_allocate_nothing(copy_of, tmp_path, how):
    """The edited sizes are checked on the meta device: no real tensor is built before the refusal.
    Control: the same counter sees the modules of a bundle that loads."""
    from headstart.errors import BundleError

    with RealAllocations() as made:
        model = headstart.load(copy_of)
    n_params = sum(p.numel() for p in [*model.backbone.parameters(), *model.head.parameters()])
    assert sum(n for n in made if n != "failed") >= n_params  # the counter sees real modules being built
    words = _damage(copy_of, how, tmp_path)
    with RealAllocations() as made, pytest.raises(BundleError, match=words):
        headstart.load(copy_of)
    assert made == []
