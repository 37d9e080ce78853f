"""A trained model on disk: `model.safetensors` (every tensor) + `model.json` (everything else).

Saving and loading only; using a loaded Model (features, predictions) is `model.py`'s.

The bundle holds the backbone's weights too, so it predicts on a machine that has no
weights package. Nothing is pickled: tensors are safetensors, the rest is JSON, and both
are validated (format version, backbone name, class names, every key and shape) before
anything is built from them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .backbones import CROP_MODES, Preprocessing, get_backbone
from .errors import BundleError, HeadstartError
from .fileio import atomic_path, write_json
from .heads import head_module
from .model import TTA, Model
from .weights import WeightsInfo, mismatches

__all__ = ["Model", "load", "save"]

log = logging.getLogger(__name__)

FORMAT = "headstart-bundle"
FORMAT_VERSION = 1
TENSORS, META = "model.safetensors", "model.json"


def save(model: Model, directory: str | os.PathLike) -> Path:
    """Write `model` as a bundle folder (model.safetensors + model.json); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    # safetensors wants contiguous tensors; the engine may have made them channels-last.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(directory / TENSORS) as tmp:
        save_file(tensors, str(tmp))
    write_json(directory / META, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "headstart_version": __version__,
        "torch_version": torch.__version__,
        "backbone": model.entry.name,
        "backbone_identity": model.backbone_identity or model.weights.identity(),
        "weights": model.weights.to_dict(),
        "strategy": model.strategy,
        "preprocessing": model.preprocessing.to_dict(),
        "feature_dim": model.entry.feature_dim,
        "classes": list(model.classes),
        "head": model.head_config,
        "tta": model.tta,
    })
    return directory


def _checked_preprocessing(prep: Preprocessing) -> Preprocessing:
    import math

    from torchvision.transforms import InterpolationMode

    InterpolationMode(prep.interpolation)  # ValueError for an unknown one
    if prep.crop_mode not in CROP_MODES:
        raise ValueError(f"preprocessing crop_mode {prep.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
    if not (16 <= prep.crop_size <= prep.resize_size <= 4096):
        raise ValueError(f"preprocessing sizes crop {prep.crop_size}, resize {prep.resize_size} are out of range")
    if len(prep.mean) != 3 or len(prep.std) != 3 or not all(math.isfinite(v) for v in prep.mean + prep.std) \
            or min(prep.std) <= 0:
        raise ValueError(f"preprocessing mean {prep.mean} / std {prep.std} are not 3 finite values, std > 0")
    return prep


def _bundle_dir(path: Path) -> Path:
    if (path / META).is_file():
        return path
    if (path / "model" / META).is_file():
        return path / "model"
    raise BundleError(f"no model found at {path}: expected a run directory (with model/{META}) or a bundle "
                      f"folder holding {META} and {TENSORS}.")


def load(path: str | os.PathLike) -> Model:
    """Load a run directory or a bundle folder, validating everything before building modules."""
    d = _bundle_dir(Path(path).expanduser())
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{d / META} is not readable JSON ({exc}); the bundle is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{d / META} is not a headstart bundle.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{d} is bundle format version {meta.get('format_version')!r}; this headstart "
                          f"({__version__}) reads version {FORMAT_VERSION}. Use a matching headstart version.")
    try:
        entry = get_backbone(str(meta["backbone"]))
        classes = meta["classes"]
        if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise BundleError(f"{d / META}: 'classes' must be a list of distinct non-empty names.")
        prep = _checked_preprocessing(Preprocessing.from_dict(meta["preprocessing"]))
        head_cfg = dict(meta["head"])
        weights = WeightsInfo(**meta["weights"])
        tta = str(meta.get("tta", "none"))  # bundles saved before test-time flips existed have none
        if tta not in TTA:
            raise BundleError(f"{d / META}: 'tta' is {tta!r}; this headstart knows {', '.join(TTA)}.")
        # On the meta device a module has shapes but no storage, so sizes edited into model.json
        # (a billion classes, a huge hidden layer) allocate nothing before they are checked.
        with torch.device("meta"):
            shapes = {"backbone": entry.create(), "head": head_module(head_cfg, entry.feature_dim, len(classes))}
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, HeadstartError) as exc:
        raise BundleError(f"{d / META} is incomplete or edited: {type(exc).__name__}: {exc}") from None

    try:
        tensors = load_file(str(d / TENSORS))
    except Exception as exc:  # truncated or foreign file
        raise BundleError(f"{d / TENSORS} cannot be read ({type(exc).__name__}: {exc}); the bundle is damaged.") \
            from None
    stray = [k for k in tensors if not k.startswith(("backbone.", "head."))]
    if stray:
        raise BundleError(f"{d / TENSORS} holds unexpected tensors ({', '.join(stray[:3])}).")
    parts = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")} for name in shapes}
    for name, sd in parts.items():
        problems = mismatches(shapes[name], sd)
        if problems:
            raise BundleError(f"{d / TENSORS} does not fit the {entry.name} {name} that {META} describes "
                              f"({len(classes)} classes): {'; '.join(problems)}. The bundle was edited or mixed "
                              "with another model's files.")
    backbone, head = entry.create(), head_module(head_cfg, entry.feature_dim, len(classes))
    backbone.load_state_dict(parts["backbone"])
    head.load_state_dict(parts["head"])
    return Model(entry=entry, backbone=backbone.eval(), head=head.eval(), classes=classes, preprocessing=prep,
                 weights=weights, head_config=head_cfg, strategy=str(meta.get("strategy", "feature-extraction")),
                 backbone_identity=meta.get("backbone_identity"), tta=tta)
