"""The life of a run directory: chosen, built aside, logged, published, or cleaned up; checkpoints; resume.

A run is built in `<out>.partial-<pid>-<n>` and renamed to `<out>` only when complete, so a
directory at `<out>` always holds a finished run. Fine-tuning checkpoints live beside it in
`<out>.checkpoints`, not inside, so that they survive a kill and `--resume` finds them; they
are removed once the run is published.

The run's `train.log` takes only the records of that run: a handler on the process-wide
"headstart" logger would otherwise collect every thread's records, and two runs at the same
time in one process (a notebook, a server) would write into each other's logs. A run marks
its thread through a context variable; threads the run starts itself inherit the mark when
started through `in_this_run`.
"""

from __future__ import annotations

import contextvars
import errno
import itertools
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from headstart.errors import DataError, HeadstartError, Interrupted, in_cli, option
from headstart.learn.checkpoints import checkpoint_dir
from headstart.settings import Runtime

log = logging.getLogger("headstart")

_current_run: contextvars.ContextVar[int | None] = contextvars.ContextVar("headstart_run", default=None)
_ids = itertools.count(1)
_level_lock = threading.Lock()
_level_users = 0
_level_saved = logging.NOTSET


def choose_run_dir(out: str | os.PathLike | None, overwrite: bool) -> Path:
    """The final run directory: `out`, or runs/<timestamp>; an existing non-empty one only with overwrite."""
    final = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    final = final.expanduser().absolute()
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise HeadstartError(f"run directory {final} already exists; pass another {option('out', None)} or "
                             f"{option('overwrite')}.")
    return final


def check_not_interrupted(final: Path, resume: bool, overwrite: bool) -> None:
    """Training again into a run that was interrupted would throw its checkpoints away without a word: refuse,
    naming both ways on (resume it, or start again with overwrite, which deletes them)."""
    ckpt = checkpoint_dir(final) / "last.pt"
    if ckpt.is_file() and not resume and not overwrite:
        how = f"headstart train --resume {final}" if in_cli() else f"headstart.resume({str(final)!r})"
        raise HeadstartError(f"the run {final} was interrupted, and {ckpt.parent} keeps the checkpoint of its last "
                             f"finished epoch. Continue it with: {how}, or start it again with {option('overwrite')}, "
                             "which deletes the checkpoints.")


def check_outside(data: str, labels: str | None, out: Path, cache: Path | None) -> None:
    """Nothing is written into the user's data: neither the run nor the cache may sit inside it."""
    given = Path(labels or data).resolve()  # checked to exist by check_input
    root = given.parent if labels else given  # a labels CSV: its folder holds the data
    for what, p in (("--out", out), ("--cache-dir", cache)):
        if p is not None and (p.resolve() == root or root in p.resolve().parents):
            raise HeadstartError(f"{what} {p} is inside the data folder {root}; headstart never writes into "
                                 "your data. Choose a folder outside it.")


def resume_settings(run: str | os.PathLike) -> tuple[dict, Path]:
    """The settings an interrupted run was started with, for `--resume RUN`, and the file they came from."""
    path = checkpoint_dir(Path(run).expanduser().absolute()) / "config.json"
    if not path.is_file():
        raise HeadstartError(f"--resume {run}: no checkpoint folder {path.parent}; nothing to resume.")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except ValueError as exc:
        raise HeadstartError(f"--resume {run}: {path} is not valid JSON ({exc}); the checkpoint folder is damaged, "
                             "so start the run again without --resume.") from None


