"""headstart: transfer learning for image classification on ImageNet backbones.

The public names below load on first use (PEP 562), so `headstart --help`, argument errors and other
commands that never touch a network start without importing torch, torchvision or scikit-learn
(about 7 s on a 2-core laptop CPU). `import headstart; headstart.train(...)` works as before.
"""

from __future__ import annotations

import importlib
import typing

from headstart._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "get_backbone": "nets.registry", "list_backbones": "nets.registry",
    "Ensemble": "models.bundle", "Model": "models.bundle", "load": "models.bundle",
    "resume": "runs.train", "train": "runs.train",
    "evaluate": "runs.predict",
    "explain_files": "runs.explain",
    "report": "reports.html",
    "FineTuneSettings": "settings", "Runtime": "settings", "TrainConfig": "settings",
    "extract_features": "runs.extract",
    "inspect": "inspection",
}

__all__ = ["__version__", "train", "resume", "load", "evaluate", "report", "extract_features", "explain_files",
           "inspect", "Model", "Ensemble", "get_backbone", "list_backbones", "Runtime", "FineTuneSettings",
           "TrainConfig"]

if typing.TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from headstart.nets.registry import get_backbone, list_backbones
    from headstart.models.bundle import Ensemble, Model, load
    from headstart.runs.explain import explain_files
    from headstart.inspection import inspect
    from headstart.runs.extract import extract_features
    from headstart.runs.predict import evaluate
    from headstart.reports.html import report
    from headstart.settings import FineTuneSettings, Runtime, TrainConfig
    from headstart.runs.train import resume, train


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
