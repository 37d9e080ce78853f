"""Built-in data sets, written out as image folders that the rest of headstart reads.

Only Fashion-MNIST for now. It is read from gzipped IDX files in a written order of
sources (an explicit folder, Debian's `dataset-fashion-mnist`, our download cache, a
download) and written as `OUT/{train,test}/<class>/<index:05d>.png`, where index is the
image's position in its IDX file. A data set is built in `OUT.partial-<pid>` and renamed
onto OUT only when complete, so OUT is either absent or whole.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from headstart.errors import DataError
from headstart.progress import bar as progress_bar
from headstart.fileio import default_cache_dir, write_json

MARKER = ".headstart-dataset.json"
MARKER_FORMAT = 1

FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in .gz) into an array of its dims."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({e})") from e

    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX file has {len(data)} bytes, but its header {dims} says {expected}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def prepare_fashion_mnist(
    out_dir: str | os.PathLike,
    per_class: int | None = None,
    source: str | os.PathLike | None = None,
    progress: bool = True,
    test_per_class: int | None = None,
) -> dict:
    """Write Fashion-MNIST under out_dir; per_class keeps the first N training images
    of each class (test_per_class the same for the test set, which is whole by default).
    Returns a summary: out_dir, n_train, n_test, classes, source."""
    for name, value in (("per_class", per_class), ("test_per_class", test_per_class)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise DataError(f"{name} must be a positive whole number, got {value!r}")
    out_dir = Path(out_dir)
    settings = {"name": "fashion-mnist", "per_class": None if per_class is None else int(per_class)}
    if test_per_class is not None:
        settings["test_per_class"] = int(test_per_class)
    done = _existing(out_dir, settings)
    if done is not None:
        return done

    src = _find_fashion_mnist(source)
    classes = FASHION_MNIST_CLASSES
    splits = {}
    for split, (images_name, labels_name) in _SPLIT_FILES.items():
        images, labels = _load_split(src, images_name, labels_name)
        keep = np.arange(len(labels))
        n = per_class if split == "train" else test_per_class
        if n is not None:
            # The first N of each class in file order, so N=1000 always picks the same images.
            firsts = [np.flatnonzero(labels == c)[:n] for c in range(len(classes))]
            keep = np.sort(np.concatenate(firsts))
        splits[split] = (images, labels, keep)

    counts = {
        split: dict(zip(classes, np.bincount(labels[keep], minlength=len(classes)).tolist()))
        for split, (_, labels, keep) in splits.items()
    }
    summary = {
        "out_dir": str(out_dir),
        "n_train": len(splits["train"][2]),
        "n_test": len(splits["test"][2]),
        "classes": list(classes),
        "source": str(src),
    }
    marker = {"format": MARKER_FORMAT, **settings, "counts": counts, **summary}
    del marker["out_dir"]  # the folder may be moved; the marker must still hold

    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    if partial.exists():  # left by an earlier run of a process with our pid
        shutil.rmtree(partial)
    try:
        _write_images(partial, splits, progress)
        write_json(partial / MARKER, marker)  # last: a folder without it is not a data set
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        _publish(partial, out_dir)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        # Another process may have published the same data set first; that is success.
        done = _existing(out_dir, settings)
        if done is None:
            raise
        return done
    return summary


DATASETS: dict[str, Callable[..., dict]] = {"fashion-mnist": prepare_fashion_mnist}


def prepare(name: str, out_dir: str | os.PathLike, **kw) -> dict:
    """Write the built-in data set `name` under out_dir; see DATASETS for the names."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](out_dir, **kw)


def _existing(out_dir: Path, settings: dict) -> dict | None:
    """The summary if out_dir already holds this data set; None if out_dir is absent or
    empty; DataError if it holds anything else (we never write into a user's folder)."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another folder or delete it")
    if not any(out_dir.iterdir()):
        return None
    marker = _read_marker(out_dir / MARKER)
    if marker is None or any(marker.get(k) != v for k, v in settings.items()):
        held = "files that are not a headstart data set"
        if marker is not None:
            held = f"{marker.get('name')} with per_class={marker.get('per_class')}"
        raise DataError(
            f"{out_dir} already holds {held}, not {settings['name']} with "
            f"per_class={settings['per_class']}; choose another folder or delete it"
        )
    for split, by_class in marker["counts"].items():
        for name, n in by_class.items():
            folder = out_dir / split / name
            found = sum(1 for p in folder.glob("*.png")) if folder.is_dir() else 0
            if found != n:
                raise DataError(
                    f"{folder} has {found} images, but {out_dir / MARKER} records {n}; "
                    "the data set was changed: delete the folder and prepare it again"
                )
    return {
        "out_dir": str(out_dir),
        **{k: marker[k] for k in ("n_train", "n_test", "classes", "source")},
    }


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _find_fashion_mnist(source: str | os.PathLike | None) -> Path:
    """The folder holding the four IDX files: source if given, else the first of Debian's
    package, our cache, and a fresh download into the cache."""
    if source is not None:
        source = Path(source)
        missing = _missing_files(source)
        if missing:
            raise DataError(
                f"{source} lacks the Fashion-MNIST IDX files {', '.join(missing)} (.gz or not)"
            )
        return source

    cache = _cache_dir() / "FashionMNIST" / "raw"  # where torchvision puts its download
    for candidate in (DEBIAN_DIR, cache):
        if not _missing_files(candidate):
            return candidate
    try:
        _download(cache.parent.parent)
    except Exception as e:
        raise DataError(
            f"Fashion-MNIST was not found in {DEBIAN_DIR} or {cache}, and downloading it "
            f"failed ({e}). Install Debian's package with `apt-get install dataset-fashion-mnist` "
            "(as root) or connect to the internet."
        ) from e
    return cache


def _missing_files(folder: Path) -> list[str]:
    stems = [name for pair in _SPLIT_FILES.values() for name in pair]
    return [s for s in stems if _idx_path(folder, s) is None]


def _idx_path(folder: Path, stem: str) -> Path | None:
    # Prefer the plain file: torchvision's download leaves both, and it reads faster.
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _cache_dir() -> Path:

    return default_cache_dir() / "downloads"


def _download(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    # urllib has no timeout, so an unreachable network would hang; probe the mirror first.
    url = urllib.parse.urlsplit(FashionMNIST.mirrors[0])
    socket.create_connection((url.hostname, url.port or 80), timeout=10).close()
    # torchvision reports on stdout, which belongs to the caller (e.g. JSON output).
    with contextlib.redirect_stdout(sys.stderr):
        FashionMNIST(root, train=False, download=True)


def _load_split(src: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _idx_path(src, images_name), _idx_path(src, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of 28x28, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: labels must be 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


def _write_images(root: Path, splits: dict, progress: bool) -> None:
    folders = {
        split: [os.path.join(root, split, name) for name in FASHION_MNIST_CLASSES]
        for split in splits
    }
    for split_folders in folders.values():
        for folder in split_folders:
            os.makedirs(folder)
    total = sum(len(keep) for _, _, keep in splits.values())
    with progress_bar(total, "fashion-mnist", disable=not progress) as bar:
        for split, (images, labels, keep) in splits.items():
            for i in keep:
                path = os.path.join(folders[split][labels[i]], f"{i:05d}.png")
                Image.fromarray(images[i], mode="L").save(path, format="PNG", compress_level=1)
                bar.update()


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished folder onto out_dir (which is absent or an empty folder)."""
    if out_dir.is_dir():
        out_dir.rmdir()  # fails, rightly, if something appeared in it meanwhile
    os.replace(partial, out_dir)
