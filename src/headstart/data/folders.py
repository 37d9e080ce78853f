"""Image folders and labels files: finding the images, their classes and their splits.

Accepted layouts:
  DATA/train|val|test/<class>/...   splits given (val and test carved from train if missing)
  DATA/<class>/...                  splits assigned by a hash of each file's relative path
  --labels FILE.csv                 rows of `path,label[,split]`, paths relative to the CSV

Classes are the sorted class names. A missing split is assigned by hashing the file's path
relative to its split folder, so a file keeps its split when others are added or removed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from headstart.distributed import SAME_ON_EVERY_RANK
from headstart.errors import DataError
from headstart.data.images import is_image_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_IGNORED_DIRS = {"__MACOSX", "__pycache__", "@eaDir"}


@dataclass(frozen=True)
class Sample:
    path: str  # absolute path
    rel: str  # path relative to its split folder (or the data root), '/'-separated: the split hash input
    label: int  # index into classes
    split: str  # "train", "val" or "test"


@dataclass
class ImageData:
    root: str
    classes: list[str]
    samples: list[Sample]
    layout: str
    ignored: list[dict] = field(default_factory=list)  # {"path", "reason"}: files that are not images

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def summary(self) -> dict:
        counts = {sp: len(self.split(sp)) for sp in SPLITS}
        per_class = {c: {sp: 0 for sp in SPLITS} for c in self.classes}
        for s in self.samples:
            per_class[self.classes[s.label]][s.split] += 1
        return {"root": self.root, "layout": self.layout, "classes": self.classes, "n_images": len(self.samples),
                "splits": counts, "per_class": per_class, "n_ignored": len(self.ignored)}


def split_of(rel: str, val_fraction: float, test_fraction: float) -> str:
    """A stable split from the path alone: the first 64 bits of its SHA-256 as a number in [0, 1)."""
    # surrogateescape: a file name that is not valid UTF-8 hashes as its own bytes.
    u = int.from_bytes(hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _walk_images(folder: Path, ignored: list[dict]) -> list[str]:
    """Image files under `folder` (paths that start with it), recursively and sorted; hidden entries skipped.

    Links to files are followed; links to folders are listed in `ignored` and not followed,
    since one pointing back up the tree would be a loop. A folder that cannot be listed is
    listed in `ignored` too. Paths are strings: Path objects for 20,000 files took 0.5 s of a 0.73 s scan.
    """
    found: list[str] = []

    def unlistable(exc: OSError) -> None:
        ignored.append({"path": os.fspath(exc.filename), "reason": f"cannot list folder ({exc.strerror or exc})"})

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unlistable):
        keep = []
        for d in sorted(dirnames):
            if _is_hidden(d):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                ignored.append({"path": os.path.join(dirpath, d), "reason": "link to a folder inside a class, "
                                "not followed (it could loop); link the class folder itself or copy the files"})
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            p = os.path.join(dirpath, name)
            if is_image_name(name):
                found.append(p)
            else:
                ignored.append({"path": p, "reason": "not an image file extension"})
    return found


def _class_dirs(folder: Path, ignored: list[dict]) -> list[Path]:
    """Class folders (links to folders are followed, unless they lead back to `folder` or above it)."""
    dirs = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            target = entry.resolve()
            if entry.is_symlink() and (target == folder.resolve() or target in folder.resolve().parents):
                ignored.append({"path": str(entry), "reason": f"link to {target}, which holds the data folder "
                                "(a loop); not followed"})
            else:
                dirs.append(entry)
        else:
            ignored.append({"path": str(entry), "reason": "file at the class level (not inside a class folder)"})
    return dirs


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist. Pass a folder of class subfolders "
                        "(DATA/<class>/image.jpg) or of train/val/test splits.")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder. Pass the folder that holds the class subfolders, "
                        "or a labels CSV with --labels.")


def check_input(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> None:
    """The DataError load_data would give for a missing or wrong path, without scanning anything."""
    if labels is not None:
        csv_path = Path(labels).expanduser().absolute()
        if not csv_path.is_file():
            raise DataError(f"labels file {csv_path} does not exist or is not a file.")
    else:
        _check_root(Path(path).expanduser().absolute())


def scan_folder(root: str | os.PathLike, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                classes: list[str] | None = None) -> ImageData:
    """Find every image under `root` with its class and split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError("--val-fraction and --test-fraction must each be in [0, 1) and sum to less than 1.")
    root = Path(root).expanduser().absolute()
    _check_root(root)
    ignored: list[dict] = []
    top = [p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)]
    split_dirs = {_SPLIT_ALIASES[p.name.lower()]: p for p in top if p.name.lower() in _SPLIT_ALIASES}

    files: list[tuple[str, str, str, str | None]] = []  # (path, rel, class, given split)
    empty: list[str] = []  # class folders without a single image file
    bases = sorted(split_dirs.items()) if split_dirs else [(None, root)]
    layout = "splits" if split_dirs else "classes"
    for sp, d in bases:
        for cdir in _class_dirs(d, ignored):
            found = _walk_images(cdir, ignored)
            start = len(os.path.join(d, ""))  # every path found starts with the class folder inside d
            files.extend((p, p[start:].replace(os.sep, "/"), cdir.name, sp) for p in found)
            if not found:
                empty.append(cdir.relative_to(root).as_posix())
    if split_dirs:
        extra = [p.name for p in top if p.name.lower() not in _SPLIT_ALIASES]
        if extra:
            log.warning("%s: folders %s are not train/val/test and are ignored (split layout).", root, extra)
    if empty and files:
        log.warning("%s: class folders %s hold no image files and are left out.", root, empty)

    if not files:
        raise DataError(f"no images found under {root}. Expected DATA/<class>/<image> or "
                        f"DATA/train/<class>/<image>; image extensions: .jpg .jpeg .png .bmp .gif .tif .webp.")
    has_val, has_test = "val" in split_dirs, "test" in split_dirs
    # Carve missing splits out of train (or out of everything in the class layout).
    v = 0.0 if has_val else val_fraction
    t = 0.0 if has_test else test_fraction
    rows = []
    for p, rel, cname, given in files:
        sp = given if given in ("val", "test") else split_of(rel, v, t)
        rows.append((p, rel, cname, sp))
    return _make_data(root, rows, layout, ignored, classes)


