"""report.html: one self-contained page per run (and compare.html), from the same summary as report.md.

`load_summary(run_dir)` rebuilds the run's summary from the files in its directory
(config.json, metrics.json, skipped.json, test_predictions.csv, the plots), so the run
itself and `headstart report RUN` write the same report.md and report.html, byte for byte.

The page fetches nothing: plots and the worst errors' thumbnails are inlined as base64
PNG data URIs, the CSS sits in the page, there is no script, and a Content-Security-Policy
(`default-src 'none'`) makes the browser refuse any fetch a future edit might add. Links to
files beside the page (test_predictions.csv, a run's report.html) are relative, followed only
when clicked. Every string that comes from the user's data (class and file names) is
escaped; a name that is not valid UTF-8 arrives with surrogates and is shown as `\\xff`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path
from urllib.parse import quote

from headstart.errors import HeadstartError
from headstart.fileio import write_text
from headstart.reports.markdown import (SPLITS, class_notes, data_issue_sections, images_per_class, provenance_facts,
                                        run_summary, write_run_report)
from headstart.reports.plots import shown_path
from headstart.reports.tables import NO_TEST_IMAGES, macro_f1_text

THUMB = 96  # pixels, the longer side of a worst-error thumbnail: 16 of them stay under ~150 KB
WORST = 16  # as many as worst_errors.png shows
PAGE_PLOTS = ("training_curve.png",)  # inlined; the confusion matrix and the worst errors are drawn in HTML

CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:0 auto;padding:1em 1.5em;color:#222}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.none{color:#666;font-style:italic}
table.facts th{background:#f6f6f6;white-space:nowrap;vertical-align:top}
table.cm td{text-align:right;min-width:2.2em}table.cm td.d{font-weight:bold}
table.cm th.c{writing-mode:vertical-rl;transform:rotate(180deg);vertical-align:bottom}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.5em 1em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:160px;font-size:12px;overflow-wrap:anywhere}
.p{white-space:nowrap}
figure img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
figure .missing{width:96px;height:96px;background:#eee;display:flex;align-items:center;font-size:11px}
img.plot{max-width:100%}
.muted{color:#666}
"""


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


def esc(value) -> str:
    """`value` as HTML text: undecodable bytes (surrogates) shown as \\xff escapes, then HTML-escaped."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make (e.g. from a JSON \\ud800)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def _href(name: str) -> str:
    # A relative link to a file beside the page; quote() also makes '<', '"' and spaces harmless.
    return esc(quote(name.encode("utf-8", "surrogateescape")))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """Text already made HTML (its user strings escaped): `_facts` places it as it is."""


def _facts(rows: list[list[str]]) -> str:
    return '<table class="facts">' + "".join(
        f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, Markup) else esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _words(text: str) -> Markup:
    """`text` that wraps only between words: a browser otherwise breaks a command after any hyphen (`--`)."""
    return Markup(" ".join(f'<span class="p">{esc(w)}</span>' for w in text.split(" ")))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_html(s: dict, run_dir: Path) -> str:
    """The run's page; `run_dir` holds the plots to inline."""
    body = [f"<h1>headstart run {esc(s['name'])}</h1>", "<h2>The run</h2>", _facts(_run_facts(s))]
    if s["data"]["per_class"]:
        header, rows = images_per_class(s["data"])
        body.append('<h3 id="images">Images per class</h3>' + _table(header, rows, {1, 2, 3})
                    + "".join(f"<p>{esc(note)}</p>" for note in class_notes(s["data"])))
    body.append("<h3>Timings</h3>" + _facts(s["timings"]))
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
                    f'<a href="{_href(s["predictions"])}">{esc(s["predictions"])}</a>.</p>')
    body += _worst_section(s["worst_errors"], bool(s["test"]), s["data"]["root"])
    for f, title in s["plots"]:
        if f in PAGE_PLOTS:
            body.append(f"<h2>{esc(title)}</h2>"
                        f'<img class="plot" alt="{esc(title)}" src="{_data_uri((run_dir / f).read_bytes())}">')
    if "training_curve.png" not in [f for f, _ in s["plots"]]:
        body.append('<h2>Training curve</h2><p class="muted">None: this run recorded no epochs against a validation '
                    "split (a linear head is fitted in one L-BFGS solve; an MLP head without a validation split "
                    "keeps no history).</p>")
    body.append("<h2>Skipped files</h2>")
    if s["skipped"]:
        body.append(f"<p>{len(s['skipped'])} files were not used:</p>"
                    + _table(["path", "reason"], [[i.get("path", ""), i.get("reason", "")] for i in s["skipped"]]))
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
    return rows + [[k, _words(v) if k == "command" else v] for k, v in provenance_facts(s)]


