"""Heatmaps of images through one model or several (an ensemble): what `Model.explain` returns.

Each input gets an `Explanation` in input order: the class its map is for (the one asked for, else the
predicted one), that class's probability, the predicted class, and the map at the image's own size as
decoded (EXIF orientation applied), NaN where the centre crop cut the image away (placement.py); or,
for an unusable input, why (as `Model.predict` reports it), and the others go on.

One pass of each model's backbone per view gives both the map and the probabilities: the pooled
features are the feature map's mean, so nothing runs twice. An ensemble explains the class its averaged
probabilities pick, and its map is the mean of its members' maps, each divided first by its own maximum:
the members' scores are in units of their own logits (a scratch CNN's are not a fine-tuned
MobileNetV2's), and the ensemble averages probabilities, not logits, so no sum of raw maps is its
score. pytorch-grad-cam combines the maps of several layers the same way (each scaled, then averaged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from headstart.data.decoding import decode_side
from headstart.data.images import ImageError, load_image, to_rgb
from headstart.errors import HeadstartError
from headstart.heatmaps import cam
from headstart.heatmaps.placement import displayed_size, place
from headstart.nets.spec import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanation:
    """What `explain` says about one input: where the model looked for a class, or why it could not."""

    input: str  # the path as given, or "<image i>" for the i-th input when it is an in-memory image
    map: np.ndarray | None = field(default=None, repr=False)  # (height, width) float32 at the image's size
    class_: str | None = None  # the class the map is for: the one asked for, else the predicted one
    probability: float | None = None  # the model's probability of `class_`
    label: str | None = None  # the predicted class (the most probable)
    label_probability: float | None = None
    method: str | None = None  # "cam" (linear head, exact), "grad-cam", or the members' for an ensemble
    error: str | None = None  # why the input could not be used

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Member:
    """One model as the maps need it: the engine running its FeatureMapNet, its head, how its images are
    prepared, and whether it averages the mirror view too (test-time flips)."""

    engine: object  # uint8 pixels (B, 3, S, S) -> feature map (B, C, h, w); see engines/engine.py
    head: nn.Module  # pooled features (B, C) -> logits (B, K)
    preprocessing: Preprocessing
    mirrored: bool = False

    @property
    def method(self) -> str:
        return cam.method_of(self.head)


def class_index(classes: Sequence[str], class_: str | None) -> int | None:
    if class_ is None:
        return None
    if class_ not in classes:
        raise HeadstartError(f"class {class_!r} is not one of the model's classes ({', '.join(classes)}); "
                             "name one of those, or leave the class out for the predicted one.")
    return list(classes).index(class_)


def explain(members: Sequence[Member], classes: Sequence[str], items: Sequence, names: Sequence[str],
            class_: str | None = None, batch_size: int = 64) -> list[Explanation]:
    """One Explanation per item (a path or a PIL image), in order; `names` say what each is called."""
    return [e[0] for e in explain_classes(members, classes, items, names, [[class_]] * len(items), batch_size)]


def explain_classes(members: Sequence[Member], classes: Sequence[str], items: Sequence, names: Sequence[str],
                    wanted: Sequence[Sequence[str | None]], batch_size: int = 64) -> list[list[Explanation]]:
    """Per item, one Explanation per class named in `wanted[i]` (None: the predicted class), in that order, all
    from one pass of each backbone: the maps of several classes differ only in the head's last step. An
    unusable item gets its error once per class asked for."""
    if len(wanted) != len(items):
        raise ValueError(f"{len(wanted)} lists of classes for {len(items)} inputs")
    targets = [[class_index(classes, c) for c in w] for w in wanted]
    out: list[list[Explanation]] = []
    for s in range(0, len(items), batch_size):
        out += _batch(members, classes, items[s:s + batch_size], names[s:s + batch_size], targets[s:s + batch_size])
    return out


def _load(item, preprocessings: Sequence[Preprocessing]):
    """Per member, the decoded uint8 pixels (3, S, S) and the size they were decoded at; and the image's
    own size. Members whose transforms decode alike share one decode."""
    decoded: dict = {}
    pixels, sizes = [], []
    if isinstance(item, (str, os.PathLike)):
        try:
            os.stat(item)
        except OSError as exc:  # predict's words for a file it cannot even find (engines/features.extract)
            raise ImageError(f"cannot read file ({exc.strerror or exc})") from None
        for pre in preprocessings:
            transform = pre.transform()
            side = decode_side(transform)
            if side not in decoded:
                decoded[side] = load_image(item, side)
            img = decoded[side]
            pixels.append(transform.decode(img))
            sizes.append(img.size)
        size = displayed_size(item)
        return pixels, sizes, size
    if not isinstance(item, Image.Image):
        raise ImageError(f"not an image path or PIL image but {type(item).__name__}")
    img = to_rgb(item)
    return [pre.transform().decode(img) for pre in preprocessings], [img.size] * len(preprocessings), img.size


def _batch(members, classes, items, names, targets: list[list[int | None]]) -> list[list[Explanation]]:
    loaded, errors = [], {}
    for i, (item, name) in enumerate(zip(items, names)):
        try:
            loaded.append((i, *_load(item, [m.preprocessing for m in members])))
        except (ImageError, OSError, ValueError) as exc:
            errors[i] = str(exc)
            log.warning("skipping %s: %s", name, exc)
    results = {i: [Explanation(names[i], error=e)] * len(targets[i]) for i, e in errors.items()}
    if loaded:
        rows = [row[0] for row in loaded]
        for i, explanations in zip(rows, _explain_loaded(members, classes, loaded, names, [targets[i] for i in rows])):
            results[i] = explanations
    return [results[i] for i in range(len(items))]


def _explain_loaded(members, classes, loaded, names, targets) -> list[list[Explanation]]:
    views = []  # per member: its views' feature maps of the batch
    proba = 0.0
    for k, m in enumerate(members):
        pixels = torch.stack([row[1][k] for row in loaded])
        fmaps = cam.view_maps(m.engine, pixels, m.preprocessing.normalizer, m.mirrored)
        views.append(fmaps)
        p = sum(torch.softmax(cam.logits(m.head, f).double(), dim=1) for f in fmaps) / len(fmaps)
        proba = proba + p / len(members)
    proba = proba.numpy()
    predicted = proba.argmax(axis=1)
    method = members[0].method if len(members) == 1 else "mean of " + ", ".join(m.method for m in members)
    out: list[list[Explanation]] = [[] for _ in loaded]
    for j in range(max(len(t) for t in targets)):  # the j-th class asked for, of the images that asked for one
        batch = [b for b, t in enumerate(targets) if j < len(t)]
        target = torch.as_tensor([predicted[b] if targets[b][j] is None else targets[b][j] for b in batch],
                                 dtype=torch.long)
        grids = []  # per member: (len(batch), h, w), the mean of its views' maps
        for m, fmaps in zip(members, views):
            grids.append((sum(cam.class_map(m.head, f[batch], target) for f in fmaps) / len(fmaps)).numpy())
        for r, b in enumerate(batch):
            i, _, decoded_sizes, size = loaded[b]
            placed = [place(g[r], m.preprocessing, decoded_sizes[k], size)
                      for k, (m, g) in enumerate(zip(members, grids))]
            t, p = int(target[r]), int(predicted[b])
            out[b].append(Explanation(names[i], _combine(placed), classes[t], float(proba[b, t]), classes[p],
                                      float(proba[b, p]), method))
    return out


def _combine(maps: list[np.ndarray]) -> np.ndarray:
    """One model's map as it is; several models' maps each divided by its own maximum, then averaged where
    any of them saw the image (module docstring)."""
    if len(maps) == 1:
        return maps[0]
    scaled = []
    for m in maps:
        top = np.nanmax(m) if np.isfinite(m).any() else 0.0
        scaled.append(m / top if top > 0 else m)
    stack = np.stack(scaled)
    seen = np.isfinite(stack).sum(axis=0)
    total = np.nan_to_num(stack, nan=0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 where no member saw the pixel: NaN, as it should
        return (total / seen).astype(np.float32)
