"""Label issues: out-of-fold probabilities of the linear head, judged by cleanlab.

Every readable image (all splits: a wrong test label misreports every score) gets class probabilities
from a linear head (learn/heads.py) that never saw it: stratified K-fold, each fold's head fitted on
the other folds. In-sample probabilities would vouch for the very labels they learnt. The head's C is
chosen once, on the first fold's own validation hold-out, and kept for the other folds.

The features are first reduced to DIMS principal components: on FMNIST-TL with 5% of the training
labels moved (docs/inspect.md), 5 folds on the 1,280 MobileNetV2 features took minutes on 2 cores
beside other work, on 256 components seconds, and flagged as well.

cleanlab's `find_label_issues` (filter_by="low_self_confidence": its confident-learning count of
label errors per class, taken from the lowest probabilities of the given label) proposes the files;
of those, a file is flagged when the out-of-fold probability of its given label is also under
MAX_GIVEN: a label moved to an unrelated class leaves it near 0, while FMNIST's shirts and T-shirts,
which no label fixes, keep some. Measured (docs/inspect.md): the default filter flagged 1,088 files of
FMNIST-TL, recall 0.95 and precision 0.43 of the moved ones; with MAX_GIVEN, see the numbers there.

A class with fewer images than folds cannot be in every fold: its images are left out of this check,
with a note saying so, and the check is skipped when fewer than two classes remain.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from headstart.errors import HeadstartError
from headstart.learn.heads import LinearHead

log = logging.getLogger("headstart")

DIMS = 256
MAX_GIVEN = 0.07
FILTER = "low_self_confidence"


def principal_axes(X: np.ndarray, dims: int = DIMS) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean (d,), axes (d, dims)) of `X`'s first `dims` principal components; None when X has no more than
    `dims` columns or rows (it is then used as it is).

    From the eigenvectors of the features' covariance (d x d): for FMNIST-TL's 20,120 x 1,280 features one
    matrix product and one symmetric eigendecomposition, where scikit-learn's randomized PCA took 21-63 s
    on the loaded machine."""
    if X.shape[1] <= dims or len(X) <= dims:
        return None
    X = np.asarray(X, np.float32)
    mean = X.mean(axis=0)
    centred = X - mean
    cov = (centred.T @ centred).astype(np.float64) / len(X)
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    return mean, vectors[:, ::-1][:, :dims].astype(np.float32)


def project(X: np.ndarray, axes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """`X` on `axes` (principal_axes'), float32: (X - mean) @ axes; X itself when there are none."""
    if axes is None:
        return np.asarray(X, np.float32)
    mean, top = axes
    return (np.asarray(X, np.float32) - mean) @ top


def reduced(X: np.ndarray, dims: int = DIMS) -> np.ndarray:
    """`X` on its first `dims` principal components (all of X when it has no more), float32."""
    return project(X, principal_axes(X, dims))


def out_of_fold(Z: np.ndarray, y: np.ndarray, n_classes: int, folds: int,
                seed: int = 0) -> tuple[np.ndarray, dict, list[tuple], np.ndarray]:
    """(n, n_classes) probabilities of each row from a linear head fitted on the other folds; how; each fold's
    head as (weight (k, d), bias (k,), its k classes), its feature scaler folded in (learn/heads.py); and the
    fold that held each row out."""
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    proba = np.zeros((len(y), n_classes))
    fold = np.full(len(y), -1, np.int64)
    heads = []
    C = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for j, (train, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y)):
            head = LinearHead(**({"Cs": (C,)} if C is not None else {}), random_state=seed).fit(Z[train], y[train])
            C = head.C_
            proba[np.ix_(held, head.classes_)] = head.predict_proba(Z[held])
            linear = head.to_torch()[0]
            heads.append((linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy(),
                          np.asarray(head.classes_)))
            fold[held] = j
    return proba, {"folds": folds, "C": C, "seconds": round(time.perf_counter() - t0, 2)}, heads, fold


def label_issues(Z: np.ndarray, y: np.ndarray, classes: list[str], folds: int = 5, seed: int = 0) -> dict:
    """The label check on (reduced) features `Z` (n, d) with given labels `y` (indices into `classes`).

    Returns {"flagged": indices into X, "score": 1 - cleanlab's label quality of each (higher: surer),
    "suggested": the likeliest class of each, "proba": out-of-fold probabilities of every image (rows of
    the images left out are NaN), "heads": each fold's linear head on Z as (weight (k, d), bias (k,), its k
    classes as indices into `classes`), "fold": the fold whose head judged each image (-1: not checked),
    "notes": [...], "info": {...}}."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise HeadstartError("the label check needs cleanlab: pip install 'headstart[inspect]' (or cleanlab).") \
            from None
    notes = []
    counts = np.bincount(y, minlength=len(classes))
    small = [c for c, n in zip(classes, counts) if 0 < n < folds]
    if small:
        notes.append(f"classes {', '.join(small)} have fewer images than the {folds} folds need; their labels are not "
                     f"checked (pass --folds {max(2, int(counts[counts > 0].min()))} to check them, with less data per "
                     "fold)")
    kept_classes = np.flatnonzero(counts >= folds)
    rows = np.flatnonzero(np.isin(y, kept_classes))
    proba_all = np.full((len(y), len(classes)), np.nan)
    fold_all = np.full(len(y), -1, np.int64)
    empty = {"flagged": np.zeros(0, np.int64), "score": np.zeros(0), "suggested": np.zeros(0, np.int64),
             "proba": proba_all, "heads": [], "fold": fold_all, "notes": notes, "info": {"checked": 0}}
    if len(kept_classes) < 2:
        notes.append(f"the label check needs two classes of at least {folds} images; it was skipped")
        return empty
    index = np.full(len(classes), -1)
    index[kept_classes] = np.arange(len(kept_classes))
    yk = index[y[rows]]
    t0 = time.perf_counter()
    proba, info, heads, fold = out_of_fold(Z[rows], yk, len(kept_classes), folds, seed)
    fold_all[rows] = fold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab's notes on tiny classes: the notes above say it
        proposed = find_label_issues(yk, proba, filter_by=FILTER)
        quality = get_label_quality_scores(yk, proba)
    given = proba[np.arange(len(yk)), yk]
    hit = np.flatnonzero(proposed & (given < MAX_GIVEN))
    proba_all[np.ix_(rows, kept_classes)] = proba
    info.update(checked=int(len(rows)), proposed_by_cleanlab=int(proposed.sum()), max_given=MAX_GIVEN,
                filter_by=FILTER, dims=int(Z.shape[1]), seconds=round(time.perf_counter() - t0, 2))
    log.info("labels: %d of %d files flagged (%d proposed by cleanlab) from %d-fold probabilities in %.1fs",
             len(hit), len(rows), int(proposed.sum()), folds, info["seconds"])
    return {"flagged": rows[hit], "score": 1.0 - quality[hit], "suggested": kept_classes[proba[hit].argmax(axis=1)],
            "proba": proba_all, "heads": [(w, b, kept_classes[k]) for w, b, k in heads], "fold": fold_all,
            "notes": notes, "info": info}
