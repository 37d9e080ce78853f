"""report.html: one self-contained page per run (and compare.html), from the same summary as report.md.

`load_summary(run_dir)` rebuilds the run's summary from the files in its directory
(config.json, metrics.json, skipped.json, test_predictions.csv, the plots), so the run
itself and `headstart report RUN` write the same report.md and report.html, byte for byte.

The page fetches nothing: plots, the worst errors' thumbnails and their heatmaps (overlays.py: where the
model looked for the predicted and for the true class) are inlined as base64 PNG data URIs, the CSS sits in
the page, there is no script, and a Content-Security-Policy (`default-src 'none'`) makes the browser refuse
any fetch a future edit might add (pieces.py: what every page shares). Links to files beside the page
(test_predictions.csv, a run's report.html) are relative, followed only when clicked. Every string that
comes from the user's data (class and file names) is escaped; a name that is not valid UTF-8 arrives with
surrogates and is shown as `\\xff`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.fileio import write_text
from headstart.reports.markdown import (SPLITS, class_notes, data_issue_sections, images_per_class, provenance_facts,
                                        run_summary, write_run_report)
from headstart.reports.overlays import worst_overlays
from headstart.reports.pieces import data_uri, esc, facts, href, img, page, table, thumbnail, words
from headstart.reports.plots import shown_path
from headstart.reports.tables import NO_TEST_IMAGES, macro_f1_text

THUMB = 96  # pixels, the longer side of a worst-error thumbnail: 16 of them stay under ~150 KB
WORST = 16  # as many as worst_errors.png shows
PAGE_PLOTS = ("training_curve.png",)  # inlined; the confusion matrix and the worst errors are drawn in HTML


# --------------------------------------------------------------------------- the summary, from the run's files


def load_summary(run_dir: str | os.PathLike, name: str | None = None) -> dict:
    """The run's summary (runreport.run_summary) rebuilt from its directory, with what the page adds.

    `name` is the run's name when the directory is not yet at its final place (a run being built).
    """
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    metrics = _read_json(run_dir / "metrics.json")
    skipped = _read_json(run_dir / "skipped.json") if (run_dir / "skipped.json").is_file() else []
    try:
        summary = run_summary(name=name or run_dir.name, config=config, metrics=metrics, skipped=skipped,
                              files=sorted(os.listdir(run_dir)), per_class=_used_per_class(run_dir / "splits.csv"))
    except KeyError as exc:
        raise HeadstartError(f"{run_dir} lacks {exc} in its config.json or metrics.json: it was written by an "
                             "older headstart. Train it again to get its report.") from None
    summary["timings"] = _timings(metrics)
    summary["worst_errors"] = _worst_errors(run_dir / "test_predictions.csv")
    return summary


def _read_json(path: Path):
    if not path.is_file():
        raise HeadstartError(f"{path} is missing: {path.parent} is not a finished headstart run directory. Pass "
                             "the folder `headstart train --out` wrote.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HeadstartError(f"{path} is not valid JSON ({exc}); it was damaged or edited. Train the run again.") \
            from None


def _used_per_class(path: Path) -> dict | None:
    """{class: {split: images used}} from splits.csv (None without one), in the order classes first appear."""
    if not path.is_file():
        return None
    counts: dict[str, dict[str, int]] = {}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            split = counts.setdefault(row["class"], {key: 0 for key, _ in SPLITS})
            if row["status"] == "ok" and row["split"] in split:
                split[row["split"]] += 1
    return counts


def _timings(metrics: dict) -> list[list[str]]:
    ext, ft = metrics.get("extraction") or {}, metrics.get("fine_tune") or {}
    rows = [["whole run", f"{metrics['wall_seconds']:.1f} s"]]
    if ext:
        speed = f", {ext['images_per_second']:.0f} images/s" if ext.get("images_per_second") else ""
        rows.append(["feature extraction", f"{ext['seconds']:.1f} s ({ext['computed']} computed, "
                                           f"{ext['from_cache']} from the cache{speed})"])
    if metrics.get("head_seconds") is not None:
        rows.append(["head training", f"{metrics['head_seconds']:.1f} s"])
    if ft.get("seconds") is not None:
        speed = f", {ft['images_per_second']:.0f} images/s" if ft.get("images_per_second") else ""
        rows.append(["fine-tuning", f"{ft['seconds']:.1f} s ({ft['epochs_run']} epochs{speed})"])
    return rows


def _worst_errors(path: Path, n: int = WORST) -> dict | None:
    """The `n` most confident of the mistakes in test_predictions.csv (ordered as worst_errors.png), or None."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        wrong = [r for r in csv.DictReader(f) if r["correct"] == "0"]
    wrong.sort(key=lambda r: -float(r["probability"]))  # stable: equally confident ones keep the file's order
    return {"mistakes": len(wrong), "shown": [{"path": r["path"], "true": r["true"], "predicted": r["predicted"],
                                               "probability": float(r["probability"])} for r in wrong[:n]]}


