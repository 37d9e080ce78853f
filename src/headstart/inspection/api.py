"""`headstart inspect DATA`: from a raw folder to its likely wrong labels, leaks, near duplicates, strays and odd
images, in OUT/issues.csv (data/issues.py), OUT/summary.json and OUT/inspect.html.

The data and its features are prepared as `train` prepares them (runs/context.py: the same splits, image
size and feature cache), so features computed here are the ones a later `train` finds, and back. Each
image is then decoded once more, small, for the image checks and the fingerprints that confirm near
copies (data/looks.py). Nothing is written into DATA: OUT may not sit inside it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.data.folders import check_input
from headstart.data.issues import COLUMNS
from headstart.data.looks import CHECKS, check_scores, check_threshold, look_all
from headstart.engines.features import cache_root_of
from headstart.errors import HeadstartError
from headstart.fileio import write_json, write_text
from headstart.inspection.balance import class_balance
from headstart.inspection.copies import near_copies
from headstart.inspection.labels import label_issues, principal_axes, project
from headstart.inspection.overlays import label_overlays
from headstart.inspection.page import THUMB, render_page, shown
from headstart.inspection.strays import stray_scores
from headstart.runs.context import Place, load_run_data, prepare, resolve_backbone
from headstart.runs.rundir import check_outside
from headstart.settings import Runtime, TrainConfig
from headstart.strategies import configure

log = logging.getLogger("headstart")

CHECK_SHARE = 0.2  # an image check that flags more than this share of the set describes the set, not a few files
CHECK_FENCE = 3.0  # an image check lists a file only when its score is also a far-out low value for the set


@dataclass
class Inspection:
    """What `inspect` found: where it wrote, every finding (issues.csv's rows) and summary.json's content."""

    out: Path
    issues: list[dict]
    summary: dict


def inspect(data: str | os.PathLike, *, labels: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
            backbone: str | None = None, weights: str | None = None, image_size: int | str = "auto", folds: int = 5,
            seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, runtime: Runtime | None = None,
            **runtime_settings) -> Inspection:
    """Inspect an image folder (or labels CSV) and write OUT/issues.csv, OUT/summary.json and OUT/inspect.html.

    `runtime` (or its fields as keywords: device, engine, precision, batch_size, workers, cache_dir) runs
    the backbone as for train. OUT defaults to inspections/<name of DATA>.
    """
    t0 = time.perf_counter()
    if folds < 2:
        raise HeadstartError(f"--folds {folds}: out-of-fold probabilities need at least 2 folds.")
    rt = Runtime.of(runtime, **runtime_settings)
    cfg = configure(TrainConfig(data=os.fspath(data), labels=os.fspath(labels) if labels else None, backbone=backbone,
                                weights=weights, image_size=image_size, seed=seed, val_fraction=val_fraction,
                                test_fraction=test_fraction, batch_size=rt.batch_size, workers=rt.workers,
                                device=rt.device, engine=rt.engine, precision=rt.precision, cache_dir=rt.cache_dir,
                                data_check=False))
    check_input(cfg.data, cfg.labels)
    cache_root = cache_root_of(cfg.cache_dir)
    out = Path(out or Path("inspections") / Path(os.path.abspath(cfg.data)).name).expanduser().absolute()
    check_outside(cfg.data, cfg.labels, out, cache_root)
    entry = resolve_backbone(cfg)
    ctx = prepare(cfg, entry, Place(None, out, cache_root), load_run_data(cfg, cache_root))
    t_features = time.perf_counter() - t0
    found = find_issues(ctx, folds, seed, out)
    found["summary"]["seconds"] = {"data_and_features": round(t_features, 2), **found["summary"]["seconds"],
                                   "total": round(time.perf_counter() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "issues.csv", issues_csv(found["rows"]))
    write_json(out / "summary.json", found["summary"])
    write_text(out / "inspect.html", render_page(found["summary"], found["rows"], found["base"], found["label_maps"]))
    log.info("inspection written to %s (%s)", out, ", ".join(f"{k} {n}" for k, n in found["summary"]["counts"].items())
             or "no issues")
    return Inspection(out, found["rows"], found["summary"])


def find_issues(ctx, folds: int, seed: int, out: Path | None = None) -> dict:
    """Every check on a prepared run context: {"rows": issues.csv's rows, "summary": ..., "base": DATA's folder,
    "label_maps": {path: (given label's overlay, suggested label's overlay)} of the label findings the page shows}."""
    data, feats = ctx.data, ctx.feats
    base = os.path.dirname(data.root) if data.layout == "csv" else data.root
    rel = lambda p: os.path.relpath(p, base).replace(os.sep, "/")  # noqa: E731
    classes = data.classes
    paths = [s.path for s in feats.samples]
    splits = [s.split for s in feats.samples]
    names = [rel(p) for p in paths]
    seconds = {}
    rows: list[dict] = []
    notes: list[str] = []

    def row(i, kind, score, suggested="", partner=""):
        return {"path": names[i], "split": splits[i], "kind": kind, "score": round(float(score), 4),
                "given_label": classes[feats.y[i]], "suggested_label": suggested, "partner": partner}

    t = time.perf_counter()
    looks, failed = look_all(paths)
    seconds["decoding"] = round(time.perf_counter() - t, 2)
    by_path = {s.path: s for s in data.samples}
    unreadable = {}
    for p, reason in {**feats.ext.failures, **failed}.items():
        s = by_path.get(p)
        rows.append({"path": rel(p), "split": s.split if s else "", "kind": "unreadable", "score": 1.0,
                     "given_label": classes[s.label] if s else "", "suggested_label": "", "partner": ""})
        unreadable[rel(p)] = reason
    ok = np.array([x is not None for x in looks], bool)

    t = time.perf_counter()
    axes = principal_axes(feats.X)
    Z = project(feats.X, axes)  # the label check's and the copy search's space
    seconds["components"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    lab = label_issues(Z, feats.y, classes, folds, seed)
    notes += lab["notes"]
    seconds["labels"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    st = stray_scores(feats.X, feats.y, relabel=dict(zip(lab["flagged"].tolist(), lab["suggested"].tolist())))
    seconds["strays"] = round(time.perf_counter() - t, 2)
    strays = set(st["listed"].tolist())  # a flagged file that fits no class either is a stray, listed once as such
    for i, score, sug in sorted(zip(lab["flagged"], lab["score"], lab["suggested"]), key=lambda r: -r[1]):
        if int(i) not in strays:
            rows.append(row(i, "label", score, suggested=classes[sug]))

    t = time.perf_counter()
    idx = np.flatnonzero(ok)
    fingers = np.stack([looks[i].finger for i in idx]) if len(idx) else np.zeros((0, 3, 1, 1), np.float32)
    cop = near_copies(Z[idx], fingers, [splits[i] for i in idx], [names[i] for i in idx],
                      [paths[i] for i in idx]) if len(idx) > 1 \
        else {"rows": [], "info": {}}
    for p, q, kind, s in cop["rows"]:
        rows.append(row(idx[p], kind, s, partner=names[idx[q]]))
    seconds["near_copies"] = round(time.perf_counter() - t, 2)

    for i in sorted(st["listed"], key=lambda i: -st["distance"][i]):
        rows.append(row(i, "stray", st["score"][i]))

    checks = {}
    scores = check_scores(looks)
    for check in CHECKS:
        sc = scores[check]
        threshold = check_threshold(check, sc)
        hit = np.flatnonzero(~np.isnan(sc) & (sc < min(threshold, low_fence(sc, check))))
        checks[check] = {"threshold": threshold, "flagged": int(len(hit))}
        if ok.sum() and len(hit) > CHECK_SHARE * ok.sum():
            note = (f"{len(hit)} of {int(ok.sum())} images are {check} by cleanvision's measure: that describes this "
                    "data set, not a few odd files; they are not listed one by one")
            checks[check]["note"] = note
            notes.append(note)
            continue
        for i in sorted(hit, key=lambda i: sc[i]):
            rows.append(row(i, check, 1.0 - sc[i]))

    t = time.perf_counter()
    at = {n: i for i, n in enumerate(names)}
    picks = [(at[r["path"]], classes.index(r["given_label"]), classes.index(r["suggested_label"]))
             for r in shown(rows, "label")]
    drawn, why_not = label_overlays(ctx, lab, axes, picks, THUMB)
    label_maps = {names[i]: pair for i, pair in drawn.items()}
    heatmaps = {"drawn": len(label_maps), "of": len(picks), "method": "cam of the fold head that held each file out"}
    if why_not:
        heatmaps["note"] = why_not
    seconds["label_heatmaps"] = round(time.perf_counter() - t, 2)

    balance = class_balance(ctx.summary["per_class"], classes, feats.y, lab["proba"])
    notes += balance["notes"]
    for n in notes:
        log.warning("inspect: %s", n)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    summary = {
        "data": data.root, "layout": data.layout, "classes": classes, "n_images": len(data.samples),
        "n_readable": int(len(paths)), "splits": ctx.summary["splits"],
        "backbone": ctx.entry.name, "image_size": ctx.image_size, "cache_namespace": feats.cache.key,
        "counts": counts, "notes": notes,
        "labels": {**lab["info"], "heatmaps": heatmaps}, "near_copies": cop["info"],
        "strays": {"listed": int(len(st["listed"]))},
        "image_checks": checks, "class_balance": balance,
        "byte_identical_across_splits": ctx.summary["duplicates_across_splits"],
        "unreadable": unreadable, "skipped": ctx.skipped, "columns": list(COLUMNS),
        "score": "how sure each finding is, higher is surer: label 1 - cleanlab's label quality; leak and "
                 "near-duplicate the pair's picture similarity; stray the share of images nearer to their class; "
                 "image checks 1 - cleanvision's score",
        "act": f"headstart train {base} --exclude {out / 'issues.csv' if out else '<OUT>/issues.csv'} "
               "[--exclude-kinds label,leak]",
        "seconds": seconds,
    }
    return {"rows": rows, "summary": summary, "base": base, "label_maps": label_maps}


def low_fence(scores: np.ndarray, check: str) -> float:
    """Where an image check's score is low for this set: Q1 - FENCE x IQR of the set's scores (odd size and odd
    aspect ratio: no fence, cleanvision's own rule already is, or needs none). FMNIST-TL's sandals are
    low-information by cleanvision's threshold, 15% of the set: that is what the set is, not an odd file."""
    known = scores[~np.isnan(scores)]
    if check in ("odd-size", "odd-aspect-ratio") or not len(known):
        return np.inf
    q1, q3 = np.percentile(known, [25, 75])
    return q1 - CHECK_FENCE * (q3 - q1)


def issues_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
