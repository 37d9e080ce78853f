"""What a run directory tells a reader: per-image test predictions, and report.md built from one summary.

`run_summary` collects the run's facts (data, strategy and why, backbone, weights, image
size and why, engine, results, plots, skipped files) into one JSON-ready dict;
`render_markdown` turns that dict into report.md. Another format (an HTML page) renders
the same dict, so the reports cannot disagree about the run.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np

from headstart.reports.tables import markdown_sections, markdown_skipped, markdown_table
from headstart.fileio import write_text

PLOTS = {"training_curve.png": "Training curve", "confusion_matrix.png": "Confusion matrix (test split)",
         "worst_errors.png": "Most confident mistakes (test split), with file names"}
TOP_K = 3


def write_test_predictions(path: str | os.PathLike, paths: Sequence[str], y_true: np.ndarray, proba: np.ndarray,
                           classes: Sequence[str], top_k: int = TOP_K) -> None:
    """One row per scored test image: path, true and predicted class, its probability, and the top k."""
    k = max(1, min(top_k, len(classes)))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", "probability", "correct"]
               + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "probability")])
    for p, t, row in zip(paths, y_true, proba):
        order = np.argsort(-row, kind="stable")[:k]
        w.writerow([p, classes[t], classes[order[0]], f"{row[order[0]]:.6f}", int(order[0] == t)]
                   + [v for j in order for v in (classes[j], f"{row[j]:.6f}")])
    write_text(path, buf.getvalue())


def run_summary(*, name: str, config: dict, metrics: dict, skipped: list[dict], files: Sequence[str],
                per_class: dict | None = None) -> dict:
    """The facts of a run, from its resolved config and metrics; `files` are the names in the run directory;
    `per_class` the images of each class used in each split ({class: {"train": n, ...}}, from splits.csv),
    else the images found (config.json's data summary)."""
    data = config["data_summary"]
    versions = config.get("versions") or {}
    decision = config.get("strategy_decision")
    if decision:
        why = "; ".join(decision["reasons"])
    else:
        why = "asked for (--strategy)"
    engine = config["engine"]
    test = metrics.get("test")
    return {
        "name": name,
        "data": {"root": data["root"], "labels": config.get("labels"), "layout": data["layout"],
                 "classes": len(data["classes"]), "images": data["n_images"], "splits": data["splits"],
                 "used": {"train": metrics["n_train"], "val": metrics["n_val"], "test": metrics["n_test"]},
                 "duplicates_across_splits": data.get("duplicates_across_splits"),
                 "per_class": per_class or data.get("per_class"), "per_class_found": data.get("per_class")},
        # Runs from before the date and the commit were recorded have no such keys: "not recorded".
        "provenance": {"started": config.get("started"), "command": config.get("command"),
                       "version": versions.get("headstart"), "commit": versions.get("headstart_commit", False)},
        "strategy": {"asked": config["strategy"], "used": config["resolved_strategy"], "why": why,
                     "head": config["head"]},
        "backbone": {"name": config["backbone"], "weights": config["weights"]["source"],
                     "weights_kind": config["weights"]["kind"]},
        "image_size": {"pixels": config["image_size"], "why": config["image_size_reason"]},
        "tta": {"used": config.get("resolved_tta", "none"),  # runs from before test-time flips had none
                "why": "; ".join((config.get("tta_decision") or {}).get("reasons", []))
                or ("asked for (--tta)" if "resolved_tta" in config else "a run from before --tta")},
        "engine": {"engine": engine["engine"], "precision": engine["precision"], "device": engine["device"],
                   "why": engine.get("reason", "")},
        "fine_tune": {k: metrics["fine_tune"][k] for k in ("epochs_run", "best_epoch", "stopped_by")}
        if "fine_tune" in metrics else None,
        "val_accuracy": metrics.get("val_accuracy"),
        "ensemble": metrics.get("ensemble"),
        "test": test,
        "wall_seconds": metrics["wall_seconds"],
        "plots": [(f, PLOTS[f]) for f in PLOTS if f in files],
        "predictions": "test_predictions.csv" if "test_predictions.csv" in files else None,
        "skipped": skipped,
        "excluded": data.get("excluded"),  # --exclude: the files an issues.csv had left out, and why
        "data_check": metrics.get("data_check"),  # runs/datacheck.py: likely label errors and leaks
    }


def render_markdown(s: dict) -> str:
    d = s["data"]
    counts = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
    used = ", ".join(f"{k} {v}" for k, v in d["used"].items())
    facts = [
        ["data", d["labels"] or d["root"]],
        ["layout", {"splits": "train/val/test folders", "classes": "class folders, splits by file-name hash",
                    "labels": "labels CSV"}.get(d["layout"], d["layout"])],
        ["images", f"{d['images']} in {d['classes']} classes ({counts}); readable and used: {used}"],
        ["strategy", f"{s['strategy']['used']} (asked: {s['strategy']['asked']}; head {s['strategy']['head']})"],
        ["why this strategy", s["strategy"]["why"]],
        ["backbone", s["backbone"]["name"]],
        ["weights", s["backbone"]["weights"]],
        ["image size", f"{s['image_size']['pixels']} px ({s['image_size']['why']})"],
        ["test-time views", f"{s['tta']['used']} ({s['tta']['why']})"],
        ["engine", f"{s['engine']['engine']}, {s['engine']['precision']} on {s['engine']['device']} "
                   f"({s['engine']['why']})"],
        ["wall time", f"{s['wall_seconds']:.0f} s"],
        *provenance_facts(s),
    ]
    if s["fine_tune"]:
        ft = s["fine_tune"]
        epochs = f"{ft['epochs_run']} epoch{'' if ft['epochs_run'] == 1 else 's'}"
        facts.append(["fine-tuning", f"{epochs}, best epoch {ft['best_epoch']}, stopped by {ft['stopped_by']}"])
    if s["test"] and s["test"]["n_images"] < d["used"]["test"]:
        facts.append(["left out of the test scores", f"{d['used']['test'] - s['test']['n_images']} test images of "
                                                     "classes with no training images (the model cannot predict them)"])
    if s["val_accuracy"] is not None:
        facts.append(["validation accuracy", f"{s['val_accuracy']:.4f}"])
    parts = [f"# headstart run {s['name']}", "## The run\n\n" + markdown_table(["", ""], facts, ["l", "l"])]
    if d["per_class"]:
        header, rows = images_per_class(d)
        parts.append("## Images per class\n\n" + markdown_table(header, rows, ["l", "r", "r", "r"])
                     + "".join(f"\n\n{note}" for note in class_notes(d)))
    if s.get("ensemble"):
        parts.append(_ensemble_section(s["ensemble"]))
    copies = d["duplicates_across_splits"]
    if copies and copies["groups"]:
        kinds = ", ".join(f"{n} across {k}" for k, n in sorted(copies["by_splits"].items()))
        examples = "\n".join("- " + " = ".join(f"`{p}`" for p in group) for group in copies["examples"])
        parts.append(f"## Warning: the same file in two splits\n\n{copies['groups']} groups of byte-identical "
                     f"files ({copies['files']} files) sit in more than one split ({kinds}). Copies across train "
                     f"and test inflate every number below. For example:\n\n{examples}")
    parts += data_issue_sections(s)
    if s["test"]:
        parts.append("## Test split")
        parts += markdown_sections(s["test"], level=3)
    else:
        parts.append("## Test split\n\nNo test split: pass --test-fraction > 0 or a test/ folder to measure the "
                     "model.")
    if s["predictions"]:
        parts.append(f"Every test image's prediction, with its top {TOP_K}: [{s['predictions']}]"
                     f"({s['predictions']}).")
    if s["plots"]:
        parts.append("## Plots\n\n" + "\n\n".join(f"### {title}\n\n![{title}]({f})" for f, title in s["plots"]))
    if s["skipped"]:
        parts.append(markdown_skipped(s["skipped"]).replace("## Skipped images", "## Skipped files", 1))
    else:
        parts.append("## Skipped files\n\nNone: every file found was used.")
    return "\n\n".join(parts) + "\n"


def data_issue_sections(s: dict) -> list[str]:
    """The data check's warnings and the files --exclude left out, as Markdown sections (plain text in HTML)."""
    parts = []
    check = s.get("data_check")
    if check and (check["many_label_errors"] or check["leaks"]):
        lines = []
        if check["many_label_errors"]:
            lines.append(f"{check['likely_label_errors']} training and validation images "
                         f"({100 * check['share']:.1f}%) look mislabelled to their nearest neighbours.")
        if check["leaks"]:
            ex = check["leak_examples"][0]
            lines.append(f"{check['leaks']} validation or test images have a near copy in train (e.g. "
                         f"`{ex['image']}` = `{ex['train_copy']}`): the test score is inflated.")
        parts.append("## Warning: data issues\n\n" + " ".join(lines) + f" `{check['command']}` lists them; "
                     "`train --exclude ISSUES_CSV` leaves them out.")
    excluded = s.get("excluded")
    if excluded:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(excluded["by_kind"].items())) or "none matched"
        listed = "\n".join(f"- `{f['path']}` ({f['split']}): {', '.join(f['kinds'])}" for f in excluded["files"][:50])
        more = f"\n- ... {excluded['n_files'] - 50} more in config.json" if excluded["n_files"] > 50 else ""
        parts.append(f"## Left out (--exclude)\n\n{excluded['n_files']} files listed in `{excluded['file']}` "
                     f"(kinds: {excluded['kinds'] if isinstance(excluded['kinds'], str) else ', '.join(excluded['kinds'])}"
                     f") were left out of this run ({kinds}); the data folder is unchanged.\n\n{listed}{more}")
    return parts
