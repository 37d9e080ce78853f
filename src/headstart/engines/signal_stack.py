"""Keep a thread's alternate signal stack across code that frees an OpenVINO plugin (Linux).

Why (keep_signal_stack's docstring has the whole story): a freed OpenVINO CPU plugin puts back the
signal stack it found when it was made, which may be another plugin's, already unmapped; the next
signal handled on it kills the process. Every place that compiles or frees an OpenVINO model goes
through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys


class _SignalStack(ctypes.Structure):  # stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack():
    """Put back the calling thread's alternate signal stack after the block (Linux; elsewhere nothing).

    OpenVINO's CPU plugin, on Linux, mmaps an alternate signal stack for the thread that creates it (one
    plugin per `openvino.Core`) and, when freed, puts back the one it found and unmaps its own. Two plugins
    freed in the order they were made (A, then B) leave B putting back A's unmapped stack, and the next
    signal handled on it (Python's handlers run there, such as the DataLoader's SIGCHLD one) kills the
    process with SIGSEGV, silently (seen on the native-bf16 CPU kind, OpenVINO 2026.4). With the stack put
    back at once, every plugin finds, and later puts back, the same valid one (tests/test_engines.py).
    One Core for the whole process would avoid this too, but a child forked after OpenVINO has run
    (the tests' CLI children) then hangs in its first compile."""
    libc = _libc()
    saved = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        saved.ss_flags &= ~1  # SS_ONSTACK describes the query, it is not a flag to set
        libc.sigaltstack(ctypes.byref(saved), None)


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
