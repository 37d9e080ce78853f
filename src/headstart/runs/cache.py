"""`headstart cache info` and `cache clear`: what headstart keeps in its cache folder, and removing it.

The cache holds what is worth computing once: the features (engines/features.py), converted backbones,
downloads and file digests. Removing it loses no result, only time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.fileio import default_cache_dir


# What headstart writes under a cache folder: pooled features, backbones converted for ONNX Runtime or
# OpenVINO (engines/), `datasets prepare`'s downloads and the file digests of each data root
# (datachecks.py). `cache clear` removes these and nothing else.
CACHE_PARTS = ("features", "engines", "downloads", "digests")


def _cache_folder(root: str | os.PathLike | None) -> Path:
    """The cache folder meant; a --cache-dir given but missing is an error, not an empty cache."""
    if root is None:
        return default_cache_dir()
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise HeadstartError(f"--cache-dir {path} {what}; pass the folder `train --cache-dir` used, or leave "
                             f"--cache-dir out for the default cache ({default_cache_dir()}).")
    return path


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links counted as links, not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.is_file() or path.is_symlink() else 0
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def cache_info(root: str | os.PathLike | None = None) -> dict:
    """The whole cache folder: total bytes, bytes per part (CACHE_PARTS, and "other" for anything else
    found there), and each feature namespace. None means the default folder, which may not exist yet."""
    root = _cache_folder(root)
    parts = {name: _tree_bytes(root / name) for name in CACHE_PARTS}
    parts["other"] = sum(_tree_bytes(p) for p in root.iterdir() if p.name not in CACHE_PARTS) if root.is_dir() else 0
    spaces = []
    for d in sorted((root / "features").glob("*")) if (root / "features").is_dir() else []:
        shards = list(d.glob("*.safetensors"))
        try:
            meta = json.loads((d / "namespace.json").read_text())
        except (OSError, ValueError):
            meta = {}
        spaces.append({"namespace": d.name, "backbone": meta.get("backbone"), "image_size":
                       meta.get("preprocessing", {}).get("crop_size"), "engine": meta.get("engine"),
                       "precision": meta.get("precision"), "shards": len(shards), "bytes": _tree_bytes(d)})
    engines = sorted((root / "engines").glob("*.onnx")) if (root / "engines").is_dir() else []
    return {"path": str(root), "exists": root.is_dir(), "bytes": sum(parts.values()), "parts": parts,
            "namespaces": spaces, "converted_models": len(engines)}


def clear_cache(root: str | os.PathLike | None = None) -> dict:
    """Remove everything headstart put in the cache folder (CACHE_PARTS); return the bytes freed, per part."""
    root = _cache_folder(root)
    freed = {}
    for name in CACHE_PARTS:
        if (root / name).exists():
            freed[name] = _tree_bytes(root / name)
            shutil.rmtree(root / name)
    return {"path": str(root), "bytes": sum(freed.values()), "parts": freed}
