"""A trained model on disk: `model.safetensors` (every tensor) + `model.json` (everything else).

Saving and loading only; using a loaded Model (features, predictions) is `model.py`'s.

An ensemble bundle (`--strategy ensemble`, ensemble.py) is a folder whose model.json says
strategy "ensemble", the averaging and its members' folders, `members/0`, `members/1`, ...,
each an ordinary bundle; `load` returns an `Ensemble`, which is used wherever a Model is.

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

from headstart._version import __version__
from headstart.nets.spec import CROP_MODES, Preprocessing
from headstart.nets.registry import get_backbone
from headstart.errors import BundleError, HeadstartError
from headstart.fileio import atomic_path, write_json
from headstart.learn.head_modules import head_module
from headstart.models.ensemble import AVERAGING, Ensemble, member_dir
from headstart.models.model import TTA, Model
from headstart.engines.quantize import Int8Source
from headstart.nets.weights import WeightsInfo, mismatches

__all__ = ["Model", "Ensemble", "load", "save"]

log = logging.getLogger(__name__)

FORMAT = "headstart-bundle"
FORMAT_VERSION = 1
TENSORS, META = "model.safetensors", "model.json"
INT8_TENSOR = "int8.onnx"  # the int8 backbone's ONNX file (protobuf, never unpickled), when trained with it


def save(model: Model | Ensemble, directory: str | os.PathLike) -> Path:
    """Write `model` as a bundle folder (model.safetensors + model.json); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Ensemble):
        return _save_ensemble(model, directory)
    tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    # safetensors wants contiguous tensors; the engine may have made them channels-last.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if model.int8 is not None:  # the quantised backbone, as bytes: predicting needs no calibration images
        tensors[INT8_TENSOR] = torch.frombuffer(bytearray(model.int8.onnx), dtype=torch.uint8)
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
        **({"int8": {"calibration": model.int8.digest}} if model.int8 is not None else {}),
    })
    return directory


def _save_ensemble(model: Ensemble, directory: Path) -> Path:
    members = [member_dir(i) for i in range(len(model.members))]
    for m, sub in zip(model.members, members):
        save(m, directory / sub)
    write_json(directory / META, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "headstart_version": __version__,
        "strategy": "ensemble",
        "averaging": AVERAGING,
        "members": [{"path": sub, "name": name} for sub, name in zip(members, model.names)],
        "classes": list(model.classes),
    })
    return directory


def _load_ensemble(d: Path, meta: dict) -> Ensemble:
    members = meta.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                and isinstance(m.get("name", ""), str) for m in members):
        raise BundleError(f"{d / META}: 'members' must be a list of {{path, name}}; the bundle was edited.")
    loaded = []
    for m in members:
        sub = (d / m["path"]).resolve()
        if d.resolve() not in sub.parents:  # an edited path must not reach out of the bundle
            raise BundleError(f"{d / META}: member path {m['path']!r} is not inside the bundle.")
        if not (sub / META).is_file():
            raise BundleError(f"{d / META} names member {m['path']!r}, but {sub / META} is missing; the bundle "
                              "is incomplete: copy the whole folder.")
        member = load(sub)
        if isinstance(member, Ensemble):
            raise BundleError(f"{sub}: an ensemble member is itself an ensemble; members must be plain bundles.")
        loaded.append(member)
    ensemble = Ensemble(loaded, names=[m.get("name") or f"member {i}" for i, m in enumerate(members)])
    if meta.get("classes") not in (None, list(ensemble.classes)):
        raise BundleError(f"{d / META}: 'classes' differ from its members'; the bundle was edited or mixed.")
    return ensemble


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


def load(path: str | os.PathLike) -> Model | Ensemble:
    """Load a run directory or a bundle folder, validating everything before building modules.

    An ensemble bundle gives an Ensemble of its members (each loaded and checked as a bundle)."""
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
    if meta.get("strategy") == "ensemble" and "members" in meta:
        return _load_ensemble(d, meta)
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
    int8 = None
    if INT8_TENSOR in tensors:
        digest = (meta.get("int8") or {}).get("calibration")
        if not isinstance(digest, str) or not digest:
            raise BundleError(f"{d / TENSORS} holds an int8 backbone but {META} names no calibration for it; "
                              "the bundle was edited or mixed with another model's files.")
        int8 = Int8Source(digest, onnx=tensors.pop(INT8_TENSOR).numpy().tobytes())
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
                 backbone_identity=meta.get("backbone_identity"), tta=tta, int8=int8)
