"""Progress bars (images/s and ETA) that stay silent under --quiet and when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty()


def bar(total: int, desc: str, unit: str = "img", disable: bool = False) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True, leave=False,
                disable=disable or not enabled(), smoothing=0.1)
