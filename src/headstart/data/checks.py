"""Checks that keep a score honest: copies of one image in two splits, and evaluating on training images.

A byte-identical file in train and test is scored as if unseen, so every test number is
inflated by it (scraped folders often hold the same photo under two names). A run hashes
each file's bytes (SHA-256, each file read once) and reports the copies that cross splits.
Files that cannot be read are left to the decoder to report. The hashing runs in 2 threads
(waiting on a disk releases the GIL), each taking CHUNK files at a time: one task per file
spent more on the futures than on hashing small files (FMNIST-TL's 20,000 PNGs, in the page
cache: 1.64 s as 20,000 tasks in 4 threads, 0.48 s in chunks in 2 threads, 0.34 s in one loop).

Hashing every byte of every file on every run made a second `train` on a cached data set pay
for its whole data again (issue 15), so digests are kept in the cache root
(`<cache>/digests/<hash of the data root>.json`), each under its file's (path, size,
mtime_ns): a file whose size or modification time changed is hashed again, the same rule
the feature cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

EXAMPLES = 5  # copy groups listed in the log and the run's records; the count covers all of them
CHUNK = 256  # files per hashing task (module docstring)
THREADS = 2


def file_digest(path: str) -> str | None:
    if not os.path.isfile(path):  # a FIFO named like an image would block the open forever
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()  # in chunks: memory stays flat on a huge file
    except OSError:
        return None


def _hash_all(paths: Sequence[str], threads: int) -> list[str | None]:
    """`file_digest` of each path, in order, in `threads` threads taking CHUNK paths per task."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    if threads <= 1 or len(chunks) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [d for chunk in pool.map(lambda c: [file_digest(p) for p in c], chunks) for d in chunk]


def content_digests(paths: Sequence[str], threads: int = THREADS, cache_root: str | os.PathLike | None = None
                    ) -> list[str | None]:
    """SHA-256 of each file's bytes, in input order; None for a file that cannot be read.

    With `cache_root`, digests of files whose (path, size, mtime_ns) are unchanged since a
    previous run are read from there and the new ones written back (atomically)."""
    if cache_root is None or not paths:
        return _hash_all(paths, threads)
    store = _digest_file(Path(cache_root), paths)
    known = _read_digests(store)
    stamps = [_stamp(p) for p in paths]
    out: list[str | None] = [None] * len(paths)
    todo = []
    for i, (p, stamp) in enumerate(zip(paths, stamps)):
        hit = known.get(p)
        if stamp is not None and hit is not None and hit[:2] == stamp:
            out[i] = hit[2]
        elif stamp is not None:
            todo.append(i)
    if todo:
        for i, digest in zip(todo, _hash_all([paths[i] for i in todo], threads)):
            out[i] = digest
            if digest is not None:
                known[paths[i]] = [*stamps[i], digest]
        _write_digests(store, known)
    return out


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _digest_file(cache_root: Path, paths: Sequence[str]) -> Path:
    """One file per data root, so runs on other folders neither read nor rewrite it."""
    try:
        root = os.path.commonpath([os.path.abspath(p) for p in paths])
    except ValueError:  # paths on different drives
        root = ""
    name = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache_root / "digests" / f"{name}.json"


def _read_digests(path: Path) -> dict[str, list]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data["files"] if data.get("format") == 1 else {}
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: hash again
        return {}


def _write_digests(path: Path, known: dict[str, list]) -> None:
    from headstart.fileio import write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"format": 1, "files": known}, separators=(",", ":")))  # 200,000 files: 25 MB
    except OSError as exc:  # a read-only cache costs the next run its hashing, nothing else
        log.warning("cannot keep file digests in %s (%s); the next run hashes the files again.", path, exc)


def cross_split_copies(paths: Sequence[str], splits: Sequence[str], digests: Sequence[str | None]) -> dict:
    """Groups of byte-identical files that sit in more than one split.

    Returns {"groups", "files", "by_splits": {"train/test": groups, ...}, "examples": [[paths], ...]};
    "files" counts every file of such a group.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        if d is not None:
            groups[d].append(i)
    crossing = [idx for idx in groups.values() if len({splits[i] for i in idx}) > 1]
    by_splits: dict[str, int] = defaultdict(int)
    order = {"train": 0, "val": 1, "test": 2}
    for idx in crossing:
        names = sorted({splits[i] for i in idx}, key=lambda s: order.get(s, 3))
        by_splits["/".join(names)] += 1
    return {"groups": len(crossing), "files": sum(len(idx) for idx in crossing), "by_splits": dict(by_splits),
            "examples": [[paths[i] for i in idx] for idx in crossing[:EXAMPLES]]}


def warn_cross_split_copies(copies: dict) -> None:
    if not copies["groups"]:
        return
    kinds = ", ".join(f"{n} across {k}" for k, n in sorted(copies["by_splits"].items()))
    examples = "; ".join(" = ".join(group) for group in copies["examples"])
    log.warning("%d groups of byte-identical files (%d files) sit in more than one split (%s); copies across "
                "train and test inflate every number. Remove the duplicates or move each group into one split. "
                "For example: %s", copies["groups"], copies["files"], kinds, examples)


def read_splits(run_dir: str | os.PathLike) -> list[dict] | None:
    """The rows of a run's splits.csv (path, class, split, status), or None when there is none."""
    import csv

    path = Path(run_dir) / "splits.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def seen_in_training(paths: Sequence[str], rows: list[dict]) -> int:
    """How many of `paths` are files this run trained or validated on (compared after resolving links)."""
    seen = set(resolved_paths([r["path"] for r in rows if r["split"] in ("train", "val")]))
    return sum(p in seen for p in resolved_paths(paths))


def resolved_paths(paths: Sequence[str]) -> list[str]:
    """`os.path.realpath` of each path, resolving each folder once: a file that is not itself a link
    resolves to its folder's real path joined with its name (FMNIST-TL's 20,000 paths: 0.9 s of
    `realpath` calls, which look at every component of every path, against one `lstat` per file)."""
    folders: dict[str, str] = {}
    out = []
    for p in paths:
        head, name = os.path.split(os.path.abspath(p))
        if not name or os.path.islink(p):  # no name: the root; abspath has already removed "." and ".."
            out.append(os.path.realpath(p))
            continue
        if head not in folders:
            folders[head] = os.path.realpath(head)
        out.append(os.path.join(folders[head], name))
    return out
