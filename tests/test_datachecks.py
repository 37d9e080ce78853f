"""File digests kept in the cache root: reused while a file is unchanged, hashed again when it changes."""

from __future__ import annotations

import hashlib
import os

from headstart.data import checks as datachecks
from headstart.data.checks import content_digests


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


def test_resolved_paths_are_realpath_through_linked_folders_and_files(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (real / "a").mkdir(parents=True)
    (real / "a" / "x.png").write_bytes(b"x")
    (real / "y.png").write_bytes(b"y")
    (tmp_path / "dirlink").symlink_to(real / "a", target_is_directory=True)
    (tmp_path / "filelink.png").symlink_to(real / "y.png")
    (tmp_path / "chain.png").symlink_to(tmp_path / "dirlink" / "x.png")
    monkeypatch.chdir(tmp_path)
    paths = [str(real / "a" / "x.png"), str(tmp_path / "dirlink" / "x.png"), "dirlink/x.png", "filelink.png",
             str(tmp_path / "chain.png"), "real/../real/y.png", str(tmp_path / "missing.png"), "dirlink/none.png"]
    assert datachecks.resolved_paths(paths) == [os.path.realpath(p) for p in paths]
    rows = [{"path": str(real / "a" / "x.png"), "split": "train"}, {"path": "filelink.png", "split": "test"}]
    # x.png four ways (its path, the linked folder absolute and relative, a chain of links); y.png only in test.
    assert datachecks.seen_in_training(paths, rows) == 4


def test_digests_in_several_chunks_and_threads_keep_the_input_order(tmp_path, monkeypatch):
    paths = _files(tmp_path / "data", n=7) + [str(tmp_path / "missing.png")]
    monkeypatch.setattr(datachecks, "CHUNK", 2)  # 4 tasks over 2 threads
    expected = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths[:-1]] + [None]
    assert content_digests(paths, threads=2) == expected
    assert content_digests(paths, threads=1) == expected
    assert content_digests(paths, threads=2, cache_root=tmp_path / "cache") == expected
