"""Text reports of a metrics dict (from `metrics.compute_metrics`): the terminal report and Markdown.

`markdown_sections`, `markdown_table` and `markdown_skipped` are shared with the run's
report.md (`runreport`). Every file is written atomically through `headstart.fileio`.
"""

from __future__ import annotations

import os
from typing import Any

from headstart.fileio import write_text

# Keeps the confusion matrix of a 10-class report inside a 120-column terminal.
REPORT_WIDTH = 120
# A class with no test images has no recall and no F1 (scikit-learn's zero_division makes them 0): its row says so.
NO_TEST_IMAGES = "no test images"



def format_report(metrics: dict) -> str:
    """Plain-text report: summary, per-class table and confusion matrix."""
    sections = [
        _format_summary(metrics),
        _format_per_class(metrics["per_class"]),
        _format_confusion(metrics["confusion_matrix"], metrics["classes"]),
    ]
    return "\n\n".join(sections) + "\n"


def _summary_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [
        ("images", str(metrics["n_images"])),
        ("accuracy", f"{metrics['accuracy']:.4f}"),
    ]
    if "accuracy_ci95" in metrics:  # metrics saved before the interval was added have none
        low, high = metrics["accuracy_ci95"]
        rows.append(("accuracy, 95% interval", f"{low:.4f} - {high:.4f}"))
    rows += [
        ("balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"),
        ("macro F1", f"{metrics['macro_f1']:.4f}"),
    ]
    rows += [(f"top-{k} accuracy", f"{v:.4f}") for k, v in metrics["top_k_accuracy"].items()]
    if metrics["skipped"]:
        rows.append(("skipped images", str(len(metrics["skipped"]))))
    return rows


def _format_summary(metrics: dict) -> str:
    rows = _summary_rows(metrics)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _format_per_class(per_class: list[dict]) -> str:
    name_w = max(len("class"), *(len(row["class"]) for row in per_class))
    lines = [f"{'class':<{name_w}}  precision  recall      f1  support"]
    for row in per_class:
        if not row["support"]:
            lines.append(f"{row['class']:<{name_w}}  {NO_TEST_IMAGES:<25}  {0:7d}")
            continue
        lines.append(
            f"{row['class']:<{name_w}}  {row['precision']:9.4f}  {row['recall']:6.4f}"
            f"  {row['f1']:6.4f}  {row['support']:7d}"
        )
    return "\n".join(lines)


def _format_confusion(cm: list[list[int]], classes: list[str]) -> str:
    corner = "true \\ pred"
    label_w = min(max(len(corner), *(len(c) for c in classes)), 16)
    count_w = len(str(max(max(row) for row in cm)))
    # Share what is left of the line between the columns; names shorter than that stay whole.
    fit_w = (REPORT_WIDTH - label_w) // len(classes) - 1
    cell_w = max(count_w, min(max(len(c) for c in classes), max(fit_w, 3)))

    header = f"{corner:<{label_w}} " + " ".join(f"{c[:cell_w]:>{cell_w}}" for c in classes)
    lines = ["confusion matrix (rows = true, columns = predicted)", header]
    for name, row in zip(classes, cm):
        cells = " ".join(f"{count:>{cell_w}}" for count in row)
        lines.append(f"{name[:label_w]:<{label_w}} {cells}")
    return "\n".join(lines)


def write_report_markdown(metrics: dict, path: str | os.PathLike, title: str = "Evaluation report") -> None:
    """Write a Markdown report (summary, per-class table, confusion matrix) atomically."""
    parts = [f"# {title}", *markdown_sections(metrics)]
    if metrics["skipped"]:
        parts.append(markdown_skipped(metrics["skipped"]))
    write_text(path, "\n\n".join(parts) + "\n")


def markdown_sections(metrics: dict, level: int = 2) -> list[str]:
    """The summary, per-class and confusion-matrix sections of a report, headed at `level`."""
    parts = [_markdown_summary(metrics), _markdown_per_class(metrics), _markdown_confusion(metrics)]
    return ["#" * (level - 2) + part for part in parts]


def _md(text: Any) -> str:
    # A "|" inside a class name or path would split the table cell.
    return str(text).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]], align: list[str]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |")
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_summary(metrics: dict) -> str:
    rows = [list(row) for row in _summary_rows(metrics)]
    return "## Summary\n\n" + markdown_table(["metric", "value"], rows, ["l", "r"])


def _markdown_per_class(metrics: dict) -> str:
    rows = [
        [r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
        if r["support"] else [r["class"], NO_TEST_IMAGES, "-", "-", 0]
        for r in metrics["per_class"]
    ]
    header = ["class", "precision", "recall", "F1", "support"]
    return "## Per class\n\n" + markdown_table(header, rows, ["l", "r", "r", "r", "r"])


def _markdown_confusion(metrics: dict) -> str:
    classes = metrics["classes"]
    rows = [[name, *row] for name, row in zip(classes, metrics["confusion_matrix"])]
    table = markdown_table(["true \\ pred", *classes], rows, ["l"] + ["r"] * len(classes))
    return "## Confusion matrix\n\nRows are true classes, columns predicted classes.\n\n" + table


def markdown_skipped(skipped: list[dict]) -> str:
    rows = [[item.get("path", ""), item.get("reason", "")] for item in skipped]
    return "## Skipped images\n\n" + markdown_table(["path", "reason"], rows, ["l", "l"])

