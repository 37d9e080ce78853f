"""`headstart compare`: the strategies side by side on one split and seed.

Each strategy runs as an ordinary `train` into `<out>/<name>`, with its own empty feature
cache (so every wall time includes its cold feature extraction), and the table, JSON and
plot are built from the runs' own metrics.json and config.json (wall time is the run's
own `wall_seconds`).

Interrupted (Ctrl-C) or failed, a strategy leaves nothing: its `.cache-<name>`,
`<name>.checkpoints` and partial folder are removed, so only finished runs remain.
`compare.settings.json` records the data and settings; the same compare started again
keeps the finished runs and trains the rest, without --overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from headstart.errors import HeadstartError, Interrupted, option
from headstart.fileio import write_json
from headstart.reports.plots import new_figure, save_png
from headstart.reports.html import write_compare_html
from headstart.learn.checkpoints import checkpoint_dir
from headstart.settings import LIMITS, TrainConfig, check_limits
from headstart.strategies import compare_rows, get_strategy

log = logging.getLogger(__name__)

SETTINGS = "compare.settings.json"  # what the runs in the folder were started with; a rerun resumes them


def compare(data: str | os.PathLike, *, out: str | os.PathLike, seed: int = 0, strategies: list[str] | None = None,
            overwrite: bool = False, **common) -> dict:
    """Train each strategy on `data` and return {"runs": [...]} with one row per strategy.

    Only finished runs stay in `out`: an interrupted or failed strategy leaves no run, cache or
    checkpoints behind. Started again with the same data and settings, compare keeps the finished
    runs and trains the rest, so no --overwrite is needed after Ctrl-C.
    """
    from headstart.runs.train import train

    rows_of = compare_rows()  # name -> train() settings, from the strategy registry
    names = strategies or list(rows_of)
    unknown = [n for n in names if n not in rows_of]
    if unknown:
        raise HeadstartError(f"unknown strategies {unknown}; choose from {', '.join(rows_of)}.")
    # What train would refuse, refused before `out` is made: the settings, and the fine-tuning budget's numbers.
    TrainConfig(data=os.fspath(data), seed=seed, **common).validate()
    budget = common.get("finetune") or {}
    check_limits(**{k: v for k, v in (budget.items() if isinstance(budget, dict) else ()) if k in LIMITS})
    out = Path(out).expanduser().absolute()
    settings = {"data": os.fspath(Path(data).expanduser().absolute()), "seed": seed,
                **{k: v for k, v in sorted(common.items()) if k not in ("workers",)}}  # workers change no number
    settings = json.loads(json.dumps(settings, default=str))  # as compare.settings.json will read back
    resume = _resumable(out, settings)
    if out.exists() and any(out.iterdir()) and not overwrite and not resume:
        raise HeadstartError(f"{out} already exists and does not hold an unfinished compare of {data} with these "
                             f"settings; pass another {option('out', None)} or {option('overwrite')}.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SETTINGS, settings)
    for name in rows_of:  # leftovers of a run killed outright (SIGKILL), which could not clean up
        _clean(out, name)
    rows = []
    for name in names:
        run_dir = out / name
        if resume and not overwrite and _finished(run_dir):
            log.info("compare: %s already finished in %s; kept", name, run_dir)
            rows.append(_row(name, run_dir))
            continue
        log.info("compare: %s", name)
        run_settings = {**common, **rows_of[name]}  # a strategy's own settings win over the shared ones
        if not get_strategy(run_settings["strategy"]).trains_backbone:
            run_settings.pop("finetune", None)  # the budget (--epochs) is the trained strategies' only
        try:
            train(data, **run_settings, seed=seed, out=os.fspath(run_dir), overwrite=True,
                  cache_dir=os.fspath(out / f".cache-{name}"))
        except KeyboardInterrupt:
            done = [r["strategy"] for r in rows]
            kept = f"{', '.join(done)} finished and kept in {out}" if done else "nothing partial was kept"
            raise Interrupted(f"{kept}; run the same compare again to train the rest.") from None
        finally:
            _clean(out, name)
        rows.append(_row(name, run_dir))
    result = {"data": os.fspath(data), "seed": seed, "runs": rows}
    write_json(out / "compare.json", result)
    plot_compare(rows, out / "compare.png")
    write_compare_html(out, result)
    return result


def _clean(out: Path, name: str) -> None:
    """Remove what an unfinished run of `name` leaves: its feature cache, checkpoints and partial folders."""
    for path in (out / f".cache-{name}", checkpoint_dir(out / name), *out.glob(f"{name}.partial-*")):
        shutil.rmtree(path, ignore_errors=True)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "model" / "model.json").is_file()


def _resumable(out: Path, settings: dict) -> bool:
    """`out` holds a compare started with the same settings (its finished runs, perhaps its leftovers)."""
    try:
        return json.loads((out / SETTINGS).read_text(encoding="utf-8")) == settings
    except (OSError, ValueError):
        return False


def _row(name: str, run_dir: Path) -> dict:
    """One table row, from the run's own files: so a kept run and a new one are reported alike."""
    from headstart.models.bundle import load

    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    ft = m.get("fine_tune", {})
    test = m.get("test", {})
    trainable = ft.get("trainable_parameters") or sum(p.numel() for p in load(run_dir).head.parameters())
    return {
        "strategy": name,
        "run": os.fspath(run_dir),
        "image_size": config["image_size"],
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_ci95": test.get("accuracy_ci95"),
        "n_test_images": test.get("n_images"),
        "balanced_accuracy": test.get("balanced_accuracy"),
        "wall_seconds": round(m["wall_seconds"], 1),
        "trainable_parameters": int(trainable),
        "extraction_images_per_second": m["extraction"]["images_per_second"],
        "training_images_per_second": ft.get("images_per_second"),
        "epochs": ft.get("epochs_run"),
        "n_train_images": m["n_train"] + m["n_val"],
    }


