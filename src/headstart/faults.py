"""Test-only fault injection: stop the process at a named point, so interruption tests are deterministic.

HEADSTART_FAULT holds comma-separated `[sigint-]POINT:N` items. At the N-th time this process
passes POINT, it kills itself with SIGKILL (a crash or `kill -9`, nothing can clean up), or
sends SIGINT with the `sigint-` prefix (Ctrl-C: to its whole process group when it leads one,
as a shell's foreground job does, else to itself). `POINT:N@R` fires only in the process whose
RANK (torchrun's environment) is R, to kill one rank of a distributed job. Points:

  chunk   a feature-cache chunk was stored (N counts chunks in this process)
  step    an optimizer step was taken in fine-tuning (N counts steps in this process)
  epoch   fine-tuning epoch N was checkpointed (N is the epoch number, so it survives a resume)

Unset, it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(where: str, count: int | None = None) -> None:
    """Passing point `where`: the `count`-th time (or this process's running count when None)."""
    spec = os.environ.get("HEADSTART_FAULT")
    if not spec:
        return
    if count is None:
        count = _counts[where] = _counts.get(where, 0) + 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        n, _, only_rank = n.partition("@")
        if only_rank and only_rank != os.environ.get("RANK", "0"):
            continue
        sig = signal.SIGKILL
        if name.startswith("sigint-"):
            name, sig = name[len("sigint-"):], signal.SIGINT
        if name == where and n == str(count):
            if sig == signal.SIGINT and os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), sig)  # as a terminal's Ctrl-C: the whole group, decoding workers too
            else:
                os.kill(os.getpid(), sig)
