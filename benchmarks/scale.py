"""How the cost of a run grows with the data: the `scale` section of `make bench`.

A folder of small images (16x16 PNG noise, `n` of them in 100 classes; 1,000 in bench-smoke)
is trained on once at 32 px, which fills the feature cache for real (bench-smoke), or, in the
full bench, filled synthetically: 2,000 distinct images and hard links to them, and the cache
written directly with random features under the keys `train` looks up (writing 200,000 PNGs
and running the network on them would take a quarter of the bench's hour, and neither is
what this section measures). Then, in this process, per image: scanning
the folder, assigning splits, file digests (cached since the first run) and the feature-cache
look-up; and in a fresh process the wall time and peak RSS of a second `train`, set against
the time its head took. Growth per image comes from the same steps on a quarter of the
folder, growth per class from that quarter spread over up to 1,000 classes (hard links: no copies).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 100


def _write_images(root: Path, n: int, classes: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = root / f"class{i % classes:04d}" / f"img{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(p)  # unique: no copies across splits
        paths.append(p)
    return paths


UNIQUE = 2_000  # distinct images of a synthetic folder; the rest are hard links to them


def _link_copies(paths: list[Path], root: Path, n: int, classes: int) -> list[Path]:
    """`n` files in `classes` folders, hard links to `paths` in turn: 200,000 files in seconds, not minutes."""
    out = list(paths)
    for i in range(len(paths), n):
        p = root / f"class{i % classes:04d}" / f"img{i:07d}.png"
        os.link(paths[i % len(paths)], p)
        out.append(p)
    return out


def _fill_cache(folder: Path, cache: Path) -> None:
    """What a first `train` at 32 px leaves in `cache`, without running the network: file digests, and
    random features under the namespace and keys `train` looks up (the head then fits noise, which costs
    what fitting real features costs)."""
    from headstart.nets.registry import get_backbone
    from headstart.data.folders import scan_folder
    from headstart.data.checks import content_digests
    from headstart.engines.rule import choose_engine
    from headstart.engines.features import CHUNK, FeatureCache, image_key, make_namespace
    from headstart.nets.weights import load_backbone

    entry = get_backbone("mobilenet_v2")
    _, winfo = load_backbone(entry, None)
    features = FeatureCache(cache, make_namespace(entry.name, winfo.identity(), entry.preprocessing.scaled(32),
                                                  choose_engine("cpu")))
    paths = [s.path for s in scan_folder(folder).samples]
    content_digests(paths, cache_root=cache)
    rng = np.random.default_rng(0)
    for i in range(0, len(paths), CHUNK):
        keys = [image_key(p) for p in paths[i:i + CHUNK]]
        features.put(keys, rng.standard_normal((len(keys), entry.feature_dim), dtype=np.float32))


def _link_subset(paths: list[Path], root: Path, classes: int) -> None:
    for i, p in enumerate(paths):
        d = root / f"class{i % classes:04d}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(p, d / p.name)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def steps(folder: Path, cache_root: Path, limit: int | None = None) -> dict:
    """Seconds of each per-image step of a run on `folder`, in this process; digests and look-up of its first
    `limit` images only, when given (cached like the whole folder's, which a quarter folder's are not)."""
    from headstart.data.folders import scan_folder, split_of
    from headstart.data.checks import content_digests
    from headstart.engines.features import FeatureCache, image_key

    t_scan, data = _timed(lambda: scan_folder(folder))
    rels = [os.path.relpath(s.path, folder) for s in data.samples]
    t_split, _ = _timed(lambda: [split_of(r, 0.1, 0.1) for r in rels])
    paths = [s.path for s in data.samples][:limit]
    t_digest, _ = _timed(lambda: content_digests(paths, cache_root=cache_root))
    spaces = sorted((cache_root / "features").glob("*/namespace.json"))

    def lookup():
        keys = [image_key(p) for p in paths]
        if not spaces:
            return 0
        namespace = {k: v for k, v in json.loads(spaces[0].read_text()).items() if k != "format"}
        cache = FeatureCache(cache_root, namespace)
        cache.refresh()
        hits = [k for k in keys if cache.contains(k)]
        cache.get(hits)
        return len(hits)

    t_lookup, hits = _timed(lookup)
    return {"images": len(paths), "classes": len(data.classes), "scan_s": t_scan, "split_s": t_split,
            "digest_s": t_digest, "lookup_s": t_lookup, "cache_hits": hits}


def _first_train(headstart: list, folder: Path, cache: Path) -> list:
    return [*headstart, "-q", "train", folder, "--strategy", "feature-extraction", "--image-size", "32",
            "--cache-dir", cache]


def fill(headstart: list, work: Path, n: int, smoke: bool = False, synthetic: bool = False) -> dict:
    """The folder of `n` images and its feature cache, filled by a first `train` (timed, not a step measured),
    or `synthetic`ally: UNIQUE images and hard links to them, and the cache written directly (_fill_cache)."""
    need = n * 16 * 1024 + (2 << 30 if not smoke else 0)  # files (a block each), cache (1280 floats each), slack
    free = shutil.disk_usage(work).free
    if free < need:
        raise RuntimeError(f"scale: {work} has {free / 2**30:.1f} GiB free, the section needs "
                           f"{need / 2**30:.1f} GiB; free some space or run it with fewer images (--smoke).")
    root = work / "scale"
    folder, cache = root / "data", root / "cache"
    if synthetic:
        t_write, paths = _timed(lambda: _link_copies(_write_images(folder, min(n, UNIQUE), CLASSES), folder, n,
                                                     CLASSES))
        t_first, _ = _timed(lambda: _fill_cache(folder, cache))
    else:
        t_write, paths = _timed(lambda: _write_images(folder, n, CLASSES))
        t_first, _ = _timed(lambda: subprocess.run([str(c) for c in _first_train(headstart, folder, cache)
                                                    + ["--out", root / "run1"]], check=True, capture_output=True))
    quarter = paths[: n // 4]
    _link_subset(quarter, root / "quarter", CLASSES)
    _link_subset(quarter, root / "quarter-1000", min(1000, len(quarter)))  # one image a class at most
    return {"images": n, "write_seconds": round(t_write, 1), "first_train_seconds": round(t_first, 1),
            "synthetic": synthetic}


def measure(headstart: list, work: Path, filled: dict, max_rss) -> dict:
    """The timed part on `fill`'s folder: each step per image in this process, then a second `train`."""
    root = work / "scale"
    folder, cache = root / "data", root / "cache"
    n = filled["images"]
    # Scanning and splits grow with the folder (a quarter of it, then that quarter in up to 1,000 classes);
    # digests and look-ups with the images asked for, from the whole folder's caches (a quarter's would
    # miss them: other paths).
    full, part, spread = steps(folder, cache), steps(root / "quarter", cache), steps(root / "quarter-1000", cache)
    first = steps(folder, cache, limit=part["images"])
    part.update({k: first[k] for k in ("digest_s", "lookup_s")})
    spread.update({k: first[k] for k in ("digest_s", "lookup_s")})  # per path: no term per class
    t0 = time.perf_counter()
    mib, _ = max_rss(*_first_train(headstart, folder, cache), "--out", root / "run2")
    t_second = time.perf_counter() - t0
    metrics = json.loads((root / "run2" / "metrics.json").read_text())
    per_image = {k: round(full[f"{k}_s"] / full["images"] * 1e6, 1) for k in ("scan", "split", "digest", "lookup")}
    growth_image = {k: round((full[f"{k}_s"] - part[f"{k}_s"]) / (full["images"] - part["images"]) * 1e6, 1)
                    for k in ("scan", "split", "digest", "lookup")}
    extra_classes = spread["classes"] - part["classes"]
    growth_class = {k: round((spread[f"{k}_s"] - part[f"{k}_s"]) / extra_classes * 1e6, 1)
                    if extra_classes > 0 and k in ("scan", "split") else None
                    for k in ("scan", "split", "digest", "lookup")}
    return {"images": n, "classes": CLASSES, "classes_spread": spread["classes"],
            "write_seconds": filled["write_seconds"], "first_train_seconds": filled["first_train_seconds"],
            "second_train_seconds": round(t_second, 1), "synthetic": filled.get("synthetic", False),
            "second_train_peak_rss_mib": round(mib, 1), "second_train_head_seconds": metrics.get("head_seconds"),
            "second_train_from_cache": metrics["extraction"]["from_cache"],
            "second_train_wall_seconds": metrics.get("wall_seconds"),
            "us_per_image": per_image, "us_per_extra_image": growth_image, "us_per_extra_class": growth_class,
            "cache_hits": full["cache_hits"], "load_average": os.getloadavg()[0]}