def command_line(argv: Sequence[str] | None) -> str:
    """The command that started the run, as one would type it again; a Python caller's process otherwise."""
    if not argv:
        return "not recorded"
    first = Path(argv[0])
    if first.name == "headstart" or (first.name == "__main__.py" and first.parent.name == "headstart"):
        return shlex.join(["headstart", *argv[1:]])
    return f"headstart.train() from Python, in the process {shlex.join(argv)}"


def provenance_facts(s: dict) -> list[list[str]]:
    """When, how and by which code the run was made: the rows both reports show."""
    p = s["provenance"]
    before = "not recorded (a run from before headstart recorded it)"
    date = p["started"].replace("T", " ") + " (when the run started)" if p["started"] else before
    if p["commit"] is False:  # the key is absent
        commit = before
    elif p["commit"] is None:
        commit = "none (headstart was not run from a git checkout)"
    else:
        commit = p["commit"].replace(" + changes", ", with uncommitted changes to its files")
    return [["date", date], ["command", command_line(p["command"])],
            ["headstart", f"version {p['version'] or 'not recorded'}, commit {commit}"]]


SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))


def images_per_class(d: dict) -> tuple[list[str], list[list[str]]]:
    """The table of images per class and split: those used, "used of found" where some were not readable."""
    found = d["per_class_found"] or {}
    rows = []
    for name, counts in d["per_class"].items():
        row = [name]
        for key, _ in SPLITS:
            used, seen = counts.get(key, 0), found.get(name, {}).get(key)
            row.append(f"{used} of {seen}" if seen is not None and seen != used else str(used))
        rows.append(row)
    return ["class", *(title for _, title in SPLITS)], rows


