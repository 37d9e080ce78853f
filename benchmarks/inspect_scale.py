"""How `headstart inspect` grows with the data once features exist: the `inspect_scale` section of `make bench`.

    python benchmarks/run.py --only inspect_scale          # n = 200,000 and n/4 (results files updated)
    python benchmarks/inspect_scale.py 200000              # the same, printed only
    python benchmarks/inspect_scale.py 2000                # what --smoke runs

Issue 30 item 5: the neighbour searches stay sub-quadratic so that 200,000 images take minutes, not hours,
in bounded memory. What is measured are the steps of `inspect` whose cost depends on the number of images
once the features are in the cache (inspection/api.py's `find_issues`), each called as `inspect` calls it:

- components: `principal_axes` and `project` (the 1,280 features on their first 256 principal components);
- labels: `label_issues` (5-fold linear heads on the components, cleanlab's `find_label_issues`);
- strays: `stray_scores` (per class, each image's 20 nearest of its class in the 1,280 features);
- near copies: `near_copies` (four neighbour searches: the components and three views of the pictures'
  spectra; mutual best pairs over PROPOSE_SIM checked on their pixels).

Each step runs in a fresh process (run.py's `max_rss`): its wall time, timed inside, and the process's peak
RSS, which includes the inputs it holds (the `data` row: the inputs alone). The step before a step is run
untimed where it needs its output (the components for labels and near copies); strays get the moved
labels' true classes as the label check's suggestions (what `inspect` passes them from that check).

What is synthetic, and why: decoding 200,000 image files and running MobileNetV2 on them would take hours
of the bench and is not what is measured (extraction and decoding have their own sections, and decoding
each image once for the image checks is linear: 23 s for FMNIST-TL's 20,120 in docs/guides/inspect.md).
So the inputs are made once per size, in a process of their own, saved and loaded by each step's process
(deterministic in n; --smoke makes them in this process):
- features: 1,280 floats (MobileNetV2's width) per image, float32 as the cache holds them, in CLASSES
  clustered classes: class centre + a shared 64-dimensional low-rank part + isotropic noise (a linear head
  on them is about as accurate as on FMNIST-TL's, so its L-BFGS fits take comparable iterations);
- pictures: 28 x 28 grey images (Fashion-MNIST's size) of smooth random fields, and their fingerprints as
  data/looks.py's `look` makes them (whole, and cropped by each of ZOOMS, resized to FINGER x FINGER);
  the pixel check reads the pictures from memory instead of re-reading files (`copies.pixels` replaced in
  the child), so the peak RSS holds them too (n x 784 bytes);
- plants: COPIES of the images have a near copy (shifted 1 px, noise of a grey level, features a little
  moved), MOVED of the labels are moved to another class, STRAYS images come from a cluster of their own;
  the share of each the step finds is reported, as a check that the approximate index (faiss IVF above
  learn/neighbours.EXACT_UP_TO images) still finds them at 200,000.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = 10
WIDTH = 1280  # MobileNetV2's features
RANK = 64
SIDE = 28
COPIES = 0.005  # share of images with a planted near copy
MOVED = 0.05  # share of labels moved to another class
STRAYS = 0.001  # share of images from a cluster of their own
CHUNK = 20_000
SMOKE_WIDTH = 320  # --smoke: more than the 256 components, so every step runs, without a 1,280-wide eigh per size
STEPS = ("data", "components", "labels", "strays", "near_copies")


def _fields(rng: np.random.Generator, m: int) -> np.ndarray:
    """`m` smooth random grey pictures (m, SIDE, SIDE) uint8: grids of 4, 7 and 14 cells bilinearly enlarged."""
    from scipy.ndimage import zoom

    out = np.full((m, SIDE, SIDE), 128.0, np.float32)
    for cells, amp in ((4, 60.0), (7, 35.0), (14, 15.0)):
        grid = rng.normal(0, amp, (m, cells, cells)).astype(np.float32)
        out += zoom(grid, (1, SIDE / cells, SIDE / cells), order=1, grid_mode=True, mode="nearest")
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _fingers(pictures: np.ndarray) -> np.ndarray:
    """Fingerprints of `pictures` (m, SIDE, SIDE) as data/looks.look makes them: (m, 1 + len(ZOOMS), FINGER,
    FINGER), the whole picture and its views cropped by ZOOMS, each resized bilinearly (here by SciPy)."""
    from scipy.ndimage import zoom

    from headstart.data.looks import FINGER, FINGER_DTYPE, ZOOMS

    views = []
    for z in (None, *ZOOMS):
        m = 0 if z is None else max(1, round((1 - z) / 2 * SIDE))
        v = pictures[:, m:SIDE - m, m:SIDE - m].astype(np.float32)
        views.append(zoom(v, (1, FINGER / v.shape[1], FINGER / v.shape[2]), order=1, grid_mode=True, mode="nearest"))
    return np.clip(np.stack(views, axis=1), 0, 255).round().astype(FINGER_DTYPE)


def synthetic(n: int, seed: int = 0, width: int = WIDTH) -> dict:
    """The inputs of the measured steps for `n` images (see the module's docstring), made in chunks."""
    rng = np.random.default_rng(seed)
    n_copies, n_strays = int(n * COPIES), max(1, int(n * STRAYS))
    mean = np.abs(rng.normal(0, 0.5, width)).astype(np.float32)  # shared by all: cosines of 0.5 between classes
    centres = rng.normal(0, 0.25, (CLASSES + 1, width)).astype(np.float32)  # the last: the strays' cluster
    centres[-1] *= 2
    low = rng.normal(0, 0.04, (RANK, width)).astype(np.float32)
    y_true = rng.integers(0, CLASSES, n)
    strays = rng.choice(n, n_strays, replace=False)
    X = np.empty((n, width), np.float32)
    pictures = np.empty((n, SIDE, SIDE), np.uint8)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        other = (y_true[a:b] + rng.integers(1, CLASSES, b - a)) % CLASSES  # each image a little like another class
        w = rng.beta(1, 4, (b - a, 1)).astype(np.float32)
        X[a:b] = mean + (1 - w) * centres[y_true[a:b]] + w * centres[other]
        X[a:b] += rng.standard_normal((b - a, RANK), np.float32) @ low
        X[a:b] += rng.standard_normal((b - a, width), np.float32) * 0.15
        pictures[a:b] = _fields(rng, b - a)
    X[strays] += centres[-1] - centres[y_true[strays]]
    # Near copies: image j is i shifted by a pixel with a grey level of noise, its features a little moved.
    pairs = rng.choice(np.setdiff1d(np.arange(n), strays), (n_copies, 2), replace=False) if n_copies else \
        np.zeros((0, 2), np.int64)
    i, j = pairs[:, 0], pairs[:, 1]
    y_true[j] = y_true[i]
    X[j] = X[i] + rng.standard_normal((len(j), width), np.float32) * 0.05
    noise = rng.integers(-1, 2, (len(j), SIDE, SIDE))
    pictures[j] = np.clip(np.roll(pictures[i], 1, axis=2).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    # Moved labels: a share of the others (not the strays, not the copies) given another class.
    free = np.setdiff1d(np.arange(n), np.concatenate([strays, pairs.ravel()]))
    moved = rng.choice(free, int(n * MOVED), replace=False)
    y = y_true.copy()
    y[moved] = (y[moved] + rng.integers(1, CLASSES, len(moved))) % CLASSES
    fingers = np.concatenate([_fingers(pictures[a:a + CHUNK]) for a in range(0, n, CHUNK)])
    splits = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.8, 0.1, 0.1])].tolist()
    return {"X": X, "y": y, "y_true": y_true, "moved": moved, "strays": strays, "pairs": pairs,
            "pictures": pictures, "fingers": fingers, "splits": splits,
            "names": [f"class{int(c)}/img{k:07d}.png" for k, c in enumerate(y)]}


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(n: int, width: int, path: Path) -> None:
    """`synthetic` inputs of `n` images saved to `path` (.npz, uncompressed), for the steps' processes to load:
    making them takes a minute at 200,000 (the pictures' resizing), loading them seconds."""
    d = synthetic(n, width=width)
    d["splits"], d["names"] = np.array(d["splits"]), np.array(d["names"])
    np.savez(path, **d)


