"""One pass over the image files for what the backbone's features cannot say: the image checks, and a small
fingerprint of each picture that confirms or refuses a near copy the features suggest.

The checks are cleanvision's (github.com/cleanlab/cleanvision, `ImagePropertyIssueManager`), with its
measures and default thresholds: dark (99th brightness percentile), light (5th), low information
(entropy), blurry (edge strength and grey-level spread on the image at most 64 px), odd aspect ratio,
odd size (against the set's quartiles). cleanvision's own `Imagelab` ran at 66 images/s on this
2-core machine (2,000 FMNIST-TL images in 30 s, one process, beside other work): 5 minutes for
FMNIST-TL, where `inspect` has a minute in all. Here each image is decoded once, by headstart's
decoder (data/images.py: the files it refuses are the "unreadable" ones), reduced to at most
CHECK_SIDE pixels, and measured there in NumPy.

A fingerprint is the picture in grey at FINGER x FINGER pixels, whole and with its border cropped by
each of ZOOMS (a copy may be cropped). Its `spectrum`, the log magnitudes of the lowest spatial frequencies,
does not change when the picture moves, is resized or re-encoded, and `spectrum_similarity` compares
two files by it. Features say "the same kind of thing": on FMNIST-TL a planted copy was the nearest
neighbour of its original in feature space 33 times in 60, in spectrum 45 times (docs/inspect.md).
Normalised cross-correlation of the pixels, best over shifts (band-passed or not), was measured as a
judge too and separated copies from lookalikes worse than the spectrum: not kept. What is kept as the
second judge (`pixel_differences`) compares the files themselves, re-read at their own resolution, after
remaking one as a copy of the other.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from headstart.data.images import ImageError, load_image

FINGER = 32  # fingerprint side, pixels
FINGER_DTYPE = np.uint8  # a fingerprint is a grey "L" picture resized by Pillow: whole grey levels, 3 KB a file
ZOOMS = (0.88, 0.94)  # the fingerprint's cropped views keep these shares of each side (crops of 6% and 3% a side)
COPY_SIM = 0.975  # spectrum_similarity from which two files are the same picture (docs/inspect.md)
SPECTRUM = 8  # spatial frequencies of the copy descriptor, each way
SPECTRA_CHUNK = 8192  # fingerprints transformed at a time (unit_spectra)
CHECK_SIDE = 64  # cleanvision measures blur at most 64 px (MAX_RESOLUTION_FOR_BLURRY_DETECTION)
THREADS = 2
# cleanvision 0.3.7's defaults (ImagePropertyIssueManager.get_default_params)
DARK, LIGHT, ODD_ASPECT, LOW_INFORMATION, BLURRY = 0.32, 0.05, 0.35, 0.3, 0.29
ENTROPY_FACTOR, BLUR_FACTOR, COLOR_THRESHOLD, SIZE_IQR = 0.1, 0.01, 0.18, 3.0
CHECKS = ("dark", "light", "low-information", "blurry", "odd-aspect-ratio", "odd-size")


@dataclass
class Look:
    """What one decode of an image file tells: its size, cleanvision's raw measures, and its fingerprints."""

    width: int
    height: int
    measures: dict  # brightness_perc_99, brightness_perc_5, entropy, blurriness, grey_std
    finger: np.ndarray  # (1 + len(ZOOMS), FINGER, FINGER) uint8 grey: whole and cropped by each of ZOOMS


def look(path: str) -> Look:
    """The image at `path` measured and fingerprinted; ImageError (or OSError) when it cannot be decoded."""
    image = load_image(path, min_side=CHECK_SIDE)
    width, height = image.size
    gray = image.convert("L")
    small = gray.copy()
    small.thumbnail((CHECK_SIDE, CHECK_SIDE))
    rgb = image.copy()
    rgb.thumbnail((CHECK_SIDE * 4, CHECK_SIDE * 4))  # percentiles of a 256 px view: the same to a few 1/255
    px = np.asarray(rgb, dtype=np.float32)
    bright = np.sqrt(0.241 * px[..., 0] ** 2 + 0.691 * px[..., 1] ** 2 + 0.068 * px[..., 2] ** 2) / 255
    p5, p99 = np.percentile(bright, [5, 99])
    edges = np.asarray(small.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    views = [gray]
    for zoom in ZOOMS:
        m = max(1, round((1 - zoom) / 2 * min(width, height)))
        views.append(gray.crop((m, m, width - m, height - m)) if width > 2 * m and height > 2 * m else gray)
    finger = np.stack([np.asarray(g.resize((FINGER, FINGER), Image.BILINEAR), dtype=FINGER_DTYPE) for g in views])
    measures = {"brightness_perc_99": float(p99), "brightness_perc_5": float(p5), "entropy": float(gray.entropy()),
                "blurriness": float(edges.std()), "grey_std": float(np.std(small.histogram()))}
    return Look(width, height, measures, finger)


def look_all(paths: Sequence[str], threads: int = THREADS) -> tuple[list[Look | None], dict[str, str]]:
    """`look` of every path, in order (None where it failed), and path -> why for the failures."""
    def one(p: str):
        try:
            return look(p)
        except (ImageError, OSError) as exc:
            return str(exc)

    if threads > 1 and len(paths) > 64:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(one, paths, chunksize=64))
    else:
        results = [one(p) for p in paths]
    failures = {p: r for p, r in zip(paths, results) if isinstance(r, str)}
    return [r if isinstance(r, Look) else None for r in results], failures