def class_notes(d: dict) -> list[str]:
    """A sentence for each split some class has no images in: what that means for the numbers."""
    notes = []
    for key, title, meaning in (("train", "training", "the model cannot predict them"),
                                ("val", "validation", "no validation score covers them"),
                                ("test", "test", "the test scores say nothing about them")):
        empty = [name for name, counts in d["per_class"].items() if not counts.get(key, 0)]
        if empty and len(empty) < len(d["per_class"]):  # a split with no images at all is in the facts
            notes.append(f"No {title} images: {', '.join(empty)} ({meaning}).")
    return notes


def _ensemble_section(e: dict) -> str:
    """Each member and their average, on the same validation images; test accuracy of each."""
    num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[m["name"], m["strategy"], m["backbone"], f"{m['image_size']} px", m["tta"], num(m["val"]["accuracy"]),
             num(m["val"]["log_loss"]), f"{m['wall_seconds']:.0f} s", num(m.get("test_accuracy"))]
            for m in e["members"]]
    rows.append(["ensemble", "mean of probabilities", "", "", "", num(e["val"]["accuracy"]),
                 num(e["val"]["log_loss"]), "", num(e.get("test_accuracy"))])
    kept = ("The run's model is the ensemble." if e["kept"] else
            "The run's model is the first member alone: the ensemble did not beat it on validation.")
    return ("## Ensemble members\n\n" + markdown_table(
        ["member", "strategy", "backbone", "size", "views", "val acc", "val log loss", "wall", "test acc"], rows,
        ["l", "l", "l", "r", "l", "r", "r", "r", "r"]) + f"\n\n{kept} Each member's own run is in members/<member>.")


def write_run_report(path: Path, summary: dict) -> None:
    write_text(path, render_markdown(summary))