def _test_sections(m: dict) -> list[str]:
    accuracy = f"{m['accuracy']:.4f}"
    if m.get("accuracy_ci95"):
        low, high = m["accuracy_ci95"]
        accuracy += f" (95% interval {low:.4f} - {high:.4f})"
    rows = [["images", str(m["n_images"])], ["accuracy", accuracy],
            ["balanced accuracy", f"{m['balanced_accuracy']:.4f}"], ["macro F1", macro_f1_text(m)]]
    rows += [[f"top-{k} accuracy", f"{v:.4f}"] for k, v in m["top_k_accuracy"].items()]
    return ["<h3>Metrics</h3>", _facts(rows),
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


def _worst_section(worst: dict | None, has_test: bool, root: str | None) -> list[str]:
    if not has_test:
        return []
    out = ["<h2>Most confident mistakes</h2>"]
    if worst is None:
        return out + ['<p class="muted">This run has no test_predictions.csv to find them in.</p>']
    if not worst["shown"]:
        return out + ["<p>None: every test image was classified correctly.</p>"]
    out.append(f'<p class="muted">{len(worst["shown"])} of the {worst["mistakes"]} wrong predictions on the test '
               "split, those made with the highest probability first: look for wrong labels and broken images.</p>")
    figures = []
    for w in worst["shown"]:  # each named by its path in the data folder: IMG_1056.jpg is in many folders
        name = shown_path(w["path"], root)
        figures.append(f"<figure>{_thumbnail(w['path'], name)}<figcaption><b>{esc(name)}</b><br>"
                       f"true: {esc(w['true'])}<br>predicted: {esc(w['predicted'])} "
                       f'<span class="p">(p={w["probability"]:.2f})</span></figcaption></figure>')
    return out + ['<div class="grid">' + "".join(figures) + "</div>"]


def _thumbnail(path: str, name: str) -> str:
    from headstart.data.images import ImageError, load_image  # decoded by the same rules as training

    try:
        image = load_image(path, min_side=THUMB)  # a large JPEG decodes at a fraction of its size
    except (ImageError, OSError) as exc:  # moved or changed since the run: the page still lists the file
        return f'<div class="missing">not readable now: {esc(exc)}</div>'
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return f'<img alt="{esc(name)}" src="{_data_uri(buf.getvalue())}">'


# --------------------------------------------------------------------------- compare.html


def render_compare_html(result: dict, out: Path) -> str:
    """The strategies side by side: the table, compare.png inlined, and a link to each run's report.html."""
    rows = []
    for r in result["runs"]:
        run = Path(r["run"])
        rel = os.path.relpath(run, out) if run.is_absolute() else r["run"]
        name = esc(r["strategy"])
        if (run / "report.html").is_file():
            name = f'<a href="{_href(Path(rel, "report.html").as_posix())}">{name}</a>'
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
    body = ["<h1>headstart compare</h1>", _facts([["data", result["data"]], ["seed", str(result["seed"])]]),
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>",
            '<p class="muted">Wall time includes each strategy\'s cold feature extraction. 95% intervals are Wilson '
            "score intervals; runs whose intervals overlap are not clearly different. Each strategy's name links "
            "to its run's report.</p>"]
    if (out / "compare.png").is_file():
        body.append(f'<img class="plot" alt="test accuracy against wall time" '
                    f'src="{_data_uri((out / "compare.png").read_bytes())}">')
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