def spectrum(finger: np.ndarray) -> np.ndarray:
    """A shift-invariant descriptor of fingerprints (n, FINGER, FINGER): the log magnitudes of their lowest
    spatial frequencies, for finding copies that moved (nearest neighbours of these, learn/neighbours.py)."""
    f = np.abs(np.fft.rfft2(finger - finger.mean(axis=(-2, -1), keepdims=True)))
    low = np.concatenate([f[:, :SPECTRUM, :SPECTRUM], f[:, -SPECTRUM + 1:, :SPECTRUM]], axis=1)
    d = np.log1p(low).reshape(len(finger), -1)
    return d - d.mean(axis=1, keepdims=True)


def unit_spectra(fingers: np.ndarray, chunk: int = SPECTRA_CHUNK) -> np.ndarray:
    """(n, v, m) unit-length spectra of fingerprints (n, v, FINGER, FINGER), whole and cropped (Look.finger),
    float32; computed `chunk` files at a time, so the Fourier transforms' temporaries stay bounded (at 200,000
    files at once they held several GB)."""
    out = []
    for a in range(0, len(fingers), chunk):
        f = np.asarray(fingers[a:a + chunk], np.float32)
        d = np.stack([spectrum(f[:, v]) for v in range(f.shape[1])], axis=1)
        out.append((d / np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-12)).astype(np.float32))
    if not out:
        return np.zeros((0, fingers.shape[1], 2 * SPECTRUM * SPECTRUM - SPECTRUM), np.float32)
    return np.concatenate(out)


def spectrum_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How alike pairs of pictures are, from their `unit_spectra` `a`, `b` (n, v, m): the best cosine similarity,
    whole against whole, each cropped view against whole and whole against each cropped view (a copy may be
    cropped). In [-1, 1]; COPY_SIM and above: the same picture."""
    sims = [(a[:, 0] * b[:, 0]).sum(1)]
    for v in range(1, a.shape[1]):
        sims += [(a[:, v] * b[:, 0]).sum(1), (a[:, 0] * b[:, v]).sum(1)]
    return np.maximum.reduce(sims)


def check_scores(looks: Sequence[Look | None]) -> dict[str, np.ndarray]:
    """cleanvision's score of each check for each image (NaN where unreadable): in [0, 1], low is bad."""
    ok = [x for x in looks if x is not None]
    nan = np.full(len(looks), np.nan)

    def col(f) -> np.ndarray:
        out = nan.copy()
        out[[i for i, x in enumerate(looks) if x is not None]] = [f(x) for x in ok]
        return out

    m = lambda key: col(lambda x: x.measures[key])  # noqa: E731
    blur = 1 - np.exp(-m("blurriness") * BLUR_FACTOR)
    spread = 1 - np.exp(-m("grey_std") * BLUR_FACTOR)
    spread[spread <= COLOR_THRESHOLD] = 0
    size = col(lambda x: math.sqrt(x.width * x.height))
    scores = {"dark": m("brightness_perc_99"), "light": 1 - m("brightness_perc_5"),
              "low-information": np.minimum(m("entropy") * ENTROPY_FACTOR, 1), "blurry": np.minimum(blur + spread, 1),
              "odd-aspect-ratio": col(lambda x: min(x.width / x.height, x.height / x.width)),
              "odd-size": _size_scores(size)}
    return scores


def _size_scores(size: np.ndarray) -> np.ndarray:
    """cleanvision's odd-size score: distance from the middle of [q1 - 3 IQR, q3 + 3 IQR] over its width."""
    known = size[~np.isnan(size)]
    if not len(known):
        return size
    q1, q3 = np.percentile(known, [25, 75])
    low, high = q1 - SIZE_IQR * (q3 - q1), q3 + SIZE_IQR * (q3 - q1)
    gap = high - low
    norm = gap if gap > 0 else (low + high) / 2
    return 1 - np.clip(np.abs(size - (low + high) / 2) / norm, 0, 1)


def check_threshold(check: str, scores: np.ndarray) -> float:
    """The score under which cleanvision calls an image `check`'s issue (odd size: 0.5, or 1 when every
    image has one size)."""
    if check == "odd-size":
        known = scores[~np.isnan(scores)]
        return 1.0 if len(known) and np.all(known == 1.0) else 0.5
    return {"dark": DARK, "light": LIGHT, "low-information": LOW_INFORMATION, "blurry": BLURRY,
            "odd-aspect-ratio": ODD_ASPECT}[check]


