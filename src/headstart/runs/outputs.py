"""The one writer of a run's files, for every strategy (the ensemble included): config.json,
metrics.json, skipped.json, splits.csv, the plots, test_predictions.csv, report.txt, and report.md /
report.html built from those files as `headstart report` rebuilds them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.data.images import load_image
from headstart.fileio import write_json, write_text
from headstart.reports.html import write_reports
from headstart.reports.markdown import write_test_predictions
from headstart.reports.plots import plot_confusion_matrix, plot_training_curve, plot_worst_errors
from headstart.reports.tables import format_report


@dataclass
class TestScores:
    """The test split as the saved model scored it: paths, labels (head columns), probabilities, classes."""

    paths: list[str]
    y: np.ndarray | None
    proba: np.ndarray | None
    classes: list[str]


@dataclass
class RunOutputs:
    """What a finished run writes: its resolved config, metrics, skipped files, splits, history and test scores."""

    config: dict
    metrics: dict
    skipped: list[dict]
    splits: str  # splits.csv's text
    history: dict | None  # epochs of the training curve; None: no curve
    test: TestScores


def splits_csv(data, ext) -> str:
    """splits.csv: every image of the data with its class, split and whether it was used."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "class", "split", "status"])
    for s, key in zip(data.samples, ext.keys):
        w.writerow([s.path, data.classes[s.label], s.split, "ok" if key is not None else "skipped"])
    return buf.getvalue()


def write_outputs(out: Path, name: str, run: RunOutputs) -> None:
    """Every file of the run into `out` (the partial folder published as `name`)."""
    write_json(out / "config.json", run.config)
    write_json(out / "metrics.json", run.metrics)
    write_json(out / "skipped.json", run.skipped)
    write_text(out / "splits.csv", run.splits)
    if run.history:
        plot_training_curve(run.history, out / "training_curve.png")
    t = run.test
    if "test" in run.metrics:
        plot_confusion_matrix(run.metrics["test"]["confusion_matrix"], t.classes, out / "confusion_matrix.png")
        plot_worst_errors(t.paths, t.y, t.proba, t.classes, out / "worst_errors.png", load_image,
                          root=run.config["data_summary"]["root"])
        write_test_predictions(out / "test_predictions.csv", t.paths, t.y, t.proba, t.classes)
        write_text(out / "report.txt", format_report(run.metrics["test"]) + "\n")
    # report.md and report.html from the files just written, as `headstart report` rebuilds them
    write_reports(out, name=name)
