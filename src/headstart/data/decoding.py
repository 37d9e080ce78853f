"""Image files into batches for the frozen backbone: decoding, resizing, normalising, and where that runs.

By default (`default_workers`) images are decoded in one worker process beside the network when the network
leaves a core free (a GPU runs it, or its threads do not take every core), and in the main process, between
the network's batches, when its threads take every core. Beside an engine whose threads hold every core, a
worker costs more than its own CPU time: ONNX Runtime's and OpenMP's parallel loops wait at each barrier for
the thread the worker pushed off its core. Measured on 2 cores (MobileNetV2, 128 px, 3,000 FMNIST-TL images,
median of 4 alternating runs, docs/guides/speed.md): 249 images/s with one worker, 359 in the main process, against
484 for the engine alone. Decoding each batch in 2 forked processes between the engine's calls (pixels in
shared memory) was measured too and reached 311: not kept.

Better still (`default_streams`), when the engine runs calls side by side (ONNX Runtime and OpenVINO:
`parallel_calls`): one engine stream per core, each call on a 1-thread session (an OpenVINO stream), so no
core waits at another's barrier, while the calling thread decodes the next batches. Until 2026-12-01 each
stream was a thread that decoded its own chunks too; two threads decoding in Python contend for the GIL:
on the AMX machine 3,000 FMNIST-TL images at 128 px decoded in 2 threads at 4,130-4,368 images/s against
5,400 in one (186 us of CPU per image in one thread, 316-332 in each of two). With one decoding thread
beside two OpenVINO bf16 streams the whole extraction ran at 1,938-2,085 images/s against 1,461-1,561 for
streams that decoded their own chunks (engine alone in 2-thread calls 2,294-2,411); ONNX Runtime fp32
1,009-1,090 against the engine alone's 1,224-1,284. (Earlier, on the AVX2 kind with ONNX Runtime: 395-405
images/s for 2 self-decoding streams against 325-340 for one, engine alone 438-446.)

Every way gives the same batches in the same order, bitwise, so features do not depend on it.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from headstart.data.images import ImageError, load_image


def default_workers(device: str = "cpu", engine_threads: int | None = None) -> int:
    """Decoding processes beside the network: 1 when it leaves a core free, else 0 (module docstring)."""
    cores = os.cpu_count() or 1
    if cores < 2:
        return 0
    threads = torch.get_num_threads() if engine_threads is None else engine_threads
    return 1 if not str(device).startswith("cpu") or threads < cores else 0


def default_streams(device: str = "cpu", engine=None, engine_threads: int | None = None) -> int:
    """Engine calls extraction runs side by side (module docstring): one per core the engine's threads would
    take, on a CPU engine that runs calls side by side; else 1."""
    if not str(device).startswith("cpu") or not getattr(engine, "parallel_calls", False):
        return 1
    threads = torch.get_num_threads() if engine_threads is None else engine_threads
    return max(1, min(os.cpu_count() or 1, threads))


def decode_side(transform: Callable) -> int | None:
    """The shorter side a transform resizes to (torchvision's ImageClassification): the JPEG draft target."""
    size = getattr(transform, "resize_size", None)
    return int(size[0]) if isinstance(size, (list, tuple)) and len(size) == 1 else None


def split_transform(transform: Callable) -> tuple[Callable, Callable | None]:
    """(per-image part for the loader's workers, per-batch part for the consumer, or None)."""
    if hasattr(transform, "decode") and hasattr(transform, "normalize"):
        return transform.decode, transform.normalize
    return transform, None


class _Images(torch.utils.data.Dataset):
    """(index, per-image tensor or None, reason or None); see `split_transform` for the batch part."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths = list(paths)
        self.transform, finish = split_transform(transform)
        self.min_side = decode_side(transform)
        # A grayscale image stays one channel through resizing and the transfer to the consumer, whose
        # per-batch part makes it three (bitwise the RGB result; see images.load_image).
        self.gray = finish is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i], self.min_side, gray=self.gray)), None
        except ImageError as exc:
            return i, None, str(exc)


def stack_pixels(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, C, H, W) uint8 of decoded images, each (1 or 3, H, W): a batch of gray images stays one channel;
    gray images among colour ones are repeated (the same values as their RGB decoding, images.load_image)."""
    channels = max(x.shape[-3] for x in images)
    return torch.stack([x.expand(channels, -1, -1) for x in images])


def _collate(items):
    ok = [(i, x) for i, x, err in items if err is None]
    failed = [(i, err) for i, x, err in items if err is not None]
    return [i for i, _ in ok], stack_pixels([x for _, x in ok]) if ok else None, failed


@dataclass
class Batch:
    """One batch of decoded images: what `iter_batches` yields."""

    indices: list[int]  # positions in `paths` of the images in `x`, in order
    x: torch.Tensor | None  # (len(indices), 3, H, W), fully transformed; None when none was readable
    failed: list[tuple[int, str]]  # (position in `paths`, reason) of the images that could not be read

    @property
    def size(self) -> int:
        """Images this batch accounts for, readable or not (for progress)."""
        return len(self.indices) + len(self.failed)


def iter_batches(paths: Sequence[str], transform: Callable, batch_size: int, workers: int = 0,
                 normalize: bool = True) -> Iterator[Batch]:
    """`paths` in order, in batches of `batch_size`, decoded by `workers` processes; an unreadable image is
    reported in its batch's `failed`, never raised. The per-image part of `transform` runs in the workers,
    its per-batch part (normalisation, see `split_transform`) here, on the whole batch; `normalize=False`
    leaves that to the caller, whose batches are then the uint8 pixels (an engine normalises them itself)."""
    _, finish = split_transform(transform)
    finish = finish if normalize else None
    loader = torch.utils.data.DataLoader(
        _Images(paths, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    for idx, xs, bad in loader:
        yield Batch(idx, finish(xs) if finish is not None and xs is not None else xs, bad)


def map_batches(paths: Sequence[str], transform: Callable, batch_size: int, workers: int,
                fn: Callable[..., Any], streams: int = 1) -> Iterator[tuple[Batch, Any]]:
    """`iter_batches`, each batch with `fn(batch.x)` (None for a batch with no readable image), in order.

    A transform with a per-batch part (`normalizer`, backbone_spec.SplitClassification) leaves it to `fn`:
    the batches stay uint8 pixels and `fn(batch.x, normalize=normalizer)` runs it (an engine normalises them
    itself, a converted one in its own graph: pixels.py).

    With `streams` > 1, `fn(batch.x, threads=...)` runs in that many threads side by side, on threads // streams
    of torch's threads each, while this thread decodes the next batches (module docstring); torch's threads are
    that share until the generator is closed. Close it when stopping early (`contextlib.closing`): that drops
    the queued batches, waits for the running ones and gives torch its threads back."""
    normalizer = getattr(transform, "normalizer", None)
    kw = {} if normalizer is None else {"normalize": normalizer}
    batches = iter_batches(paths, transform, batch_size, workers, normalize=normalizer is None)
    if streams <= 1:
        for batch in batches:
            yield batch, (fn(batch.x, **kw) if batch.x is not None else None)
        return
    saved = torch.get_num_threads()
    per_stream = max(1, saved // streams)
    torch.set_num_threads(per_stream)  # decoding's and normalising's torch ops take one stream's share too
    pool = ThreadPoolExecutor(streams, thread_name_prefix="headstart-stream")
    queue: collections.deque = collections.deque()
    try:
        for batch in batches:
            queue.append((batch, pool.submit(fn, batch.x, threads=per_stream, **kw) if batch.x is not None else None))
            while len(queue) >= 2 * streams:  # each stream has a batch running and one waiting
                done, out = queue.popleft()
                yield done, (out.result() if out is not None else None)
        while queue:
            done, out = queue.popleft()
            yield done, (out.result() if out is not None else None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(saved)
