"""Built-in data sets: a tiny Fashion-MNIST-shaped IDX set written by the test itself."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.data import datasets
from headstart.data.datasets import FASHION_MNIST_CLASSES, prepare, prepare_fashion_mnist, read_idx
from headstart.errors import DataError


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_source(folder: Path, gz: bool = True) -> dict:
    """30 training images (3 per class, shuffled) and 10 test images, all distinct."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 3)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.permutation(np.arange(10, dtype=np.uint8)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "src"
    return folder, make_source(folder)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (28, 28)
        return np.asarray(image)


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_keeps_first_n_of_each_class_in_file_order(tmp_path, source):
    src, arrays = source
    out = tmp_path / "out"
    summary = prepare_fashion_mnist(out, per_class=2, source=src, progress=False)

    assert summary == {
        "out_dir": str(out),
        "n_train": 20,
        "n_test": 10,
        "classes": list(FASHION_MNIST_CLASSES),
        "source": str(src),
    }
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        first_two = np.flatnonzero(labels == c)[:2]
        files = sorted((out / "train" / name).iterdir())
        assert [f.name for f in files] == [f"{i:05d}.png" for i in first_two]
        for i, f in zip(first_two, files):
            np.testing.assert_array_equal(read_png(f), images[i])


def test_test_split_is_always_complete(tmp_path, source):
    src, arrays = source
    out = tmp_path / "out"
    prepare_fashion_mnist(out, per_class=1, source=src, progress=False)

    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(
            read_png(out / "test" / FASHION_MNIST_CLASSES[label] / f"{i:05d}.png"), images[i]
        )
    assert len(list(out.glob("test/*/*.png"))) == 10


def test_class_folders_are_named_in_label_order(tmp_path, source):
    out = tmp_path / "out"
    prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)

    assert FASHION_MNIST_CLASSES == (
        "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
    )  # fmt: skip
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(FASHION_MNIST_CLASSES)
    assert sorted(p.name for p in out.iterdir()) == [".headstart-dataset.json", "test", "train"]


def test_all_images_and_plain_idx_files(tmp_path):
    src = tmp_path / "plain"
    make_source(src, gz=False)
    summary = prepare_fashion_mnist(tmp_path / "out", source=src, progress=False)

    assert (summary["n_train"], summary["n_test"]) == (30, 10)
    assert len(list((tmp_path / "out").glob("train/*/*.png"))) == 30


def test_second_call_returns_without_rewriting(tmp_path, source):
    src, _ = source
    out = tmp_path / "out"
    first = prepare_fashion_mnist(out, per_class=2, source=src, progress=False)
    before = snapshot(out)
    # Without its source the call can only succeed by not reading it again.
    for f in src.iterdir():
        f.unlink()

    assert prepare_fashion_mnist(out, per_class=2, source=src, progress=False) == first
    assert snapshot(out) == before


def test_existing_empty_folder_is_used(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)
    assert summary["n_train"] == 20


def test_refuses_a_foreign_folder(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    with pytest.raises(DataError, match="choose another folder or delete it"):
        prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob("*.partial-*"))


def test_refuses_a_data_set_with_other_settings(tmp_path, source):
    out = tmp_path / "out"
    prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)
    before = snapshot(out)

    with pytest.raises(DataError, match="per_class=2"):
        prepare_fashion_mnist(out, per_class=1, source=source[0], progress=False)
    assert snapshot(out) == before


def test_refuses_a_data_set_that_lost_images(tmp_path, source):
    out = tmp_path / "out"
    prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)
    next((out / "train" / "Bag").iterdir()).unlink()

    with pytest.raises(DataError, match="Bag"):
        prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: b"\x08\x03" + data[2:], "bad magic number"),
        (lambda data: data[:-5], "header"),
    ],
)
def test_malformed_idx_is_named(tmp_path, damage, message):
    src = tmp_path / "src"
    make_source(src, gz=False)
    bad = src / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    out = tmp_path / "out"

    with pytest.raises(DataError, match=message) as error:
        prepare_fashion_mnist(out, per_class=2, source=src, progress=False)
    assert str(bad) in str(error.value)
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial-*"))


def test_labels_out_of_range_are_refused(tmp_path):
    src = tmp_path / "src"
    make_source(src)
    write_idx(src / "t10k-labels-idx1-ubyte", np.full(10, 10, np.uint8))

    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        prepare_fashion_mnist(tmp_path / "out", source=src, progress=False)


def test_failure_while_writing_leaves_nothing(tmp_path, source, monkeypatch):
    calls = []
    real = datasets.Image.Image.save

    def fail_on_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Image.Image, "save", fail_on_fifth)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        prepare_fashion_mnist(out, per_class=2, source=source[0], progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial-*"))


def test_missing_source_files_are_listed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        prepare_fashion_mnist(tmp_path / "out", source=tmp_path / "empty", progress=False)


def test_no_source_and_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(root):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets, "_download", offline)  # the test never goes online
    with pytest.raises(DataError) as error:
        prepare_fashion_mnist(tmp_path / "out", progress=False)
    message = str(error.value)
    assert str(tmp_path / "no-debian") in message
    assert str(tmp_path / "cache" / "headstart" / "downloads") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "network is unreachable" in message
    assert not (tmp_path / "out").exists()


def test_prepare_by_name(tmp_path, source):
    summary = prepare("fashion-mnist", tmp_path / "out", per_class=1, source=source[0])
    assert summary["n_train"] == 10

    with pytest.raises(DataError, match="fashion-mnist"):
        prepare("imagenet", tmp_path / "other")


@pytest.mark.parametrize("per_class", [0, -1, 1.5, True, "3"])
def test_per_class_must_be_positive_int(tmp_path, source, per_class):
    with pytest.raises(DataError, match="per_class"):
        prepare_fashion_mnist(tmp_path / "out", per_class=per_class, source=source[0])


def test_real_training_labels():
    # `make test` installs Debian's dataset-fashion-mnist: missing, this fails rather than skips.
    assert datasets.DEBIAN_DIR.is_dir(), f"{datasets.DEBIAN_DIR} is missing: apt-get install dataset-fashion-mnist"
    labels = read_idx(datasets.DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10