SMALL_TEST = 10_000  # below this many test images, the table shows each accuracy's 95% interval


def format_table(result: dict) -> str:
    """The runs side by side; extraction and training speeds in their own columns ("-": that phase did not run)."""
    rows = result["runs"]
    with_ci = any((r.get("n_test_images") or 0) < SMALL_TEST and r.get("test_accuracy_ci95") for r in rows)
    acc_head = "test acc [95% interval]" if with_ci else "test acc"
    acc_w = len(acc_head)
    head = (f"{'strategy':<26} {'size':>4} {acc_head:>{acc_w}} "
            f"{'bal acc':>7} {'wall s':>7} {'trainable':>11} {'extract/s':>9} {'train/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = _accuracy_cell(r, with_ci)
        bal = "-" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.4f}"
        lines.append(f"{r['strategy']:<26} {r.get('image_size', '-'):>4} {acc:>{acc_w}} {bal:>7} "
                     f"{r['wall_seconds']:>7.0f} {r['trainable_parameters']:>11,} "
                     f"{_speed(r['extraction_images_per_second']):>9} {_speed(r['training_images_per_second']):>8}")
    if with_ci:
        lines.append(f"95% intervals: Wilson score intervals on test sets under {SMALL_TEST:,} images; runs whose "
                     "intervals overlap are not clearly different.")
    return "\n".join(lines)


def _accuracy_cell(r: dict, with_ci: bool) -> str:
    acc = r["test_accuracy"]
    if acc is None:
        return "-"
    ci = r.get("test_accuracy_ci95")
    if with_ci and ci and (r.get("n_test_images") or 0) < SMALL_TEST:
        return f"{acc:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{acc:.4f}"


def _speed(value) -> str:
    return "-" if not value else f"{value:.0f}"


def plot_compare(rows: list[dict], path: Path) -> None:
    save_png(compare_figure(rows), path)


def compare_figure(rows: list[dict]):
    """Test accuracy (with its 95% interval) against wall time, one labelled point per strategy.

    The two feature-extraction runs often land on top of each other (same extraction time, close
    accuracies), so each label is placed at the first of a few offsets where its box overlaps no
    label already placed and no other point.
    """
    fig = new_figure(7, 4.5, dpi=110, layout=None)  # tight_layout below, before the labels are measured
    ax = fig.add_subplot(111)
    shown = [r for r in rows if r["test_accuracy"] is not None]
    for r in shown:
        ci = r.get("test_accuracy_ci95")
        yerr = [[r["test_accuracy"] - ci[0]], [ci[1] - r["test_accuracy"]]] if ci else None
        ax.errorbar(r["wall_seconds"], r["test_accuracy"], yerr=yerr, fmt="o", markersize=7, capsize=3)
    ax.set_xlabel("wall time, seconds (including cold feature extraction)")
    ax.set_ylabel("test accuracy (bars: 95% interval)")
    ax.set_title("Strategies on one split and seed")
    ax.grid(alpha=0.3)
    if shown:
        walls = [r["wall_seconds"] for r in shown]
        ax.set_xlim(0, max(walls) * 1.35 + 1)  # room on the right for the labels
    fig.tight_layout()
    _place_labels(fig, ax, shown)
    return fig


OFFSETS = [(8, 4), (8, -14), (8, 16), (8, -26), (8, 28), (8, -38), (8, 40), (8, -50), (8, 52)]  # points


def _place_labels(fig, ax, rows: list[dict]) -> None:
    renderer = fig.canvas.get_renderer()
    points = [ax.transData.transform((r["wall_seconds"], r["test_accuracy"])) for r in rows]
    placed = []
    for r in sorted(rows, key=lambda r: -r["test_accuracy"]):  # top down: the first offset is above-right
        xy = (r["wall_seconds"], r["test_accuracy"])
        label = ax.annotate(r["strategy"], xy, textcoords="offset points", xytext=OFFSETS[0], fontsize=8,
                            va="center")
        for offset in OFFSETS:
            label.xyann = offset
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed) and not any(box.contains(*p) for p in points):
                break
        placed.append(label.get_window_extent(renderer))
