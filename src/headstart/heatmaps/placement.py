"""A map on the network's grid, put back onto the image the user has: its own size, as decoded.

The network saw a resized, centre-cropped copy of the image (Preprocessing.crop_box says which part); its
map (h, w) covers that part, cell (i, j) the i-th of h rows and j-th of w columns of it. On the image, the
map is interpolated bilinearly between cell centres (torch's and OpenCV's `align_corners=False`
convention, the one pytorch-grad-cam resizes with), constant past the outer centres, and NaN where the
crop cut the image away: the model did not see those pixels, and a made-up value there would be read as
"it looked here".

A JPEG may be decoded at a reduced scale for the network (images.load_image's draft mode): the crop is
computed on that decoded size and placed by fractions, so the map still lines up with the full image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from headstart.nets.spec import Preprocessing

ORIENTATION = 0x0112  # EXIF's orientation tag; values 5 to 8 turn the image a quarter (images.load_image)


def displayed_size(path) -> tuple[int, int]:
    """(width, height) of an image file as load_image decodes it in full (EXIF orientation applied), read
    from its header."""
    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _weights(n_out: int, start: float, stop: float, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, n_cells) bilinear weights of output pixels 0..n_out-1 over a grid of n_cells spanning
    [start, stop) in pixels, and which output pixels the grid covers."""
    centres = np.arange(n_out) + 0.5
    inside = (centres >= start) & (centres < stop)
    u = np.clip((centres - start) / (stop - start) * n_cells - 0.5, 0, n_cells - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, n_cells - 1)
    t = u - lo
    w = np.zeros((n_out, n_cells))
    rows = np.arange(n_out)
    w[rows, lo] += 1 - t  # each row once per statement; lo == hi (past the last centre) adds up to 1
    w[rows, hi] += t
    return w, inside


def place(grid: np.ndarray, preprocessing: Preprocessing, decoded_size: tuple[int, int],
          size: tuple[int, int]) -> np.ndarray:
    """The (h, w) `grid` of an image decoded at `decoded_size` (width, height) for the network, as a
    (height, width) float32 map of the image at `size` (width, height): NaN outside the crop."""
    left, top, right, bottom = preprocessing.crop_box(*decoded_size)
    width, height = size
    wy, rows = _weights(height, top * height, bottom * height, grid.shape[0])
    wx, cols = _weights(width, left * width, right * width, grid.shape[1])
    out = (wy @ np.asarray(grid, np.float64) @ wx.T).astype(np.float32)  # separable bilinear: (height, width)
    out[~rows, :] = np.nan
    out[:, ~cols] = np.nan
    return out
