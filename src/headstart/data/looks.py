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
ZOOM (a copy may be cropped). Its `spectrum`, the log magnitudes of the lowest spatial frequencies,
does not change when the picture moves, is resized or re-encoded, and `spectrum_similarity` compares
two files by it. Features say "the same kind of thing": on FMNIST-TL a planted copy was the nearest
neighbour of its original in feature space 33 times in 60, in spectrum 45 times (docs/inspect.md).
Normalised cross-correlation of the pixels, best over shifts (band-passed or not), was measured as a
judge too and separated copies from lookalikes worse than the spectrum: not kept.
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
ZOOM = 0.88  # the fingerprint's cropped view keeps this share of each side
COPY_SIM = 0.975  # spectrum_similarity from which two files are the same picture (docs/inspect.md)
SPECTRUM = 8  # spatial frequencies of the copy descriptor, each way
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
    finger: np.ndarray  # (2, FINGER, FINGER) float32 grey: whole and cropped


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
    m = max(1, round((1 - ZOOM) / 2 * min(width, height)))
    crop = gray.crop((m, m, width - m, height - m)) if width > 2 * m and height > 2 * m else gray
    finger = np.stack([np.asarray(g.resize((FINGER, FINGER), Image.BILINEAR), dtype=np.float32) for g in (gray, crop)])
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


def unit_spectra(fingers: np.ndarray) -> np.ndarray:
    """(n, 2, m) unit-length spectra of fingerprints (n, 2, FINGER, FINGER), whole and cropped."""
    d = np.stack([spectrum(fingers[:, 0]), spectrum(fingers[:, 1])], axis=1)
    return (d / np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-12)).astype(np.float32)


def spectrum_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How alike pairs of pictures are, from their `unit_spectra` `a`, `b` (n, 2, m): the best cosine similarity,
    whole against whole, cropped against whole and whole against cropped (a copy may be cropped). In [-1, 1];
    COPY_SIM and above: the same picture."""
    return np.maximum.reduce([(a[:, 0] * b[:, 0]).sum(1), (a[:, 1] * b[:, 0]).sum(1), (a[:, 0] * b[:, 1]).sum(1)])


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
