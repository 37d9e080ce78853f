"""Heads as estimators, on small seeded Gaussian blobs standing in for cached features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.errors import HeadstartError
from headstart.learn.heads import DEFAULT_CS, LinearHead, MLPHead, head_module, make_head

LABELS = np.array([2, 5, 7])  # non-contiguous on purpose: predictions must be these values, not 0..k-1
HEADS = [LinearHead, MLPHead]


def blobs(n: int, labels=LABELS, d: int = 32, spread: float = 1.0, seed: int = 0, weights=None):
    """`n` points in `d` dims around one centre per label; `seed` fixes the centres, `n`-draws use seed + 1."""
    centres = np.random.default_rng(seed).normal(0.0, 1.0, (len(labels), d)) * 1.5
    rng = np.random.default_rng([seed, n])
    idx = rng.choice(len(labels), size=n, p=weights)
    X = centres[idx] + rng.normal(0.0, spread, (n, d))
    return X.astype(np.float32), np.asarray(labels)[idx]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split_data():
    X, y = blobs(270)
    return (X[:150], y[:150]), (X[150:210], y[150:210]), (X[210:], y[210:])


def _fit(cls, split_data, **kwargs):
    (Xtr, ytr), (Xv, yv), _ = split_data
    return cls(**kwargs).fit(Xtr, ytr, Xv, yv)


@pytest.fixture(scope="module")
def fitted(split_data):
    return {cls: _fit(cls, split_data) for cls in HEADS}


@pytest.mark.parametrize("cls", HEADS)
def test_head_is_accurate_on_separable_data(cls, fitted, split_data):
    head = fitted[cls]
    _, _, (Xte, yte) = split_data
    assert head.score(Xte, yte) >= 0.95
    assert head.val_accuracy_ >= 0.9
    assert head.n_features_in_ == 32


@pytest.mark.parametrize("cls", HEADS)
def test_probabilities_follow_classes(cls, fitted, split_data):
    head = fitted[cls]
    _, _, (Xte, yte) = split_data
    assert head.classes_.tolist() == [2, 5, 7]
    proba = head.predict_proba(Xte)
    assert proba.shape == (60, 3)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (proba >= 0).all()
    pred = head.predict(Xte)
    assert set(pred.tolist()) <= {2, 5, 7}
    assert np.array_equal(pred, head.classes_[proba.argmax(axis=1)])
    for j, c in enumerate(head.classes_):  # column j is the probability of label classes_[j]
        assert proba[yte == c, j].mean() > 0.8


@pytest.mark.parametrize("cls", HEADS)
def test_to_torch_gives_the_same_logits(cls, fitted, split_data):
    head = fitted[cls]
    _, _, (Xte, _) = split_data
    module = head.to_torch()
    with torch.no_grad():
        logits = module(torch.as_tensor(Xte))  # raw features: the scaler is folded in
    expected = torch.as_tensor(head.decision_function(Xte), dtype=torch.float32)
    assert logits.shape == (60, 3)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert all(p.requires_grad for p in module.parameters())  # ready to fine-tune


def test_linear_head_binary_case_to_torch(split_data):
    X, y = blobs(200, labels=np.array([0, 9]), seed=3)
    head = LinearHead().fit(X[:120], y[:120], X[120:160], y[120:160])
    assert head.classes_.tolist() == [0, 9]
    with torch.no_grad():
        logits = head.to_torch()(torch.as_tensor(X[160:]))
    expected = torch.as_tensor(head.logits(X[160:]), dtype=torch.float32)
    assert logits.shape == (40, 2)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    # scikit-learn's binary convention: decision_function is the second class's margin over the first.
    margin = head.decision_function(X[160:])
    assert margin.shape == (40,) and np.allclose(margin, head.logits(X[160:]) @ [-1.0, 1.0])
    assert head.score(X[160:], y[160:]) >= 0.95


@pytest.mark.parametrize("cls", HEADS)
def test_same_seed_gives_identical_heads(cls, split_data):
    _, _, (Xte, _) = split_data
    a = _fit(cls, split_data, random_state=7)
    b = _fit(cls, split_data, random_state=7)
    assert np.array_equal(a.predict(Xte), b.predict(Xte))
    assert np.array_equal(a.decision_function(Xte), b.decision_function(Xte))
    sa, sb = a.to_torch().state_dict(), b.to_torch().state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlp_seed_matters(split_data):
    a = _fit(MLPHead, split_data, random_state=1, max_epochs=3)
    b = _fit(MLPHead, split_data, random_state=2, max_epochs=3)
    assert not torch.equal(a.to_torch()[0].weight, b.to_torch()[0].weight)


@pytest.mark.parametrize("cls,kwargs", [(LinearHead, {"Cs": (1.0,)}), (MLPHead, {"max_epochs": 30})])
def test_balanced_class_weight_raises_minority_recall(cls, kwargs):
    # Two overlapping classes, 95% / 5%: unweighted fits favour the majority class.
    X, y = blobs(1000, labels=np.array([0, 1]), d=8, spread=2.5, seed=5, weights=[0.95, 0.05])
    Xte, yte = blobs(2000, labels=np.array([0, 1]), d=8, spread=2.5, seed=5, weights=[0.5, 0.5])
    recall = {}
    for cw in (None, "balanced"):
        head = cls(class_weight=cw, **kwargs).fit(X, y)
        recall[cw] = float(np.mean(head.predict(Xte[yte == 1]) == 1))
    assert recall["balanced"] > recall[None] + 0.1


def test_linear_head_records_its_c_search_and_picks_c_on_validation(fitted, split_data):
    head = fitted[LinearHead]
    tried = [r["C"] for r in head.search_]
    assert tried[:len(DEFAULT_CS)] == sorted(DEFAULT_CS)
    # These blobs are separable: loss still fell at C=1, so the path went on by factors of 3 until it turned.
    assert np.allclose(tried[len(DEFAULT_CS):], [3.0 ** i for i in range(1, len(tried) - len(DEFAULT_CS) + 1)])
    for r in head.search_:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0
        # Past the grid a warm start on separable data can already meet the tolerance (0 iterations).
        assert r["iterations"] >= (1 if r["C"] in DEFAULT_CS else 0)
    best = min(head.search_, key=lambda r: r["val_loss"])
    assert head.C_ == best["C"]
    assert head.val_accuracy_ == best["val_accuracy"]
    assert head.config()["C"] == head.C_ and head.config()["search"] == head.search_
    assert head.scaler_.n_samples_seen_ == 210  # refit on train + validation


@pytest.mark.parametrize("spread,seed", [(8.0, 14), (12.0, 11)])
def test_linear_head_picks_the_c_with_the_best_validation_score(spread, seed):
    # 20 training points in 200 noisy dims: too little and too much regularisation both hurt on validation.
    X, y = blobs(220, labels=np.array([0, 1]), d=200, spread=spread, seed=seed)
    Cs = (1e-5, 1e-3, 1e-1, 10.0, 1000.0)
    head = LinearHead(Cs=Cs).fit(X[:20], y[:20], X[20:], y[20:])
    by_c = {r["C"]: r for r in head.search_}
    assert list(by_c) == list(Cs)
    assert len({r["val_loss"] for r in head.search_}) == len(Cs)  # the Cs really differ on validation
    assert by_c[head.C_]["val_loss"] == min(r["val_loss"] for r in head.search_)  # chosen by validation loss
    assert by_c[head.C_]["val_accuracy"] == head.val_accuracy_
    assert head.C_ not in (Cs[0], Cs[-1])  # an interior C: chosen, not the end of the grid by default


def test_linear_head_without_validation_uses_the_middle_c(split_data):
    (Xtr, ytr), _, (Xte, yte) = split_data
    head = LinearHead(Cs=(0.01, 0.1, 1.0), validation_fraction=0.0).fit(Xtr, ytr)
    assert head.search_ == [] and head.val_accuracy_ is None
    assert head.C_ == 0.1
    assert head.score(Xte, yte) >= 0.95


def test_mlp_head_records_history_and_refits(fitted):
    head = fitted[MLPHead]
    h = head.history_
    n = len(h["epoch"])
    assert h["epoch"] == list(range(1, n + 1))
    assert len(h["train_loss"]) == len(h["val_loss"]) == len(h["val_accuracy"]) == n
    assert 1 <= h["best_epoch"] <= n <= head.max_epochs
    assert head.best_epoch_ == h["best_epoch"]
    # The best epoch has the lowest validation loss (up to the 1e-4 improvement threshold).
    assert h["val_loss"][head.best_epoch_ - 1] <= min(h["val_loss"]) + 1e-4
    if n < head.max_epochs:  # stopped early: exactly `patience` epochs without improvement
        assert n == head.best_epoch_ + head.patience
    assert head.val_accuracy_ == h["val_accuracy"][head.best_epoch_ - 1]
    assert head.config()["epochs"] == head.best_epoch_
    assert head.scaler_.n_samples_seen_ == 210  # refit on train + validation


def test_mlp_head_stops_early(split_data):
    head = _fit(MLPHead, split_data, max_epochs=200, patience=2, lr=1e-2)
    assert len(head.history_["epoch"]) < 200
    assert len(head.history_["epoch"]) == head.best_epoch_ + 2


@pytest.mark.parametrize("cls", HEADS)
def test_head_module_loads_the_saved_tensors(cls, fitted, split_data):
    head = fitted[cls]
    _, _, (Xte, _) = split_data
    saved = head.to_torch()
    rebuilt = head_module(head.config(), 32, 3)
    rebuilt.load_state_dict(saved.state_dict())  # strict: same keys and shapes
    rebuilt.eval()
    x = torch.as_tensor(Xte)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), saved(x))


def test_make_head():
    head = make_head("mlp", class_weight="balanced", seed=3, hidden=16)
    assert isinstance(head, MLPHead)
    assert (head.class_weight, head.random_state, head.hidden) == ("balanced", 3, 16)
    assert isinstance(make_head("linear"), LinearHead)
    with pytest.raises(HeadstartError, match="nope") as err:
        make_head("nope")
    assert "linear" in str(err.value) and "mlp" in str(err.value)


# --- the C path past the ends of the grid (issue 10, item 9) ---------------------------------------------------------


def _low_noise(n_train=200, n_val=200, d=20, seed=0):
    """Nearly separable, low-noise labels from a linear rule with a few flips: the best C is well above 1."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, d))
    X = rng.normal(size=(n_train + n_val, d)).astype(np.float32)
    y = np.argmax(X @ w.T, axis=1)
    flip = rng.random(len(y)) < 0.02
    y[flip] = rng.integers(0, 3, flip.sum())
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def test_linear_head_extends_the_c_path_upwards_to_an_interior_minimum():
    Xtr, ytr, Xv, yv = _low_noise()
    head = LinearHead().fit(Xtr, ytr, Xv, yv)  # DEFAULT_CS ends at 1; on main the search stopped there
    cs = [r["C"] for r in head.search_]
    losses = [r["val_loss"] for r in head.search_]
    assert head.C_ > 1.0
    best = cs.index(head.C_)
    assert 0 < best < len(cs) - 1  # an interior minimum: the loss turned above the chosen C
    assert losses[best] == min(losses) and losses[best + 1] > losses[best]
    assert head.search_edge_ is None and head.config()["search_edge"] is None


