"""Heatmaps of the likely wrong labels in inspect.html: where the head that judged each shown file looked for
its given label and for the label it suggests.

The label check's heads (labels.py) are linear on principal components of the pooled features: logits =
W z + b with z = (f - mean) P. On the pooled features f themselves that is one linear layer, (W P^T) f +
(b - W P^T mean), and f is the global average of the backbone's last feature map: so the map is CAM
(heatmaps/cam.py), exact, drawn by the same code `headstart explain` uses (heatmaps/explain.py). Each file
is drawn with the fold head that held it out, the one whose probabilities flagged it: that head never saw
the file's label.

The feature cache holds only the pooled vectors, so the files shown (page.SHOWN at most, never all flagged
files) go through the backbone once more, up to its pooling, in eager torch fp32 (as report.html's worst
errors do, reports/overlays.py): on FMNIST-TL at 160 px, 48 MobileNetV2 passes, a second or two on 2 cores.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from headstart.data.images import ImageError, load_image
from headstart.engines.rule import choose_engine, make_engine
from headstart.errors import HeadstartError
from headstart.heatmaps.cam import FeatureMapNet
from headstart.heatmaps.explain import Member, explain_classes
from headstart.heatmaps.overlay import thumbnail

log = logging.getLogger("headstart")

FAILURES = (HeadstartError, OSError, ValueError, RuntimeError)  # a backbone that cannot run these images


def feature_head(weight: np.ndarray, bias: np.ndarray, cols: np.ndarray, axes, n_classes: int) -> nn.Module:
    """A fold's head on the reduced features (weight (k, d), bias (k,), its classes `cols`) as one nn.Linear on
    the pooled features, with a row per class of the data (a class the fold lacks: no weight, no chance)."""
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    if axes is not None:  # z = (f - mean) @ top  =>  W z + b = (W top^T) f + (b - W top^T mean)
        mean, top = axes
        w = w @ np.asarray(top, np.float64).T
        b = b - w @ np.asarray(mean, np.float64)
    linear = nn.Linear(w.shape[1], n_classes)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(-1e9)
        linear.weight[torch.as_tensor(cols)] = torch.as_tensor(w, dtype=torch.float32)
        linear.bias[torch.as_tensor(cols)] = torch.as_tensor(b, dtype=torch.float32)
    return nn.Sequential(linear)


def label_overlays(ctx, lab: dict, axes, picks: list[tuple[int, int, int]], side: int) -> tuple[dict, str | None]:
    """For each pick (index into ctx.feats.samples, given class, suggested class), the pair (given label's
    overlay, suggested label's overlay) as PIL images at most `side` pixels a side, keyed by the pick's index
    (an image that cannot be read now is left out); and, when none could be drawn, why (else None)."""
    if not picks:
        return {}, None
    classes = ctx.feats.classes
    try:
        net = FeatureMapNet(ctx.entry, ctx.engine.model)
        engine = make_engine(net, choose_engine(ctx.choice.device, "torch", "fp32"))
    except FAILURES as exc:
        log.warning("inspect: no heatmaps of the label findings: %s", exc)
        return {}, f"the backbone could not be run for them ({exc})"
    out = {}
    for j, (weight, bias, cols) in enumerate(lab["heads"]):
        mine = [p for p in picks if lab["fold"][p[0]] == j]
        if not mine:
            continue
        member = Member(engine, feature_head(weight, bias, cols, axes, len(classes)), ctx.prep)
        paths = [ctx.feats.samples[i].path for i, _, _ in mine]
        try:
            explained = explain_classes([member], classes, paths, paths,
                                        [[classes[g], classes[s]] for _, g, s in mine], batch_size=16)
        except FAILURES as exc:
            log.warning("inspect: no heatmaps of the label findings: %s", exc)
            return {}, f"the backbone could not be run for them ({exc})"
        for (i, _, _), path, (given, suggested) in zip(mine, paths, explained):
            if not given.ok:
                continue
            try:  # a reduced decode is enough: the map covers the whole image at any size
                image = load_image(path, min_side=side)
            except (ImageError, OSError):
                continue
            out[i] = (thumbnail(image, given.map, side), thumbnail(image, suggested.map, side))
    return out, None
