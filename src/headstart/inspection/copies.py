"""Near copies: the same picture twice (re-saved, resized, shifted, slightly cropped), within a split or across
splits; a validation or test image with a near copy in train is a leak.

Two searches propose pairs, each image's NEIGHBOURS nearest (learn/neighbours.py: faiss, sub-quadratic at
scale): in the backbone's feature space, and in a shift-invariant pixel descriptor (data/looks.spectrum,
of the whole picture and of its cropped view). Features alone were not enough (docs/inspect.md): on
FMNIST-TL a planted copy was its original's nearest neighbour in feature space 33 times in 60 and 18
times not among the 20 nearest, since a thousand trousers all look alike to an ImageNet network; the
descriptor found 45 of them first, and most of the rest are the cropped ones its cropped view finds.
Each proposed pair is then judged as pictures by the similarity of their spectra (data/looks.py), whole
and cropped: a pair is a copy when it reaches COPY_SIM. On the 20,120 images of FMNIST-TL with 60
planted copies, among the candidate pairs 0.975 kept 52 of them and 36 other pairs, most of them
different garments photographed alike (FMNIST is full of lookalikes); 0.97 kept 53 and 86 others, 0.96
57 and 516 (docs/inspect.md). Requiring a feature similarity as well only lost copies.

Rows: a leak's `path` is the validation or test image and its `partner` the train image it copies;
a near duplicate's `path` is the later file of the pair (train before val before test, then by
name), so leaving out every `path` (`train --exclude`) keeps one file of each group.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from headstart.data.looks import COPY_SIM, spectrum_similarity, unit_spectra
from headstart.learn.neighbours import nearest

log = logging.getLogger("headstart")

NEIGHBOURS = 5

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def candidate_pairs(X: np.ndarray, spectra: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """(m, 2) index pairs (i < j) that either search puts among each other's `k` nearest."""
    whole, cropped = spectra[:, 0], spectra[:, 1]
    found = [nearest(X, k)[1], nearest(whole, k, normalise=False)[1], nearest(whole, k, cropped, normalise=False)[1]]
    n = len(X)
    a = np.concatenate([np.repeat(np.arange(n), nb.shape[1]) for nb in found])
    b = np.concatenate([nb.ravel() for nb in found])
    ok = (b >= 0) & (a != b)
    pairs = np.stack([np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def near_copies(X: np.ndarray, fingers: np.ndarray, splits: list[str], names: list[str]) -> dict:
    """Pairs of near copies among images with features `X` (n, d: the principal components the label check
    uses, a fifth of the search's cost on MobileNetV2's 1,280) and fingerprints (n, 2, F, F) (Look.finger).

    Returns {"rows": [(path index, partner index, kind, similarity)], "info": {...}}; `names` orders a pair."""
    t0 = time.perf_counter()
    spectra = unit_spectra(fingers)
    pairs = candidate_pairs(X, spectra)
    sims = spectrum_similarity(spectra[pairs[:, 0]], spectra[pairs[:, 1]]) if len(pairs) else np.zeros(0, np.float32)
    best: dict[tuple[int, str], tuple[int, float]] = {}
    for (i, j), s in zip(pairs, sims):
        if s < COPY_SIM:
            continue
        first, later = sorted((int(i), int(j)), key=lambda m: (SPLIT_ORDER.get(splits[m], 3), names[m]))
        kind = "leak" if splits[first] == "train" and splits[later] != "train" else "near-duplicate"
        if best.get((later, kind), (None, -1.0))[1] < s:
            best[(later, kind)] = (first, float(s))
    rows = sorted(((p, q, kind, s) for (p, kind), (q, s) in best.items()), key=lambda r: (-r[3], names[r[0]]))
    info = {"candidate_pairs": int(len(pairs)), "threshold": COPY_SIM, "neighbours": NEIGHBOURS,
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("near copies: %d candidate pairs, %d leaks and %d near duplicates in %.1fs", len(pairs),
             sum(r[2] == "leak" for r in rows), sum(r[2] == "near-duplicate" for r in rows), info["seconds"])
    return {"rows": rows, "info": info}
