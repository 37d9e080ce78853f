"""Decoding one image file into an RGB PIL image, or a clear reason why not.

Choices (documented in docs/guides/data.md and docs/guides/reliability.md):
- only the first frame of animated or multi-page files is used;
- EXIF orientation is applied;
- transparency is composited onto a white background (ALPHA_BACKGROUND), not dropped;
- 16-bit and float grayscale are scaled to 8 bits, not clipped;
- a truncated file is refused (skipped and reported), never padded with grey;
- a header claiming more than MAX_PIXELS pixels is refused before any pixel is decoded;
- anything but a regular file (a FIFO or device named like an image) is refused unopened.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from headstart.quiet import quiet

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 9459 x 9459)
ALPHA_BACKGROUND = (255, 255, 255)
DECODER_OPTIONS = {"alpha_background": list(ALPHA_BACKGROUND), "max_pixels": MAX_PIXELS, "first_frame": True,
                   "exif_transpose": True, "jpeg_draft": "shorter side >= resize size"}


class ImageError(Exception):
    """This file cannot be used as an image; the message is the reason shown to the user."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike | bytes | BinaryIO, min_side: int | None = None,
               gray: bool = False) -> Image.Image:
    """Open `path` and return an RGB image, or raise ImageError saying why it cannot be used.

    With `gray`, a grayscale image comes back in mode "L" instead (the same pixels as one channel of
    its RGB conversion): Pillow resizes each channel alone, so resizing it and repeating the channel
    afterwards is bitwise the RGB result at a third of the work (tests/test_images.py).

    `path` may also be the file's bytes or a seekable binary file object (an upload), decoded
    by the same rules.

    With `min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    draft mode) as long as both sides stay at least `min_side`: a 2000x1500 photo headed for a
    128 px network decodes about 10x faster. The resize that follows sees slightly different
    pixels than from a full decode, so the option is part of the feature cache's key.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = io.BytesIO(path)
    try:
        if isinstance(path, (str, os.PathLike)):
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device named like an image: opening it could block
                raise ImageError("not a regular file")
            size = st.st_size
        else:
            size = path.seek(0, os.SEEK_END)
            path.seek(0)
        if size == 0:
            raise ImageError("empty file (0 bytes)")
        # Pillow's notes on damaged metadata ("Corrupt EXIF data") name no file and change no pixel: not
        # printed. Pixel data that is cut short is an error, handled below. quiet(), not catch_warnings:
        # several threads decode at once.
        with quiet(), Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:  # when Pillow's own limit was lifted
                raise ImageError(f"too many pixels: {im.width}x{im.height} is over the limit of "
                                 f"{MAX_PIXELS:,}")
            if im.width < 1 or im.height < 1:
                raise ImageError(f"image has no pixels ({im.width}x{im.height})")
            im.seek(0)
            if min_side and im.format == "JPEG":
                im.draft(im.mode, (min_side, min_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im, gray)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (wrong extension, or another kind of file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow checks the header's size in Image.open, before any pixel is decoded.
        raise ImageError(f"too many pixels: the header claims more than the limit of {MAX_PIXELS:,}; "
                         "not decoded") from None
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():  # Pillow says both "image file is truncated" and "Truncated File Read"
            msg = "truncated file (" + msg + ")"
        raise ImageError(msg) from None
    except (SyntaxError, ValueError, TypeError, EOFError, IndexError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise ImageError(f"corrupt image ({type(exc).__name__}: {exc})") from None


def to_rgb(im: Image.Image, gray: bool = False) -> Image.Image:
    """RGB, or with `gray` a grayscale image as mode "L" (see load_image)."""
    if im.mode == "RGB" or (gray and im.mode == "L"):
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = Image.fromarray(_to_uint8(im), mode="L")
        return im if gray else im.convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def _to_uint8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        arr = np.nan_to_num(arr) / top * 255.0
    elif im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr / 65535.0 * 255.0  # 16-bit range, including mode "I" from 16-bit PNGs
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
