"""`headstart compare`: the strategies side by side on one split and seed.

Each strategy runs as an ordinary `train` into `<out>/<name>`, with its own empty feature
cache (so every wall time includes its cold feature extraction), and the table, JSON and
plot are built from the runs' own metrics.json.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .errors import HeadstartError
from .fileio import atomic_path, write_json

log = logging.getLogger(__name__)

# name -> train() settings; fine-tuning settings are this project's defaults.
STRATEGIES = {
    "scratch": dict(strategy="scratch", image_size="auto"),  # the small CNN at the images' native size
    "feature-extraction-linear": dict(strategy="feature-extraction", head="linear"),
    "feature-extraction-mlp": dict(strategy="feature-extraction", head="mlp"),
    "fine-tune": dict(strategy="fine-tune"),
}


def compare(data: str | os.PathLike, *, out: str | os.PathLike, seed: int = 0, strategies: list[str] | None = None,
            overwrite: bool = False, **common) -> dict:
    """Train each strategy on `data` and return {"runs": [...]} with one row per strategy."""
    from .training import train

    names = strategies or list(STRATEGIES)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise HeadstartError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}.")
    out = Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HeadstartError(f"{out} already exists; pass another --out or --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        cache = out / f".cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        log.info("compare: %s", name)
        t0 = time.perf_counter()
        settings = {**common, **STRATEGIES[name]}  # a strategy's own settings win over the shared ones
        run = train(data, **settings, seed=seed, out=os.fspath(out / name), overwrite=True, cache_dir=os.fspath(cache))
        wall = time.perf_counter() - t0
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(_row(name, run, wall))
    result = {"data": os.fspath(data), "seed": seed, "runs": rows}
    write_json(out / "compare.json", result)
    plot_compare(rows, out / "compare.png")
    return result


def _row(name: str, run, wall: float) -> dict:
    m = run.metrics
    ft = m.get("fine_tune", {})
    n_images = m["n_train"] + m["n_val"]
    trainable = ft.get("trainable_parameters") or sum(p.numel() for p in run.model.head.parameters())
    return {
        "strategy": name,
        "run": os.fspath(run.run_dir),
        "test_accuracy": m.get("test", {}).get("accuracy"),
        "balanced_accuracy": m.get("test", {}).get("balanced_accuracy"),
        "wall_seconds": round(wall, 1),
        "trainable_parameters": int(trainable),
        "extraction_images_per_second": m["extraction"]["images_per_second"],
        "training_images_per_second": ft.get("images_per_second"),
        "epochs": ft.get("epochs_run"),
        "n_train_images": n_images,
    }


def format_table(result: dict) -> str:
    head = f"{'strategy':<28} {'test acc':>8} {'bal acc':>8} {'wall s':>8} {'trainable':>11} {'img/s':>8}"
    lines = [head, "-" * len(head)]
    for r in result["runs"]:
        speed = r["training_images_per_second"] or r["extraction_images_per_second"] or 0
        acc = r["test_accuracy"]
        bal = r["balanced_accuracy"]
        lines.append(f"{r['strategy']:<28} {acc if acc is None else f'{acc:.4f}':>8} "
                     f"{bal if bal is None else f'{bal:.4f}':>8} {r['wall_seconds']:>8.0f} "
                     f"{r['trainable_parameters']:>11,} {speed:>8.0f}")
    return "\n".join(lines)


def plot_compare(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot(111)
    for r in rows:
        if r["test_accuracy"] is None:
            continue
        ax.scatter(r["wall_seconds"], r["test_accuracy"], s=60)
        ax.annotate(r["strategy"], (r["wall_seconds"], r["test_accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("wall time, seconds (including cold feature extraction)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Strategies on one split and seed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
