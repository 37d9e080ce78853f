"""Decoding awkward image files: every file is built here with PIL or raw bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.data.images import ImageError, is_image_name, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im)  # (h, w, 3) uint8


def _noise_bytes(fmt: str, **save_kwargs) -> bytes:
    """An incompressible image, so cutting the file removes pixel data and not just padding."""
    arr = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


# --- files that must be refused ----------------------------------------------------------------------------------


def test_zero_byte_file_is_refused(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(p)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9])
def test_truncated_file_is_refused_not_padded(tmp_path, fmt, ext, keep):
    data = _noise_bytes(fmt)
    p = tmp_path / f"cut.{ext}"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match="(?i)truncated|corrupt") as err:
        load_image(p)
    assert str(err.value).startswith("truncated file")


def test_text_file_named_jpg_is_refused(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not the pixels you are looking for\n" * 10)
    with pytest.raises(ImageError, match="not an image"):
        load_image(p)


# --- files that must load, as RGB with known pixels --------------------------------------------------------------


def test_png_named_jpg_loads_by_content(tmp_path):
    p = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (5, 4), (12, 34, 56)).save(p, "PNG")
    im = load_image(p)
    assert im.size == (5, 4)
    assert (_pixels(im) == (12, 34, 56)).all()


def test_rgb_png_is_returned_unchanged(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    p = tmp_path / "rgb.png"
    Image.fromarray(arr).save(p)
    assert np.array_equal(_pixels(load_image(p)), arr)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    arr = np.array([[0, 100, 255]], dtype=np.uint8)
    p = tmp_path / "gray.png"
    Image.fromarray(arr, mode="L").save(p)
    assert np.array_equal(_pixels(load_image(p)), np.repeat(arr[..., None], 3, axis=2))


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128]]], dtype=np.uint8)
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == WHITE  # fully transparent red: the background, not red
    assert tuple(px[0, 1]) == RED  # opaque red stays red
    assert px[0, 2, 0] == 255 and abs(int(px[0, 2, 1]) - 127) <= 1 and abs(int(px[0, 2, 2]) - 127) <= 1


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path, ext):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / f"palette.{ext}"
    im.save(p, transparency=1)  # index 1 (green) is transparent
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == RED
    assert tuple(px[0, 1]) == WHITE


def test_palette_without_transparency(tmp_path):
    im = Image.new("P", (1, 1))
    im.putpalette([0, 0, 255] + [0] * (256 * 3 - 3))
    p = tmp_path / "palette.png"
    im.save(p)
    assert tuple(_pixels(load_image(p))[0, 0]) == BLUE


def test_la_is_composited_on_white(tmp_path):
    la = np.array([[[100, 0], [100, 255]]], dtype=np.uint8)
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == WHITE
    assert tuple(px[0, 1]) == (100, 100, 100)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 32768, 0, 1000]], dtype=np.uint16)
    p = tmp_path / "gray16.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")  # really a 16-bit file
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == WHITE
    assert abs(int(px[0, 1, 0]) - 128) <= 1  # not clipped to 255
    assert tuple(px[0, 2]) == (0, 0, 0)
    assert px[0, 3, 0] == 4  # 1000 / 65535 * 255 = 3.9
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_dark_16_bit_grayscale_is_scaled_too(tmp_path):
    """All values below 256 in a 16-bit file are still 16-bit values, not 8-bit ones."""
    arr = np.array([[200, 0]], dtype=np.uint16)
    p = tmp_path / "dark16.png"
    Image.fromarray(arr).save(p)
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == (1, 1, 1)  # 200 / 65535 * 255 = 0.78
    assert tuple(px[0, 1]) == (0, 0, 0)


def test_one_bit_image(tmp_path):
    im = Image.new("1", (2, 1))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / "bits.png"
    im.save(p)
    px = _pixels(load_image(p))
    assert tuple(px[0, 0]) == (0, 0, 0)
    assert tuple(px[0, 1]) == WHITE


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=95)  # CMYK red
    assert Image.open(p).mode == "CMYK"
    px = _pixels(load_image(p)).astype(int)
    assert np.abs(px - RED).max() <= 3


@pytest.mark.parametrize("orientation,top,bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotation_is_applied(tmp_path, orientation, top, bottom):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (20, 40)  # width and height swapped
    px = _pixels(out).astype(int)
    # 6 turns the stored image 90 degrees clockwise for display (left goes to the top); 8 counter-clockwise.
    assert np.abs(px[5, 10] - top).max() <= 3
    assert np.abs(px[34, 10] - bottom).max() <= 3


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 5), c) for c in (RED, BLUE, (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    out = load_image(p)
    assert out.size == (6, 5)
    assert (_pixels(out) == RED).all()


def test_one_pixel_image(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    out = load_image(p)
    assert out.size == (1, 1)
    assert tuple(_pixels(out)[0, 0]) == (1, 2, 3)


def test_load_image_accepts_str_paths_and_does_not_keep_the_file_open(tmp_path):
    p = tmp_path / "x.bmp"
    Image.new("RGB", (3, 3), BLUE).save(p)
    out = load_image(str(p))
    Path(p).unlink()  # the returned image is fully loaded
    assert (_pixels(out) == BLUE).all()


def test_is_image_name_by_extension_case_insensitive():
    assert is_image_name("a.JPG") and is_image_name("b.jpeg") and is_image_name("c.webp")
    assert not is_image_name("notes.txt") and not is_image_name("jpg") and not is_image_name(".DS_Store")


def test_bytes_and_file_objects_decode_by_the_same_rules_as_paths(tmp_path):
    """An upload (bytes or a file object) gets the path's decoding: JPEG draft, EXIF, alpha, refusals."""
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 300, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(tmp_path / "photo.jpg", exif=exif, quality=90)
    rgba = Image.new("RGBA", (8, 8), (*RED, 0))
    rgba.save(tmp_path / "clear.png")
    for name, min_side in (("photo.jpg", 64), ("photo.jpg", None), ("clear.png", 64)):
        p = tmp_path / name
        want = _pixels(load_image(p, min_side))
        assert (_pixels(load_image(p.read_bytes(), min_side)) == want).all()
        with open(p, "rb") as f:
            assert (_pixels(load_image(f, min_side)) == want).all()
    assert load_image(tmp_path / "photo.jpg", 64).size == (100, 75)  # 300x400 drafted at 1/4, then turned by EXIF
    assert (_pixels(load_image((tmp_path / "clear.png").read_bytes())) == WHITE).all()
    for data, reason in ((b"", "empty file"), (b"hello, not pixels\n" * 20, "not an image"),
                         (_noise_bytes("PNG")[:500], "truncated file")):
        with pytest.raises(ImageError, match=reason):
            load_image(data)
        with pytest.raises(ImageError, match=reason):
            load_image(io.BytesIO(data))


