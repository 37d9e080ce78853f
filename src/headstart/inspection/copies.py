"""Near copies: the same picture twice (re-saved, resized, shifted, slightly cropped), within a split or across
splits; a validation or test image with a near copy in train is a leak.

Two searches propose pairs, each image's NEIGHBOURS nearest (learn/neighbours.py: faiss, sub-quadratic at
scale): in the backbone's feature space, and in a shift-invariant pixel descriptor (data/looks.spectrum,
of the whole picture and of its cropped views). Features alone were not enough (docs/inspect.md): on
FMNIST-TL a planted copy was its original's nearest neighbour in feature space 33 times in 60 and 18
times not among the 20 nearest, since a thousand trousers all look alike to an ImageNet network; the
descriptor found 45 of them first, and most of the rest are the cropped ones its cropped views find.
Each proposed pair was then judged by the similarity of their spectra alone (COPY_SIM: on the 20,120 images
of FMNIST-TL with 60 planted copies, 52 found and 25 wrong pairs among 87; lower thresholds found more and
hundreds of wrong ones: Fashion-MNIST is full of garments photographed alike). Now a file keeps one partner,
its most similar one, and only when it is that file's most similar too (`mutual_best`); such a pair that
reaches PROPOSE_SIM is a copy when its pixels agree once one file is remade as a copy of the other
(data/looks.pixel_difference, PIXEL_MAX). Measured on FMNIST-TL (docs/guides/inspect.md): the mutual rule
alone changed little (52 found, 24 wrong among 81); with the pixel check, 60 of 60 found and 3 wrong pairs
among 68 (58 of 60 and 3 of 67 on a second draw with other transforms).

Rows: a leak's `path` is the validation or test image and its `partner` the train image it copies;
a near duplicate's `path` is the later file of the pair (train before val before test, then by
name), so leaving out every `path` (`train --exclude`) keeps one file of each group.
"""

from __future__ import annotations

import logging
import time

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from headstart.data.images import ImageError
from headstart.data.looks import (COPY_SIM, PIXEL_MAX, THREADS, pixel_differences, pixels, spectrum_similarity,
                                  unit_spectra)
from headstart.learn.neighbours import nearest

log = logging.getLogger("headstart")

NEIGHBOURS = 5
PAIRS_CHUNK = 65_536  # candidate pairs compared at a time (pair_similarities)
PROPOSE_SIM = 0.92  # spectrum similarity from which mutual best partners are checked on their pixels

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def candidate_pairs(X: np.ndarray, spectra: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(m, 2) index pairs (i < j) that either search puts among each other's `k` nearest."""
    whole = spectra[:, 0]
    found = [nearest(X, k)[1], nearest(whole, k, normalise=False)[1]]
    found += [nearest(whole, k, spectra[:, v], normalise=False)[1] for v in range(1, spectra.shape[1])]
    n = len(X)
    a = np.concatenate([np.repeat(np.arange(n), nb.shape[1]) for nb in found])
    b = np.concatenate([nb.ravel() for nb in found])
    ok = (b >= 0) & (a != b)
    pairs = np.stack([np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def pair_similarities(spectra: np.ndarray, pairs: np.ndarray, chunk: int = PAIRS_CHUNK) -> np.ndarray:
    """`spectrum_similarity` of each pair (m, 2) of rows of `spectra` (n, v, m'), `chunk` pairs at a time: both
    sides of every candidate pair gathered at once held 2 x pairs x views x 120 floats, 2.4 GB for the 820,000
    pairs of 50,000 images (benchmarks/inspect_scale.py), 9.5 GB at 200,000."""
    out = np.zeros(len(pairs), np.float32)
    for a in range(0, len(pairs), chunk):
        p = pairs[a:a + chunk]
        out[a:a + chunk] = spectrum_similarity(spectra[p[:, 0]], spectra[p[:, 1]])
    return out


def mutual_best(pairs: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Which of `pairs` (m, 2) are mutual best partners: each file's most similar partner among the pairs
    (`sims`) is the other file, so a file is kept in one pair at most."""
    if not len(pairs):
        return np.zeros(0, bool)
    a, b = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((-np.concatenate([sims, sims]), a))
    first = np.r_[True, a[order][1:] != a[order][:-1]]
    best = np.full(int(pairs.max()) + 1, -1)
    best[a[order][first]] = b[order][first]
    return (best[pairs[:, 0]] == pairs[:, 1]) & (best[pairs[:, 1]] == pairs[:, 0])


def near_copies(X: np.ndarray, fingers: np.ndarray, splits: list[str], names: list[str],
                paths: list[str] | None = None) -> dict:
    """Pairs of near copies among images with features `X` (n, d: the principal components the label check
    uses, a fifth of the search's cost on MobileNetV2's 1,280) and fingerprints (n, v, F, F) (Look.finger).
    A pair of mutual best partners (`mutual_best`) that reaches PROPOSE_SIM is a copy when the files at
    `paths` differ by at most PIXEL_MAX (data/looks.pixel_difference); without `paths`, when it reaches COPY_SIM.

    Returns {"rows": [(path index, partner index, kind, similarity)], "info": {...}}; `names` orders a pair."""
    t0 = time.perf_counter()
    spectra = unit_spectra(fingers)
    pairs = candidate_pairs(X, spectra)
    sims = pair_similarities(spectra, pairs)
    keep = mutual_best(pairs, sims) & (sims >= (PROPOSE_SIM if paths is not None else COPY_SIM))
    proposed = int(keep.sum())
    if paths is not None and proposed:
        files = sorted(set(pairs[keep].ravel().tolist()))
        with ThreadPoolExecutor(THREADS) as pool:
            grey = dict(zip(files, pool.map(_pixels_or_none, [paths[i] for i in files])))
        qs = [q for q in np.flatnonzero(keep) if all(grey[int(f)] is not None for f in pairs[q])]
        keep[:] = False
        diff = pixel_differences([(grey[int(pairs[q, 0])], grey[int(pairs[q, 1])]) for q in qs])
        keep[np.asarray(qs, int)[diff <= PIXEL_MAX]] = True
    rows = []
    for (i, j), s in zip(pairs[keep], sims[keep]):
        first, later = sorted((int(i), int(j)), key=lambda m: (SPLIT_ORDER.get(splits[m], 3), names[m]))
        kind = "leak" if splits[first] == "train" and splits[later] != "train" else "near-duplicate"
        rows.append((later, first, kind, float(s)))
    rows.sort(key=lambda r: (-r[3], names[r[0]]))
    info = {"candidate_pairs": int(len(pairs)), "mutual_pairs_checked": proposed,
            "threshold": PROPOSE_SIM if paths is not None else COPY_SIM,
            "pixel_max": PIXEL_MAX if paths is not None else None, "neighbours": NEIGHBOURS,
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("near copies: %d candidate pairs, %d mutual best pairs checked on their pixels, %d leaks and %d near "
             "duplicates in %.1fs", len(pairs), proposed, sum(r[2] == "leak" for r in rows),
             sum(r[2] == "near-duplicate" for r in rows), info["seconds"])
    return {"rows": rows, "info": info}


def _pixels_or_none(path: str) -> np.ndarray | None:
    try:
        return pixels(path)
    except (ImageError, OSError):
        return None
