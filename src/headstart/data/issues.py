"""issues.csv, the list `headstart inspect` writes and `train --exclude` reads: one finding per row.

Columns (COLUMNS): `path` (relative to the data folder, '/'-separated), `split`, `kind`, `score` (how sure
the finding is, higher is surer, in [0, 1]), `given_label`, `suggested_label` (a label issue's likelier
class), `partner` (the other file of a pair: the train image a leak copies, the file a near duplicate
repeats). Kinds: `label`, `leak` (a validation or test image with a near copy in train), `near-duplicate`,
`stray` (belongs to no class), `unreadable` (the decoder refuses it) and the image checks (data/looks.py).

`train --exclude` leaves out each row's `path`: for a pair that keeps the other file, so one copy of a
near duplicate stays and a leak's test image leaves the test split.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from headstart.errors import DataError

COLUMNS = ("path", "split", "kind", "score", "given_label", "suggested_label", "partner")
PAIR_KINDS = ("leak", "near-duplicate")
KINDS = ("label", *PAIR_KINDS, "stray", "unreadable", "dark", "light", "low-information", "blurry",
         "odd-aspect-ratio", "odd-size")


def read_issues(path: str | os.PathLike) -> list[dict]:
    """The rows of an issues.csv, checked for its columns; a DataError naming the file otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--exclude {path}: no such file. Pass the issues.csv `headstart inspect DATA --out DIR` "
                        "wrote (DIR/issues.csv).")
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("path", "kind") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"--exclude {path}: no {' or '.join(missing)} column; it is not an issues.csv of "
                                f"`headstart inspect` (columns {', '.join(COLUMNS)}).")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--exclude {path} cannot be read as CSV ({exc}).") from None


def parse_kinds(kinds) -> list[str] | None:
    """`--exclude-kinds label,leak` as a list (None: every kind); an unknown kind is a DataError."""
    if kinds is None or kinds == "" or kinds == []:
        return None
    names = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise DataError(f"--exclude-kinds: unknown kind{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"kinds are {', '.join(KINDS)}.")
    return names


def exclusions(rows: list[dict], root: str | os.PathLike, kinds: list[str] | None) -> dict[str, list[str]]:
    """Absolute path -> the kinds it was listed under, for the rows of `kinds` (every kind when None)."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if kinds is not None and r.get("kind") not in kinds:
            continue
        rel = r.get("path") or ""
        if not rel:
            continue
        p = os.path.normpath(os.path.join(root, rel))
        out.setdefault(p, [])
        if r.get("kind") not in out[p]:
            out[p].append(r.get("kind"))
    return out
