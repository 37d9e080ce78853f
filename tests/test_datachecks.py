"""File digests kept in the cache root: reused while a file is unchanged, hashed again when it changes."""

from __future__ import annotations

import hashlib
import os

from headstart import datachecks
from headstart.datachecks import content_digests


def _files(folder, n=4):
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        p.write_bytes(bytes([i]) * 100)
        paths.append(str(p))
    return paths


def test_digests_are_cached_and_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    paths = _files(tmp_path / "data")
    cache = tmp_path / "cache"
    first = content_digests(paths, cache_root=cache)
    assert first == [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    assert len(list((cache / "digests").glob("*.json"))) == 1

    hashed = []
    real = datachecks.file_digest
    monkeypatch.setattr(datachecks, "file_digest", lambda p: hashed.append(p) or real(p))
    assert content_digests(paths, cache_root=cache) == first
    assert hashed == []  # nothing changed: nothing read

    # Same size, new bytes, new mtime: hashed again, and the new digest is the file's.
    with open(paths[1], "wb") as f:
        f.write(b"x" * 100)
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = content_digests(paths, cache_root=cache)
    assert hashed == [paths[1]]
    assert again[1] == hashlib.sha256(b"x" * 100).hexdigest() != first[1]
    assert again[:1] + again[2:] == first[:1] + first[2:]
    hashed.clear()
    assert content_digests(paths, cache_root=cache) == again and hashed == []  # the new digest was kept


def test_a_damaged_digest_file_means_hashing_again(tmp_path):
    paths = _files(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    first = content_digests(paths, cache_root=cache)
    (store,) = (cache / "digests").glob("*.json")
    store.write_text("{not json")
    assert content_digests(paths, cache_root=cache) == first
    assert content_digests(paths) == first  # without a cache: the same digests


def test_a_read_only_cache_still_gives_digests(tmp_path):
    paths = _files(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digests").write_text("a file where the folder would go")
    assert content_digests(paths, cache_root=cache) == content_digests(paths)


def test_a_second_train_reads_the_digests_instead_of_hashing(image_folder, tmp_path, monkeypatch, one_torch_thread):
    import headstart

    cache = tmp_path / "cache"
    common = dict(strategy="feature-extraction", head="linear", image_size=32, workers=0, seed=0, weights="none",
                  cache_dir=cache)
    headstart.train(image_folder, out=tmp_path / "run1", **common)
    assert len(list((cache / "digests").glob("*.json"))) == 1
    hashed = []
    real = datachecks.file_digest
    monkeypatch.setattr(datachecks, "file_digest", lambda p: hashed.append(p) or real(p))
    run = headstart.train(image_folder, out=tmp_path / "run2", **common)
    assert hashed == []
    assert run.metrics["duplicates_across_splits"]["groups"] == 0
