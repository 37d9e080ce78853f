"""The epoch loop (loop.py): stopping, early stopping, history.csv and TensorBoard, in a run and alone."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from conftest import write_image_folder
from sklearn.datasets import load_digits

import headstart
from headstart.learn.heads import MLPHead
from headstart.learn.loop import (HISTORY_COLUMNS, EarlyStopping, HistoryCSV, History, OnEpochEnd, TimeBudget,
                            read_history_csv, run_epochs)


def test_every_callback_sees_the_epoch_a_callback_stops_at():
    seen = []
    stop_at_3 = OnEpochEnd(lambda epoch, logs: "enough" if epoch == 3 else None)
    after = OnEpochEnd(lambda epoch, logs: seen.append(epoch))
    reason = run_epochs(range(1, 11), lambda e: {"epoch": e}, [stop_at_3, after])
    assert reason == "enough" and seen == [1, 2, 3]
    assert run_epochs(range(1, 3), lambda e: {}, []) == "epochs"


def test_early_stopping_keeps_the_best_snapshot_and_counts_patience():
    values = iter([1.0, 0.5, 0.49995, 0.6, 0.7])
    stopper = EarlyStopping("val_loss", "min", patience=3, snapshot=lambda: "weights", min_delta=1e-4)
    reason = run_epochs(range(1, 10), lambda e: {"val_loss": next(values)}, [stopper])
    # 0.49995 is not 1e-4 better than 0.5: epochs 3, 4 and 5 are the three without improvement.
    assert reason == "early stopping" and stopper.best_epoch == 2 and stopper.best_state == "weights"
    assert stopper.bad == 3 and stopper.best_score == -0.5
    nan = EarlyStopping("val_accuracy", "max", patience=1, snapshot=lambda: None, nan_is_best=True)
    assert run_epochs(range(1, 4), lambda e: {"val_accuracy": math.nan}, [nan]) == "epochs"
    assert nan.best_epoch == 3  # no validation score: the last epoch is kept


def test_time_budget_stops_after_the_epoch_that_crossed_it():
    assert run_epochs(range(1, 5), lambda e: {}, [TimeBudget(1.0, t0=-1e9)]) == "time budget"
    assert run_epochs(range(1, 5), lambda e: {}, [TimeBudget(None)]) == "epochs"


def test_mlp_head_writes_history_csv_as_it_trains(tmp_path, one_torch_thread):
    X, y = load_digits(return_X_y=True)
    csv_path = tmp_path / "history.csv"
    rows_seen = []
    # After each epoch the file is complete: a crash there would leave every finished epoch's row.
    check = OnEpochEnd(lambda epoch, logs: rows_seen.append(len(read_history_csv(csv_path))))
    head = MLPHead(max_epochs=12, patience=3).fit(X[:600], y[:600], X[600:800], y[600:800],
                                                 callbacks=[HistoryCSV(csv_path, "head"), check])
    rows = read_history_csv(csv_path)
    n = len(head.history_["epoch"])
    assert rows_seen == list(range(1, n + 1))
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy"):
        assert [r[key] for r in rows] == head.history_[key]  # repr round-trips floats exactly
    assert {r["phase"] for r in rows} == {"head"} and all(r["lr"] == head.lr and r["seconds"] >= 0 for r in rows)
    # The callbacks change nothing: the same fit without them has the same weights.
    plain = MLPHead(max_epochs=12, patience=3).fit(X[:600], y[:600], X[600:800], y[600:800])
    assert np.array_equal(plain.logits(X[800:]), head.logits(X[800:]))


def test_run_writes_history_csv_and_tensorboard_for_head_and_scratch(tmp_path, one_torch_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_image_folder(tmp_path / "data", n_per_class=24, classes=("a", "b", "c"), size=(12, 12))
    run = headstart.train(data, strategy="scratch", head="mlp", out=tmp_path / "run", workers=0, cache_dir="none",
                          tensorboard=True, finetune=dict(epochs=3, patience=5))
    rows = read_history_csv(tmp_path / "run" / "history.csv")
    head_rows = [r for r in rows if r["phase"] == "head"]
    scratch_rows = [r for r in rows if r["phase"] == "scratch"]
    assert head_rows and len(head_rows) + len(scratch_rows) == len(rows)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["fine_tune"]["history"]
    assert history == run.metrics["fine_tune"]["history"]
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds", "lr"):
        assert [r[key] for r in scratch_rows] == history[key]
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.value for e in acc.Scalars("scratch/val_accuracy")] == pytest.approx(history["val_accuracy"])
    assert [e.step for e in acc.Scalars("head/train_loss")] == [r["epoch"] for r in head_rows]


def test_tensorboard_missing_is_a_clear_exit_2(tmp_path, monkeypatch, capsys):
    from headstart.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    data = write_image_folder(tmp_path / "data")
    code = main(["train", str(data), "--tensorboard", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--tensorboard needs the tensorboard package" in err and "headstart[tensorboard]" in err
    assert not (tmp_path / "run").exists()


def test_history_keeps_only_its_keys():
    h = History(("epoch", "train_loss"))
    h.on_epoch_end(1, {"epoch": 1, "train_loss": 0.5, "lr": 0.1})
    assert h.history == {"epoch": [1], "train_loss": [0.5]}