def load(path: Path) -> dict:
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["splits"], d["names"] = d["splits"].tolist(), d["names"].tolist()
    return d


def child(n: int, step: str, width: int = WIDTH, inputs: Path | None = None) -> dict:
    """One step on `n` synthetic images in this (fresh) process, the inputs loaded from `inputs` (`save`) or
    made here: its seconds and what it found."""
    from headstart.inspection import copies
    from headstart.inspection.labels import label_issues, principal_axes, project
    from headstart.inspection.strays import stray_scores

    t0 = time.perf_counter()
    d = load(inputs) if inputs else synthetic(n, width=width)
    assert len(d["y"]) == n
    out = {"step": step, "images": n, "make_seconds": round(time.perf_counter() - t0, 1),
           "inputs_peak_rss_mib": round(_peak_mib(), 1)}
    classes = [f"class{c}" for c in range(CLASSES)]
    if step in ("labels", "near_copies"):
        Z = project(d["X"], principal_axes(d["X"]))
    t0 = time.perf_counter()
    if step == "components":
        Z = project(d["X"], principal_axes(d["X"]))
        out["dims"] = int(Z.shape[1])
    elif step == "labels":
        lab = label_issues(Z, d["y"], classes, 5, 0)
        hit = np.isin(d["moved"], lab["flagged"])
        out.update(flagged=int(len(lab["flagged"])), moved=int(len(d["moved"])), recall=round(float(hit.mean()), 3),
                   precision=round(float(hit.sum() / max(1, len(lab["flagged"]))), 3), C=lab["info"]["C"])
    elif step == "strays":
        relabel = {int(i): int(d["y_true"][i]) for i in d["moved"]}  # what the label check would suggest
        st = stray_scores(d["X"], d["y"], relabel=relabel)
        top = np.argsort(-st["distance"])[:2 * len(d["strays"])]
        out.update(listed=int(len(st["listed"])), planted=int(len(d["strays"])),
                   planted_listed=round(float(np.isin(d["strays"], st["listed"]).mean()), 3),
                   planted_in_top_2x=round(float(np.isin(d["strays"], top).mean()), 3))
    elif step == "near_copies":
        pictures = d["pictures"]
        copies.pixels = lambda path: pictures[int(path)]  # the files' pictures, from memory
        cop = copies.near_copies(Z, d["fingers"], d["splits"], d["names"], [str(k) for k in range(n)])
        found = {tuple(sorted((p, q))) for p, q, _, _ in cop["rows"]}
        planted = {tuple(sorted(map(int, pq))) for pq in d["pairs"]}
        out.update(pairs_found=len(found), planted=len(planted),
                   planted_found=round(len(found & planted) / max(1, len(planted)), 3),
                   wrong_pairs=len(found - planted), candidate_pairs=cop["info"]["candidate_pairs"],
                   pixel_checked=cop["info"]["mutual_pairs_checked"])
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def measure(n: int, max_rss, smoke: bool = False, log=print, work: Path | None = None) -> dict:
    """Each step at `n` images and at n/4 (the growth), each in a fresh process: seconds and peak RSS. The inputs
    of each size are made once, in a process of their own, and saved in `work` (a temporary folder by default).

    `smoke`: in this process instead (a fresh one imports for ~5 s, ten of them would be the section's minute);
    the peak RSS is then this process's so far, and says nothing of the step."""
    import shutil
    import tempfile

    sizes = [n // 4, n]
    width = SMOKE_WIDTH if smoke else WIDTH
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="inspect-scale-", dir=work))
    try:
        for size in sizes:
            inputs = folder / f"inputs-{size}.npz"
            if not smoke:
                t0 = time.perf_counter()
                max_rss(sys.executable, Path(__file__).resolve(), "--save", inputs, size, "--width", width)
                log(f"inspect_scale {size:,}: inputs made in {time.perf_counter() - t0:.0f} s")
            for step in STEPS:
                if smoke:
                    r = child(size, step, width)
                    r["peak_rss_mib"] = round(_peak_mib(), 1)
                else:
                    mib, stdout = max_rss(sys.executable, Path(__file__).resolve(), "--child", step, size,
                                          "--inputs", inputs)
                    r = json.loads(stdout.strip().splitlines()[-1])
                    r["peak_rss_mib"] = round(mib, 1)
                rows.append(r)
                log(f"inspect_scale {size:,} {step}: {r}")
            inputs.unlink(missing_ok=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    by = {(r["images"], r["step"]): r for r in rows}
    growth = {}
    for step in STEPS[1:]:
        small, large = by[(sizes[0], step)]["seconds"], by[(sizes[1], step)]["seconds"]
        growth[step] = round(large / small, 1) if small > 0 else None
    from headstart.learn.neighbours import EXACT_UP_TO

    return {"images": n, "quarter": sizes[0], "classes": CLASSES, "width": width, "smoke": smoke, "rows": rows,
            "time_ratio_4x_images": growth, "exact_up_to": EXACT_UP_TO, "load_average": round(os.getloadavg()[0], 1),
            "date": time.strftime("%Y-%m-%d %H:%M")}


NAMES = {"data": "inputs alone (loaded and held; smoke: made)", "components": "principal components",
         "labels": "labels (5 folds + cleanlab)", "strays": "strays (per-class neighbours)",
         "near_copies": "near copies (4 searches + pixel check)"}


def markdown(s: dict) -> list[str]:
    rows = {(r["images"], r["step"]): r for r in s["rows"]}
    q, n = s["quarter"], s["images"]
    lines = ["", f"Inspect at scale ({n:,} and {q:,} synthetic images, {s['width']} features in {s['classes']} classes, "
             f"{'all in one process (smoke)' if s['smoke'] else 'each step in a fresh process'}; exact neighbour search up to {s['exact_up_to']:,} images, faiss IVF "
             f"above; load average {s['load_average']}):", "",
             f"| step | s at {q:,} | s at {n:,} | time ratio (4x images) | peak RSS MiB at {q:,} | at {n:,} | "
             f"found at {n:,} |", "|---|---|---|---|---|---|---|"]
    for step in STEPS:
        a, b = rows[(q, step)], rows[(n, step)]
        found = {"labels": lambda r: f"recall {r['recall']:.2f}, precision {r['precision']:.2f}",
                 "strays": lambda r: f"{r['planted_listed']:.0%} of planted strays listed",
                 "near_copies": lambda r: f"{r['planted_found']:.0%} of {r['planted']} planted copies, "
                                          f"{r['wrong_pairs']} other pairs"}.get(step, lambda r: "")(b)
        ratio = s["time_ratio_4x_images"].get(step)
        lines.append(f"| {NAMES[step]} | {a.get('seconds', a['make_seconds']) if step != 'data' else a['make_seconds']}"
                     f" | {b['seconds'] if step != 'data' else b['make_seconds']} | "
                     f"{'' if ratio is None else ratio} | {a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | {found} |")
    return lines


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=int, nargs="?", default=200_000)
    p.add_argument("--smoke", action="store_true", help="in this process (peak RSS not per step)")
    p.add_argument("--width", type=int, default=WIDTH, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=STEPS, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.save:
        save(a.images, a.width, a.save)
        return 0
    if a.child:
        print(json.dumps(child(a.images, a.child, a.width, a.inputs)))
        return 0
    from benchmarks.run import max_rss

    s = measure(a.images, max_rss, smoke=a.smoke)
    print("\n".join(markdown(s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
