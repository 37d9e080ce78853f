"""The CPU's feature flags, read once per call from /proc/cpuinfo.

Its own module because two places decide by them (engines/rule.py's precision rule, quantize.py's weight
type) and one must not import the other. Tests fake a CPU kind by replacing `cpu.cpu_flags`.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)  # the flags do not change while a process runs
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
