"""Planted problems for `headstart inspect`, and how many of them it finds (docs/inspect.md).

    python benchmarks/inspect_quality.py plant CLEAN OUT [--seed 0] [--strays digits|fashion-mnist]
    python benchmarks/inspect_quality.py score OUT.truth.json INSPECT_OUT/issues.csv
    python benchmarks/inspect_quality.py digits OUT        # scikit-learn's digits as a train/test PNG folder

`plant` copies a clean train/test folder (hard links) into OUT with three kinds of planted problems,
and writes what it planted to OUT.truth.json beside it (never inside the data):
- 5% of the train/ files moved to a random other class folder (a wrong label);
- COPIES test images written into train/ again, re-encoded as JPEG, resized, shifted by a few pixels,
  cropped, or several of these (a leak);
- STRAYS images of another data set spread over the train/ classes (they resemble each other,
  not any class).
`score` compares an inspection's issues.csv with that truth: recall and precision of the label
issues, the share of planted copies found and of copy pairs that were not planted, and the share of
planted strays among the stray rows and in the top of the stray list.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COPIES = 60
STRAYS = 60
LABEL_SHARE = 0.05
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _copy_variant(im: Image.Image, how: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """`im` changed as a re-saved copy would be: (image, file extension)."""
    w, h = im.size
    ext = ".png"
    for step in how.split("+"):
        if step == "resize":
            f = float(rng.choice([0.75, 1.25, 1.5, 2.0]))
            im = im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BILINEAR)
        elif step == "shift":
            dx, dy = (int(v) for v in rng.choice([-2, -1, 1, 2], size=2))
            arr = np.asarray(im)
            im = Image.fromarray(np.roll(np.roll(arr, dy, axis=0), dx, axis=1))
        elif step == "crop":
            cw, ch = im.size
            m = max(1, round(0.06 * min(cw, ch)))
            im = im.crop((m, m, cw - m, ch - m))
        elif step == "crop4":  # a slighter crop, 4% a side
            cw, ch = im.size
            m = max(1, round(0.04 * min(cw, ch)))
            im = im.crop((m, m, cw - m, ch - m))
        elif step == "bright":  # brighter or darker by 10-15%
            f = float(rng.choice([0.85, 0.9, 1.1, 1.15]))
            im = Image.fromarray(np.clip(np.asarray(im, np.float32) * f, 0, 255).astype(np.uint8))
        elif step in ("jpeg", "jpeg60"):
            ext = ".jpg"
    return im, ext


VARIANTS = ["jpeg", "resize", "shift", "crop", "resize+jpeg", "shift+jpeg", "resize+shift", "crop+resize+jpeg"]
# a second family, for measuring on transforms the first did not show (--variants other)
OTHER_VARIANTS = ["jpeg60", "crop4", "bright", "bright+jpeg60", "crop4+resize", "shift+bright", "crop4+jpeg60",
                  "resize+bright+jpeg60"]
SAME_PICTURE_MAD = 5.0  # grey levels: two originals closer than this are one picture (see `score`)


def _stray_images(kind: str, n: int, size: tuple[int, int], rng: np.random.Generator) -> list[Image.Image]:
    if kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = rng.choice(len(d.images), size=n, replace=False)
        return [Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize(size, Image.BILINEAR) for i in idx]
    if kind == "fashion-mnist":
        from headstart.data.datasets import DEBIAN_DIR, read_idx

        images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
        idx = rng.choice(len(images), size=n, replace=False)
        return [Image.fromarray(images[i]).resize((8, 8), Image.BILINEAR).resize(size, Image.BILINEAR) for i in idx]
    raise SystemExit(f"unknown stray source {kind!r}")


def plant(clean: Path, out: Path, seed: int = 0, strays: str = "digits", copies: int = COPIES,
          n_strays: int = STRAYS, label_share: float = LABEL_SHARE, variants: list[str] = VARIANTS) -> dict:
    """OUT: CLEAN with planted wrong labels, copies of test images in train and strays (module docstring)."""
    rng = np.random.default_rng(seed)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    files = _files(clean)
    train = [f for f in files if f.startswith("train/")]
    test = [f for f in files if f.startswith("test/")]
    classes = sorted({f.split("/")[1] for f in train})
    chosen = {train[i] for i in rng.choice(len(train), size=round(label_share * len(train)), replace=False)}
    truth = {"clean": str(clean), "seed": seed, "moved": [], "copies": [], "strays": []}
    for f in files:
        _, cls, name = f.split("/", 2)
        target = out / f
        if f in chosen:
            new = str(rng.choice([c for c in classes if c != cls]))
            target = out / "train" / new / name
            truth["moved"].append({"path": target.relative_to(out).as_posix(), "given": new, "true": cls})
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(clean / f, target)
    for j, i in enumerate(rng.choice(len(test), size=copies, replace=False)):
        f = test[i]
        cls = f.split("/")[1]
        how = variants[j % len(variants)]
        with Image.open(clean / f) as im:
            im.load()
            changed, ext = _copy_variant(im, how, rng)
        dest = out / "train" / cls / f"copy_{j:03d}{ext}"
        if ext == ".jpg":
            changed.convert("RGB" if changed.mode not in ("L", "RGB") else changed.mode).save(
                dest, quality=60 if "jpeg60" in how else 75)
        else:
            changed.save(dest)
        truth["copies"].append({"test": f, "copy": dest.relative_to(out).as_posix(), "how": how})
    with Image.open(clean / train[0]) as im:
        size = im.size
    for j, im in enumerate(_stray_images(strays, n_strays, size, rng)):
        cls = classes[j % len(classes)]
        dest = out / "train" / cls / f"stray_{j:03d}.png"
        im.save(dest)
        truth["strays"].append(dest.relative_to(out).as_posix())
    Path(f"{out}.truth.json").write_text(json.dumps(truth, indent=1))
    return {"moved": len(truth["moved"]), "copies": len(truth["copies"]), "strays": len(truth["strays"]),
            "images": len(files) + copies + n_strays, "truth": f"{out}.truth.json"}


def score(truth_path: Path, issues_path: Path) -> dict:
    truth = json.loads(Path(truth_path).read_text())
    with open(issues_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    moved = {m["path"] for m in truth["moved"]}
    flagged = [r for r in rows if r["kind"] == "label"]
    flagged_paths = {r["path"] for r in flagged}
    hit = flagged_paths & moved
    train_flagged = {r["path"] for r in flagged if r["split"] in ("train", "val")}
    suggested_right = sum(1 for r in flagged if r["path"] in moved and
                          r["suggested_label"] == next(m["true"] for m in truth["moved"] if m["path"] == r["path"]))
    planted = {frozenset((c["test"], c["copy"])) for c in truth["copies"]}
    pair_rows = [r for r in rows if r["kind"] in ("leak", "near-duplicate")]
    pairs = {frozenset((r["path"], r["partner"])) for r in pair_rows}
    found = planted & pairs
    # A reported pair that was not planted is wrong unless the data set already held the picture twice:
    # Fashion-MNIST has product photos in it more than once. Checked on the pixels, not by eye: the two
    # files (a planted copy stands for the test image it copies) have one size and differ by at most
    # SAME_PICTURE_MAD grey levels on average, less than re-saving as JPEG at quality 75 changes a
    # Fashion-MNIST image (median 3.8, 95th percentile 5.2 over 500 of them).
    data = Path(str(truth_path)[:-len(".truth.json")])
    source = {c["copy"]: c["test"] for c in truth["copies"]}
    unplanted = pairs - planted
    already = {p for p in unplanted if _same_picture(data, *(source.get(f, f) for f in sorted(p)))}
    leaks = {frozenset((r["path"], r["partner"])) for r in pair_rows if r["kind"] == "leak"}
    stray_rows = sorted((r for r in rows if r["kind"] == "stray"), key=lambda r: -float(r["score"]))
    strays = set(truth["strays"])
    top = [r["path"] for r in stray_rows[:2 * len(strays)]]
    return {
        "labels": {"moved": len(moved), "flagged": len(flagged_paths), "flagged_train_val": len(train_flagged),
                   "recall": _ratio(len(hit), len(moved)), "precision": _ratio(len(hit), len(flagged_paths)),
                   "precision_train_val": _ratio(len(hit), len(train_flagged)),
                   "suggested_the_true_class": _ratio(suggested_right, len(hit))},
        "copies": {"planted": len(planted), "found": len(found), "share_found": _ratio(len(found), len(planted)),
                   "found_as_leak": len(planted & leaks), "pair_rows": len(pairs),
                   "pairs_not_planted": len(unplanted), "duplicates_already_in_the_data": len(already),
                   "wrong_pairs": len(unplanted - already), "share_wrong": _ratio(len(unplanted - already), len(pairs)),
                   "share_not_planted": _ratio(len(unplanted), len(pairs))},
        "strays": {"planted": len(strays), "stray_rows": len(stray_rows),
                   "flagged": len(strays & {r["path"] for r in stray_rows}),
                   "share_flagged": _ratio(len(strays & {r["path"] for r in stray_rows}), len(strays)),
                   f"in_top_{2 * len(strays)}": len(strays & set(top)),
                   "share_in_top": _ratio(len(strays & set(top)), len(strays))},
    }


def _same_picture(data: Path, a: str, b: str) -> bool:
    """Files `a` and `b` under `data` are one picture: the same size and a mean absolute difference of at most
    SAME_PICTURE_MAD grey levels."""
    if a == b:
        return True
    try:
        with Image.open(data / a) as x, Image.open(data / b) as y:
            pa, pb = np.asarray(x.convert("L"), np.float32), np.asarray(y.convert("L"), np.float32)
    except OSError:
        return False
    return pa.shape == pb.shape and float(np.abs(pa - pb).mean()) <= SAME_PICTURE_MAD


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def digits(out: Path, size: int = 32, test_share: float = 0.3, seed: int = 0) -> dict:
    """scikit-learn's 1,797 digits (8x8, 17 grey levels) as OUT/{train,test}/<digit>/<n>.png at `size` pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    is_test = rng.random(len(d.target)) < test_share
    for i, (img, t) in enumerate(zip(d.images, d.target)):
        split = "test" if is_test[i] else "train"
        dest = out / split / f"digit_{t}" / f"{i:04d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR).save(dest)
    return {"train": int((~is_test).sum()), "test": int(is_test.sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plant")
    a.add_argument("clean", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--strays", default="digits", choices=["digits", "fashion-mnist"])
    a.add_argument("--copies", type=int, default=COPIES)
    a.add_argument("--n-strays", type=int, default=STRAYS)
    a.add_argument("--variants", default="default", choices=["default", "other"],
                   help="the copies' transforms: VARIANTS, or OTHER_VARIANTS (JPEG 60, 4%% crop, brightness)")
    s = sub.add_parser("score")
    s.add_argument("truth", type=Path)
    s.add_argument("issues", type=Path)
    d = sub.add_parser("digits")
    d.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "plant":
        result = plant(args.clean, args.out, args.seed, args.strays, args.copies, args.n_strays,
                       variants=OTHER_VARIANTS if args.variants == "other" else VARIANTS)
    elif args.cmd == "score":
        result = score(args.truth, args.issues)
    else:
        result = digits(args.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