def scale(headstart: list, work: Path, n: int, max_rss, smoke: bool = False, synthetic: bool = False) -> dict:
    try:
        return measure(headstart, work, fill(headstart, work, n, smoke, synthetic), max_rss)
    finally:
        shutil.rmtree(work / "scale", ignore_errors=True)


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def markdown(s: dict) -> list[str]:
    step_names = {"scan": "scanning the folder", "split": "split assignment", "digest": "file digests (cached)",
                  "lookup": "feature-cache look-up"}
    lines = ["", f"Scale: {s['images']:,} 16x16 PNG images in {s['classes']} classes, features cached by a first "
             f"`train` at 32 px ({s['first_train_seconds']:.0f} s); load average {s['load_average']:.1f}:", "",
             "| step | µs per image | µs per extra image | µs per extra class |", "|---|---|---|---|"]
    lines += [f"| {label} | {s['us_per_image'][k]:.1f} | {s['us_per_extra_image'][k]:.1f} | "
              f"{_number(s['us_per_extra_class'][k])} |" for k, label in step_names.items()]
    head = s.get("second_train_head_seconds")
    lines += ["", f"Second `train` on the same folder: {s['second_train_seconds']:.0f} s wall "
              f"({s['second_train_from_cache']:,} images from the cache), of which the head "
              f"{head if head is not None else float('nan'):.0f} s; peak RSS {s['second_train_peak_rss_mib']:.0f} MiB."]
    return lines
