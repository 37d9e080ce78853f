"""A trained model in use: features, probabilities and predictions for image files and PIL images.

`bundle.py` saves and loads a Model; this module only uses one. The backbone's engine is
built once per (engine, precision, device, cache folder) and reused by every later call:
building it costs, with ONNX Runtime, a hash of every backbone tensor and a new session.
A Model may be called from several threads at once (a server): the engine table is filled
under a lock, and the engines themselves are safe to share (engines/).

Every input gets an answer in input order. An unusable one (missing, not an image, damaged)
is a `Prediction` with its `error` from `predict`, a NaN row from `predict_proba(...,
errors="nan")`, and an ImageError naming it from `predict_proba` by default: rows of a
probability matrix that silently skipped an input would pair with the wrong files.

Test-time flips (`tta="flip"`): each image's probabilities are averaged with those of its
mirror image (the preprocessed tensor flipped left-right, as `--augment flip` trains on).
The features of a flipped model are the two views side by side, (n, 2 * feature_dim), so
every path that goes features -> probabilities (run, evaluate, predict, serve) averages the
same way; the mirror view has its own feature-cache namespace. On FMNIST-TL the fine-tuned
MobileNetV2 went from 0.9094 to 0.9126 test accuracy on the bf16 kind (issue 14), for one
more pass of the backbone per image (docs/guides/fine-tuning.md, "Test-time flips").
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from headstart.nets.registry import Backbone, Preprocessing
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import choose_engine, make_engine, resolve_device
from headstart.errors import HeadstartError
from headstart.engines.features import FeatureCache, cache_root_of, extract, make_namespace
from headstart.learn.head_modules import softmax
from headstart.heatmaps.cam import FeatureMapNet
from headstart.heatmaps.explain import Explanation, Member as HeatmapMember, explain_classes as explain_each
from headstart.data.images import ImageError, to_rgb
from headstart.engines.quantize import Int8Source
from headstart.settings import Runtime
from headstart.nets.weights import WeightsInfo

log = logging.getLogger(__name__)

ERRORS = ("raise", "nan")
TTA = ("none", "flip")  # test-time views: the image alone, or the image and its mirror image


class Mirrored:
    """An engine that sees every batch mirrored left-right: the second view of flip TTA. It runs as its
    engine does (side by side calls too: `parallel_calls`), keywords passed on."""

    def __init__(self, engine):
        self.engine, self.choice = engine, engine.choice
        self.parallel_calls = getattr(engine, "parallel_calls", False)

    def __call__(self, x: torch.Tensor, **kw) -> torch.Tensor:  # (B, C, H, W) -> (B, feature_dim)
        return self.engine(x.flip(-1), **kw)


@dataclass(frozen=True)
class Prediction:
    """What `Model.predict` says about one input: its top-k classes, or why it could not be used."""

    input: str  # the path as given, or "<image i>" for the i-th input when it is an in-memory image
    top: list[tuple[str, float]]  # (class, probability), most probable first; empty when `error` is set
    error: str | None = None  # why the input could not be used (missing, not an image, damaged, ...)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        """The most probable class, or None for an unusable input."""
        return self.top[0][0] if self.top else None


def as_inputs(images) -> list:
    """A list of inputs from one path, one PIL image, or a sequence of them: a single string is one
    file, not a sequence of one-character file names."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _name(item, i: int) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<image {i}>"