# The second judge of a proposed copy: the two files' pixels laid on each other at one of the pictures' own
# resolution. The spectrum cannot tell a copy from a garment photographed alike (at the similarity that keeps
# every planted copy of FMNIST-TL, hundreds of other mutual best pairs pass); the pixels can once the copy is
# remade the way it was made: the other file cropped (PIXEL_CROPS) and resized to this one's size with
# Pillow's bilinear filter (as a resized copy was made: comparing both at the smaller size instead left
# resized copies 4-12 grey levels apart), then the best whole-pixel shift, and a gain for a brightness change.
# Measured on FMNIST-TL's planted sets (docs/guides/inspect.md): with a 1 px blur the planted copies differ from
# their originals by at most 0.9 grey levels (JPEG 75 and the first transforms) and 2.1 (all but one of the
# JPEG 60 and brightness ones), other pairs proposed by 0.56 (pictures Fashion-MNIST holds twice) and up,
# 8 of ~1,300 under 2.2. The crops tried are 1 and 2 px of a 28 px picture: a crop between them on a large
# picture is matched only as well as the blur allows (not measured).
PIXEL_CROPS = (0.0, 0.04, 0.06)  # share of each side cropped from the file remade as the other
PIXEL_SHIFT = 3  # whole pixels searched each way, at the smaller file's scale
PIXEL_BLUR = 1.0  # px: both pictures blurred this much (JPEG noise)
PIXEL_GAIN = (0.8, 1.25)  # brightness gains allowed
PIXEL_MAX = 2.2  # mean absolute difference in grey levels (of 255): at most this, one picture
PIXEL_SIDE = 128  # larger pictures are compared reduced to this side


def pixels(path: str) -> np.ndarray:
    """The grey picture at `path` (uint8, at most PIXEL_SIDE a side) for `pixel_difference`."""
    gray = load_image(path, min_side=PIXEL_SIDE, gray=True).convert("L")  # a colour file comes back RGB
    if max(gray.size) > PIXEL_SIDE:
        gray.thumbnail((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def pixel_difference(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two grey pictures (uint8) are once one is remade as a copy of the other (see PIXEL_CROPS):
    the least mean absolute difference in grey levels, over both directions, the crops, the shifts of up to
    PIXEL_SHIFT (more when the target is larger) and a gain in PIXEL_GAIN, of the blurred pictures' centres
    (the shift searched left out a side). PIXEL_MAX and under: one picture."""
    return float(pixel_differences([(a, b)])[0])


def pixel_differences(pairs: Sequence[tuple[np.ndarray, np.ndarray]], chunk: int = 1_000_000) -> np.ndarray:
    """`pixel_difference` of each pair of pictures, computed together for the pairs of one pair of sizes
    (at most `chunk` numbers at a time)."""
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.ndimage import gaussian_filter

    out = np.full(len(pairs), np.inf)
    groups: dict[tuple, list[int]] = {}
    for q, (a, b) in enumerate(pairs):
        groups.setdefault((a.shape, b.shape), []).append(q)
    for (sa, sb), members in groups.items():
        for first in (0, 1):  # remade: pairs[q][first]; laid on: the other
            (h, w), src_shape = (sb, sa) if first == 0 else (sa, sb)
            s = max(PIXEL_SHIFT, math.ceil(PIXEL_SHIFT * max(h, w) / max(src_shape)))
            if h <= 2 * s + 2 or w <= 2 * s + 2:
                continue
            per_pair = (2 * s + 1) ** 2 * (h - 2 * s) * (w - 2 * s)
            step = max(1, chunk // per_pair)
            for c0 in range(0, len(members), step):
                qs = members[c0:c0 + step]
                dst = np.stack([pairs[q][1 - first] for q in qs]).astype(np.float32)
                y = gaussian_filter(dst, (0, PIXEL_BLUR, PIXEL_BLUR))
                win = sliding_window_view(y, (h - 2 * s, w - 2 * s), axis=(1, 2))  # (n, 2s+1, 2s+1, ., .)
                win = win - win.mean(axis=(3, 4), keepdims=True)
                norm = np.maximum((win * win).sum(axis=(3, 4)), 1e-6)
                for crop in PIXEL_CROPS:
                    m = max(1, round(crop * min(src_shape))) if crop else 0
                    if m and min(src_shape) <= 2 * m + 2:
                        continue
                    x = np.stack([_remade(pairs[q][first], m, (w, h)) for q in qs])
                    x = gaussian_filter(x, (0, PIXEL_BLUR, PIXEL_BLUR))[:, s:h - s, s:w - s]
                    x = x - x.mean(axis=(1, 2), keepdims=True)
                    gain = np.clip(np.einsum("nijhw,nhw->nij", win, x) / norm, *PIXEL_GAIN)
                    d = np.abs(x[:, None, None] - gain[..., None, None] * win).mean(axis=(3, 4)).min(axis=(1, 2))
                    out[qs] = np.minimum(out[qs], d)
    return out


def _remade(src: np.ndarray, m: int, size: tuple[int, int]) -> np.ndarray:
    """`src` with `m` px cropped a side, resized to `size` (w, h) by Pillow's bilinear filter."""
    im = Image.fromarray(src)
    if m:
        im = im.crop((m, m, src.shape[1] - m, src.shape[0] - m))
    if im.size != size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, np.float32)
