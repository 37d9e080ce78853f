"""The image-size rule against every fixed size, on small-image data sets (docs/guides/data.md, "Choosing the image size").

    python benchmarks/image_size.py                       # both sets, 5 seeds: fixed sizes, then the rule's runs
    python benchmarks/image_size.py --part fixed          # only the fixed sizes (needs no headstart change)
    python benchmarks/image_size.py --part auto --sets digits   # `--strategy auto` (the default) on digits

Data sets, written as PNGs under --work (never into a data folder), each with a stratified
70/10/20 train/validation/test split per seed (labels CSV):
- digits: scikit-learn's 8x8 digits (1,797 images);
- fmnist14: the first 200 test images per class of Fashion-MNIST, shrunk to 14x14 (2,000 images).

Part `fixed`: per seed, the linear head that `train(..., strategy="feature-extraction", image_size=S)`
fits (C chosen on validation, refit on train + validation), scored on the test split, for each S in
SIZES. Features are extracted once per size into a cache shared by the seeds (the images are the same,
only the splits differ), in the namespace `train` uses, so the `rule` part reuses them.
Part `rule`: per seed, `train(..., strategy="feature-extraction")` with the default `image_size="auto"`:
the size the rule picks, its reason and test accuracy.
Part `auto`: per seed, `train(...)` with every default (`--strategy auto`): the strategy and size it
picks, test accuracy and wall time.
Results: <work>/image_size.json (updated after every run, so a stopped run keeps its numbers) and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = (32, 64, 96, 128, 160, 224)
SEEDS = (0, 1, 2, 3, 4)


def _split_csv(root: Path, paths: list[str], labels: list[str], seed: int) -> Path:
    """A labels CSV next to the images with a stratified 70/10/20 split drawn with `seed`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(paths))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=0.125, stratify=[labels[i] for i in rest], random_state=seed)
    split = {**{int(i): "train" for i in train}, **{int(i): "val" for i in val}, **{int(i): "test" for i in test}}
    out = root / f"split-{seed}.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, (p, lab) in enumerate(zip(paths, labels)):
            w.writerow([p, lab, split[i]])
    return out


def _write_images(root: Path, images: np.ndarray, labels: np.ndarray, names) -> tuple[list[str], list[str]]:
    paths, labs = [], []
    for i, (img, lab) in enumerate(zip(images, labels)):
        rel = f"images/{names[lab]}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (root / rel).exists():
            Image.fromarray(img, mode="L").save(root / rel)
        paths.append(rel)
        labs.append(names[lab])
    return paths, labs


def digits(root: Path) -> tuple[list[str], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255 / 16), 0, 255).round().astype(np.uint8)  # 0..16 -> 0..255
    return _write_images(root, images, d.target, [str(c) for c in range(10)])