@dataclass(eq=False)
class Model:
    """A backbone and a head with the preprocessing and class names they were trained with."""

    entry: Backbone
    backbone: nn.Module  # image batch -> pooled features
    head: nn.Module  # features -> logits, columns follow `classes`
    classes: list[str]
    preprocessing: Preprocessing
    weights: WeightsInfo
    head_config: dict
    strategy: str = "feature-extraction"
    backbone_identity: str | None = None  # what the feature cache keys on; the weights hash when frozen
    tta: str = "none"  # "flip": probabilities averaged with the mirror image's (module docstring)
    int8: Int8Source | None = None  # the quantised backbone when the head was trained on int8 features
    _engines: dict = field(default_factory=dict, init=False, repr=False)
    _engines_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def classes_(self) -> np.ndarray:
        return np.array(self.classes)

    def engine(self, device: str = "auto", engine: str = "auto", precision: str = "auto", cache_root=None):
        """The backbone's engine for this choice, built on first use and then reused (by every thread).

        A model whose head learnt int8 features keeps int8 unless another precision is asked for:
        its head would otherwise see features a little unlike those it was fitted to."""
        if precision == "auto" and self.int8 is not None and resolve_device(device) == "cpu":
            precision = "int8"
        choice = choose_engine(device, engine, precision)
        if choice.precision == "int8" and self.int8 is None:
            raise HeadstartError("this model has no int8 backbone (it was not trained with --precision int8); "
                                 "use --precision fp32 or auto.")
        key = (choice.engine, choice.precision, choice.device, None if cache_root is None else os.fspath(cache_root))
        with self._engines_lock:  # held while building: two first calls build one engine, not two
            if key not in self._engines:
                self._engines[key] = make_engine(self.backbone, choice, cache_root, self.int8)
            return self._engines[key]

    def map_engine(self, device: str = "auto", engine: str = "auto", precision: str = "auto", cache_root=None):
        """An engine, as `engine` chooses it, running the backbone up to its global average pooling: uint8
        pixels -> the last feature map, which heatmaps are drawn on (heatmaps/cam.py). An int8 model's map
        comes from its fp32 backbone: its bundle keeps only the quantised pooled network."""
        if precision == "int8" or (precision == "auto" and self.int8 is not None):
            precision = "fp32"
        choice = choose_engine(device, engine, precision)
        key = ("map", choice.engine, choice.precision, choice.device,
               None if cache_root is None else os.fspath(cache_root))
        with self._engines_lock:
            if key not in self._engines:
                self._engines[key] = make_engine(FeatureMapNet(self.entry, self.backbone), choice, cache_root)
            return self._engines[key]

    def heatmap_member(self, runtime: Runtime) -> HeatmapMember:
        """This model as heatmaps/explain.py needs it."""
        eng = self.map_engine(runtime.device, runtime.engine, runtime.precision, cache_root_of(runtime.cache_dir))
        return HeatmapMember(eng, self.head, self.preprocessing, mirrored=self.tta == "flip")

    def heatmap_members(self, runtime: Runtime) -> list[HeatmapMember]:
        """The models whose maps make this one's: itself (an Ensemble: its members)."""
        return [self.heatmap_member(runtime)]

    def namespace(self, choice: EngineChoice, view: str = "image") -> dict:
        ns = make_namespace(self.entry.name, self.backbone_identity or self.weights.identity(), self.preprocessing,
                            choice, self.int8)
        return ns if view == "image" else {**ns, "view": view}  # plain views keep the keys they always had

    @property
    def n_views(self) -> int:
        return 2 if self.tta == "flip" else 1

    @property
    def feature_width(self) -> int:
        """Columns of `features`: the backbone's features of each test-time view, side by side."""
        return self.entry.feature_dim * self.n_views

    def _views(self, eng) -> list[tuple[str, object]]:
        return [("image", eng)] + ([("mirror", Mirrored(eng))] if self.tta == "flip" else [])

    def batch_features(self, eng, pixels: torch.Tensor) -> np.ndarray:
        """(B, feature_width) features through `eng`, every view, of a batch of decoded pixels: (B, C, H, W)
        uint8, as `preprocessing.transform().decode` makes them; the engine normalises them (pixels.py)."""
        normalize = self.preprocessing.normalizer
        return np.concatenate([e(pixels, normalize=normalize).numpy() for _, e in self._views(eng)], axis=1)

    def logits_from_features(self, feats: np.ndarray) -> np.ndarray:
        """Logits of one view: (n, feature_dim) features -> (n, n_classes)."""
        self.head.eval()
        with torch.inference_mode():
            return self.head(torch.as_tensor(np.asarray(feats, np.float32))).double().numpy()

    def proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, feature_width) features -> (n, n_classes): the mean of the views' probabilities."""
        views = np.split(np.asarray(feats), self.n_views, axis=1)
        proba = softmax(self.logits_from_features(views[0]))
        for v in views[1:]:
            proba = proba + softmax(self.logits_from_features(v))
        return proba / len(views)

    def features(self, images, runtime: Runtime | None = None, *, desc: str = "features",
                 **kw) -> tuple[np.ndarray, list[str | None]]:
        """Features (n_inputs, feature_width) of image paths (through the cache) and PIL images, in input
        order, and per input None or why it could not be used (its row is then NaN).

        `runtime` runs the backbone; its fields may also be given as keywords (batch_size, cache_dir,
        device, engine, precision, workers), which replace the runtime's.
        """
        rt = Runtime.of(runtime, **kw)
        batch_size = rt.batch_size
        items = as_inputs(images)
        cache_root = cache_root_of(rt.cache_dir)
        eng = self.engine(rt.device, rt.engine, rt.precision, cache_root)
        transform = self.preprocessing.transform()
        feats = np.full((len(items), self.feature_width), np.nan, np.float32)
        errors: list[str | None] = [None] * len(items)
        at_paths = [i for i, im in enumerate(items) if isinstance(im, (str, os.PathLike))]
        if at_paths:
            paths = [os.fspath(items[i]) for i in at_paths]
            d = self.entry.feature_dim
            for v, (view, view_engine) in enumerate(self._views(eng)):
                cache = FeatureCache(cache_root, self.namespace(eng.choice, view))
                # extract warns once about each unusable file; the mirror view gets only the usable ones.
                result = extract(view_engine, transform, paths, cache, batch_size=batch_size, workers=rt.workers,
                                 desc=desc if view == "image" else f"{desc} (mirrored)")
                ok = [i for i, k in zip(at_paths, result.keys) if k is not None]
                if ok:
                    feats[ok, v * d:(v + 1) * d] = cache.get([k for k in result.keys if k is not None])
                for i, p in zip(at_paths, paths):
                    errors[i] = errors[i] or result.failures.get(p)
                at_paths = [i for i in at_paths if errors[i] is None]
                paths = [os.fspath(items[i]) for i in at_paths]
                if not paths:
                    break
        # In-memory images: no cache key to give them, so straight through the network.
        in_memory, batch = [], []
        for i, im in enumerate(items):
            if isinstance(im, (str, os.PathLike)):
                continue
            try:
                if not isinstance(im, Image.Image):
                    raise ImageError(f"not an image path or PIL image but {type(im).__name__}")
                batch.append(transform.decode(to_rgb(im)))
                in_memory.append(i)
            except (ImageError, OSError, ValueError) as exc:
                errors[i] = str(exc)
                log.warning("skipping %s: %s", _name(im, i), exc)
        for s in range(0, len(batch), batch_size):
            feats[in_memory[s:s + batch_size]] = self.batch_features(eng, torch.stack(batch[s:s + batch_size]))
        return feats, errors

    def predict_proba(self, images, runtime: Runtime | None = None, *, errors: str = "raise", **kw) -> np.ndarray:
        """Probabilities (n_inputs, n_classes) for image paths or PIL images, rows in input order.

        An unusable input raises ImageError naming it (errors="raise"), or gets a row of NaN
        (errors="nan"). `runtime` runs the backbone; keywords batch_size, cache_dir, device, engine,
        precision, workers replace its fields.
        """
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {', '.join(ERRORS)}, not {errors!r}")
        items = as_inputs(images)
        feats, reasons = self.features(items, runtime, **kw)
        bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
        if bad and errors == "raise":
            listing = "; ".join(f"{_name(items[i], i)}: {r}" for i, r in bad[:5])
            raise ImageError(f"{len(bad)} of {len(items)} inputs cannot be used ({listing}"
                             f"{'; ...' if len(bad) > 5 else ''}). Pass errors='nan' for a NaN row in their place, "
                             "or use predict(), which reports each input's status.")
        proba = np.full((len(items), len(self.classes)), np.nan)
        ok = [r is None for r in reasons]
        if any(ok):
            proba[ok] = self.proba_from_features(feats[ok])
        return proba

    def predict(self, images, top_k: int = 1, runtime: Runtime | None = None, **kw) -> list[Prediction]:
        """One Prediction per input, in input order: its top-k (class, probability) pairs, or its error.

        `images` is one path or PIL image, or a sequence of them; nothing is dropped. `runtime` and
        keywords as for `predict_proba`.
        """
        items = as_inputs(images)
        feats, reasons = self.features(items, runtime, **kw)
        ok = [r is None for r in reasons]
        proba = self.proba_from_features(feats[ok]) if any(ok) else np.zeros((0, len(self.classes)))
        rows = iter(proba)
        k = max(1, min(top_k, len(self.classes)))
        out = []
        for i, (item, reason) in enumerate(zip(items, reasons)):
            if reason is not None:
                out.append(Prediction(_name(item, i), [], reason))
                continue
            p = next(rows)
            order = np.argsort(-p, kind="stable")[:k]
            out.append(Prediction(_name(item, i), [(self.classes[j], float(p[j])) for j in order]))
        return out

    def explain(self, images, class_: str | None = None, runtime: Runtime | None = None,
                **kw) -> list[Explanation]:
        """Where the model looked: one Explanation per input, in input order, with the map of `class_` (the
        predicted class when None) at the image's own size as decoded, or the input's error as `predict`
        reports it. A linear head gets CAM (exact: the map's mean over the network's grid is the class's
        logit minus its bias), any other head Grad-CAM at the same layer; test-time flips average the
        mirror image's map, flipped back (heatmaps/cam.py). `runtime` and keywords as for `predict_proba`."""
        items = as_inputs(images)
        return [e[0] for e in self.explain_classes(items, [[class_]] * len(items), runtime, **kw)]

    def explain_classes(self, images, classes: Sequence[Sequence[str | None]], runtime: Runtime | None = None,
                        **kw) -> list[list[Explanation]]:
        """Several maps per input from one pass of the backbone: for input i, one Explanation per class named in
        `classes[i]` (None: the predicted class), in that order; an unusable input gets its error once per
        class. report.html draws each worst error's predicted and true class this way."""
        rt = Runtime.of(runtime, **kw)
        items = as_inputs(images)
        return explain_each(self.heatmap_members(rt), self.classes, items,
                            [_name(item, i) for i, item in enumerate(items)], classes, rt.batch_size)


def features_of(model, images: list, runtime: Runtime | None = None,
                **kw) -> tuple[np.ndarray, dict[str, str]]:
    """Features of the usable inputs (rows in input order, unusable ones left out) and, for each
    unusable one, why: `Model.features` in the shape evaluation wants."""
    feats, reasons = model.features(images, runtime, **kw)
    ok = np.array([r is None for r in reasons], dtype=bool)
    names = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"<image {i}>" for i, im in enumerate(images)]
    return feats[ok], {n: r for n, r in zip(names, reasons) if r is not None}
