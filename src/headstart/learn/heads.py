"""Classification heads trained on cached features, as scikit-learn estimators.

They inherit `BaseEstimator` and `ClassifierMixin` and pass `check_estimator`, so `clone`,
`cross_val_score`, `Pipeline` and `GridSearchCV` take them. `__init__` only stores settings;
`fit(X, y, X_val, y_val)` chooses what needs choosing (C, or the epoch count) on the
validation set, then refits on train + validation and returns self. Without validation data
(as inside `cross_val_score`), the head holds out its own stratified `validation_fraction`
of X for that choice and refits on all of X. Learned state ends in `_`; the columns of
`predict_proba` follow `classes_`. Fitting draws only from local generators seeded by
`random_state`: the global torch and NumPy random states are left as they were.

With `cv=K` (what `headstart train` passes below `CV_BELOW` train + validation images, `cv_folds`),
the linear head chooses C by K-fold cross-validation on the training and validation images together
instead of on the one validation split: on 900 images a validation split of 90 ranks the Cs by a
handful of images (issue 32).

`to_torch()` hands the head to fine-tuning (and to the bundle) as an `nn.Module` whose
logits are `logits(X)`, the feature standardisation folded into its first layer.
`decision_function` follows scikit-learn: those logits, except for two classes, where it is
the margin of the second class over the first (n_samples,).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from headstart.learn.head_modules import MLP, head_module, softmax  # noqa: F401  (head_module, softmax: re-exported)
from headstart.learn.loop import EarlyStopping, History, run_epochs, snapshot_state

log = logging.getLogger(__name__)

DEFAULT_CS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# Where the C path may go past the grid when validation loss is still falling at an end of it:
# by factors of C_STEP up to C_MAX (down to C_MIN). On JPEG folders every run chose C=1, the
# top of DEFAULT_CS, with validation loss still falling (issue 10, item 9).
C_STEP, C_MIN, C_MAX = 3.0, 1e-6, 1e3
# Below CV_BELOW train + validation images `headstart train` chooses the linear head's C by CV_FOLDS-fold
# cross-validation on them (`cv_folds`); above, one validation split ranks the Cs well enough and K fits per C
# would cost K times the search.
CV_BELOW, CV_FOLDS = 3000, 5


# A feature's scale in the linear head's standardisation is at least this share of the median feature's (`_standardiser`).
SCALE_FLOOR = 0.3


def _standardiser(X) -> StandardScaler:
    """The linear head's standardisation: a StandardScaler whose scale is at least SCALE_FLOOR of the median
    feature's spread.

    Pooled ReLU features can be zero on all but a few images: EfficientNet-Lite0 on 8x8 digits had 250 of its
    1,280 features zero on over 99% of them. Divided by their own tiny spread (down to 3e-7), one held-out image
    stood 113,048 deviations out, its loss swamped the others', and validation chose C=1.4e-6 (test accuracy
    0.41) or, by cross-validation, C=1e-4 (0.82). Floored, such a feature counts as an ordinary one: over ten
    random 900-image fits of those features test accuracy went from 0.878 (0.41 at worst) to 0.939 (0.926 at
    worst). A floor of the whole median spread gave 0.941 there but shrank PCA components whose small variance
    carries class information (digits through PCA(32): 0.903 -> 0.898); at 0.3 they keep 0.903. Still a linear
    map: `to_torch` folds it into the first layer as before."""
    scaler = StandardScaler().fit(X)
    spread = np.sqrt(scaler.var_)
    if SCALE_FLOOR and (spread > 0).any():
        floor = SCALE_FLOOR * float(np.median(spread[spread > 0]))
        scaler.scale_ = np.sqrt(scaler.var_ + floor * floor)
    return scaler


def cv_folds(n_images: int) -> int | None:
    """The folds a linear head chooses its C by, for `n_images` train + validation images; None: the validation
    split alone."""
    return CV_FOLDS if n_images < CV_BELOW else None


def _fold_scaler(linear: nn.Linear, scaler: StandardScaler) -> None:
    """Make `linear(x)` equal `linear((x - mean) / scale)` so the module takes raw features."""
    with torch.no_grad():
        scale = torch.as_tensor(scaler.scale_, dtype=torch.float64)
        mean = torch.as_tensor(scaler.mean_, dtype=torch.float64)
        w = linear.weight.double() / scale
        b = linear.bias.double() - w @ mean
        linear.weight.copy_(w.float())
        linear.bias.copy_(b.float())


def class_weights(kind, yi: np.ndarray, n_classes: int, classes=None) -> torch.Tensor | None:
    """Per-class loss weights for label indices `yi`: None, inverse frequency for "balanced",
    or a dict {label: weight} over `classes` (the labels of the indices; absent labels weigh 1)."""
    if kind is None:
        return None
    if isinstance(kind, dict):
        labels = np.arange(n_classes) if classes is None else np.asarray(classes)
        w = np.array([float(kind.get(c.item() if hasattr(c, "item") else c, 1.0)) for c in labels])
        return torch.as_tensor(w, dtype=torch.float32)
    if kind != "balanced":
        raise ValueError(f"class_weight must be None, 'balanced' or a dict of label -> weight, not {kind!r}")
    w = compute_class_weight("balanced", classes=np.arange(n_classes), y=yi)
    return torch.as_tensor(w, dtype=torch.float32)


def _seed(random_state) -> int:
    """An int seed for local generators: the given int, one drawn from a given RandomState, or fresh entropy."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31))  # a new generator: the global state is untouched
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31))
    return int(random_state)


