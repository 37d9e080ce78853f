"""Warnings silenced around a block, correctly when several threads do it at once.

`warnings.catch_warnings` saves the process's filter list on entry and puts that copy back on exit.
Two threads whose blocks overlap therefore restore each other's lists: thread A saves the user's
filters, B saves A's "ignore everything", A restores the user's, B restores "ignore everything", and
the process ignores every warning from then on. Measured here: two threads each decoding 20,000 PNGs
through a per-image `catch_warnings` left 2 extra filters, "ignore" for every Warning first, on 3 runs
out of 3 (tests/test_quiet.py has the interleaving that does it every time).

`quiet()` counts the threads inside: the first one in saves the filters and silences, the last one
out restores, and no thread restores while another is still inside. Every block in headstart that
may run beside another thread and silences warnings goes through it (decoding, converting a model for
an engine); blocks that change the filters any other way must not run beside it.
"""

from __future__ import annotations

import threading
import warnings

from PIL import Image


class _Quiet:
    """The counted block behind `quiet()` (a class: entered once per decoded image, it must cost little)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                self._saved.__exit__(None, None, None)
                self._saved = None


_QUIET = _Quiet()


def quiet() -> _Quiet:
    """Warnings ignored in the block, except Pillow's DecompressionBombWarning, which is raised.

    The exception is for `images.load_image`: Pillow warns (rather than raises) for a header that claims
    more pixels than its limit, before decoding any; raised, it is a reason to refuse the file.
    """
    return _QUIET