def run_dir_of(model) -> Path | None:
    """The run directory a model path names (one holding config.json and splits.csv), else None (a loaded
    model, a bundle folder, anything else)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(model).expanduser()
    return path if (path / "config.json").is_file() and (path / "splits.csv").is_file() else None


def read_run_config(run_dir: Path | None) -> dict:
    """What evaluate reads of a run's config.json: the engine it asked for and its classes, checked.

    An unreadable file is as good as none (the model bundle is what is scored); a readable one that
    does not match gives a HeadstartError naming the run, the key and what to do.
    """
    if run_dir is None:
        return {}
    source = run_dir / "config.json"
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    what = (f"; fix it in {source}, or evaluate the run's model folder {run_dir / 'model'} with DATA, which "
            "does not read config.json.")
    requested = config.get("requested_engine", {})
    if not isinstance(requested, dict):
        raise DataError(f"{source}: key 'requested_engine' should be an object, not {requested!r}{what}")
    for key, value in requested.items():
        if key not in ("device", "engine", "precision"):
            raise DataError(f"{source}: key 'requested_engine.{key}' is not an engine setting (device, engine, "
                            f"precision){what}")
        try:
            Runtime(**{key: value})
        except HeadstartError as exc:
            raise DataError(f"{source}: key 'requested_engine.{key}': {exc}{what}") from None
    classes = config.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{source}: key 'classes' should be a list of class names, not {classes!r}{what}")
    return config


def in_this_run(fn: Callable) -> Callable:
    """`fn` to run in another thread with the caller's run mark, so its log records go to the run's log."""
    ctx = contextvars.copy_context()
    return lambda *a, **kw: ctx.run(fn, *a, **kw)


class _ThisRunOnly(logging.Filter):
    def __init__(self, run_id: int):
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        return _current_run.get() == self.run_id  # evaluated in the thread that logs


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Send this run's "headstart" records (INFO and up) to `path` while the block runs."""
    global _level_users, _level_saved
    logger = logging.getLogger("headstart")
    token = _current_run.set(next(_ids))
    handler = logging.FileHandler(path, encoding="utf-8", errors="surrogateescape")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(_ThisRunOnly(_current_run.get()))
    with _level_lock:  # from Python with logging unset, the log still gets INFO; restored by the last run out
        if _level_users == 0:
            _level_saved = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        _level_users += 1
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        with _level_lock:
            _level_users -= 1
            if _level_users == 0:
                logger.setLevel(_level_saved)
        _current_run.reset(token)


def _make_partial(final: Path) -> Path:
    # pid and a counter: two runs of one process at once (threads) each get their own
    partial = final.with_name(f"{final.name}.partial-{os.getpid()}-{next(_ids)}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, final: Path) -> None:
    """Rename the finished run into place; an overwritten run is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(partial, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # the earlier run goes back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """The partial directory of the run to write into, with the run's train.log attached.

    When the block ends normally the run is published at `final` and its checkpoints removed.
    When it fails, nothing partial is kept (checkpoints excepted, for --resume), folders made
    for it are removed, and an OSError becomes a HeadstartError saying what to do.
    """
    partial = None
    created = [p for p in final.parents if not p.exists()]  # folders that creating the run adds, deepest first
    try:
        partial = _make_partial(final)
        with run_log(partial / "train.log"):
            yield partial
        publish(partial, final)
        shutil.rmtree(checkpoint_dir(final), ignore_errors=True)  # published: no longer needed
    except BaseException as exc:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        for folder in created:  # a failed first run leaves no empty runs/ behind
            try:
                folder.rmdir()
            except OSError:
                break
        ckpt = checkpoint_dir(final) / "last.pt"
        if not ckpt.is_file():  # stopped before the first epoch's checkpoint: its folder holds nothing to resume
            shutil.rmtree(ckpt.parent, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a permission, a vanished file: the environment, not a bug
            raise environment_error(exc, final) from exc
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted) and ckpt.is_file():
            raise Interrupted(f"fine-tuning checkpoints of the last finished epoch are kept in {ckpt.parent}; "
                              f"continue with: headstart train --resume {final}") from exc
        raise


def environment_error(exc: OSError, final: Path) -> HeadstartError:
    full = "free some space, or pass --out and --cache-dir on another disk"
    allowed = "check that you may read the data and write --out and --cache-dir"
    hint = {errno.ENOSPC: full, errno.EDQUOT: full, errno.EACCES: allowed, errno.EPERM: allowed,
            errno.EROFS: "pass --out and --cache-dir on a writable disk"}.get(exc.errno, "check the path named")
    where = f" ({exc.filename})" if exc.filename else ""
    kept = "The earlier run there is untouched." if final.exists() else "Nothing was left there."
    return HeadstartError(f"run {final} was not completed: {exc.strerror or exc}{where}; {hint}. {kept}")