def test_linear_head_says_when_the_search_hit_its_cap(caplog, monkeypatch):
    from headstart.learn import heads

    Xtr, ytr, Xv, yv = _low_noise()  # its optimum is at C=9 (the test above)
    monkeypatch.setattr(heads, "C_MAX", 3.0)
    head = LinearHead().fit(Xtr, ytr, Xv, yv)
    assert [r["C"] for r in head.search_][-2:] == [1.0, 3.0] and head.C_ == 3.0
    assert head.search_edge_ == "upper" and head.config()["search_edge"] == "upper"
    assert "C=3, the upper end of the search" in caplog.text


def test_linear_head_extends_the_c_path_downwards():
    # Pure noise labels: the strongest regularisation is best, below the grid's lowest C.
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 50)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    head = LinearHead(Cs=(1.0, 3.0, 10.0)).fit(X[:100], y[:100], X[100:], y[100:])
    cs = [r["C"] for r in head.search_]
    assert min(cs) < 1.0 and head.C_ < 1.0
    assert cs == sorted(cs)
    best = cs.index(head.C_)
    assert best > 0 or head.search_edge_ == "lower"


def test_final_fit_starts_from_the_search_and_reaches_the_cold_starts_optimum():
    """The refit on train + validation starts from the chosen C's search solution, rewritten for the refit's
    scaler (`_rescaled`: the same logits); it must land where a fit from zeros lands, in fewer iterations."""
    from sklearn.preprocessing import StandardScaler

    from headstart.learn.heads import _rescaled, fit_softmax_regression

    X, y = blobs(900, d=64, spread=4.0, seed=3)
    head = LinearHead().fit(X[:600], y[:600], X[600:], y[600:])
    yi = np.searchsorted(head.classes_, y).astype(np.int64)
    Xs = torch.as_tensor(head.scaler_.transform(X).astype(np.float32))
    W, b, cold_iters = fit_softmax_regression(Xs, torch.as_tensor(yi), len(LABELS), head.C_)
    assert head.n_iter_ < cold_iters
    cold = (Xs @ W.T + b).numpy()
    warm = (Xs @ head.coef_.T + head.intercept_).numpy()
    assert np.abs(warm - cold).max() < 5e-3 * np.abs(cold).max()  # both stop at the gradient tolerance
    assert (warm.argmax(1) == cold.argmax(1)).mean() > 0.995
    # The rewrite itself is exact: the same logits under the other scaler.
    old, new = StandardScaler().fit(X[:600]), head.scaler_
    W0, b0 = torch.randn(3, 64), torch.randn(3)
    W1, b1 = _rescaled(W0, b0, old, new)
    a = torch.as_tensor(old.transform(X).astype(np.float32)) @ W0.T + b0
    c = torch.as_tensor(new.transform(X).astype(np.float32)) @ W1.T + b1
    assert torch.allclose(a, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("balanced", [False, True])
def test_softmax_regression_reaches_scikit_learns_optimum(balanced):
    """fit_softmax_regression minimises scikit-learn's objective (divided by n): the same probabilities as
    LogisticRegression at the same C, with and without class weights (balanced weights sum to n, so the
    weighted mean and scikit-learn's weighted sum have one optimum; unweighted, the largest difference was 0.18)."""
    from sklearn.linear_model import LogisticRegression

    from headstart.learn.heads import fit_softmax_regression

    X, y = blobs(300, spread=2.0, weights=[0.6, 0.3, 0.1])  # overlapping and unbalanced: the penalty matters
    yi = np.searchsorted(LABELS, y)
    counts = np.bincount(yi, minlength=3)
    per_class = len(yi) / (3 * counts) if balanced else np.ones(3)
    C = 0.05
    W, b, _ = fit_softmax_regression(torch.as_tensor(X), torch.as_tensor(yi), 3, C,
                                     torch.as_tensor(per_class, dtype=torch.float32) if balanced else None,
                                     max_iter=2000, tol=1e-9)
    ours = torch.softmax(torch.as_tensor(X) @ W.T + b, 1).numpy()
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000, class_weight=dict(enumerate(per_class)) if balanced
                             else None).fit(X, yi).predict_proba(X)
    assert np.abs(ours - ref).max() < 1e-3


