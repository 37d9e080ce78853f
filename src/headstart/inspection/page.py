"""inspect.html: one self-contained page of an inspection, in report.html's style (reports/html.py's page,
CSS and Content-Security-Policy: nothing is fetched, no script, every name from the data escaped).

Per kind, the findings sorted by score (surest first) as thumbnails with the given and suggested
label; a pair shows both files; a likely wrong label, beside its image, where the label check's head looked
for the given label and for the suggested one (overlays.py). At most SHOWN per kind: issues.csv lists them
all. The pieces of the page are report.html's (reports/pieces.py).
"""

from __future__ import annotations

import os

from headstart.reports.pieces import esc, facts, img, page, table, thumbnail

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


def shown(rows: list[dict], kind: str) -> list[dict]:
    """The findings of `kind` the page shows, in its order: surest first, at most SHOWN."""
    return sorted((r for r in rows if r["kind"] == kind), key=lambda r: -r["score"])[:SHOWN]


def _figure(r: dict, base: str, maps: tuple | None = None) -> str:
    caption = [f"<b>{esc(r['path'])}</b>", f"{esc(r['split'])}, score {r['score']:.3f}",
               f"given: {esc(r['given_label'])}"]
    if r["suggested_label"]:
        caption.append(f"suggested: {esc(r['suggested_label'])}")
    images = _thumb(os.path.join(base, r["path"]))
    if maps is not None:  # the image, then the given label's map and the suggested label's, captioned
        name = os.path.basename(r["path"])
        given, suggested = (img(m, f"{name}: map of {r[key]}") for m, key in zip(maps, ("given_label",
                                                                                        "suggested_label")))
        images = (f"<div>{images}image</div><div>{given}map: given</div><div>{suggested}map: suggested</div>")
    if r["partner"]:
        images += _thumb(os.path.join(base, r["partner"]))
        caption.append(f"partner: {esc(r['partner'])}")
    width = ' style="width:210px"' if r["partner"] else ' style="width:310px"' if maps is not None else ""
    return (f'<figure{width}><div class="row">{images}</div><figcaption>'
            + "<br>".join(caption) + "</figcaption></figure>")


def render_page(summary: dict, rows: list[dict], base: str, label_maps: dict | None = None) -> str:
    """The page of an inspection of the data at `base` (the folder issues.csv's paths are relative to);
    `label_maps` holds, by path, the overlays of the label findings shown (given label's, suggested label's)."""
    label_maps = label_maps or {}
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
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: -r["score"])  # as shown() sorts
        title = TITLES.get(kind, f"Image check: {kind} (cleanvision's measure)")
        body.append(f'<h2 id="{esc(kind)}">{esc(title)} ({len(mine)})</h2>')
        if kind in EXPLAIN:
            body.append(f'<p class="muted">{esc(EXPLAIN[kind])}</p>')
        if kind == "label":
            heatmaps = summary["labels"].get("heatmaps", {})
            body.append(f'<p class="muted">No heatmaps: {esc(heatmaps["note"])}.</p>' if heatmaps.get("note") else
                        '<p class="muted">Beside each image, where the head that judged it looked for the given label '
                        "and for the suggested one (CAM: red raised that label's score most). A map shows where, "
                        "not why.</p>")
        if kind == "unreadable":
            body.append(table(["path", "why"], [[r["path"], summary["unreadable"].get(r["path"], "")] for r in mine]))
            continue
        more = f'<p class="muted">{len(mine) - SHOWN} more in issues.csv.</p>' if len(mine) > SHOWN else ""
        body.append('<div class="grid">' + "".join(_figure(r, base, label_maps.get(r["path"]) if kind == "label"
                                                           else None) for r in mine[:SHOWN]) + "</div>" + more)
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
