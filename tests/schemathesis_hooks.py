"""Schemathesis hooks for `headstart serve` (schemathesis.toml loads them): what an image body is.

The OpenAPI document types an image upload as `format: binary`, and JSON Schema cannot say "bytes
Pillow can decode": from the schema alone Schemathesis sends random bytes, a PDF or a ZIP as
"valid" images, which the server rightly refuses (415, documented). Registering real image files for
the image media types keeps the positive-data check meaningful: every image it sends must be
classified (200), whatever its format, mode and shape.
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

# format -> the modes Pillow writes in it
FORMATS = {"PNG": ("L", "RGB", "RGBA", "P", "I;16"), "JPEG": ("L", "RGB"), "GIF": ("L", "P"),
           "BMP": ("L", "RGB"), "WEBP": ("RGB", "RGBA"), "TIFF": ("L", "RGB", "RGBA")}


@st.composite
def image_files(draw) -> bytes:
    """An image file: any of FORMATS, 1 to 48 pixels a side, random pixels."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
    else:
        bands = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        im = Image.fromarray(pixels[..., 0] if bands == 1 else pixels, "L" if bands == 1 else mode)
        if mode == "P":
            im = im.convert("P")
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


# POST /predict's images: the multipart file parts (an array of `format: binary`) and the raw body.
schemathesis.openapi.format("binary", image_files())
schemathesis.openapi.media_type("image/*", image_files(), aliases=["application/octet-stream"])