# --- JPEG draft decoding -----------------------------------------------------------------------------------------


def _photo_jpeg(path: Path, size=(800, 600)) -> Path:
    """A smooth gradient with detail, saved as a JPEG: what a camera photo looks like to the decoder."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)
    return path


def test_jpeg_draft_decodes_at_the_smallest_scale_keeping_min_side(tmp_path):
    p = _photo_jpeg(tmp_path / "photo.jpg")
    assert load_image(p).size == (800, 600)
    # libjpeg scales by 1/2, 1/4 or 1/8; the smallest whose both sides stay >= min_side is used.
    assert load_image(p, min_side=100).size == (200, 150)  # 1/8 would give 100x75
    assert load_image(p, min_side=75).size == (100, 75)
    assert load_image(p, min_side=300).size == (400, 300)
    assert load_image(p, min_side=301).size == (800, 600)
    png = tmp_path / "photo.png"
    Image.open(p).save(png)
    assert load_image(png, min_side=100).size == (800, 600)  # other formats decode whole


def test_extraction_decodes_jpegs_in_draft_mode_and_the_key_says_so(tmp_path):
    """The feature pipeline asks for the resize size, so its input differs (slightly) from a full decode:
    which is why the option is part of the feature cache key."""
    import torch

    from headstart.nets.registry import get_backbone
    from headstart.engines.choice import EngineChoice
    from headstart.data.decoding import _Images, decode_side, split_transform
    from headstart.engines.features import make_namespace

    prep = get_backbone("mobilenet_v2").preprocessing.scaled(64)
    transform = prep.transform()
    assert decode_side(transform) == prep.resize_size == 73
    p = _photo_jpeg(tmp_path / "photo.jpg")
    _, x, bad = _Images([str(p)], transform)[0]
    assert bad is None
    decode_half, _ = split_transform(transform)  # the worker's half: resize and crop (uint8)
    assert load_image(p, min_side=73).size == (100, 75)  # 1/8: both sides still >= 73
    assert torch.equal(x, decode_half(load_image(p, min_side=73)))
    assert not torch.equal(x, decode_half(load_image(p)))  # a full decode gives other pixels
    ns = make_namespace("mobilenet_v2", "x", prep, EngineChoice("torch", "fp32", "cpu", "tests"))
    assert ns["decoder"]["jpeg_draft"] == "shorter side >= resize size"
