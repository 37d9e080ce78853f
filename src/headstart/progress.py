"""Progress of long phases (extraction, boundary activations, epochs), with images/s and ETA.

On a terminal: a tqdm bar on stderr, silent under --quiet. Elsewhere (a log file, CI, a pipe):
plain INFO lines through logging, so they reach train.log, e.g.
"extracting: 2,560/10,000 images, 312 images/s, ETA 24 s": one once LOG_SECONDS have passed
and a tenth more of the work is done since the last line, or LONG_SECONDS have passed. A phase
shorter than LOG_SECONDS writes none (the phase's own summary line follows anyway).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_QUIET = False
LOG_SECONDS = 10.0
LONG_SECONDS = 60.0


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty()


class Progress:
    """`update(n)` as images are done; a bar on a terminal, periodic log lines otherwise."""

    def __init__(self, total: int, desc: str, unit: str = "img", disable: bool = False):
        self.total, self.desc = total, desc
        self.unit = "images" if unit == "img" else unit
        self.bar = None if disable or not enabled() else tqdm(
            total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True, leave=False, smoothing=0.1)
        self.log_lines = not disable and self.bar is None
        self.done = self.logged = 0
        self.t0 = self.t_logged = time.monotonic()
        self._lock = threading.Lock()

    # The clock is time.monotonic, not perf_counter, which the loops time their epochs and budgets with.
    def update(self, n: int = 1) -> None:
        with self._lock:  # extraction's streams update one bar from several threads
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
                return
            if not self.log_lines:
                return
            now = time.monotonic()
            since = now - self.t_logged
            if (since >= LOG_SECONDS and self.done - self.logged >= self.total / 10) or since >= LONG_SECONDS:
                log.info("%s", self.line(now))
                self.logged, self.t_logged = self.done, now

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(self.total - self.done) / rate:,.0f} s" if rate > 0 and self.done < self.total else ""
        return f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}, {rate:,.0f} {self.unit}/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int, desc: str, unit: str = "img", disable: bool = False) -> Progress:
    return Progress(total, desc, unit, disable)


# Counts in words for logs and messages: "1 image", "2 images", "1 class".
IRREGULAR = {"class": "classes", "batch": "batches"}


def count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else IRREGULAR.get(noun, noun + 's')}"


_console_lock = threading.Lock()
_console = {"users": 0, "handler": None, "level": logging.NOTSET}


class _Console:
    """`with console(verbose):` around a Python API call (train, evaluate, compare): the progress and summary
    lines the CLI prints, on stderr, for a caller who set up no logging (a notebook, a script).

    It does nothing when the CLI (or the caller) already put a handler on the "headstart" logger or on
    the root logger: their settings decide. `verbose=False` silences the lines below WARNING for the call;
    so does the caller's own `logging.getLogger("headstart").setLevel(logging.WARNING)`. Counted, like
    quiet(), so that calls in several threads at once add one handler and the last one out removes it.
    """

    def __init__(self, verbose: bool | None = None):
        self.verbose = verbose
        self.silenced = False

    def __enter__(self):
        logger = logging.getLogger("headstart")
        with _console_lock:
            if self.verbose is False:
                self.silenced, self.saved = True, logger.level
                logger.setLevel(logging.WARNING)
                return self
            if _console["users"] == 0 and (logger.handlers or logging.getLogger().handlers):
                return self  # logging is set up already: the CLI's handler, or the caller's
            if _console["users"] == 0:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("[headstart] %(message)s"))
                _console.update(handler=handler, level=logger.level)
                logger.addHandler(handler)
                if logger.level == logging.NOTSET:  # else the caller chose a level: keep it
                    logger.setLevel(logging.INFO)
            _console["users"] += 1
            self.counted = True
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("headstart")
        with _console_lock:
            if self.silenced:
                logger.setLevel(self.saved)
            elif getattr(self, "counted", False):
                _console["users"] -= 1
                if _console["users"] == 0:
                    logger.removeHandler(_console["handler"])
                    logger.setLevel(_console["level"])
                    _console["handler"] = None
        return False


def console(verbose: bool | None = None) -> _Console:
    return _Console(verbose)