def fmnist14(root: Path, per_class: int = 200) -> tuple[list[str], list[str]]:
    from headstart.data.datasets import FASHION_MNIST_CLASSES, read_idx

    src = Path("/usr/share/datasets/fashion-mnist")
    images = read_idx(src / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    small = np.stack([np.asarray(Image.fromarray(images[i]).resize((14, 14), Image.BILINEAR)) for i in keep])
    return _write_images(root, small, labels[keep], list(FASHION_MNIST_CLASSES))


MAKERS = {"digits": digits, "fmnist14": fmnist14}


def fixed_accuracies(root: Path, csvs: dict[int, Path], cache: Path, log, sizes=SIZES, out=None, save=None) -> dict:
    """{seed: {size: test accuracy}} of the feature-extraction run's linear head, features once per size;
    added to `out` (and `save` called) after each, so a stopped run keeps its numbers."""
    from headstart.nets.registry import get_backbone
    from headstart.data.folders import load_data
    from headstart.engines.rule import choose_engine, make_engine
    from headstart.engines.features import FeatureCache, extract, make_namespace
    from headstart.learn.heads import make_head
    from headstart.nets.weights import load_backbone

    entry = get_backbone("mobilenet_v2")
    model, winfo = load_backbone(entry, None)
    choice = choose_engine()
    engine = make_engine(model, choice, cache)
    out = {} if out is None else out
    for size in sizes:
        prep = entry.preprocessing.scaled(size)
        fc = FeatureCache(cache, make_namespace(entry.name, winfo.identity(), prep, choice))
        for seed, labels in csvs.items():
            d = load_data(root, labels=labels)[0]
            y = np.array([x.label for x in d.samples])
            sp = np.array([x.split for x in d.samples])
            t0 = time.perf_counter()
            ext = extract(engine, prep.transform(), [x.path for x in d.samples], fc, desc=f"{size} px")
            X = fc.get(ext.keys)
            tr, va, te = sp == "train", sp == "val", sp == "test"
            head = make_head("linear", seed=seed).fit(X[tr], y[tr], X[va], y[va])  # refit on train + val
            acc = out.setdefault(str(seed), {})[str(size)] = float(np.mean(head.predict(X[te]) == y[te]))
            log(f"{root.name} seed {seed} {size} px: {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
            if save:
                save()
    return out


def run_default(root: Path, labels: Path, seed: int, cache: Path, out: Path, **settings) -> dict:
    import headstart

    t0 = time.perf_counter()
    r = headstart.train(str(root), labels=str(labels), seed=seed, cache_dir=str(cache), out=str(out),
                        overwrite=True, **settings)
    return {"seed": seed, "strategy": r.config["resolved_strategy"], "size": r.config["image_size"],
            "reason": r.config["image_size_reason"], "accuracy": r.metrics["test"]["accuracy"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/headstart-image-size"))
    p.add_argument("--sets", nargs="*", default=list(MAKERS))
    p.add_argument("--part", nargs="*", default=["fixed", "rule"], choices=["fixed", "rule", "auto"])
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    p.add_argument("--sizes", nargs="*", type=int, default=list(SIZES), help="part fixed: these sizes, in this order")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    store = a.work / "image_size.json"
    result = json.loads(store.read_text()) if store.exists() else {}

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    def save() -> None:
        store.write_text(json.dumps(result, indent=1))

    for name in a.sets:
        root = a.work / name
        paths, labels = MAKERS[name](root)
        csvs = {s: _split_csv(root, paths, labels, s) for s in a.seeds}
        cache = a.work / f"cache-{name}"
        entry = result.setdefault(name, {})
        for part in a.part:
            entry[part] = {**entry.get(part, {}), "date": time.strftime("%Y-%m-%d %H:%M"),
                           "load_before": os.getloadavg()}
            if part == "fixed":
                fixed_accuracies(root, csvs, cache, log, a.sizes, entry[part].setdefault("by_seed", {}), save)
            else:
                settings = {"strategy": "feature-extraction"} if part == "rule" else {}
                runs = []
                for s in a.seeds:
                    runs.append(run_default(root, csvs[s], s, cache, a.work / "runs" / f"{name}-{part}-{s}",
                                            **settings))
                    log(f"{name} {part} seed {s}: {runs[-1]}")
                    entry[part]["runs"] = runs
                    save()
            entry[part]["load_after"] = os.getloadavg()
            save()
    print("\n".join(markdown(result)))
    return 0


def markdown(result: dict) -> list[str]:
    """Mean test accuracy over seeds per fixed size, the rule's size and accuracy, and its loss to the best."""
    lines = ["| data | seeds | " + " | ".join(f"{s} px" for s in SIZES) + " | default | default's size | "
             "loss to best |", "|---|---|" + "---|" * len(SIZES) + "---|---|---|"]
    for name, entry in result.items():
        fixed = entry.get("fixed", {}).get("by_seed")
        if not fixed:
            continue
        sizes = [s for s in SIZES if all(str(s) in v for v in fixed.values())]  # measured on every seed
        mean = {s: statistics.mean(v[str(s)] for v in fixed.values()) for s in sizes}
        runs = entry.get("rule", {}).get("runs", [])
        default = statistics.mean(r["accuracy"] for r in runs) if runs else float("nan")
        chosen = ", ".join(sorted({str(r["size"]) for r in runs}))
        lines.append(f"| {name} | {len(fixed)} | " + " | ".join(f"{mean[s]:.4f}" if s in mean else "" for s in SIZES) +
                     f" | {default:.4f} | {chosen} px | {100 * (max(mean.values()) - default):+.2f} points |")
    for name, entry in result.items():
        runs = entry.get("auto", {}).get("runs", [])
        if runs:
            lines.append(f"\n{name}, every default (`--strategy auto`): " + "; ".join(
                f"seed {r['seed']}: {r['strategy']} at {r['size']} px, {r['accuracy']:.4f} in {r['wall_seconds']:.0f} s"
                for r in runs) + f"; mean {statistics.mean(r['accuracy'] for r in runs):.4f}")
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
