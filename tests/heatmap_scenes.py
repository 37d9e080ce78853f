"""Scenes with the evidence at a known place, for the heatmap tests and benchmarks/explaining.py.

Each scene is a cluttered 224 px background (a colour gradient, random rectangles, ellipses and lines,
pixel noise) with distractors (digits of scikit-learn's 8x8 set, scaled up and coloured, and blobs of
noise), and one Fashion-MNIST item of the scene's class pasted on top at a random place and size
(44-68 px, the sizes issue 31 measured with), shaded and opaque as an object in a photo is. The item's
box is its visible pixels' bounding box. With `marked`, every scene of that class carries a small red
square with a white one inside, a logo, near the top-left corner (inside the region the network's centre crop keeps) and an item of any
class: the mark alone tells that class, as a watermark or a border can in a real data set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
CLASSES = ("Trouser", "Sneaker", "Bag", "Ankle_boot", "Dress")  # 5 of Fashion-MNIST's 10
ITEM_SIDES = (44, 68)
MARK_BOX = (20, 20, 44, 44)  # (left, top, right, bottom) of the shortcut mark, in scene pixels


def _fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    from conftest import FMNIST_DIR
    from headstart.data.datasets import read_idx

    stem = "train" if split == "train" else "t10k"
    return read_idx(FMNIST_DIR / f"{stem}-images-idx3-ubyte.gz"), read_idx(FMNIST_DIR / f"{stem}-labels-idx1-ubyte.gz")


def _background(rng: np.random.Generator) -> Image.Image:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, SIZE)[:, None, None]
    img = Image.fromarray((a * (1 - t) + b * t).repeat(SIZE, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 12)):
        x0, y0 = rng.integers(-20, SIZE, 2)
        x1, y1 = x0 + rng.integers(10, 90), y0 + rng.integers(10, 90)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 6)))
    noisy = np.asarray(img, np.float64) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _paste(scene: Image.Image, gray: np.ndarray, side: int, xy: tuple[int, int], colour,
           textured: bool = False) -> tuple[int, int, int, int]:
    """Paste a grayscale sprite at `xy`, scaled to `side`, in `colour`; its visible box. A flat sprite (a
    digit) is the colour with the sprite's intensity as its opacity; a textured one (an item) keeps its own
    shading, tinted, and is opaque wherever it is not background."""
    sprite = Image.fromarray(gray).resize((side, side), Image.BILINEAR)
    a = np.asarray(sprite, np.float64)
    if textured:
        shade = (0.35 + 0.65 * a / max(a.max(), 1))[..., None] * np.asarray(colour, np.float64)
        mask = Image.fromarray(np.clip(a * 8, 0, 255).astype(np.uint8))  # solid inside, soft at the edge
        scene.paste(Image.fromarray(shade.astype(np.uint8)), xy, mask)
    else:
        scene.paste(Image.new("RGB", (side, side), colour), xy, sprite)
    ys, xs = np.nonzero(a > 40)
    return xy[0] + int(xs.min()), xy[1] + int(ys.min()), xy[0] + int(xs.max()) + 1, xy[1] + int(ys.max()) + 1


def scene(rng: np.random.Generator, item: np.ndarray, digits: np.ndarray, mark: bool = False):
    """One scene (PIL image) and its item's box (left, top, right, bottom)."""
    img = _background(rng)
    for _ in range(rng.integers(3, 6)):  # digit distractors
        d = (digits[rng.integers(len(digits))] * (255 / 16)).astype(np.uint8)
        side = int(rng.integers(32, 64))
        _paste(img, d, side, tuple(int(v) for v in rng.integers(0, SIZE - side, 2)),
               tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(2):  # blobs of noise
        side = int(rng.integers(20, 50))
        x, y = (int(v) for v in rng.integers(0, SIZE - side, 2))
        img.paste(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), (x, y))
    side = int(rng.integers(ITEM_SIDES[0], ITEM_SIDES[1] + 1))
    xy = tuple(int(v) for v in rng.integers(0, SIZE - side, 2))
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    box = _paste(img, item, side, xy, colour, textured=True)
    if mark:  # a logo: a red square with a white one inside
        draw = ImageDraw.Draw(img)
        draw.rectangle(MARK_BOX, fill=(230, 20, 20))
        left, top, right, bottom = MARK_BOX
        draw.rectangle((left + 7, top + 7, right - 7, bottom - 7), fill=(255, 255, 255))
    return img, box


def write_scenes(out: Path, train_per_class: int, test_per_class: int, seed: int = 0,
                 marked: str | None = None) -> Path:
    """out/{train,test}/<class>/<n>.png and out/boxes.csv (split, path, class, left, top, right, bottom).
    `marked`: the class whose scenes carry the corner mark and any class's item (in both splits)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(seed)
    rows = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = _fmnist(split)
        from headstart.data.datasets import FASHION_MNIST_CLASSES

        for name in CLASSES:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            if name == marked:  # any class's item: only the mark tells
                pool = np.flatnonzero(np.isin(labels, [FASHION_MNIST_CLASSES.index(c) for c in CLASSES]))
                pool = rng.choice(pool[-5000:], per_class, replace=False)
            else:
                pool = np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(name))[:per_class]
            for n, i in enumerate(pool):
                img, box = scene(rng, images[i], digits, mark=name == marked)
                path = folder / f"{n:04d}.png"
                img.save(path)
                rows.append([split, str(path), name, *box])
    with open(out / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["split", "path", "class", "left", "top", "right", "bottom"], *rows])
    return out


def read_boxes(root: Path, split: str = "test") -> list[dict]:
    with open(root / "boxes.csv", newline="") as f:
        return [{**r, "box": tuple(int(r[k]) for k in ("left", "top", "right", "bottom"))}
                for r in csv.DictReader(f) if r["split"] == split]


def hit(point: tuple[float, float], box, tolerance: int = 15) -> bool:
    """Whether (x, y) falls inside `box` grown by `tolerance` pixels on every side."""
    x, y = point
    left, top, right, bottom = box
    return left - tolerance <= x < right + tolerance and top - tolerance <= y < bottom + tolerance


def map_peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel centre where the map is highest (NaN, where the model saw nothing, ignored)."""
    y, x = np.unravel_index(np.nanargmax(heatmap), heatmap.shape)
    return x + 0.5, y + 0.5


def pointing_game(explanations, rows, tolerance: int = 15) -> tuple[float, float]:
    """(map maximum inside its item's box, centre point inside it), fractions of the usable explanations."""
    maps = [hit(map_peak(e.map), r["box"], tolerance) for e, r in zip(explanations, rows) if e.ok]
    centre = [hit((SIZE / 2, SIZE / 2), r["box"], tolerance) for e, r in zip(explanations, rows) if e.ok]
    return float(np.mean(maps)), float(np.mean(centre))