# --- C by K-fold cross-validation on small data (issue 32, item 6) ---------------------------------------------------


def test_linear_head_chooses_c_by_k_fold_cross_validation_on_train_and_validation():
    """With `cv=5`, each C is scored on every train + validation image once, by a fit on the other four folds:
    its loss and accuracy are those of scikit-learn's LogisticRegression on the same folds (an independent fit of
    the same objective), and the final fit uses all the images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from headstart.learn.heads import _standardiser

    X, y = blobs(330, d=24, spread=4.0, seed=9)
    Xtr, ytr, Xv, yv = X[:200], y[:200], X[200:250], y[200:250]
    head = LinearHead(cv=5, random_state=4).fit(Xtr, ytr, Xv, yv)
    assert (head.validation_, head.cv_folds_, head.config()["cv_folds"]) == ("cross-validation", 5, 5)
    assert head.scaler_.n_samples_seen_ == 250
    best = min(head.search_, key=lambda r: r["val_loss"])
    assert (head.C_, head.val_accuracy_) == (best["C"], best["val_accuracy"])
    pool, yp = np.concatenate([Xtr, Xv]), np.searchsorted(LABELS, np.concatenate([ytr, yv]))
    for row in head.search_:
        losses, correct = [], 0
        for tr, va in StratifiedKFold(5, shuffle=True, random_state=4).split(pool, yp):
            scaler = _standardiser(pool[tr])
            ref = LogisticRegression(C=row["C"], tol=1e-8, max_iter=5000).fit(scaler.transform(pool[tr]), yp[tr])
            p = ref.predict_proba(scaler.transform(pool[va]))
            losses += list(-np.log(p[np.arange(len(va)), yp[va]]))
            correct += int((p.argmax(1) == yp[va]).sum())
        assert row["val_loss"] == pytest.approx(np.mean(losses), rel=1e-2), row
        assert abs(row["val_accuracy"] - correct / 250) <= 2 / 250, row  # a borderline image may fall either way
    again = LinearHead(cv=5, random_state=4).fit(Xtr, ytr, Xv, yv)
    assert again.search_ == head.search_ and np.array_equal(again.decision_function(X), head.decision_function(X))
    other = LinearHead(cv=5, random_state=5).fit(Xtr, ytr, Xv, yv)  # other folds: other numbers
    assert [r["val_loss"] for r in other.search_] != [r["val_loss"] for r in head.search_]


def test_cross_validation_keeps_to_what_the_data_allows(split_data, caplog):
    (Xtr, ytr), (Xv, yv), _ = split_data
    kept = LinearHead(cv=5, refit=False).fit(Xtr, ytr, Xv, yv)  # validation kept unseen: it alone chooses C
    assert (kept.validation_, kept.cv_folds_) == ("given", None) and kept.scaler_.n_samples_seen_ == 150
    held = LinearHead(cv=5).fit(Xtr, ytr)  # no validation given: folds of X
    assert (held.validation_, held.cv_folds_, held.scaler_.n_samples_seen_) == ("cross-validation", 5, 150)
    few = np.flatnonzero(ytr == 2)[3:]  # class 2 down to 3 training images: 3 folds, each with every class
    X3, y3 = np.delete(Xtr, few, axis=0), np.delete(ytr, few)
    assert LinearHead(cv=5, validation_fraction=0).fit(X3, y3).cv_folds_ == 3
    one = np.flatnonzero(ytr == 2)[1:]  # a single image of class 2: no folds at all, the validation split chooses
    X1, y1 = np.delete(Xtr, one, axis=0), np.delete(ytr, one)
    head = LinearHead(cv=5).fit(X1, y1, Xv[yv != 2], yv[yv != 2])
    assert (head.validation_, head.cv_folds_) == ("given", None) and len(head.search_) >= 2


def test_the_log_says_final_fit_only_of_the_fit_that_is_final(split_data, caplog):
    import logging

    (Xtr, ytr), (Xv, yv), _ = split_data
    with caplog.at_level(logging.INFO, logger="headstart.learn.heads"):
        for cls in HEADS:
            cls(refit=False).fit(Xtr, ytr, Xv, yv)
    assert "final fit" not in caplog.text
    assert caplog.text.count("fit, validation kept out, on 150 images") == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headstart.learn.heads"):
        LinearHead(cv=5).fit(Xtr, ytr, Xv, yv)
    assert "chosen by 5-fold cross-validation on 210 train + validation images" in caplog.text
    assert caplog.text.count("final fit on 210 images") == 1


def test_a_feature_zero_on_nearly_every_image_does_not_choose_c(monkeypatch):
    """Pooled ReLU features zero on all but a few images (EfficientNet-Lite0 on 8x8 digits: 250 of 1,280) put a
    validation image 100,000 deviations out under a plain StandardScaler, and its loss chose C=1e-6. The floored
    scale keeps such a feature ordinary: the C chosen without those features, and their accuracy."""
    from sklearn.preprocessing import StandardScaler

    from headstart.learn import heads

    X, y = blobs(400, d=24, spread=3.0, seed=2)
    rare = np.zeros((400, 8), np.float32)  # train 0-150 (barely on), validation 150-200 and test 200-400 (firing)
    rng = np.random.default_rng(0)
    for j in range(8):
        rare[rng.integers(0, 150), j] = 0.01
        rare[rng.choice(np.arange(150, 400), 6, replace=False), j] = 5.0
    Xr = np.concatenate([X, rare], axis=1)
    assert np.abs(StandardScaler().fit(Xr[:150]).transform(Xr[150:200])).max() > 1000
    floored = heads._standardiser(Xr[:150])
    spread = np.sqrt(floored.var_)
    floor = heads.SCALE_FLOOR * np.median(spread[spread > 0])
    assert np.allclose(floored.scale_, np.sqrt(floored.var_ + floor ** 2))
    assert np.abs(floored.transform(Xr[150:200])).max() < 50
    without = LinearHead().fit(X[:150], y[:150], X[150:200], y[150:200])
    with_rare = LinearHead().fit(Xr[:150], y[:150], Xr[150:200], y[150:200])
    assert with_rare.C_ == without.C_
    assert abs(with_rare.score(Xr[200:], y[200:]) - without.score(X[200:], y[200:])) <= 0.01
    monkeypatch.setattr(heads, "SCALE_FLOOR", 0.0)  # the plain scaler: the rare features choose C
    assert LinearHead().fit(Xr[:150], y[:150], Xr[150:200], y[150:200]).C_ < without.C_ / 10


def test_cv_folds_rule():
    from headstart.learn.heads import CV_BELOW, CV_FOLDS, cv_folds

    assert cv_folds(900) == cv_folds(CV_BELOW - 1) == CV_FOLDS and cv_folds(CV_BELOW) is None
