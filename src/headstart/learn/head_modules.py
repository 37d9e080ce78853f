"""The heads as torch modules, without scikit-learn: what a saved model is rebuilt from and predicts with.

`heads.py` trains them (scikit-learn estimators); loading a bundle, predicting and serving need only these,
so those commands do not import scikit-learn (0.6 s of a `headstart predict` process's start).
"""

from __future__ import annotations

import numpy as np
from torch import nn


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class MLP(nn.Sequential):
    """The textbook head: Dense(hidden, ReLU) -> Dropout -> Dense(n_classes)."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256, dropout: float = 0.5):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


def head_module(config: dict, in_features: int, n_classes: int) -> nn.Module:
    """An empty torch module of a saved head's shape, for loading its tensors from a bundle."""
    if config["kind"] == "linear":
        return nn.Sequential(nn.Linear(in_features, n_classes))
    if config["kind"] == "mlp":
        return MLP(in_features, n_classes, int(config["hidden"]), float(config["dropout"])).eval()
    raise ValueError(f"unknown head kind {config['kind']!r}")
