"""headstart: transfer learning for image classification on ImageNet backbones."""

from ._version import __version__

from .backbones import get_backbone, list_backbones  # noqa: E402
from . import timm_backbones  # noqa: E402,F401  registers the "timm:" source (timm itself loads on first use)
from .bundle import Ensemble, Model, load  # noqa: E402
from .training import resume, train  # noqa: E402
from .predict import evaluate  # noqa: E402
from .report_html import report  # noqa: E402
from .settings import FineTuneSettings, Runtime, TrainConfig  # noqa: E402
from .extraction import extract_features  # noqa: E402

__all__ = ["__version__", "train", "resume", "load", "evaluate", "report", "extract_features", "Model", "Ensemble", "get_backbone", "list_backbones",
           "Runtime", "FineTuneSettings", "TrainConfig"]
