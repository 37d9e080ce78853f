"""Property-based tests: the image loader, the folder scanner and the labels reader on random input.

Whatever the bytes, names or tree, the only failure allowed is the documented one (ImageError
for one file, DataError for a folder or labels file), and nothing is written anywhere.
Derandomized, so CI runs the same examples every time; no deadline, since the machine is shared.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from headstart.data.folders import SPLITS, collect_images, read_labels_csv, scan_folder
from headstart.errors import DataError
from headstart.data.images import MAX_PIXELS, ImageError, is_image_name, load_image

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` without following links: kind, bytes (regular files), mode and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            content = Path(p).read_bytes() if stat.S_ISREG(s.st_mode) else (
                os.readlink(p) if stat.S_ISLNK(s.st_mode) else None)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(s.st_mode), content, s.st_mode, s.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="headstart-fuzz-") as d:
        yield Path(d)


# --------------------------------------------------------------------------- the image loader


def _encoded(fmt: str, mode: str = "RGB", size=(6, 5), **kw) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


VALID = [_encoded("PNG"), _encoded("PNG", "LA"), _encoded("PNG", "P"), _encoded("JPEG"), _encoded("JPEG", "CMYK"),
         _encoded("GIF", "P"), _encoded("BMP"), _encoded("TIFF"), _encoded("TIFF", "RGB", compression="tiff_lzw"),
         _encoded("WEBP", "RGBA", lossless=True), _encoded("PPM"), _encoded("ICO", size=(16, 16))]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"GIF87a", b"BM", b"II*\x00",
         b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"\x00\x00\x01\x00"]


def _check_load(workdir: Path, data: bytes, name: str = "x.png") -> None:
    p = workdir / name
    p.write_bytes(data)
    before = sorted(os.listdir(workdir))
    try:
        im = load_image(p)
    except ImageError as exc:
        assert str(exc)  # the reason shown to the user is never empty
    else:
        assert im.mode == "RGB" and im.width >= 1 and im.height >= 1 and im.width * im.height <= MAX_PIXELS
        np.asarray(im)  # the pixels are really there
    assert sorted(os.listdir(workdir)) == before  # the loader writes nothing


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes(workdir, data):
    _check_load(workdir, data)


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=3000))
def test_random_bytes_after_a_real_header(workdir, magic, data):
    _check_load(workdir, magic + data)


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                    max_size=8), st.floats(0.0, 1.0))
def test_valid_images_with_flipped_bytes_or_cut_short(workdir, which, flips, keep):
    data = bytearray(VALID[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    _check_load(workdir, bytes(data[: max(1, int(len(data) * keep))]) if keep < 1 else bytes(data))


# --------------------------------------------------------------------------- the folder scanner

NAMES = st.one_of(
    st.sampled_from([".DS_Store", "__MACOSX", ".ipynb_checkpoints", "._a.png", "-rf", "--help.png", "train",
                     "test", "val", "Validation", "a b.png", "ü.JPG", "猫.jpeg", "x.png", "y.png", "notes.txt",
                     "cat", "dog", "-", " ", "..png"]),
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=10)
    .filter(lambda s: s not in (".", "..")).map(lambda s: s + ".png" if len(s) % 2 else s),
    st.binary(min_size=1, max_size=8).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
    .map(os.fsdecode),
)
CONTENT = st.one_of(st.just(b""), st.binary(max_size=64), st.sampled_from(VALID))
ENTRY = st.tuples(st.lists(NAMES, min_size=1, max_size=3),
                  st.sampled_from(["file", "file", "file", "dir", "link", "fifo"]),
                  CONTENT, st.sampled_from([".", "..", "../..", "x.png", "cat", "nowhere", "/"]))


def _build(root: Path, entries) -> None:
    root.mkdir()
    for parts, kind, content, target in entries:
        p = root.joinpath(*parts)
        if os.path.lexists(p) or not os.path.realpath(p).startswith(str(root.resolve()) + os.sep):
            continue  # an existing FIFO would block a write; a path through a link could leave the tree
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                p.write_bytes(content)
            elif kind == "dir":
                p.mkdir(exist_ok=True)
            elif kind == "link":
                os.symlink(target, p)
            else:
                os.mkfifo(p)
        except (FileExistsError, NotADirectoryError, IsADirectoryError, OSError):
            continue  # an impossible tree (a file where a folder is due): leave that entry out


@pytest.mark.slow
@settings(FUZZ, max_examples=60)
@given(st.lists(ENTRY, max_size=14), st.sampled_from([(0.1, 0.1), (0.0, 0.0), (0.5, 0.3)]))
def test_random_trees(workdir, entries, fractions):
    base = Path(tempfile.mkdtemp(dir=workdir))
    root = base / "data"
    try:
        _build(root, entries)
        before, around = _snapshot(root), sorted(os.listdir(base))
        try:
            data = scan_folder(root, val_fraction=fractions[0], test_fraction=fractions[1])
        except DataError as exc:
            assert str(exc)
        else:
            assert data.classes == sorted(set(data.classes)) and len(data.samples) >= 1
            assert len({s.path for s in data.samples}) == len(data.samples)
            for s in data.samples:
                assert s.split in SPLITS and 0 <= s.label < len(data.classes)
                assert is_image_name(s.path) and not any(part.startswith(".") for part in Path(s.rel).parts)
                assert os.path.lexists(s.path) and str(root) in os.path.abspath(s.path)
                try:
                    load_image(s.path)
                except ImageError:
                    pass
            for item in data.ignored:
                assert item["path"] and item["reason"]
        try:
            collect_images([root])
        except DataError:
            pass
        assert _snapshot(root) == before and sorted(os.listdir(base)) == around  # nothing written anywhere
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- the labels reader


CSV_CELLS = st.one_of(st.sampled_from(["x.png", "sub/y.png", "./x.png", "sub/../x.png", "missing.png", "/abs/none.png",
                                       "~nobody_xyz/x.png", "n" * 300, "cat", "", " ", "train", "validation", "path",
                                       "label", '"quoted, comma"', "a\tb"]),
                      st.text(max_size=12))


@FUZZ
@given(st.one_of(
    st.lists(st.lists(CSV_CELLS, max_size=4), max_size=8).map(
        lambda rows: "\n".join(",".join(r) for r in rows).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
))
@pytest.mark.slow
def test_random_labels_files(workdir, raw):
    base = Path(tempfile.mkdtemp(dir=workdir))
    try:
        (base / "sub").mkdir()
        for name in ("x.png", "sub/y.png"):
            (base / name).write_bytes(VALID[0])
        (base / "labels.csv").write_bytes(raw)
        before = _snapshot(base)
        try:
            data, bad = read_labels_csv(base / "labels.csv")
        except DataError as exc:
            assert str(exc)
        else:
            assert {s.path for s in data.samples} <= {str(base / "x.png"), str(base / "sub" / "y.png")}
            assert all(b["reason"] for b in bad)
        assert _snapshot(base) == before
    finally:
        shutil.rmtree(base)
