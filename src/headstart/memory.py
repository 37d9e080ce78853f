"""Resident memory: giving freed memory back to the system, and a debug log of it at each step.

Where the default fine-tune's memory went (FMNIST-TL, 128 px, /proc/self/status at each step
of `training.train`; issue 15 item 4): `import torch` and headstart 0.75 GB resident; feature
extraction +0.4 GB anonymous memory that stayed (ONNX Runtime's CPU arena, sized for the largest
activations of a 64-image batch); the boundary activations' engine another +0.38 GB arena on
top (the activations themselves were 149 MiB), so the process entered epoch 1 at 2.0 GB and
peaked at 2.37 GB. Each engine session is now released once its work is done (engine.release)
and the freed heap is handed back with glibc's malloc_trim: freed small blocks otherwise stay
in the process's heaps. Released, epoch 1 started at 1.06 GB (docs/guides/fine-tuning.md).

HEADSTART_MEMLOG=1 logs VmRSS, RssAnon, RssFile and the high-water mark at each point a step
calls `note` (tracemalloc does not see torch's or ONNX Runtime's allocations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_libc = None


def trim() -> bool:
    """Return freed heap memory to the system (glibc's malloc_trim); False where libc has no such call."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    fn = getattr(_libc, "malloc_trim", None) if _libc else None  # musl, macOS, Windows: none
    if fn is None:
        return False
    fn(0)
    return True


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in MiB ({} where /proc is missing)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) // 1024
    except OSError:
        pass
    return out


def note(where: str) -> None:
    """Log this process's memory at `where` when HEADSTART_MEMLOG is set."""
    if os.environ.get("HEADSTART_MEMLOG"):
        s = status()
        log.warning("memory at %s: %s", where, ", ".join(f"{k} {v} MiB" for k, v in s.items()))
