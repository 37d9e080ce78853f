"""A heatmap drawn over its image, as a PNG: what `headstart explain` writes per input.

The map's positive part, scaled to its maximum, is drawn in matplotlib's "jet" colours at half opacity
over the image (as pytorch-grad-cam's show_cam_on_image blends); where the map is NaN (pixels the centre
crop cut away, never seen by the model) the image shows alone. A large photo is drawn at most
MAX_SIDE pixels a side: the raw map keeps the full size. Drawn on a bare matplotlib Figure with an Agg
canvas (reports/plots.py says why: no global backend is touched) and written atomically.

`thumbnail` blends the same colours at the same opacity straight into the pixels of a small copy of the image,
without a figure or a title: what report.html and inspect.html inline per image.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from headstart.fileio import atomic_path

MAX_SIDE = 800
ALPHA = 0.5


def shown(heatmap: np.ndarray) -> np.ndarray:
    """The map as drawn: its positive part divided by its maximum (0 to 1), NaN kept."""
    positive = np.where(np.isnan(heatmap), np.nan, np.maximum(heatmap, 0))
    top = np.nanmax(positive) if np.isfinite(positive).any() else 0.0
    return positive / top if top > 0 else positive


def _resample(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map at (height, width), each drawn pixel taking the map's pixel at its centre."""
    rows = ((np.arange(height) + 0.5) * heatmap.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * heatmap.shape[1] / width).astype(np.int64)
    return heatmap[np.ix_(rows, cols)]


def thumbnail(image: Image.Image, heatmap: np.ndarray, side: int) -> Image.Image:
    """`image` at most `side` pixels a side with `heatmap` blended over it as write_overlay draws it (jet at ALPHA,
    the image alone where the map is NaN). The map covers the whole image at any resolution of the same
    aspect: a thumbnail of a large JPEG may come from a reduced decode (images.load_image's min_side)."""
    from matplotlib import colormaps

    small = image.convert("RGB")
    small.thumbnail((side, side))
    values = _resample(shown(heatmap), small.width, small.height)  # (height, width), 0 to 1 or NaN
    seen = np.isfinite(values)
    colour = colormaps["jet"](np.nan_to_num(values, nan=0.0))[..., :3] * 255.0
    pixels = np.asarray(small, np.float64)
    blend = np.where(seen[..., None], (1 - ALPHA) * pixels + ALPHA * colour, pixels)
    return Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))


def write_overlay(image: Image.Image, heatmap: np.ndarray, title: str, path: str | os.PathLike) -> None:
    """Write `image` with `heatmap` (the same size, (height, width)) over it and `title` above, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if heatmap.shape != (image.height, image.width):
        raise ValueError(f"the map is {heatmap.shape[1]}x{heatmap.shape[0]}, the image {image.width}x{image.height}")
    image = image.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(image.size))
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if scale < 1:
        image = image.resize((width, height), Image.BILINEAR)
    values = _resample(shown(heatmap), width, height)
    inches = 6.0
    fig = Figure(figsize=(inches, inches * height / width + 0.6), dpi=max(100, round(width / inches)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.imshow(np.ma.masked_invalid(values), cmap="jet", vmin=0, vmax=1, alpha=ALPHA, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    # The temporary name ends in .tmp, so the format is given; the dpi too (else rcParams["savefig.dpi"]).
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
