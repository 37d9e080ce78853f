"""Image folders, labels files and splits: tiny real folders made by each test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from headstart.data.folders import collect_images, load_data, read_labels_csv, scan_folder, split_of
from headstart.errors import DataError

from conftest import write_image_folder


def _png(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path)
    return path


def _labels_of(data) -> dict[str, str]:
    """Relative path -> class name."""
    return {s.rel: data.classes[s.label] for s in data.samples}


# --- layouts ---------------------------------------------------------------------------------------------------


def test_class_layout_finds_every_image_with_its_class(image_folder):
    data = scan_folder(image_folder)
    assert data.layout == "classes"
    assert data.classes == ["cat", "dog"]
    assert len(data.samples) == 12
    assert data.ignored == []
    for s in data.samples:
        assert Path(s.path).is_absolute() and Path(s.path).is_file()
        assert s.rel == f"{data.classes[s.label]}/{Path(s.path).name}"
        assert s.split in ("train", "val", "test")
        # The split comes from the relative path alone.
        assert s.split == split_of(s.rel, 0.1, 0.1)
    summary = data.summary()
    assert summary["n_images"] == 12
    assert sum(summary["splits"].values()) == 12
    assert sum(sum(v.values()) for v in summary["per_class"].values()) == 12


def test_classes_are_sorted_names_not_creation_order(tmp_path):
    for name in ("zebra", "Apple", "mango", "banana"):
        _png(tmp_path / "d" / name / "a.png")
    data = scan_folder(tmp_path / "d")
    assert data.classes == sorted(["zebra", "Apple", "mango", "banana"])
    assert {data.classes[s.label] for s in data.samples} == set(data.classes)
    assert _labels_of(data)["zebra/a.png"] == "zebra"


def test_split_layout_keeps_given_splits(tmp_path):
    root = tmp_path / "d"
    for sp, n in (("train", 5), ("val", 2), ("test", 3)):
        write_image_folder(root / sp, n_per_class=n, size=(8, 6))
    data = scan_folder(root)
    assert data.layout == "splits"
    assert data.classes == ["cat", "dog"]
    assert Counter(s.split for s in data.samples) == {"train": 10, "val": 4, "test": 6}
    for s in data.samples:
        # Each image stays in the split folder it was put in; rel is relative to that split folder.
        assert Path(s.path).relative_to(root).parts[0] == s.split
        assert s.rel == Path(s.path).relative_to(root / s.split).as_posix()
        assert s.rel.split("/")[0] == data.classes[s.label]


def test_split_layout_without_val_and_test_carves_them_from_train(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", n_per_class=40, size=(4, 4))
    data = scan_folder(root, val_fraction=0.25, test_fraction=0.25)
    assert data.layout == "splits"
    counts = Counter(s.split for s in data.samples)
    assert counts["train"] and counts["val"] and counts["test"]
    assert sum(counts.values()) == 80
    for s in data.samples:
        assert s.split == split_of(s.rel, 0.25, 0.25)


def test_split_layout_with_val_only_carves_test_not_val(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root / "train", n_per_class=30, size=(4, 4))
    write_image_folder(root / "val", n_per_class=2, size=(4, 4))
    data = scan_folder(root, val_fraction=0.3, test_fraction=0.3)
    in_val_folder = {s.path for s in data.samples if "/val/" in s.path}
    assert {s.path for s in data.split("val")} == in_val_folder  # no train image moved to val
    assert len(in_val_folder) == 4
    assert data.split("test")  # test carved out of train
    for s in data.samples:
        if "/train/" in s.path:
            assert s.split == split_of(s.rel, 0.0, 0.3)


def test_labels_csv_with_header_relative_paths_and_split_column(tmp_path):
    root = tmp_path / "proj"
    _png(root / "img" / "a.png")
    _png(root / "img" / "b.png")
    _png(root / "img" / "sub" / "c.jpg")
    _png(root / "img" / "d.png")
    (root / "labels.csv").write_text(
        "path,label,split\n"
        "img/a.png,dog,train\n"
        "img/b.png,cat,validation\n"
        "img/sub/c.jpg,cat,test\n"
        "img/d.png,dog,\n"
    )
    data, bad = read_labels_csv(root / "labels.csv")
    assert bad == []
    assert data.layout == "csv"
    assert data.classes == ["cat", "dog"]
    by_rel = {s.rel: s for s in data.samples}
    assert set(by_rel) == {"img/a.png", "img/b.png", "img/sub/c.jpg", "img/d.png"}
    assert [by_rel[r].split for r in ("img/a.png", "img/b.png", "img/sub/c.jpg")] == ["train", "val", "test"]
    assert by_rel["img/d.png"].split == split_of("img/d.png", 0.1, 0.1)  # empty split cell: hashed
    assert _labels_of(data) == {"img/a.png": "dog", "img/b.png": "cat", "img/sub/c.jpg": "cat", "img/d.png": "dog"}
    assert by_rel["img/sub/c.jpg"].path == str(root / "img" / "sub" / "c.jpg")


def test_labels_csv_without_header_or_split_column_hashes_the_split(tmp_path):
    for i in range(6):
        _png(tmp_path / f"x{i}.png")
    (tmp_path / "l.csv").write_text("".join(f"x{i}.png,{'ab'[i % 2]}\n" for i in range(6)))
    data, bad = load_data(tmp_path / "nonexistent-folder-is-not-used", labels=tmp_path / "l.csv",
                          val_fraction=0.3, test_fraction=0.3)
    assert bad == []
    assert len(data.samples) == 6  # the first row is data, not a header
    assert data.classes == ["a", "b"]
    for s in data.samples:
        assert s.split == split_of(s.rel, 0.3, 0.3)


def test_labels_csv_unusable_rows_are_returned_with_reasons(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "labels.csv").write_text("path,label\nok.png,cat\nmissing.png,cat\nok.png,\n\n")
    data, bad = read_labels_csv(tmp_path / "labels.csv")
    assert [s.rel for s in data.samples] == ["ok.png"]
    assert len(bad) == 2
    by_reason = {("file not found" in b["reason"]): b for b in bad}
    assert by_reason[True]["path"].endswith("missing.png")
    assert "line 3" in by_reason[True]["reason"]
    assert "empty label" in by_reason[False]["reason"] and "line 4" in by_reason[False]["reason"]


def test_labels_csv_with_no_usable_row_is_an_error(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\ngone.png,cat\n")
    with pytest.raises(DataError, match="labels.csv"):
        read_labels_csv(tmp_path / "labels.csv")
    with pytest.raises(DataError, match="nope.csv"):
        read_labels_csv(tmp_path / "nope.csv")


def test_load_data_on_a_folder_returns_no_unusable_rows(image_folder):
    data, bad = load_data(image_folder)
    assert bad == []
    assert data.layout == "classes" and len(data.samples) == 12


# --- the hash split ----------------------------------------------------------------------------------------------


def test_split_is_stable_when_files_are_added_or_removed(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root, n_per_class=10, size=(4, 4))
    before = {s.rel: s.split for s in scan_folder(root, val_fraction=0.2, test_fraction=0.2).samples}
    assert len(before) == 20

    for i in range(50):
        _png(root / ("cat", "dog")[i % 2] / f"new_{i:03d}.png")
    after = {s.rel: s.split for s in scan_folder(root, val_fraction=0.2, test_fraction=0.2).samples}
    assert len(after) == 70
    assert {rel: after[rel] for rel in before} == before

    removed = sorted(before)[::2]
    for rel in removed:
        (root / rel).unlink()
    fewer = {s.rel: s.split for s in scan_folder(root, val_fraction=0.2, test_fraction=0.2).samples}
    assert len(fewer) == 60
    assert {rel: fewer[rel] for rel in fewer} == {rel: after[rel] for rel in fewer}


def test_split_roughly_follows_the_fractions():
    rels = [f"class_{i % 7}/img_{i:05d}.jpg" for i in range(2000)]
    counts = Counter(split_of(r, 0.15, 0.25) for r in rels)
    assert abs(counts["test"] / 2000 - 0.25) < 0.04
    assert abs(counts["val"] / 2000 - 0.15) < 0.04
    assert abs(counts["train"] / 2000 - 0.60) < 0.04
    assert Counter(split_of(r, 0.0, 0.0) for r in rels) == {"train": 2000}


# Computed once with split_of (SHA-256 of the UTF-8 path relative to the data folder): a change to the hash
# would silently move every user's images between train, validation and test, so these are pinned.
PINNED_SPLITS = {  # path: (split at val 0.1 / test 0.1, split at val 0.3 / test 0.3)
    "cat/cat_000.png": ("train", "train"),
    "cat/cat_004.png": ("val", "test"),
    "cat/cat_007.png": ("val", "test"),
    "cat/cat_008.png": ("test", "test"),
    "cat/cat_026.png": ("test", "test"),
    "dog/dog_001.png": ("train", "val"),
    "Bag/01234.png": ("train", "val"),
    "train/Shirt/00007.png": ("val", "test"),
    "x.png": ("train", "test"),
    "dog/IMG_0042.JPG": ("train", "train"),
    "café/ü 猫.png": ("train", "train"),
}


def test_known_paths_keep_their_pinned_splits(tmp_path):
    for rel, (default, wide) in PINNED_SPLITS.items():
        assert (split_of(rel, 0.1, 0.1), split_of(rel, 0.3, 0.3)) == (default, wide), rel
    # ... and scan_folder (class layout) uses exactly that split, keyed on the path relative to the data folder.
    in_classes = [rel for rel in PINNED_SPLITS if rel.count("/") == 1 and not rel.startswith("train/")]
    for rel in in_classes:
        _png(tmp_path / "d" / rel)
    found = {s.rel: s.split for s in scan_folder(tmp_path / "d").samples}
    assert found == {rel: PINNED_SPLITS[rel][0] for rel in in_classes}

def test_bad_fractions_are_refused(image_folder):
    with pytest.raises(DataError, match="fraction"):
        scan_folder(image_folder, val_fraction=0.6, test_fraction=0.5)


# --- what is and is not an image ---------------------------------------------------------------------------------


def test_hidden_files_and_folders_and_non_images_are_ignored(image_folder):
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _png(image_folder / "cat" / ".ipynb_checkpoints" / "cat_000-checkpoint.png")
    _png(image_folder / "__MACOSX" / "cat" / "._cat_000.png")
    _png(image_folder / ".hidden_class" / "x.png")
    _png(image_folder / "cat" / "._resource_fork.png")
    (image_folder / "dog" / "notes.txt").write_text("good dogs")
    (image_folder / "dog" / "meta.json").write_text("{}")

    data = scan_folder(image_folder)
    assert data.classes == ["cat", "dog"]
    assert len(data.samples) == 12
    assert not any("/." in s.path or "__MACOSX" in s.path for s in data.samples)
    ignored = {Path(i["path"]).name: i["reason"] for i in data.ignored}
    assert set(ignored) == {"notes.txt", "meta.json"}  # non-images listed; hidden entries silently skipped
    assert all("not an image" in r for r in ignored.values())


def test_nested_subfolders_inside_a_class_are_included(image_folder):
    _png(image_folder / "cat" / "indoor" / "sofa.png")
    _png(image_folder / "cat" / "indoor" / "deeper" / "box.JPG")
    data = scan_folder(image_folder)
    labels = _labels_of(data)
    assert labels["cat/indoor/sofa.png"] == "cat"
    assert labels["cat/indoor/deeper/box.JPG"] == "cat"
    assert data.classes == ["cat", "dog"]  # subfolders are not classes
    assert len(data.samples) == 14


def test_file_at_the_class_level_is_ignored_and_listed(image_folder):
    stray = _png(image_folder / "stray.png")
    data = scan_folder(image_folder)
    assert str(stray) not in {s.path for s in data.samples}
    assert len(data.samples) == 12
    [entry] = data.ignored
    assert entry["path"] == str(stray)
    assert "class level" in entry["reason"]


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_path_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="does not exist") as err:
        scan_folder(missing)
    assert str(missing) in str(err.value)


def test_path_that_is_a_file_is_a_data_error_naming_it(tmp_path):
    f = _png(tmp_path / "one.png")
    with pytest.raises(DataError, match="is a file") as err:
        load_data(f)
    assert str(f) in str(err.value)


def test_empty_folder_is_a_data_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found") as err:
        scan_folder(empty)
    assert str(empty) in str(err.value)


def test_classes_argument_fixes_the_order_and_refuses_unknown_classes(image_folder):
    data = scan_folder(image_folder, classes=["dog", "cat", "bird"])
    assert data.classes == ["dog", "cat", "bird"]
    assert all(s.label == (0 if s.rel.startswith("dog/") else 1) for s in data.samples)

    with pytest.raises(DataError, match="dog") as err:
        scan_folder(image_folder, classes=["cat"])
    assert str(image_folder) in str(err.value)


def test_csv_classes_argument_refuses_unknown_classes(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path,label\na.png,horse\n")
    with pytest.raises(DataError, match="horse"):
        read_labels_csv(tmp_path / "l.csv", classes=["cat", "dog"])


# --- collect_images (predict inputs) -----------------------------------------------------------------------------


def test_collect_images_on_files_and_folders(tmp_path, image_folder):
    single = _png(tmp_path / "single.jpg")
    (image_folder / "dog" / "notes.txt").write_text("x")
    _png(image_folder / "cat" / ".ipynb_checkpoints" / "c.png")
    _png(image_folder / "cat" / "nested" / "n.png")
    out = collect_images([single, image_folder / "cat"])
    assert out[0] == str(single.absolute())
    # The folder searched recursively, in a stable order; the hidden checkpoint folder is skipped.
    cat = image_folder.absolute() / "cat"
    assert out[1:] == [str(cat / f"cat_{i:03d}.png") for i in range(6)] + [str(cat / "nested" / "n.png")]


def test_collect_images_on_a_missing_path_is_a_data_error(tmp_path, image_folder):
    with pytest.raises(DataError, match="does not exist") as err:
        collect_images([image_folder, tmp_path / "ghost.png"])
    assert "ghost.png" in str(err.value)