class _Head(ClassifierMixin, BaseEstimator):
    """What both heads share: input checks, label encoding, the validation hold-out, outputs."""

    classes_: np.ndarray

    def _check_fit_input(self, X, y, X_val, y_val):
        """Checked float32 X, label indices of y, and validation data: given, held out of X, or none.

        Returns (X_train, yi_train, X_val, yi_val, X_all, yi_all). With `X_val` given, X_all is
        X (refit adds the validation set); when held out, X_all is all of X. Validation images of
        a class unseen in training cannot be scored, so they are dropped.
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; the data has one class "
                             f"({self.classes_[0]!r}).")
        yi = np.searchsorted(self.classes_, y).astype(np.int64)
        X = np.asarray(X, np.float32)
        if X_val is not None and len(X_val):
            X_val = np.asarray(X_val, np.float32)
            if X_val.ndim != 2 or X_val.shape[1] != X.shape[1]:
                raise ValueError(f"X_val has shape {X_val.shape}; it needs {X.shape[1]} features per row, as X.")
            keep = np.isin(y_val, self.classes_)
            yv = np.searchsorted(self.classes_, np.asarray(y_val)[keep]).astype(np.int64)
            self.validation_ = "given"
            return X, yi, X_val[keep], yv, X, yi
        held = self._hold_out(X, yi)
        if held is None:
            self.validation_ = None
            return X, yi, None, None, X, yi
        self.validation_ = "held out"
        return (*held, X, yi)

    def _hold_out(self, X, yi):
        """A stratified `validation_fraction` of (X, yi), or None where too few images allow it."""
        n, k = len(yi), len(self.classes_)
        n_val = math.ceil(self.validation_fraction * n) if self.validation_fraction else 0
        if n_val < k or n - n_val < k or np.bincount(yi, minlength=k).min() < 2:
            return None  # stratifying needs one image of every class on each side
        tr, va = train_test_split(np.arange(n), test_size=n_val, stratify=yi, random_state=_seed(self.random_state))
        return X[tr], yi[tr], X[va], yi[va]

    def _weights(self, yi: np.ndarray) -> torch.Tensor | None:
        return class_weights(self.class_weight, yi, len(self.classes_), self.classes_)

    def _check_predict_input(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def logits(self, X) -> np.ndarray:
        """(n_samples, n_classes) logits, float64: what `to_torch()` computes, columns following `classes_`."""
        raise NotImplementedError

    def decision_function(self, X) -> np.ndarray:
        z = self.logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z  # scikit-learn's binary convention

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self.logits(X))

    def predict(self, X) -> np.ndarray:
        z = self.logits(X)  # first: it raises NotFittedError before `classes_` is looked up
        return self.classes_[np.argmax(z, axis=1)]


def fit_softmax_regression(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float,
                           class_weight: torch.Tensor | None = None, init=None, max_iter: int = 500,
                           tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multinomial logistic regression by full-batch L-BFGS: weight (k, d), bias (k,), iterations.

    Minimises mean cross-entropy + ||W||^2 / (2 C n), the objective of scikit-learn's
    LogisticRegression divided by n (same C), with an unpenalised bias. Done in torch
    because scikit-learn's lbfgs spends most of its time outside the matrix products
    here; torch's L-BFGS with a strong-Wolfe line search reaches the same optimum.
    """
    n, d = X.shape
    W = torch.zeros(n_classes, d) if init is None else init[0].clone()
    b = torch.zeros(n_classes) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * C * n)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(X @ W.T + b, y, weight=class_weight) + penalty * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach(), int(opt.state[W].get("n_iter", 0))