def _make_data(root: Path, rows, layout: str, ignored: list[dict], classes: list[str] | None) -> ImageData:
    train_classes = sorted({c for _, _, c, sp in rows if sp == "train"})
    all_classes = sorted({c for _, _, c, _ in rows})
    if classes is None:
        classes = all_classes
        missing_train = [c for c in all_classes if c not in train_classes]
        if missing_train:
            log.warning("classes %s have no training images; they are kept so evaluation can report them, "
                        "but the model cannot learn them.", missing_train)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for _, _, c, _ in rows if c not in index})
    if unknown:
        raise DataError(f"classes {unknown} in {root} are not among the model's classes {classes}.")
    samples = [Sample(os.fspath(p), rel, index[c], sp) for p, rel, c, sp in rows]
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.rel))
    return ImageData(os.fspath(root), list(classes), samples, layout, ignored)


def read_labels_csv(csv_path: str | os.PathLike, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    classes: list[str] | None = None) -> tuple[ImageData, list[dict]]:
    """Rows of `path,label[,split]`; a header row is recognised by its first cell being 'path'.

    Returns the data and the rows that could not be used (missing file, empty label), each with a reason.
    """
    check_input(csv_path, labels=csv_path)
    csv_path = Path(csv_path).expanduser().absolute()
    base = csv_path.parent
    rows, bad = [], []
    first_line: dict[Path, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"labels file {csv_path} cannot be read as CSV ({exc}). Save it as UTF-8 text with rows of "
                        "path,label[,split].") from None
    for lineno, row in enumerate(lines, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if lineno == 1 and row[0].strip().lower() == "path":
            continue
        p = _expanduser(Path(row[0].strip()))
        p = Path(os.path.normpath(p if p.is_absolute() else base / p))  # "./a.png" and "sub/../a.png" are a.png
        if len(row) < 2 or not row[1].strip():
            bad.append({"path": str(p) if row[0].strip() else "",
                        "reason": f"{csv_path.name} line {lineno}: empty label"})
            continue
        if not _is_file(p):
            bad.append({"path": str(p), "reason": f"{csv_path.name} line {lineno}: file not found"})
            continue
        if p in first_line:
            bad.append({"path": str(p), "reason": f"{csv_path.name} line {lineno}: listed again (first on line "
                                                  f"{first_line[p]}); only the first row is used"})
            continue
        first_line[p] = lineno
        rel = os.path.relpath(p, base).replace(os.sep, "/")
        given = _SPLIT_ALIASES.get(row[2].strip().lower()) if len(row) > 2 and row[2].strip() else None
        sp = given or split_of(rel, val_fraction, test_fraction)
        rows.append((p, rel, row[1].strip(), sp))
    if not rows:
        raise DataError(f"labels file {csv_path} lists no usable image ({len(bad)} rows unusable). "
                        "Expected rows of path,label with paths relative to the CSV.")
    for b in bad:
        log.warning("skipping %s: %s", b["path"], b["reason"], extra=SAME_ON_EVERY_RANK)
    return _make_data(csv_path, rows, "csv", [], classes), bad


def _expanduser(p: Path) -> Path:
    try:
        return p.expanduser()
    except RuntimeError:  # ~someone with no such user: left as written, and reported as not found
        return p


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, an embedded NUL
        return False


def load_data(path: str | os.PathLike, *, labels: str | os.PathLike | None = None, val_fraction: float = 0.1,
              test_fraction: float = 0.1, classes: list[str] | None = None) -> tuple[ImageData, list[dict]]:
    """One entry point for folders and labels files: the data and the unusable rows."""
    if labels is not None:
        return read_labels_csv(labels, val_fraction=val_fraction, test_fraction=test_fraction, classes=classes)
    return scan_folder(path, val_fraction=val_fraction, test_fraction=test_fraction, classes=classes), []


def collect_images(inputs: list[str | os.PathLike], ignored: list[dict] | None = None) -> list[str]:
    """Files and folders (searched recursively) to a sorted list of image paths, for predict; what a folder
    holds that is not taken (non-image files, links to folders) goes into `ignored` as {path, reason}."""
    out: list[str] = []
    ignored = [] if ignored is None else ignored
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(os.fspath(Path(q).absolute()) for q in _walk_images(p, ignored))
        elif p.is_file():
            out.append(os.fspath(p.absolute()))
        else:
            raise DataError(f"{p} does not exist: pass image files or folders of images.")
    return out
