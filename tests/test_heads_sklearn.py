"""The heads as scikit-learn estimators: its own checks, and the tools that take any estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import check_estimator

from headstart.learn.heads import LinearHead, MLPHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small settings keep scikit-learn's ~50 checks (each fits several times) to seconds.
CHECKED = [LinearHead(), MLPHead(hidden=16, max_epochs=10, patience=3, batch_size=16, lr=1e-2)]


@pytest.mark.slow
@pytest.mark.parametrize("head", CHECKED, ids=lambda h: type(h).__name__)
def test_check_estimator_passes(head):
    results = check_estimator(head, on_fail=None)  # every check's outcome, so a failure names them all
    failed = [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]
    assert not failed, "\n".join(failed)
    assert sum(r["status"] == "passed" for r in results) >= 40
    assert not [r for r in results if r["status"] == "xfail"]  # no declared expected failures needed


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.mark.slow
@pytest.mark.parametrize("head", [LinearHead(), MLPHead(max_epochs=15, lr=3e-3)], ids=lambda h: type(h).__name__)
def test_five_fold_cross_val_score_on_digits(head, digits):
    X, y = digits
    scores = cross_val_score(head, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert scores.shape == (5,)
    assert scores.mean() >= 0.95 and scores.min() >= 0.9  # scikit-learn's LogisticRegression: about 0.97


@pytest.mark.slow
def test_clone_pipeline_and_grid_search(digits):
    X, y = digits
    head = LinearHead(Cs=(0.01, 0.1, 1.0), class_weight="balanced", random_state=3)
    copy = clone(head)
    assert copy is not head and copy.get_params() == head.get_params()
    assert copy.get_params()["Cs"] == (0.01, 0.1, 1.0)  # the tuple round-trips unchanged
    assert not hasattr(copy, "classes_")

    pipe = Pipeline([("pca", PCA(32, random_state=0)), ("head", LinearHead())]).fit(X[:1200], y[:1200])
    assert pipe.score(X[1200:], y[1200:]) >= 0.9
    assert pipe.predict_proba(X[1200:]).shape == (len(X) - 1200, 10)

    grid = GridSearchCV(MLPHead(max_epochs=15, lr=1e-2), {"hidden": [4, 64]}, cv=3).fit(X[:900], y[:900])
    assert grid.best_params_ == {"hidden": 64}  # 4 hidden units are too few for 10 digits
    assert set(grid.cv_results_["param_hidden"]) == {4, 64}
    assert grid.score(X[900:], y[900:]) >= 0.9


@pytest.mark.parametrize("cls", [LinearHead, MLPHead])
def test_fit_without_validation_holds_out_its_own(cls, digits):
    X, y = digits
    head = cls(validation_fraction=0.2, random_state=1, **({"max_epochs": 10} if cls is MLPHead else {})).fit(X, y)
    assert head.validation_ == "held out" and head.val_accuracy_ >= 0.9
    assert head.scaler_.n_samples_seen_ == len(X)  # then refit on all of X
    if cls is LinearHead:
        assert len(head.search_) >= 2
    else:
        assert head.history_ is not None and head.best_epoch_ >= 1
    again = cls(validation_fraction=0.2, random_state=1, **({"max_epochs": 10} if cls is MLPHead else {})).fit(X, y)
    assert np.array_equal(head.decision_function(X), again.decision_function(X))  # the hold-out is seeded
    none = cls(validation_fraction=0.0, **({"max_epochs": 10} if cls is MLPHead else {})).fit(X, y)
    assert none.validation_ is None and none.val_accuracy_ is None


@pytest.mark.parametrize("cls", [LinearHead, MLPHead])
def test_fitting_leaves_the_global_random_state_alone(cls, digits):
    X, y = digits
    torch.manual_seed(123)
    np.random.seed(456)
    torch_before, numpy_before = torch.get_rng_state(), np.random.get_state()
    cls(**({"max_epochs": 3} if cls is MLPHead else {})).fit(X[:300], y[:300])
    cls(random_state=None, **({"max_epochs": 3} if cls is MLPHead else {})).fit(X[:300], y[:300])
    assert torch.equal(torch.get_rng_state(), torch_before)
    numpy_after = np.random.get_state()
    assert numpy_after[0] == numpy_before[0] and np.array_equal(numpy_after[1], numpy_before[1])
    assert numpy_after[2:] == numpy_before[2:]