def _rescaled(W: torch.Tensor, b: torch.Tensor, old, new) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) on features standardised by scaler `old`, rewritten for scaler `new`: the same logits.

    The final fit (train + validation, its own scaler) starts from the chosen C's search solution,
    which is near its optimum: FMNIST-TL's final fit took 149 L-BFGS iterations from zeros. The
    problem is strictly convex, so the start changes only how soon the same optimum is reached."""
    ratio = torch.as_tensor(new.scale_ / old.scale_, dtype=torch.float32)  # (d,)
    shift = torch.as_tensor((new.mean_ - old.mean_) / old.scale_, dtype=torch.float32)  # (d,)
    return W * ratio, b + W @ shift


def _past_optimum(search: list[dict], patience: int = 2) -> bool:
    """Validation loss is unimodal along the C path: stop once it rose `patience` times past its minimum."""
    losses = [r["val_loss"] for r in search]
    best = int(np.argmin(losses))
    return len(losses) - 1 - best >= patience and all(b > a for a, b in zip(losses[best:], losses[best + 1:]))


@dataclass
class _Split:
    """One way to score a C: training rows standardised by their own scaler, and the rows that score it."""

    Xs: torch.Tensor  # (n_train, d) standardised
    y: torch.Tensor  # (n_train,) label indices
    Xv: torch.Tensor  # (n_val, d) standardised by the training rows' scaler
    yv: np.ndarray  # (n_val,) label indices
    weights: torch.Tensor | None  # per-class loss weights
    scaler: StandardScaler


class LinearHead(_Head):
    """Multinomial logistic regression on standardised features; C chosen on validation log-loss (that of one
    validation split, or with `cv=K` of K-fold cross-validation on the training and validation images)."""

    kind = "linear"

    def __init__(self, Cs=DEFAULT_CS, class_weight=None, max_iter: int = 500, tol: float = 1e-5,
                 refit: bool = True, validation_fraction: float = 0.1, cv: int | None = None, random_state=0):
        self.Cs = Cs
        self.class_weight = class_weight  # None, "balanced", or {label: weight}
        self.max_iter = max_iter
        self.tol = tol
        self.refit = refit  # False keeps given validation data unseen (fine-tuning validates on it next)
        self.validation_fraction = validation_fraction  # held out of X when fit gets no validation data
        self.cv = cv  # folds to choose C by, on X and the validation data together; None: the validation split
        self.random_state = random_state  # seeds the hold-out and the folds; the fit itself is deterministic

    def fit(self, X, y, X_val=None, y_val=None) -> "LinearHead":
        t0 = time.perf_counter()
        X, yi, Xv_raw, yv, X_all, yi_all = self._check_fit_input(X, y, X_val, y_val)
        self.search_: list[dict] = []
        self.search_edge_: str | None = None
        self.cv_folds_: int | None = None
        Cs = sorted(float(c) for c in np.atleast_1d(self.Cs))
        pooled = self._cv_pool(X, yi, Xv_raw, yv, X_all, yi_all) if len(Cs) > 1 else None
        init = None
        if pooled is not None:  # K folds of train + validation score each C
            X, yi, self.cv_folds_ = pooled
            self.validation_ = "cross-validation"
            solutions = self._search(self._folds(X, yi, self.cv_folds_), Cs)
        elif Xv_raw is not None and len(yv) and len(Cs) > 1:
            solutions = self._search([self._split(X, yi, Xv_raw, yv)], Cs)
            if self.validation_ == "held out":
                X, yi = X_all, yi_all  # the hold-out was part of the training data it was given
            elif self.refit:
                X, yi = np.concatenate([X, Xv_raw]), np.concatenate([yi, yv])
        else:
            solutions = None
            self.C_ = Cs[len(Cs) // 2]
            self.val_accuracy_ = None
            X, yi = X_all, yi_all
        if solutions is not None:
            # Lowest validation log-loss: accuracy on a few hundred images moves in steps of one image and
            # ranks Cs by chance (FMNIST-TL: 0.8738 vs 0.8728 picked C=0.001 over 0.003, whose loss was 0.358
            # against 0.389 and whose test accuracy was 0.5 points higher).
            best = min(self.search_, key=lambda r: (r["val_loss"], -r["val_accuracy"]))
            self.C_ = best["C"]
            self.val_accuracy_ = best["val_accuracy"]
            init = solutions[self.C_]
        k = len(self.classes_)
        self.scaler_ = _standardiser(X)
        # copy=False: float32 features come out of the scaler float32, and a second copy of the set is
        # pure cost (160,000 x 1,280 float32: 0.8 GB).
        Xs = torch.as_tensor(self.scaler_.transform(X).astype(np.float32, copy=False))
        if init is not None:  # the search's solutions at C_ (one per fold), rewritten for this scaler, averaged
            starts = [_rescaled(W, b, scaler, self.scaler_) for W, b, scaler in init]
            init = (torch.stack([W for W, _ in starts]).mean(0), torch.stack([b for _, b in starts]).mean(0))
        self.coef_, self.intercept_, n_iter = fit_softmax_regression(
            Xs, torch.as_tensor(yi), k, self.C_, self._weights(yi), init, self.max_iter, self.tol)
        self.n_iter_ = max(1, n_iter)
        self.fit_seconds_ = time.perf_counter() - t0
        # Without refit the validation split stays out for what follows (fine-tuning, auto's choice, which refits
        # on train + validation when it keeps this head): this fit is not the final one, and says so.
        log.info("linear head: C=%g chosen %s%s; %s in %.1fs", self.C_, self._chosen_by(len(X)),
                 f" (accuracy {self.val_accuracy_:.4f})" if self.val_accuracy_ is not None else "",
                 _fitted_on(len(X), self.validation_ == "given" and not self.refit), self.fit_seconds_)
        return self

    def _chosen_by(self, n: int) -> str:
        if self.cv_folds_:
            return f"by {self.cv_folds_}-fold cross-validation on {n} train + validation images"
        return f"on {self.validation_ or 'no'} validation"

    def _cv_pool(self, X, yi, Xv_raw, yv, X_all, yi_all) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(images, labels, folds) to cross-validate C on, or None for the validation split.

        With `cv` set, the pool is every image the final fit will see: train + given validation (with `refit`;
        without it the validation images stay unseen for what follows, so they choose C alone), or all of X.
        The folds are at most the smallest class's images, so every fold holds every class; under 2, none."""
        if not self.cv:
            return None
        if self.validation_ == "given":
            if not self.refit:
                return None
            X, yi = np.concatenate([X, Xv_raw]), np.concatenate([yi, yv])
        else:
            X, yi = X_all, yi_all
        folds = min(int(self.cv), int(np.bincount(yi, minlength=len(self.classes_)).min()))
        return (X, yi, folds) if folds >= 2 else None

    def _folds(self, X, yi, k: int) -> list[_Split]:
        """Stratified, shuffled by `random_state`: the same images and seed give the same folds."""
        splitter = StratifiedKFold(k, shuffle=True, random_state=_seed(self.random_state))
        return [self._split(X[tr], yi[tr], X[va], yi[va]) for tr, va in splitter.split(X, yi)]

    def _split(self, X, yi, Xv_raw, yv) -> _Split:
        scaler = _standardiser(X)
        return _Split(torch.as_tensor(scaler.transform(X).astype(np.float32, copy=False)), torch.as_tensor(yi),
                      torch.as_tensor(scaler.transform(Xv_raw).astype(np.float32, copy=False)), np.asarray(yv),
                      self._weights(yi), scaler)

    def _search(self, splits: list[_Split], Cs: list[float]) -> dict:
        """Fill `search_` along the C path: the grid from strong to weak regularisation, each fit
        warm-started from the last (in each split), stopped once past the optimum; past an end of the grid
        while validation loss still falls there, by factors of C_STEP up to C_MAX or down to C_MIN.
        A C's validation loss and accuracy are those of every split's held-out rows together.
        Returns {C: [(weight, bias, scaler) of each split]}, from which the final fit starts."""
        k = len(self.classes_)
        n_val = sum(len(s.yv) for s in splits)

        def try_c(C: float, starts):
            fitted, loss, weight, correct, iters = [], 0.0, 0.0, 0, 0
            for s, start in zip(splits, starts):
                # A looser tolerance while searching: it ranks the Cs the same and costs half.
                W, b, it = fit_softmax_regression(s.Xs, s.y, k, C, s.weights, start, self.max_iter, self.tol * 10)
                with torch.no_grad():
                    logits = s.Xv @ W.T + b
                    yv_t = torch.as_tensor(s.yv)
                    # Weighted as the training loss is: with class weights, the unweighted loss ranks Cs
                    # by the objective the weights were set to change. Splits add up as one weighted mean.
                    w = float(s.weights[yv_t].sum()) if s.weights is not None else float(len(s.yv))
                    loss += float(nn.functional.cross_entropy(logits, yv_t, weight=s.weights)) * w
                    weight += w
                    correct += int((logits.argmax(1).numpy() == s.yv).sum())
                fitted.append((W, b))
                iters += it
            self.search_.append({"C": C, "val_accuracy": correct / n_val, "val_loss": loss / weight,
                                 "iterations": iters})
            solutions[C] = [(W, b, s.scaler) for (W, b), s in zip(fitted, splits)]
            return fitted

        solutions: dict[float, list] = {}
        cold = [None] * len(splits)
        params = first = None
        for C in Cs:
            params = try_c(C, params or cold)
            first = first or params
            if _past_optimum(self.search_):
                break
        # Lowest at the weak end: continue upwards, the path already warm there.
        C = self.search_[-1]["C"]
        while self._best_at("top") and C * C_STEP <= C_MAX * (1 + 1e-9):
            C *= C_STEP
            params = try_c(C, params)
        # Lowest at the strong end: continue downwards, warm-started from the strongest fit so far.
        C, params = Cs[0], first
        while self._best_at("bottom") and C / C_STEP >= C_MIN * (1 - 1e-9):
            C /= C_STEP
            params = try_c(C, params)
        self.search_.sort(key=lambda r: r["C"])
        if self._best_at("top") and self.search_[-1]["C"] * C_STEP > C_MAX * (1 + 1e-9):
            self.search_edge_ = "upper"
        elif self._best_at("bottom") and self.search_[0]["C"] / C_STEP < C_MIN * (1 - 1e-9):
            self.search_edge_ = "lower"
        if self.search_edge_:
            end = self.search_[-1 if self.search_edge_ == "upper" else 0]["C"]
            log.warning("linear head: validation loss is lowest at C=%g, the %s end of the search (C from %g to "
                        "%g); the optimum may lie beyond it.", end, self.search_edge_, C_MIN, C_MAX)
        return solutions

    def _best_at(self, end: str) -> bool:
        """Whether the lowest validation loss so far is at the largest ("top") or smallest ("bottom") C tried."""
        best = min(self.search_, key=lambda r: (r["val_loss"], -r["val_accuracy"]))["C"]
        cs = [r["C"] for r in self.search_]
        return best == (max(cs) if end == "top" else min(cs))

    def logits(self, X) -> np.ndarray:
        X = self._check_predict_input(X)
        # float64 NumPy, not float32 torch: a row's result must not depend on the rows batched with it.
        Xs = (np.asarray(X, np.float64) - self.scaler_.mean_) / self.scaler_.scale_
        return Xs @ self.coef_.double().numpy().T + self.intercept_.double().numpy()

    def config(self) -> dict:
        return {"kind": self.kind, "C": self.C_, "Cs": [float(c) for c in np.atleast_1d(self.Cs)],
                "class_weight": self.class_weight, "cv_folds": self.cv_folds_, "search": self.search_,
                "search_edge": self.search_edge_}

    def to_torch(self) -> nn.Module:
        linear = nn.Linear(self.coef_.shape[1], self.coef_.shape[0])
        with torch.no_grad():
            linear.weight.copy_(self.coef_)
            linear.bias.copy_(self.intercept_)
        _fold_scaler(linear, self.scaler_)
        return nn.Sequential(linear)


