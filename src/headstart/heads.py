"""Classification heads trained on cached features, as scikit-learn style estimators.

`__init__` stores settings; `fit(X, y, X_val, y_val)` chooses what needs choosing on the
validation set, then refits on train + validation and returns self; learned state ends
in `_`; the columns of `predict_proba` follow `classes_`. `to_torch()` hands the head to
fine-tuning (and to the bundle) as an `nn.Module` with the same logits, the feature
standardisation folded into its first layer.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_CS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fold_scaler(linear: nn.Linear, scaler: StandardScaler) -> None:
    """Make `linear(x)` equal `linear((x - mean) / scale)` so the module takes raw features."""
    with torch.no_grad():
        scale = torch.as_tensor(scaler.scale_, dtype=torch.float64)
        mean = torch.as_tensor(scaler.mean_, dtype=torch.float64)
        w = linear.weight.double() / scale
        b = linear.bias.double() - w @ mean
        linear.weight.copy_(w.float())
        linear.bias.copy_(b.float())


class _Head:
    classes_: np.ndarray

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == y))


class LinearHead(_Head):
    """Multinomial logistic regression on standardised features; C chosen on validation."""

    kind = "linear"

    def __init__(self, Cs=DEFAULT_CS, class_weight: str | None = None, max_iter: int = 300, tol: float = 1e-4,
                 random_state: int = 0):
        self.Cs = Cs
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _model(self, C: float) -> LogisticRegression:
        return LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol,
                                  random_state=self.random_state, warm_start=True)

    def fit(self, X, y, X_val=None, y_val=None) -> "LinearHead":
        X, y = np.asarray(X, np.float32), np.asarray(y)
        t0 = time.perf_counter()
        self.search_: list[dict] = []
        Cs = sorted(self.Cs)
        if X_val is not None and len(X_val) and len(Cs) > 1:
            scaler = StandardScaler().fit(X)
            Xs, Xv = scaler.transform(X), scaler.transform(np.asarray(X_val, np.float32))
            model = self._model(Cs[0])
            for C in Cs:  # strong to weak regularisation, each fit warm-started from the last
                model.set_params(C=C)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.fit(Xs, y)
                proba = model.predict_proba(Xv)
                acc = float(np.mean(model.classes_[proba.argmax(1)] == y_val))
                loss = float(log_loss(y_val, proba, labels=model.classes_))
                self.search_.append({"C": C, "val_accuracy": acc, "val_loss": loss})
            # Best validation accuracy; among ties, the lower validation loss.
            best = max(self.search_, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
            self.C_ = best["C"]
            self.val_accuracy_ = best["val_accuracy"]
            X = np.concatenate([X, np.asarray(X_val, np.float32)])
            y = np.concatenate([y, np.asarray(y_val)])
        else:
            self.C_ = Cs[len(Cs) // 2] if len(Cs) > 1 else Cs[0]
            self.val_accuracy_ = None
        self.scaler_ = StandardScaler().fit(X)
        self.model_ = self._model(self.C_)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_.fit(self.scaler_.transform(X), y)
        self.classes_ = self.model_.classes_
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        log.info("linear head: C=%g chosen on validation%s; refit on %d images in %.1fs", self.C_,
                 f" (accuracy {self.val_accuracy_:.4f})" if self.val_accuracy_ is not None else "", len(X),
                 self.fit_seconds_)
        return self

    def decision_function(self, X) -> np.ndarray:
        z = self.model_.decision_function(self.scaler_.transform(np.asarray(X, np.float32)))
        if z.ndim == 1:  # scikit-learn gives one column for two classes
            z = np.stack([-z / 2, z / 2], axis=1)
        return z

    def predict_proba(self, X) -> np.ndarray:
        return self.model_.predict_proba(self.scaler_.transform(np.asarray(X, np.float32)))

    def config(self) -> dict:
        return {"kind": self.kind, "C": self.C_, "Cs": list(self.Cs), "class_weight": self.class_weight,
                "search": self.search_}

    def to_torch(self) -> nn.Module:
        coef, intercept = self.model_.coef_, self.model_.intercept_
        if coef.shape[0] == 1:  # binary: logits (-z/2, z/2) give the same softmax as sigmoid(z)
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(coef))
            linear.bias.copy_(torch.as_tensor(intercept))
        _fold_scaler(linear, self.scaler_)
        return nn.Sequential(linear)


class MLP(nn.Sequential):
    """The textbook head: Dense(hidden, ReLU) -> Dropout -> Dense(n_classes)."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


