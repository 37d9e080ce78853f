"""`headstart explain`: where a trained model looked in image files, written as pictures and arrays.

Per usable input, two files named after it: `<name>.png`, the image with its heatmap over it and the
class, its probability and the prediction as title (heatmaps/overlay.py), and `<name>.npy`, the raw map
(float32, the image's own height x width as decoded, EXIF orientation applied; NaN where the centre crop
cut the image away). `shoe.jpg` gives `shoe.jpg.png` and `shoe.jpg.npy`. When two inputs share a file
name (`a/shoe.jpg`, `b/shoe.jpg`), every output keeps its path below the inputs' common folder
(`a/shoe.jpg.png`, `b/shoe.jpg.png`), so none overwrites another. An unusable input is reported with
its reason, as `predict` reports it, and the others are written.

Images are explained and written CHUNK at a time: a map is as large as its image (48 MB for a 12-megapixel
photo), so a folder of photos held at once would not fit in memory; the converted engines run 2 images
per call at 224 px anyway (engine.call_batch), so a larger batch would gain nothing. Nothing is written inside a folder given as input: the
PNGs would be read as images of that folder the next time it is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from headstart.data.images import ImageError, load_image
from headstart.errors import DataError, HeadstartError
from headstart.fileio import atomic_path
from headstart.heatmaps.overlay import write_overlay
from headstart.models.bundle import load
from headstart.models.ensemble import is_model
from headstart.runs.predict import expand_inputs
from headstart.settings import Runtime

log = logging.getLogger(__name__)

CHUNK = 8  # images explained, then written, at a time (module docstring)


def output_names(paths: Sequence[str]) -> list[str]:
    """Each input's output name (without .png / .npy): its file name, or, when two different inputs share
    a file name (ignoring case, for case-insensitive disks), its path below the inputs' common folder."""
    names = [os.path.basename(p) for p in paths]
    distinct = {}
    for p, n in zip(paths, names):
        distinct.setdefault(n.lower(), set()).add(os.path.normpath(p))
    if all(len(s) == 1 for s in distinct.values()):
        return names
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def _check_out(out: Path, inputs: Sequence) -> None:
    target = out.expanduser().resolve()
    for item in inputs:
        folder = Path(item).expanduser()
        if folder.is_dir() and (target == folder.resolve() or folder.resolve() in target.parents):
            raise HeadstartError(f"--out {out} is inside the input folder {item}: the heatmap PNGs would be read "
                                 "as images of that folder next time; choose an --out folder outside it.")


def _title(e) -> str:
    predicted = f"{e.label} {e.label_probability:.3f}"
    if e.class_ == e.label:
        return f"{os.path.basename(e.input)}: {predicted}"
    return f"{os.path.basename(e.input)}: map of {e.class_} ({e.probability:.3f}); predicted {predicted}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save(name) would append ".npy" to the .tmp name
        np.save(f, array)


def explain_files(model, inputs: Sequence, out: str | os.PathLike | None = None, *, class_: str | None = None,
                  runtime: Runtime | None = None, **kw) -> tuple[list[dict], list[dict]]:
    """Heatmaps of image files and folders (searched recursively) written into `out` (default RUN/explain
    when `model` is a path); returns rows of {path, class, probability, predicted, predicted_probability,
    method, overlay, map} in input order and the unusable inputs as {path, reason}.

    `model` is a run directory, a bundle folder, or a loaded Model or Ensemble; `class_` the class to draw
    (default: each image's predicted class). `runtime` runs the backbone; its fields may also be given as
    keywords (device, engine, precision, batch_size, cache_dir)."""
    runtime = Runtime.of(runtime, **kw)
    if out is None:
        if is_model(model):
            raise HeadstartError("explain_files needs `out` when given a loaded model (there is no run folder to "
                                 "write into).")
        out = Path(model) / "explain"
    out = Path(out)
    paths = expand_inputs(list(inputs))
    if not paths:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}.")
    _check_out(out, inputs)
    model = model if is_model(model) else load(model)
    names = output_names(paths)
    rows, skipped = [], []
    step = min(CHUNK, runtime.batch_size)
    for s in range(0, len(paths), step):
        for e, name in zip(model.explain(paths[s:s + step], class_=class_, runtime=runtime), names[s:s + step]):
            if not e.ok:
                skipped.append({"path": e.input, "reason": e.error})
                continue
            try:
                image = load_image(e.input)  # in full, as the user sees it: the map has its size
            except ImageError as exc:  # changed on disk since it was explained
                skipped.append({"path": e.input, "reason": str(exc)})
                log.warning("skipping %s: %s", e.input, exc)
                continue
            png, npy = out / f"{name}.png", out / f"{name}.npy"
            _save_npy(npy, e.map)
            write_overlay(image, e.map, _title(e), png)
            rows.append({"path": e.input, "class": e.class_, "probability": e.probability, "predicted": e.label,
                         "predicted_probability": e.label_probability, "method": e.method,
                         "overlay": str(png), "map": str(npy)})
    return rows, skipped