def write_reports(run_dir: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Write report.md and report.html into `run_dir` from one summary of its files; return their paths."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir, name)
    write_run_report(run_dir / "report.md", summary)
    write_text(run_dir / "report.html", render_html(summary, run_dir))
    return [run_dir / "report.md", run_dir / "report.html"]


def report(path: str | os.PathLike) -> list[Path]:
    """Rebuild the reports of a run directory (report.md, report.html) or a compare folder (compare.html)."""
    path = Path(path)
    if (path / "compare.json").is_file() and not (path / "config.json").is_file():
        return [write_compare_html(path)]
    return write_reports(path)


# --------------------------------------------------------------------------- HTML


def render_html(s: dict, run_dir: Path) -> str:
    """The run's page; `run_dir` holds the plots to inline."""
    body = [f"<h1>headstart run {esc(s['name'])}</h1>", "<h2>The run</h2>", facts(_run_facts(s))]
    if s["data"]["per_class"]:
        header, rows = images_per_class(s["data"])
        body.append('<h3 id="images">Images per class</h3>' + table(header, rows, {1, 2, 3})
                    + "".join(f"<p>{esc(note)}</p>" for note in class_notes(s["data"])))
    body.append("<h3>Timings</h3>" + facts(s["timings"]))
    copies = s["data"]["duplicates_across_splits"]
    if copies and copies["groups"]:
        kinds = ", ".join(f"{n} across {k}" for k, n in sorted(copies["by_splits"].items()))
        examples = "".join("<li>" + " = ".join(f"<code>{esc(p)}</code>" for p in group) + "</li>"
                           for group in copies["examples"])
        body.append(f'<div class="warn"><h2>Warning: the same file in two splits</h2><p>{copies["groups"]} groups '
                    f"of byte-identical files ({copies['files']} files) sit in more than one split ({esc(kinds)}). "
                    f"Copies across train and test inflate every number below. For example:</p><ul>{examples}</ul>"
                    "</div>")
    for section in data_issue_sections(s):  # the data check's warnings, the files --exclude left out
        title, _, text = section.partition("\n\n")
        body.append(f'<div class="warn"><h2>{esc(title.lstrip("# "))}</h2><pre style="white-space:pre-wrap">'
                    f"{esc(text)}</pre></div>")
    body.append('<h2 id="test">Test split</h2>')
    if s["test"]:
        body += _test_sections(s["test"])
    else:
        body.append("<p>No test split: pass --test-fraction &gt; 0 or a test/ folder to measure the model.</p>")
    if s["predictions"]:
        body.append(f'<p>Every test image\'s prediction, with its top classes: '
                    f'<a href="{href(s["predictions"])}">{esc(s["predictions"])}</a>.</p>')
    body += _worst_section(s["worst_errors"], bool(s["test"]), s["data"]["root"], run_dir)
    for f, title in s["plots"]:
        if f in PAGE_PLOTS:
            body.append(f"<h2>{esc(title)}</h2>"
                        f'<img class="plot" alt="{esc(title)}" src="{data_uri((run_dir / f).read_bytes())}">')
    if "training_curve.png" not in [f for f, _ in s["plots"]]:
        body.append('<h2>Training curve</h2><p class="muted">None: this run recorded no epochs against a validation '
                    "split (a linear head is fitted in one L-BFGS solve; an MLP head without a validation split "
                    "keeps no history).</p>")
    body.append("<h2>Skipped files</h2>")
    if s["skipped"]:
        body.append(f"<p>{len(s['skipped'])} files were not used:</p>"
                    + table(["path", "reason"], [[i.get("path", ""), i.get("reason", "")] for i in s["skipped"]]))
    else:
        body.append("<p>None: every file found was used.</p>")
    return page(f"headstart run {s['name']}", body)


def _run_facts(s: dict) -> list[list[str]]:
    d = s["data"]
    counts = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
    used = ", ".join(f"{k} {v}" for k, v in d["used"].items())
    layout = {"splits": "train/val/test folders", "classes": "class folders, splits by file-name hash",
              "labels": "labels CSV"}.get(d["layout"], d["layout"])
    rows = [["data", d["labels"] or d["root"]], ["layout", layout],
            ["images", f"{d['images']} in {d['classes']} classes ({counts}); readable and used: {used}"],
            ["strategy", f"{s['strategy']['used']} (asked: {s['strategy']['asked']}; head {s['strategy']['head']})"],
            ["why this strategy", s["strategy"]["why"]], ["backbone", s["backbone"]["name"]],
            ["weights", f"{s['backbone']['weights']} ({s['backbone']['weights_kind']})"],
            ["image size", f"{s['image_size']['pixels']} px ({s['image_size']['why']})"],
            ["engine", f"{s['engine']['engine']}, {s['engine']['precision']} on {s['engine']['device']} "
                       f"({s['engine']['why']})"]]
    if s["fine_tune"]:
        ft = s["fine_tune"]
        rows.append(["fine-tuning", f"{ft['epochs_run']} epochs, best epoch {ft['best_epoch']}, stopped by "
                                    f"{ft['stopped_by']}"])
    if s["val_accuracy"] is not None:
        rows.append(["validation accuracy", f"{s['val_accuracy']:.4f}"])
    return rows + [[k, words(v) if k == "command" else v] for k, v in provenance_facts(s)]


def _test_sections(m: dict) -> list[str]:
    accuracy = f"{m['accuracy']:.4f}"
    if m.get("accuracy_ci95"):
        low, high = m["accuracy_ci95"]
        accuracy += f" (95% interval {low:.4f} - {high:.4f})"
    rows = [["images", str(m["n_images"])], ["accuracy", accuracy],
            ["balanced accuracy", f"{m['balanced_accuracy']:.4f}"], ["macro F1", macro_f1_text(m)]]
    rows += [[f"top-{k} accuracy", f"{v:.4f}"] for k, v in m["top_k_accuracy"].items()]
    return ["<h3>Metrics</h3>", facts(rows),
            '<p class="muted">The 95% interval is the Wilson score interval of the accuracy on this many test '
            "images: two runs whose intervals overlap are not clearly different.</p>",
            "<h3>Per class</h3>", _per_class(m["per_class"]),
            "<h3>Confusion matrix</h3>", _confusion(m["confusion_matrix"], m["classes"])]


def _per_class(per_class: list[dict]) -> str:
    """Precision, recall, F1 and support of each class; a class with no test images says so instead of 0s."""
    head = "".join(f"<th>{h}</th>" for h in ("class", "precision", "recall", "F1", "support"))
    rows = []
    for r in per_class:
        if r["support"]:
            scores = "".join(f'<td class="n">{r[k]:.4f}</td>' for k in ("precision", "recall", "f1"))
        else:
            scores = f'<td class="none" colspan="3">{NO_TEST_IMAGES}</td>'
        rows.append(f"<tr><td>{esc(r['class'])}</td>{scores}<td class=\"n\">{r['support']}</td></tr>")
    return f'<table class=""><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _confusion(cm: list[list[int]], classes: list[str]) -> str:
    """Rows true, columns predicted; each cell shaded by its share of the row (the class's recall on the diagonal)."""
    head = "<th>true \\ predicted</th>" + "".join(f'<th class="c">{esc(c)}</th>' for c in classes)
    rows = []
    for i, (name, row) in enumerate(zip(classes, cm)):
        total = sum(row) or 1
        cells = "".join(
            f'<td class="{"d" if i == j else ""}" style="background:rgba(31,119,180,{n / total:.3f});'
            f'color:{"#fff" if n / total > 0.5 else "#222"}">{n}</td>' for j, n in enumerate(row))
        rows.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return (f'<table class="cm"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="muted">Rows are true classes, columns predicted classes; shading is the share of the row.</p>')


def _worst_section(worst: dict | None, has_test: bool, root: str | None, run_dir: Path) -> list[str]:
    if not has_test:
        return []
    out = ["<h2>Most confident mistakes</h2>"]
    if worst is None:
        return out + ['<p class="muted">This run has no test_predictions.csv to find them in.</p>']
    if not worst["shown"]:
        return out + ["<p>None: every test image was classified correctly.</p>"]
    out.append(f'<p class="muted">{len(worst["shown"])} of the {worst["mistakes"]} wrong predictions on the test '
               "split, those made with the highest probability first: look for wrong labels and broken images. "
               "Beside each image, where the model looked for the class it predicted and for the true class "
               "(its heatmaps, as <code>headstart explain</code> draws them: red raised that class's score "
               "most). A map shows where, not why.</p>")
    overlays, why_not = worst_overlays(run_dir, worst["shown"], THUMB)
    if why_not:
        out.append(f'<p class="muted">No heatmaps: {esc(why_not)}.</p>')
    figures = []
    for w, pair in zip(worst["shown"], overlays):  # each named by its path in the data folder: IMG_1056.jpg is in many
        name = shown_path(w["path"], root)
        cells = thumbnail(w["path"], name, THUMB, "not readable now")
        if pair is not None:  # the image, then the predicted class's map and the true class's, captioned
            predicted, true = (img(overlay, f"{name}: map of {w[key]}") for overlay, key in zip(pair, ("predicted",
                                                                                                       "true")))
            cells = (f'<div class="row"><div>{cells}image</div><div>{predicted}map: predicted</div>'
                     f"<div>{true}map: true</div></div>")
        figures.append(f"<figure>{cells}<figcaption><b>{esc(name)}</b><br>"
                       f"true: {esc(w['true'])}<br>predicted: {esc(w['predicted'])} "
                       f'<span class="p">(p={w["probability"]:.2f})</span></figcaption></figure>')
    grid = "grid maps" if any(p is not None for p in overlays) else "grid"
    return out + [f'<div class="{grid}">' + "".join(figures) + "</div>"]


# --------------------------------------------------------------------------- compare.html


def render_compare_html(result: dict, out: Path) -> str:
    """The strategies side by side: the table, compare.png inlined, and a link to each run's report.html."""
    rows = []
    for r in result["runs"]:
        run = Path(r["run"])
        rel = os.path.relpath(run, out) if run.is_absolute() else r["run"]
        name = esc(r["strategy"])
        if (run / "report.html").is_file():
            name = f'<a href="{href(Path(rel, "report.html").as_posix())}">{name}</a>'
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        if r.get("test_accuracy_ci95"):
            acc += " [{:.3f}, {:.3f}]".format(*r["test_accuracy_ci95"])
        cells = [acc, _num(r["balanced_accuracy"], "{:.4f}"), _num(r.get("image_size"), "{}"),
                 _num(r["wall_seconds"], "{:.0f}"), _num(r["trainable_parameters"], "{:,}"),
                 _num(r["extraction_images_per_second"], "{:.0f}"), _num(r["training_images_per_second"], "{:.0f}"),
                 _num(r.get("epochs"), "{}")]
        rows.append(f"<tr><td>{name}</td>" + "".join(f'<td class="n">{esc(c)}</td>' for c in cells) + "</tr>")
    header = ["strategy", "test accuracy [95% interval]", "balanced accuracy", "image size", "wall s",
              "trainable parameters", "extraction images/s", "training images/s", "epochs"]
    body = ["<h1>headstart compare</h1>", facts([["data", result["data"]], ["seed", str(result["seed"])]]),
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>",
            '<p class="muted">Wall time includes each strategy\'s cold feature extraction. 95% intervals are Wilson '
            "score intervals; runs whose intervals overlap are not clearly different. Each strategy's name links "
            "to its run's report.</p>"]
    if (out / "compare.png").is_file():
        body.append(f'<img class="plot" alt="test accuracy against wall time" '
                    f'src="{data_uri((out / "compare.png").read_bytes())}">')
    return page("headstart compare", body)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def write_compare_html(out: str | os.PathLike, result: dict | None = None) -> Path:
    """Write compare.html into a compare folder, from `result` or from its compare.json."""
    out = Path(out)
    if result is None:
        result = _read_json(out / "compare.json")
    write_text(out / "compare.html", render_compare_html(result, out))
    return out / "compare.html"
