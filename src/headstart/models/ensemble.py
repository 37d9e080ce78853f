"""An ensemble in use: several trained Models whose probabilities are averaged.

Issue 14 measured on FMNIST-TL that the mean of the probabilities of the fine-tuned MobileNetV2
(0.9094 test accuracy) and of the scratch small CNN (0.9084) reaches 0.9228: the two strategies
disagree most, so their average corrects each other's mistakes. `--strategy ensemble` trains
both (ensemble_run.py); this module only uses them.

An `Ensemble` answers wherever a `Model` is used (run scoring, evaluate, predict, the Python
API, serve, export): its `features` are the members' features side by side, each member
through its own preprocessing, engine, feature-cache namespaces and test-time views, and an
input unusable by any member is unusable (NaN row, with the first member's reason) so rows
stay aligned. `proba_from_features` is exactly the mean of the members' probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from headstart.errors import BundleError
from headstart.models.model import Model, as_inputs
from headstart.settings import Runtime

log = logging.getLogger(__name__)

AVERAGING = "mean of the members' probabilities (each member with its own test-time views)"


@dataclass(eq=False)
class Ensemble:
    """Members (Models with the same classes, in the same order) whose probabilities are averaged."""

    members: list[Model]
    names: list[str] = field(default_factory=list)  # what each member is ("fine-tune", "scratch"), for reports
    strategy: str = "ensemble"

    def __post_init__(self):
        if len(self.members) < 2:
            raise BundleError(f"an ensemble needs at least two members, not {len(self.members)}.")
        first = list(self.members[0].classes)
        for i, m in enumerate(self.members[1:], 1):
            if list(m.classes) != first:
                raise BundleError(f"ensemble member {i} ({self.name(i)}) has classes {list(m.classes)}, member 0 "
                                  f"has {first}: the members must have the same classes in the same order. "
                                  "Train them on the same data.")
        self.names = list(self.names) or [m.strategy for m in self.members]

    def name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else self.members[i].strategy

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    @property
    def classes_(self) -> np.ndarray:
        return np.array(self.classes)

    @property
    def feature_width(self) -> int:
        return sum(m.feature_width for m in self.members)

    @property
    def tta(self) -> str:
        """The members' views, e.g. "flip+none" (each member keeps its own)."""
        return "+".join(m.tta for m in self.members)

    def engine(self, device: str = "auto", engine: str = "auto", precision: str = "auto", cache_root=None) -> list:
        """Each member's engine for this choice (built once per member, as Model.engine)."""
        return [m.engine(device, engine, precision, cache_root) for m in self.members]

    def namespaces(self, choice) -> list[dict]:
        """The feature-cache namespaces of the members' image views (each member caches under its own)."""
        return [m.namespace(choice) for m in self.members]

    def _split(self, feats: np.ndarray) -> list[np.ndarray]:
        edges = np.cumsum([m.feature_width for m in self.members])[:-1]
        return np.split(np.asarray(feats), edges, axis=1)

    def member_probas(self, feats: np.ndarray) -> list[np.ndarray]:
        """(n, feature_width) features -> each member's (n, n_classes) probabilities."""
        return [m.proba_from_features(f) for m, f in zip(self.members, self._split(feats))]

    def proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, feature_width) features -> (n, n_classes): the mean of the members' probabilities."""
        return np.mean(self.member_probas(feats), axis=0)

    def features(self, images, runtime: Runtime | None = None, *, desc: str = "features",
                 **kw) -> tuple[np.ndarray, list[str | None]]:
        """The members' features side by side, (n_inputs, feature_width), and per input None or why it could
        not be used: an input any member cannot use is unusable (its whole row NaN)."""
        items = as_inputs(images)
        parts, errors = [], [None] * len(items)
        for i, m in enumerate(self.members):
            feats, reasons = m.features(items, runtime, desc=f"{desc} [{self.name(i)}]", **kw)
            parts.append(feats)
            errors = [e or r for e, r in zip(errors, reasons)]
        feats = np.concatenate(parts, axis=1)
        feats[[e is not None for e in errors]] = np.nan
        return feats, errors

    # The same code as Model's: both go features -> proba_from_features, so their answers agree.
    predict_proba = Model.predict_proba
    predict = Model.predict

    def heatmap_members(self, runtime: Runtime) -> list:
        """Each member as heatmaps/explain.py needs it: an ensemble's map is the mean of its members' maps,
        each scaled to its own maximum first (heatmaps/explain.py), for the class the ensemble predicts."""
        return [m.heatmap_member(runtime) for m in self.members]

    explain = Model.explain
    explain_classes = Model.explain_classes

    def describe(self) -> str:
        return " + ".join(f"{self.name(i)} ({m.entry.name}, {m.preprocessing.crop_size} px)"
                          for i, m in enumerate(self.members))


def is_model(obj) -> bool:
    """A loaded model of either kind (a Model or an Ensemble), as opposed to a path."""
    return isinstance(obj, (Model, Ensemble))


def member_dir(i: int) -> str:
    return os.path.join("members", str(i))
