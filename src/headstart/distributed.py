"""Scale-out on PyTorch's own engine: torchrun starts the processes, `torch.distributed` connects them.

Nothing here starts processes or picks addresses: torchrun does, and leaves RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each worker's environment. `session()` opens the
process group from them (gloo on CPU; NCCL with one CUDA device per local rank) and closes it.
A plain `headstart train` has no such variables, never opens a group, and every helper below
then answers as one process does (rank 0 of 1, barriers and gathers are no-ops).

Every collective carries a timeout (HEADSTART_DIST_TIMEOUT seconds, default 1800: longer than
the wait at the extraction barrier for the slowest rank's share), and a failed one becomes a
HeadstartError naming the rank and what to do: a rank that died closes its sockets, so gloo
reports it to the others at once and the job stops instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from headstart.errors import HeadstartError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT = 1800.0  # seconds


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process: its ranks, the world size, and where the group meets."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master: str | None = None  # MASTER_ADDR:MASTER_PORT

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(env: dict | None = None) -> Launch:
    """The torchrun environment of this process (or of `env`); one process when torchrun did not start it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Launch()
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}")
    except ValueError:
        raise HeadstartError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK="
                             f"{env.get('LOCAL_RANK')!r} are not whole numbers; start headstart with torchrun, "
                             "which sets them, or unset them.") from None
    if not 0 <= launch.rank < launch.world_size:
        raise HeadstartError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}; start headstart with "
                             "torchrun, which sets them, or unset them.")
    return launch


def backend_and_device(launch: Launch, device: str = "auto", cuda_available: bool | None = None) -> tuple[str, str]:
    """(process group backend, torch device of this rank): NCCL and cuda:LOCAL_RANK when CUDA is used, else gloo."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "cuda" and not cuda_available:
        raise HeadstartError("--device cuda: no CUDA device is visible to this process; use --device cpu.")
    if device in ("cuda", "auto") and cuda_available:
        return "nccl", f"cuda:{launch.local_rank}"
    return "gloo", "cpu"


def timeout_seconds() -> float:
    value = os.environ.get("HEADSTART_DIST_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise HeadstartError(f"HEADSTART_DIST_TIMEOUT={value!r} is not a number of seconds.") from None


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Launch]:
    """Open the process group torchrun's environment describes (if any, and if not open yet); close it after."""
    launch = launch_from_env()
    if not launch.distributed or dist.is_initialized():
        yield launch
        return
    backend, dev = backend_and_device(launch, device)
    if backend == "nccl":
        torch.cuda.set_device(dev)  # one device per local rank (untested here: these machines have no GPU)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    except Exception as exc:
        raise HeadstartError(f"rank {launch.rank} of {launch.world_size} could not join the process group at "
                             f"{launch.master} ({_first_line(exc)}); check that every node runs the same torchrun "
                             "command with the same --rdzv-endpoint and can reach it.") from None
    _label_console(launch)
    log.info("distributed: rank %d of %d (local rank %d), backend %s, device %s", launch.rank, launch.world_size,
             launch.local_rank, backend, dev)
    try:
        yield launch
    finally:
        dist.destroy_process_group()


# `log.warning(..., extra=SAME_ON_EVERY_RANK)`: a fact every rank finds alike (a skipped file, an empty class
# folder), printed by rank 0 alone instead of once per rank.
SAME_ON_EVERY_RANK = {"same_on_every_rank": True}


def _rank0_says_it(record: logging.LogRecord) -> bool:
    return not getattr(record, "same_on_every_rank", False)


def _label_console(launch: Launch) -> None:
    """Console lines name their rank; ranks other than 0 show warnings only (not those every rank finds
    alike: SAME_ON_EVERY_RANK) and no progress bars (rank 0 reports the job: its log, the world size, the
    run directory)."""
    from headstart import progress

    for handler in logging.getLogger("headstart").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            fmt = handler.formatter._fmt if handler.formatter else "%(message)s"  # type: ignore[union-attr]
            handler.setFormatter(logging.Formatter(fmt.replace("[headstart]", f"[headstart rank {launch.rank}]")
                                                   .replace("%(levelname)s:", f"%(levelname)s: rank {launch.rank}:")))
            if launch.rank:
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(_rank0_says_it)
    if launch.rank:
        progress.set_quiet(True)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def collective(what: str, again: str | None = None) -> Iterator[None]:
    """Turn a failed collective (a rank died, the network dropped, the timeout passed) into a clear error."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not active() or not _is_distributed_failure(exc):
            raise
        raise HeadstartError(
            f"rank {rank()} of {world_size()}: another rank stopped or could not be reached during {what} "
            f"({_first_line(exc)}); the job stops. Look at the other ranks' output for the cause, then "
            f"{again or 'start the same command again: the feature chunks finished are reused'}.") from None


def _is_distributed_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def barrier(what: str) -> None:
    if active():
        with collective(what):
            dist.barrier()


def all_gather_object(obj: T, what: str) -> list[T]:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, what: str, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    with collective(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], what: str) -> list[float]:
    """Element-wise sums over the ranks, in float64 (so sums of per-image losses add exactly enough)."""
    if not active():
        return [float(v) for v in values]
    # NCCL reduces CUDA tensors only
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    with collective(what):
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_tensors(part: torch.Tensor, what: str) -> torch.Tensor:
    """The ranks' tensors, concatenated along dim 0 in rank order; any dtype, any first-dim size per rank."""
    if not active():
        return part
    parts = all_gather_object(part.cpu(), what)  # pickled as it is: a 16-bit tensor stays 16-bit
    # A rank with nothing to contribute sends an empty tensor: left out, so it cannot change the dtype.
    return torch.cat([p.to(part.device) for p in parts if p.numel()] or [part])


def share(n: int, unit: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of positions 0..n-1, cut at multiples of `unit` (whole batches or chunks):
    the units are dealt out as evenly as possible, the first ranks taking one more when they do not divide."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    units = -(-n // unit) if n else 0
    per, extra = divmod(units, world)
    first = rank_ * per + min(rank_, extra)
    last = first + per + (1 if rank_ < extra else 0)
    return range(min(first * unit, n), min(last * unit, n))
