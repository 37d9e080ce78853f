"""The one epoch loop: the MLP head and fine-tuning (and the scratch baseline) run their epochs here.

`run_epochs` calls `train_one_epoch(epoch)` (the only part that differs between them: it
trains, validates and returns the epoch's logs), then every callback's
`on_epoch_end(epoch, logs)`; a callback returning a reason string ends the loop after all
callbacks have seen the epoch (early stopping, the time budget). So history, early stopping
and logs are written once: `HistoryCSV` writes `history.csv`, `TensorBoard` event files,
both on the same hook. The linear head's C search is not an epoch loop (each C is one
L-BFGS fit) and keeps its own path in heads.py.

Logs carry: epoch (1-based), train_loss, val_loss, val_accuracy, seconds, lr.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from headstart.errors import HeadstartError
from headstart.fileio import write_text

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds", "lr", "phase")


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> str | None:
        """Called after each epoch (1-based); a returned string stops the loop, and says why."""


def run_epochs(epochs: Iterable[int], train_one_epoch: Callable[[int], dict], callbacks: Iterable = ()) -> str:
    """Run `train_one_epoch(epoch)` for each epoch (1-based) until a callback stops it; return why it ended."""
    callbacks = [c for c in callbacks if c is not None]
    for epoch in epochs:
        logs = train_one_epoch(epoch)
        reasons = [c.on_epoch_end(epoch, logs) for c in callbacks]  # every callback sees the last epoch
        stop = next((r for r in reasons if r), None)
        if stop:
            return stop
    return "epochs"


class History:
    """The run's history as lists per key (what metrics.json and the training curve read)."""

    def __init__(self, keys: Iterable[str], history: dict | None = None):
        self.keys = tuple(keys)
        self.history = history if history is not None else {k: [] for k in self.keys}

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        for k in self.keys:
            if k in logs:
                self.history[k].append(logs[k])


class EarlyStopping:
    """Stop after `patience` epochs without improvement of `monitor`; keep the best weights' snapshot.

    `snapshot()` copies the weights at each new best; the caller loads `best_state` at the end.
    `mode="min"` improves when the value drops by more than `min_delta`. With `nan_is_best`, a NaN
    value (no validation data) counts as an improvement, so the last epoch is the one kept.
    The state (best_score, best_epoch, best_state, bad) is plain, for checkpoints.
    """

    def __init__(self, monitor: str, mode: str, patience: int, snapshot: Callable[[], Any], min_delta: float = 0.0,
                 nan_is_best: bool = False, best_state: Any = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode, self.patience, self.snapshot = monitor, mode, patience, snapshot
        self.min_delta, self.nan_is_best = min_delta, nan_is_best
        self.best_score, self.best_epoch, self.best_state, self.bad = -math.inf, 0, best_state, 0

    def on_epoch_end(self, epoch: int, logs: dict) -> str | None:
        value = logs[self.monitor]
        score = -value if self.mode == "min" else value  # higher is better from here on
        if (self.nan_is_best and math.isnan(score)) or score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.best_state, self.bad = score, epoch, self.snapshot(), 0
        else:
            self.bad += 1
        return "early stopping" if self.bad >= self.patience else None

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "bad": self.bad}

    def load_state(self, state: dict) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.bad = state["best_state"], state["bad"]


class OnEpochEnd:
    """A function `fn(epoch, logs)` as a callback."""

    def __init__(self, fn: Callable[[int, dict], str | None]):
        self.on_epoch_end = fn


class TimeBudget:
    """Stop once `seconds` have passed since `t0` (checked after each epoch, so an epoch is never cut)."""

    def __init__(self, seconds: float | None, t0: float | None = None):
        self.seconds, self.t0 = seconds, time.perf_counter() if t0 is None else t0

    def on_epoch_end(self, epoch: int, logs: dict) -> str | None:
        if self.seconds and time.perf_counter() - self.t0 > self.seconds:
            return "time budget"
        return None


class HistoryCSV:
    """`history.csv`: one row per epoch (HISTORY_COLUMNS), rewritten whole and atomically after each epoch,
    so a crash leaves the rows of the finished epochs, never half a row. One instance can follow several
    phases of a run (`phase` names the current one: "head", "fine-tune", "scratch")."""

    def __init__(self, path: str | Path, phase: str = ""):
        self.path, self.phase = Path(path), phase
        self.rows: list[dict] = []

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.rows.append({**{k: logs.get(k, "") for k in HISTORY_COLUMNS}, "epoch": epoch, "phase": self.phase})
        buf = io.StringIO()
        w = csv.DictWriter(buf, HISTORY_COLUMNS, lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({k: _cell(v) for k, v in row.items()})
        write_text(self.path, buf.getvalue())


def _cell(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else repr(v) if isinstance(v, float) else v


def read_history_csv(path: str | Path) -> list[dict]:
    """history.csv's rows with numbers as numbers (empty cells as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    num = lambda v: None if v == "" else int(v) if v.lstrip("-").isdigit() else float(v)  # noqa: E731
    return [{k: (v if k == "phase" else num(v)) for k, v in r.items()} for r in rows]


class TensorBoard:
    """TensorBoard event files in `log_dir` through torch's SummaryWriter: one scalar per log and epoch,
    under "<phase>/<name>" (the phases of one run have their own epoch numbering)."""

    def __init__(self, log_dir: str | Path, phase: str = ""):
        check_tensorboard()
        self.log_dir, self.phase, self.writer = Path(log_dir), phase, None

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        if self.writer is None:  # opened at the first epoch: a run without epochs gets no empty folder
            self.writer = make_summary_writer(self.log_dir)
            # Closed by close() at the end of the run, or when collected after a failed one (its thread).
            weakref.finalize(self, self.writer.close)
        for k, v in logs.items():
            if k != "epoch" and isinstance(v, (int, float)) and not math.isnan(v):
                self.writer.add_scalar(f"{self.phase or 'train'}/{k}", v, epoch)
        self.writer.flush()  # each epoch visible at once, and kept if the run is killed later

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_tensorboard() -> None:
    """Raise a HeadstartError naming the fix when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise HeadstartError("--tensorboard needs the tensorboard package, which is not installed; install it "
                             "with `pip install 'headstart[tensorboard]'`, or drop --tensorboard.") from None


def make_summary_writer(log_dir: str | Path):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def snapshot_state(net) -> Callable[[], dict]:
    """A snapshot function for EarlyStopping: a deep copy of `net`'s state dict."""
    return lambda: copy.deepcopy(net.state_dict())
