"""Reliability (issue 6), odd image files: formats, bombs, devices and pipes named like images.

Every odd file is built here, with PIL or raw bytes. Decoding cases that test_images.py already
covers (truncated files, alpha, 16-bit, 1-bit, EXIF, animated GIF, CMYK) are not repeated.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.data.folders import scan_folder
from headstart.data.images import MAX_PIXELS, ImageError, load_image

from conftest import write_image_folder
from reliability_helpers import BLUE, BOMBS, GREEN, RED, TINY, WHITE, _rgb
from test_cli import run_cli


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

    data/images.py imports only numpy, Pillow and quiet.py, so they are loaded alone (not via the package):
    as modules of a bare package "hs" whose path is headstart's folder, with a bare "hs.data" beside it.
    """
    for name, data in BOMBS.items():
        (tmp_path / name).write_bytes(data)
    script = f"""
import importlib, resource, sys, types
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
sys.modules["hs"] = hs = types.ModuleType("hs")
hs.__path__ = [{str(Path(headstart.__file__).parent)!r}]
sys.modules["hs.data"] = data = types.ModuleType("hs.data")
data.__path__ = [{str(Path(headstart.__file__).parent / "data")!r}]
sys.modules["headstart"] = hs  # data/images.py imports headstart.quiet
images = importlib.import_module("hs.data.images")
assert "torch" not in sys.modules
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


def test_docs_state_the_pixel_limit_and_background():
    readme = (Path(__file__).parent.parent / "docs" / "guides" / "data.md").read_text()
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
    from headstart.runs.train import auto_image_size

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
