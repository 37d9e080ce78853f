"""Nearest neighbours in feature space, by cosine similarity: faiss when installed, NumPy otherwise.

Near copies, leaks and strays (headstart.inspection, and the check inside `train`) all ask one
question of the backbone's features: which images lie closest to this one. Features are L2-normalised
once, so an inner product is a cosine similarity.

Up to EXACT_UP_TO base images the search is exact (faiss's flat index, or NumPy matrix products in
blocks of BLOCK queries): FMNIST-TL's 20,000 x 1,280 features take a few seconds on 2 cores. Above
that, an inverted-file index (faiss IVF, NLIST_PER_ROOT x sqrt(n) lists, NPROBE of them searched)
keeps the search sub-quadratic, so 200,000 images take minutes, not hours; its results are the exact
similarities of the neighbours it finds, and a near copy, being very close, sits in the same list
as its original. Memory stays bounded either way: the queries go in blocks and only k neighbours
of each are kept.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("headstart")

EXACT_UP_TO = 60_000
BLOCK = 4096  # queries per search call
NLIST_PER_ROOT = 4
NPROBE = 24
TRAIN_PER_LIST = 40  # k-means training images per inverted list


def normalised(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 and contiguous (an all-zero row stays zero)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def nearest(base: np.ndarray, k: int, queries: np.ndarray | None = None, *, normalise: bool = True,
            exact_up_to: int = EXACT_UP_TO) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of `base` to each row of `queries` (default: to each row of `base`, itself left
    out): similarities (n_queries, k) float32, best first, and row indices into `base` (-1 where fewer
    than k exist)."""
    B = normalised(base) if normalise else np.ascontiguousarray(base, dtype=np.float32)
    own = queries is None
    Q = B if own else (normalised(queries) if normalise else np.ascontiguousarray(queries, dtype=np.float32))
    kk = min(k + (1 if own else 0), len(B))
    if kk == 0 or len(Q) == 0:
        return np.zeros((len(Q), k), np.float32), np.full((len(Q), k), -1, np.int64)
    search = _searcher(B, exact_up_to)
    sims = np.empty((len(Q), kk), np.float32)
    idx = np.empty((len(Q), kk), np.int64)
    for start in range(0, len(Q), BLOCK):
        s, i = search(Q[start:start + BLOCK], kk)
        sims[start:start + BLOCK], idx[start:start + BLOCK] = s, i
    if own:
        sims, idx = _without_self(sims, idx)
    return _padded(sims, idx, k)


def _searcher(B: np.ndarray, exact_up_to: int):
    """A function (queries, k) -> (similarities, indices) over `B`."""
    faiss = _faiss()
    if faiss is None:
        if len(B) > exact_up_to:
            log.warning("%d images: the exact NumPy search grows with the square of that; pip install faiss-cpu "
                        "(headstart[inspect]) for an index that does not.", len(B))
        return lambda Q, k: _numpy_search(B, Q, k)
    d = B.shape[1]
    if len(B) <= exact_up_to:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(NLIST_PER_ROOT * np.sqrt(len(B)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = B[np.sort(rng.choice(len(B), size=min(len(B), nlist * TRAIN_PER_LIST), replace=False))]
        index.train(sample)
        index.nprobe = NPROBE
    index.add(B)
    return lambda Q, k: index.search(np.ascontiguousarray(Q), k)


def _numpy_search(B: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = Q @ B.T  # (block, n)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)


def _without_self(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's own index taken out (it need not come first: an exact copy ties with it); where it was not
    found, the last neighbour is dropped instead."""
    n, kk = idx.shape
    mine = idx == np.arange(n)[:, None]
    drop = np.where(mine.any(axis=1), mine.argmax(axis=1), kk - 1)
    keep = np.ones_like(mine)
    keep[np.arange(n), drop] = False
    return sims[keep].reshape(n, kk - 1), idx[keep].reshape(n, kk - 1)


def _padded(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if sims.shape[1] >= k:
        return sims[:, :k], idx[:, :k]
    pad = k - sims.shape[1]
    return (np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
            np.pad(idx, ((0, 0), (0, pad)), constant_values=-1))