class MLPHead(_Head):
    """Dense 256 ReLU, dropout, Dense N; Adam and cross-entropy, early stopping on validation loss."""

    kind = "mlp"

    def __init__(self, hidden: int = 256, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 128, max_epochs: int = 100, patience: int = 5, class_weight: str | None = None,
                 random_state: int = 0):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def _train(self, Xs: np.ndarray, yi: np.ndarray, epochs: int, Xv=None, yv=None):
        """Train a fresh MLP for up to `epochs`; with validation data, stop early and keep the best weights."""
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        n_classes = len(self.classes_)
        net = MLP(Xs.shape[1], n_classes, self.hidden, self.dropout)
        weight = None
        if self.class_weight == "balanced":
            w = compute_class_weight("balanced", classes=np.arange(n_classes), y=yi)
            weight = torch.as_tensor(w, dtype=torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        X_t, y_t = torch.as_tensor(Xs), torch.as_tensor(yi)
        history = {"epoch": [], "train_loss": [], "val_loss": [], "val_accuracy": []}
        best_state, best_loss, best_epoch, bad = None, float("inf"), epochs, 0
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(len(X_t), generator=gen)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(X_t[idx]), y_t[idx])
                loss.backward()
                opt.step()
                total += float(loss) * len(idx)
            history["epoch"].append(epoch)
            history["train_loss"].append(total / len(order))
            if Xv is None:
                continue
            net.eval()
            with torch.no_grad():
                logits = net(torch.as_tensor(Xv))
                vloss = float(nn.functional.cross_entropy(logits, torch.as_tensor(yv)))
                vacc = float((logits.argmax(1).numpy() == yv).mean())
            history["val_loss"].append(vloss)
            history["val_accuracy"].append(vacc)
            if vloss < best_loss - 1e-4:
                best_loss, best_epoch, bad = vloss, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        history["best_epoch"] = best_epoch
        return net.eval(), history

    def fit(self, X, y, X_val=None, y_val=None) -> "MLPHead":
        t0 = time.perf_counter()
        X, y = np.asarray(X, np.float32), np.asarray(y)
        self.classes_ = np.unique(y)
        to_index = {c: i for i, c in enumerate(self.classes_)}
        yi = np.array([to_index[c] for c in y], dtype=np.int64)
        if X_val is not None and len(X_val):
            X_val = np.asarray(X_val, np.float32)
            keep = np.isin(y_val, self.classes_)  # validation images of classes unseen in training can't be scored
            yv = np.array([to_index[c] for c in np.asarray(y_val)[keep]], dtype=np.int64)
            scaler = StandardScaler().fit(X)
            _, self.history_ = self._train(scaler.transform(X).astype(np.float32), yi, self.max_epochs,
                                           scaler.transform(X_val[keep]).astype(np.float32), yv)
            self.best_epoch_ = int(self.history_["best_epoch"])
            best = self.history_["val_accuracy"][self.best_epoch_ - 1]
            self.val_accuracy_ = float(best)
            X = np.concatenate([X, X_val[keep]])
            yi = np.concatenate([yi, yv])
        else:
            self.history_, self.best_epoch_, self.val_accuracy_ = None, min(self.max_epochs, 20), None
        # Refit on train + validation for the epoch count validation chose.
        self.scaler_ = StandardScaler().fit(X)
        self.net_, _ = self._train(self.scaler_.transform(X).astype(np.float32), yi, self.best_epoch_)
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        log.info("mlp head: %d epochs chosen on validation%s; refit on %d images in %.1fs", self.best_epoch_,
                 f" (accuracy {self.val_accuracy_:.4f})" if self.val_accuracy_ is not None else "", len(X),
                 self.fit_seconds_)
        return self

    def decision_function(self, X) -> np.ndarray:
        Xs = self.scaler_.transform(np.asarray(X, np.float32)).astype(np.float32)
        with torch.no_grad():
            return self.net_(torch.as_tensor(Xs)).double().numpy()

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden, "dropout": self.dropout, "lr": self.lr,
                "weight_decay": self.weight_decay, "batch_size": self.batch_size, "epochs": self.best_epoch_,
                "patience": self.patience, "class_weight": self.class_weight}

    def to_torch(self) -> nn.Module:
        net = copy.deepcopy(self.net_)
        _fold_scaler(net[0], self.scaler_)
        return net.eval()


HEADS = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, *, class_weight: str | None = None, seed: int = 0, **kwargs) -> _Head:
    if kind not in HEADS:
        from .errors import HeadstartError

        raise HeadstartError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[kind](class_weight=class_weight, random_state=seed, **kwargs)


def head_module(config: dict, in_features: int, n_classes: int) -> nn.Module:
    """An empty torch module of a saved head's shape, for loading its tensors from a bundle."""
    if config["kind"] == "linear":
        return nn.Sequential(nn.Linear(in_features, n_classes))
    if config["kind"] == "mlp":
        return MLP(in_features, n_classes, int(config["hidden"]), float(config["dropout"])).eval()
    raise ValueError(f"unknown head kind {config['kind']!r}")
