"""Batched feature extraction through the frozen backbone, and the on-disk feature cache.

Cache layout: `<cache>/features/<namespace>/namespace.json` plus shard files, each a
safetensors file of up to CHUNK images' pooled features with their image keys in its
header. The namespace hashes everything that changes a feature (backbone, weights hash,
preprocessing, engine, precision, decoder options, library versions); an image's key
hashes its absolute path, size and st_mtime_ns. So a changed file gets a new key and is
recomputed alone, and a shard, once renamed into place, is never rewritten.

Missing images are computed in sorted order in fixed chunks of CHUNK images, and each
chunk is written as it completes: memory stays flat as the data set grows, and a killed
run resumes from the last finished chunk with the same batches, hence identical features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from headstart.distributed import SAME_ON_EVERY_RANK
from headstart import distributed, faults, progress
from headstart.progress import count
from headstart.nets.spec import PIPELINE
from headstart.errors import HeadstartError
from headstart.fileio import atomic_path, write_json
from headstart.data.decoding import default_streams, default_workers, map_batches
from headstart.engines.onnx_engine import call_batch
from headstart.data.images import DECODER_OPTIONS
from headstart.fileio import default_cache_dir

log = logging.getLogger(__name__)

CHUNK = 256  # images per shard; a multiple of the batch size keeps batches identical after a resume
FORMAT = 1


def cache_root_of(cache_dir: str | os.PathLike | None) -> Path | None:
    """The cache folder a --cache-dir value means: None for the default, the string 'none' for no disk cache."""
    if cache_dir is None:
        return default_cache_dir()
    return None if str(cache_dir).lower() == "none" else Path(cache_dir)


def image_key(path: str) -> str:
    st = os.stat(path)
    # surrogateescape: a path that is not valid UTF-8 hashes as its own bytes (valid ones are unchanged).
    key = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:32]


def make_namespace(backbone: str, weights_identity: str, preprocessing, choice, int8=None) -> dict:
    """Everything that changes a feature vector, apart from the image itself; with int8, the calibration
    (quantize.Int8Source), since other calibration images give other features."""
    import PIL
    import torchvision

    from headstart._version import __version__

    namespace = {
        "backbone": backbone,
        "weights": weights_identity,
        "preprocessing": preprocessing.to_dict(),
        # A converted engine normalises the pixels in its own graph (pixels.py), where the last bits may differ.
        "pipeline": PIPELINE if choice.engine == "torch" else {**PIPELINE, "normalize": "in the engine"},
        "engine": choice.engine,
        "precision": choice.precision,
        "device": choice.device,
        "decoder": {**DECODER_OPTIONS, "pillow": PIL.__version__},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "headstart": __version__,
                     **engine_versions()},
        "pool": "global-average",
    }
    if choice.engine != "torch":  # a converted engine runs a batch in calls of this many images
        namespace["images_per_call"] = call_batch(preprocessing.crop_size, preprocessing.crop_size)
    if choice.precision == "int8":
        if int8 is None:
            raise ValueError("an int8 namespace needs the calibration it was quantised with")
        namespace["int8"] = int8.identity()
    return namespace


def engine_versions() -> dict[str, str]:
    """The converted engines' versions, when installed: they compute the features on CPU by default, and a
    new release may change a kernel (so a feature's last digits) like a new torch does."""
    from importlib import metadata

    found = {}
    for name in ("onnxruntime", "openvino"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def namespace_key(namespace: dict) -> str:
    return hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:24]


class FeatureCache:
    """Per-image features inside one namespace; `root=None` keeps them in memory only."""

    def __init__(self, root: str | os.PathLike | None, namespace: dict):
        self.namespace = namespace
        self.key = namespace_key(namespace)
        self.dir: Path | None = None  # where new shards go; None when not writing to disk
        self._shard_dir: Path | None = None  # where indexed shards are read from, even after a write failure
        self._memory: dict[str, np.ndarray] = {}
        self._index: dict[str, tuple[str, int]] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        if root is not None:
            d = Path(root) / "features" / self.key
            try:
                d.mkdir(parents=True, exist_ok=True)
                if not (d / "namespace.json").exists():
                    write_json(d / "namespace.json", {"format": FORMAT, **namespace})
                self.dir = self._shard_dir = d
            except OSError as exc:
                log.warning("feature cache %s is not writable (%s); features are kept in memory for this run "
                            "only. Pass --cache-dir to a writable folder to reuse them.", d, exc)

    def refresh(self) -> None:
        """Read the headers of shards not seen yet (other processes may have added some)."""
        if self.dir is None:
            return
        for shard in sorted(self.dir.glob("*.safetensors")):
            name = shard.name
            if name in self._seen:
                continue
            try:
                with safe_open(str(shard), framework="numpy") as f:
                    keys = json.loads(f.metadata()["keys"])
            except Exception as exc:  # a foreign or damaged file: ignore it, never crash on the cache
                log.warning("ignoring unreadable cache shard %s (%s)", shard, type(exc).__name__)
                self._seen.add(name)
                continue
            self._seen.add(name)
            for row, k in enumerate(keys):
                self._index.setdefault(k, (name, row))

    def contains(self, key: str) -> bool:
        return key in self._index or key in self._memory

    def put(self, keys: list[str], feats: np.ndarray) -> None:
        """Store one chunk's features (on disk when the cache is writable, else in memory)."""
        assert len(keys) == len(feats)
        with self._lock:  # extraction's streams store chunks from several threads
            if keys:
                self._store(keys, feats)
            faults.point("chunk")  # test hook: HEADSTART_FAULT=chunk:N

    def _store(self, keys: list[str], feats: np.ndarray) -> None:
        if self.dir is not None:
            name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
            try:
                with atomic_path(self.dir / name) as tmp:
                    save_file({"features": np.ascontiguousarray(feats, dtype=np.float32)}, str(tmp),
                              metadata={"keys": json.dumps(keys)})
                self._seen.add(name)
                for row, k in enumerate(keys):
                    self._index.setdefault(k, (name, row))
                return
            except OSError as exc:
                log.warning("cannot write to feature cache %s (%s); continuing without it.", self.dir, exc)
                self.dir = None
        for k, f in zip(keys, feats):
            self._memory[k] = np.asarray(f, dtype=np.float32)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Features for `keys`, in order; every key must be present."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        out: np.ndarray | None = None
        for i, k in enumerate(keys):
            if k in self._memory:
                out = _place(out, len(keys), i, self._memory[k])
            else:
                name, row = self._index[k]
                by_shard.setdefault(name, []).append((i, row))
        for name, pairs in by_shard.items():
            with safe_open(str(self._shard_dir / name), framework="numpy") as f:
                block = f.get_tensor("features")
            for i, row in pairs:
                out = _place(out, len(keys), i, block[row])
        if out is None:
            return np.zeros((0, 0), dtype=np.float32)
        return out


def _place(out: np.ndarray | None, n: int, i: int, vec: np.ndarray) -> np.ndarray:
    if out is None:
        out = np.empty((n, vec.shape[-1]), dtype=np.float32)
    out[i] = vec
    return out


@dataclass
class Extraction:
    keys: list[str | None]  # per input path; None where the file failed
    failures: dict[str, str] = field(default_factory=dict)  # path -> reason
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0
    ranks: list[dict] = field(default_factory=list)  # per rank: images computed, seconds (sharded extraction)

    @property
    def ok(self) -> np.ndarray:
        return np.array([k is not None for k in self.keys], dtype=bool)


def extract(engine, transform: Callable, paths: Sequence[str], cache: FeatureCache, *,
            batch_size: int = 64, workers: int | None = None, desc: str = "features",
            sharded: bool = False, streams: int | None = None) -> Extraction:
    """Make sure every readable image in `paths` has features in `cache`; return keys and failures.

    Features are not returned here, so memory does not grow with the data set:
    `cache.get(result.keys)` assembles them when a caller needs them.

    `streams` (default: decoding.default_streams when images are decoded in this process): engine calls
    side by side, each on its share of the engine's threads, while this thread decodes the next batches;
    the features are the ones a single stream computes with that many threads per call.

    `sharded` (every rank of a torchrun job calls it with the same `paths`): each rank computes its
    share of the sorted to-do list, whole chunks of it (distributed.share), so every batch is one a
    single process would run; then the ranks meet, and each returns the whole result (failures are
    the union, every feature is in the shared cache).
    """
    t0 = time.perf_counter()
    keys: list[str | None] = []
    failures: dict[str, str] = {}
    for p in paths:
        try:
            keys.append(image_key(p))
        except OSError as exc:
            keys.append(None)
            failures[p] = f"cannot read file ({exc.strerror or exc})"
    cache.refresh()
    todo = sorted({p: k for p, k in zip(paths, keys) if k is not None and not cache.contains(k)}.items())
    n_cached = sum(1 for k in keys if k is not None) - len(todo)
    n_unreadable = 0  # of the to-do list; files that could not even be stat'ed were never in it
    if todo:
        # "to read": a file that cannot be decoded is known only once read (failures are not cached)
        log.info("%s: %d/%d from cache, %d to read and compute", desc, n_cached, len(paths), len(todo))
        todo_paths = [p for p, _ in todo]
        device = getattr(getattr(engine, "choice", None), "device", "cpu")
        if workers is None:
            workers = default_workers(device)
        if streams is None:
            streams = 1 if workers else default_streams(device, engine)
        if sharded and distributed.active():
            bad = _compute_share(engine, transform, todo_paths, [k for _, k in todo], cache, batch_size, workers,
                                 streams, desc)
        else:
            bad = _compute_streams(engine, transform, todo_paths, [k for _, k in todo], cache, batch_size, workers,
                                   streams, desc)
        n_unreadable = len(bad)
        for i, reason in bad.items():
            failures[todo_paths[i]] = reason
        keys = [None if p in failures else k for p, k in zip(paths, keys)]
    result = Extraction(keys, failures, n_cached, len(todo) - n_unreadable, time.perf_counter() - t0,
                        getattr(bad, "ranks", []) if todo else [])
    log.info("%s: %s", desc, _summary(result, len(paths)))
    for p, reason in failures.items():
        log.warning("skipping %s: %s", p, reason, extra=SAME_ON_EVERY_RANK)
    return result


def _summary(result: Extraction, n: int) -> str:
    """What an extraction did, in plain words: "all 43 features from cache" when nothing was computed, never
    "0 computed (0 images/s)" (issue 29: files that cannot be read are tried again each run and are not
    features; they are warned about one by one)."""
    unreadable = f"; {count(len(result.failures), 'file')} could not be read" if result.failures else ""
    if not result.n_computed:
        if not result.n_cached:
            return f"no features: none of the {count(n, 'file')} could be read"
        return f"all {result.n_cached} features from cache{unreadable}"
    rate = result.n_computed / max(result.seconds, 1e-9)
    return (f"{result.n_cached}/{n} features from cache, {result.n_computed} computed in {result.seconds:.1f}s "
            f"({rate:.0f} images/s){unreadable}")


class _Failures(dict):
    """Position in the to-do list -> reason; sharded extraction adds what each rank did."""

    ranks: list[dict]


def _chunk_size(batch_size: int) -> int:
    return max(batch_size, CHUNK // batch_size * batch_size)


def _compute_share(engine, transform, paths: list[str], keys: list[str], cache: FeatureCache, batch_size: int,
                   workers: int, streams: int, desc: str) -> _Failures:
    """This rank's whole chunks of the to-do list into the shared cache, then every rank's failures."""
    mine = distributed.share(len(paths), _chunk_size(batch_size))
    rank = distributed.rank()
    log.info("%s: rank %d of %d computes images %d-%d of the %d to do", desc, rank, distributed.world_size(),
             mine.start, mine.stop, len(paths))
    t_share = time.perf_counter()
    bad = _compute_streams(engine, transform, paths[mine.start:mine.stop], keys[mine.start:mine.stop], cache,
                           batch_size, workers, streams, f"{desc} (rank {rank})")
    seconds = time.perf_counter() - t_share
    # A cache that could not be written keeps this rank's features in memory: they travel with the gather.
    memory = {k: cache._memory[k] for k in keys[mine.start:mine.stop] if k in cache._memory}
    mine_done = {"rank": rank, "computed": len(mine) - len(bad), "seconds": round(seconds, 3)}
    gathered = distributed.all_gather_object(({mine.start + i: r for i, r in bad.items()}, mine_done, memory),
                                             "feature extraction (waiting for every rank's share)")
    out = _Failures()
    out.ranks = []
    for failed, done, feats in gathered:
        out.update(failed)
        out.ranks.append(done)
        cache._memory.update(feats)
    cache.refresh()  # the other ranks' shards
    missing = [p for i, (p, k) in enumerate(zip(paths, keys)) if i not in out and not cache.contains(k)]
    if missing:
        raise HeadstartError(f"rank {rank}: {len(missing)} features the other ranks computed are not in the cache "
                             f"folder {cache.dir} here (e.g. for {missing[0]}); under torchrun every node must see "
                             "one shared cache folder: pass --cache-dir on a shared filesystem.")
    return out


def _compute_streams(engine, transform, paths: list[str], keys: list[str], cache: FeatureCache, batch_size: int,
                     workers: int, streams: int, desc: str) -> dict[int, str]:
    """Features of `paths` into `cache`, one chunk at a time; position -> reason for the unreadable ones.
    With `streams` > 1 that many engine calls run side by side while this thread decodes the next batches
    (decoding.map_batches). Every batch is the one a single stream makes, so which thread ran it does not
    change its features."""
    chunk = _chunk_size(batch_size)
    streams = max(1, min(streams, -(-len(paths) // max(1, batch_size))))
    if streams > 1:
        log.info("%s: %d engine streams of %d thread(s), batches decoded beside them", desc, streams,
                 max(1, torch.get_num_threads() // streams))
    failed: dict[int, str] = {}
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    done = 0
    with progress.bar(len(paths), desc) as pbar, \
            contextlib.closing(map_batches(paths, transform, batch_size, workers, engine, streams)) as batches:
        for batch, out in batches:
            failed.update(batch.failed)
            if out is not None:
                pending.append(out.numpy())
                pending_keys.extend(keys[i] for i in batch.indices)
            done += batch.size
            pbar.update(batch.size)
            # Chunk boundaries are positions in the sorted to-do list, independent of failures.
            if done % chunk == 0 or done == len(paths):
                cache.put(pending_keys, np.concatenate(pending) if pending else np.zeros((0, 0), np.float32))
                pending_keys, pending = [], []
    return failed