def _fitted_on(n: int, validation_kept: bool) -> str:
    """The log's words for the fit a head ends with: "final fit" only where nothing fits the head again."""
    if validation_kept:  # phase 1 of fine-tuning, or auto before it decides: not the run's last word
        return f"fit, validation kept out, on {n} images"
    return f"final fit on {n} images"


class MLPHead(_Head):
    """Dense 256 ReLU, dropout, Dense N; Adam and cross-entropy, early stopping on validation loss."""

    kind = "mlp"

    def __init__(self, hidden: int = 256, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 128, max_epochs: int = 100, patience: int = 5, class_weight=None,
                 refit: bool = True, validation_fraction: float = 0.1, random_state=0):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight  # None, "balanced", or {label: weight}
        self.refit = refit  # False keeps given validation data unseen (fine-tuning validates on it next)
        self.validation_fraction = validation_fraction  # held out of X when fit gets no validation data
        self.random_state = random_state

    def _train(self, Xs: np.ndarray, yi: np.ndarray, epochs: int, seed: int, Xv=None, yv=None, callbacks=()):
        """Train a fresh MLP for up to `epochs`; with validation data, stop early and keep the best weights.

        Initial weights, dropout masks and batch order come from generators seeded by `seed`, never
        from the global one, which a fit leaves as it was.
        """
        init = torch.Generator().manual_seed(seed)  # weights, then dropout masks: the draws the global
        gen = torch.Generator().manual_seed(seed)  # generator made before, so the numbers did not change
        n_classes = len(self.classes_)
        with torch.device("meta"):  # built without storage: nn.Linear's own init would draw from the global generator
            net = MLP(Xs.shape[1], n_classes, self.hidden, self.dropout)
        net = net.to_empty(device="cpu")
        for layer in (net[0], net[3]):  # PyTorch's own nn.Linear init, drawn from `init`
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=init)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=init)
        loss_fn = nn.CrossEntropyLoss(weight=class_weights(self.class_weight, yi, n_classes, self.classes_))
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        X_t, y_t = torch.as_tensor(Xs), torch.as_tensor(yi)
        history = History(("epoch", "train_loss", "val_loss", "val_accuracy"))
        # Improvement means validation loss down by more than 1e-4; with no validation data, all epochs run.
        stopper = None if Xv is None else EarlyStopping("val_loss", "min", self.patience, snapshot_state(net),
                                                        min_delta=1e-4)

        def train_one_epoch(epoch: int) -> dict:
            t0 = time.perf_counter()
            net.train()
            order = torch.randperm(len(X_t), generator=gen)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(_forward_training(net, X_t[idx], init), y_t[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            logs = {"epoch": epoch, "train_loss": total / len(order), "lr": self.lr}
            if Xv is not None:
                net.eval()
                with torch.no_grad():
                    logits = net(torch.as_tensor(Xv))
                    # Weighted as the training loss is: unweighted, it stopped a {0: 1000, 1: 1e-4}-weighted
                    # fit (scikit-learn's check_class_weight_classifiers) after its first epoch.
                    logs["val_loss"] = float(loss_fn(logits, torch.as_tensor(yv)))
                    logs["val_accuracy"] = float((logits.argmax(1).numpy() == yv).mean())
            logs["seconds"] = round(time.perf_counter() - t0, 4)
            return logs

        run_epochs(range(1, epochs + 1), train_one_epoch, [history, stopper, *callbacks])
        best_epoch = epochs
        if stopper is not None and stopper.best_state is not None:
            net.load_state_dict(stopper.best_state)
            best_epoch = stopper.best_epoch
        history = history.history
        history["best_epoch"] = best_epoch
        return net.eval(), history

    def fit(self, X, y, X_val=None, y_val=None, callbacks=()) -> "MLPHead":
        """`callbacks` (loop.py) see the epochs of the validated training, the one `history_` records."""
        t0 = time.perf_counter()
        X, yi, Xv, yv, X_all, yi_all = self._check_fit_input(X, y, X_val, y_val)
        seed = _seed(self.random_state)
        if Xv is not None and len(yv):
            scaler = StandardScaler().fit(X)
            _, self.history_ = self._train(scaler.transform(X).astype(np.float32, copy=False), yi, self.max_epochs,
                                           seed, scaler.transform(Xv).astype(np.float32, copy=False), yv, callbacks)
            self.best_epoch_ = int(self.history_["best_epoch"])
            self.val_accuracy_ = float(self.history_["val_accuracy"][self.best_epoch_ - 1])
            if self.validation_ == "held out":
                X, yi = X_all, yi_all  # the hold-out was part of the training data it was given
            elif self.refit:
                X, yi = np.concatenate([X, Xv]), np.concatenate([yi, yv])
        else:
            self.history_, self.best_epoch_, self.val_accuracy_ = None, min(self.max_epochs, 20), None
            X, yi = X_all, yi_all
        # Refit for the epoch count validation chose.
        self.scaler_ = StandardScaler().fit(X)
        self.net_, _ = self._train(self.scaler_.transform(X).astype(np.float32, copy=False), yi, self.best_epoch_,
                                   seed)
        self.fit_seconds_ = time.perf_counter() - t0
        log.info("mlp head: %d epochs chosen on %s validation%s; %s in %.1fs", self.best_epoch_,
                 self.validation_ or "no", f" (accuracy {self.val_accuracy_:.4f})" if self.val_accuracy_ is not None
                 else "", _fitted_on(len(X), self.validation_ == "given" and not self.refit), self.fit_seconds_)
        return self

    def logits(self, X) -> np.ndarray:
        X = self._check_predict_input(X)
        # float64 NumPy, not float32 torch: a row's result must not depend on the rows batched with it.
        w1, b1, w2, b2 = (p.detach().double().numpy() for p in (self.net_[0].weight, self.net_[0].bias,
                                                               self.net_[3].weight, self.net_[3].bias))
        Xs = (np.asarray(X, np.float64) - self.scaler_.mean_) / self.scaler_.scale_
        return np.maximum(Xs @ w1.T + b1, 0.0) @ w2.T + b2

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden, "dropout": self.dropout, "lr": self.lr,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size, "epochs": self.best_epoch_,
                "patience": self.patience, "class_weight": self.class_weight}

    def to_torch(self) -> nn.Module:
        net = copy.deepcopy(self.net_)
        _fold_scaler(net[0], self.scaler_)
        return net.eval()


def _forward_training(net: MLP, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`net(x)` in training mode, with dropout masks drawn from `gen` instead of the global generator."""
    h = net[1](net[0](x))
    p = net[2].p
    if p > 0:
        h = h * torch.empty_like(h).bernoulli_(1 - p, generator=gen) / (1 - p)
    return net[3](h)


HEADS = {"linear": LinearHead, "mlp": MLPHead}


def cross_validate(head: _Head, X: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> dict:
    """Stratified K-fold accuracy of (a fresh clone of) `head` on features X: mean, spread, each fold.

    Each fold's head gets no validation data and holds out its own `validation_fraction` of the
    other folds for its choices: a few hundred images give one test split a wide error bar, K folds
    use every image once for testing.
    """
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from headstart.errors import HeadstartError

    if not 2 <= k <= len(y):
        raise HeadstartError(f"--cv {k}: K-fold cross-validation needs 2 <= K <= the number of train + validation "
                             f"images ({len(y)}); pass a K in that range.")
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    if k > smallest:
        log.warning("--cv %d: the smallest class has %d train + validation images, so some folds test none of "
                    "it; a K of at most %d keeps every class in every fold.", k, smallest, smallest)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_in_this_thread():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)  # logged above
        # One fold after another: cross_val_score's n_jobs would fight the heads' own torch threads.
        folds = cross_val_score(clone(head).set_params(refit=True), X, y,
                                cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return {"k": k, "accuracy_mean": float(folds.mean()), "accuracy_std": float(folds.std()),
            "folds": [float(f) for f in folds], "n_images": int(len(y)), "seconds": round(time.perf_counter() - t0, 2)}


@contextlib.contextmanager
def _quiet_in_this_thread():
    """The fold heads' own INFO lines left out (their "final fit" would read as the run's), in this thread only:
    a run training in another thread of the process keeps its lines."""
    me = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.thread != me

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def make_head(kind: str, *, class_weight=None, seed: int = 0, **kwargs) -> _Head:
    if kind not in HEADS:
        from headstart.errors import HeadstartError

        raise HeadstartError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[kind](class_weight=class_weight, random_state=seed, **kwargs)
