"""inspect.html: one self-contained page of an inspection, in report.html's style (reports/html.py's page,
CSS and Content-Security-Policy: nothing is fetched, no script, every name from the data escaped).

Per kind, the findings sorted by score (surest first) as thumbnails with the given and suggested
label; a pair shows both files. At most SHOWN per kind: issues.csv lists them all.
"""

from __future__ import annotations

import os

from headstart.reports.pieces import esc, facts, page, table, thumbnail

SHOWN = 48
THUMB = 96
TITLES = {"label": "Likely wrong labels", "leak": "Leaks: validation or test images with a near copy in train",
          "near-duplicate": "Near duplicates", "stray": "Strays: images that belong to no class",
          "unreadable": "Files the decoder refuses"}
EXPLAIN = {
    "label": "Out-of-fold probabilities of a linear head (never the image's own fit), judged by cleanlab. Score: 1 - "
             "label quality.",
    "leak": "The test or validation image first, then the train image it copies. A leak inflates the test score.",
    "near-duplicate": "The later file first, then the file it repeats.",
    "stray": "Far from the other images of its class (its 20 nearest among them); wrong labels are listed above "
             "instead.",
}


def _thumb(path: str) -> str:
    return thumbnail(path, os.path.basename(path), THUMB)


def _figure(r: dict, base: str) -> str:
    caption = [f"<b>{esc(r['path'])}</b>", f"{esc(r['split'])}, score {r['score']:.3f}",
               f"given: {esc(r['given_label'])}"]
    if r["suggested_label"]:
        caption.append(f"suggested: {esc(r['suggested_label'])}")
    images = _thumb(os.path.join(base, r["path"]))
    if r["partner"]:
        images += _thumb(os.path.join(base, r["partner"]))
        caption.append(f"partner: {esc(r['partner'])}")
    width = ' style="width:210px"' if r["partner"] else ""
    return (f'<figure{width}><div style="display:flex;gap:4px">{images}</div><figcaption>'
            + "<br>".join(caption) + "</figcaption></figure>")


def render_page(summary: dict, rows: list[dict], base: str) -> str:
    """The page of an inspection of the data at `base` (the folder issues.csv's paths are relative to)."""
    counts = summary["counts"]
    about = [["data", summary["data"]], ["images", f"{summary['n_images']} ({summary['n_readable']} readable) in "
                                                   f"{len(summary['classes'])} classes"],
             ["splits", ", ".join(f"{k} {v}" for k, v in summary["splits"].items())],
             ["features", f"{summary['backbone']} at {summary['image_size']} px"],
             ["findings", ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"],
             ["seconds", ", ".join(f"{k} {v}" for k, v in summary["seconds"].items())],
             ["act on them", summary["act"]]]
    body = ["<h1>headstart inspect</h1>", facts(about)]
    if summary["notes"]:
        body.append('<div class="warn"><ul>' + "".join(f"<li>{esc(n)}</li>" for n in summary["notes"]) + "</ul></div>")
    body.append('<p class="muted">Every finding is a row of issues.csv (path, split, kind, score, given_label, '
                "suggested_label, partner). Nothing in the data folder was changed.</p>")
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: -r["score"])
        title = TITLES.get(kind, f"Image check: {kind} (cleanvision's measure)")
        body.append(f'<h2 id="{esc(kind)}">{esc(title)} ({len(mine)})</h2>')
        if kind in EXPLAIN:
            body.append(f'<p class="muted">{esc(EXPLAIN[kind])}</p>')
        if kind == "unreadable":
            body.append(table(["path", "why"], [[r["path"], summary["unreadable"].get(r["path"], "")] for r in mine]))
            continue
        more = f'<p class="muted">{len(mine) - SHOWN} more in issues.csv.</p>' if len(mine) > SHOWN else ""
        body.append('<div class="grid">' + "".join(_figure(r, base) for r in mine[:SHOWN]) + "</div>" + more)
    if not kinds:
        body.append("<p>No issues found.</p>")
    body.append("<h2>Class balance</h2>")
    b = summary["class_balance"]
    split_names = list(summary["splits"])
    body.append(table(["class", *split_names, "out-of-fold recall"],
                       [[c, *[b["per_class"][c][s] for s in split_names], b["out_of_fold_recall"].get(c, "")]
                        for c in summary["classes"]], set(range(1, len(split_names) + 2))))
    body.append(f'<p class="muted">Largest over smallest training class: {b["train_ratio_largest_to_smallest"]}. '
                f'Out-of-fold accuracy {b["out_of_fold_accuracy"]}, balanced accuracy '
                f'{b["out_of_fold_balanced_accuracy"]}: the gap is what the small classes lose.</p>')
    return page("headstart inspect", body)
