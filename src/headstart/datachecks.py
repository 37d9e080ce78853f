"""Checks that keep a score honest: copies of one image in two splits, and evaluating on training images.

A byte-identical file in train and test is scored as if unseen, so every test number is
inflated by it (scraped folders often hold the same photo under two names). A run hashes
each file's bytes (SHA-256, each file read once, in a few threads: the work is waiting on
the disk, which releases the GIL) and reports the copies that cross splits. Files that
cannot be read are left to the decoder to report.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

EXAMPLES = 5  # copy groups listed in the log and the run's records; the count covers all of them


def file_digest(path: str) -> str | None:
    if not os.path.isfile(path):  # a FIFO named like an image would block the open forever
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()  # in chunks: memory stays flat on a huge file
    except OSError:
        return None


def content_digests(paths: Sequence[str], threads: int = 4) -> list[str | None]:
    """SHA-256 of each file's bytes, in input order; None for a file that cannot be read."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(file_digest, paths, chunksize=64))


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
    seen = {os.path.realpath(r["path"]) for r in rows if r["split"] in ("train", "val")}
    return sum(os.path.realpath(p) in seen for p in paths)
