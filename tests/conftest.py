"""Test isolation: private TORCH_HOME, XDG_CACHE_HOME and HOME, and no network at all."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("TORCH_HOME", "XDG_CACHE_HOME", "HOME", "HEADSTART_OFFLINE")}
    os.environ.update({"TORCH_HOME": str(home / "torch"), "XDG_CACHE_HOME": str(home / "cache"),
                       "HOME": str(home), "HEADSTART_OFFLINE": "1"})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) and address else None
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to reach the network fails the test that made it; loopback stays allowed.

    Unix-domain sockets stay allowed: DataLoader workers pass tensors back through them.
    Loopback (127.0.0.0/8, ::1) too: the serving tests talk to a server they started on 127.0.0.1.
    """
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def guard(real):
        def connect(self, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not (args and _is_loopback(args[0])):
                raise NetworkBlocked(f"tests must not use the network (connect to {args[0] if args else '?'})")
            return real(self, *args, **kwargs)

        return connect

    def create_connection(address, *args, **kwargs):
        if not _is_loopback(address):
            raise NetworkBlocked(f"tests must not use the network (connect to {address})")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and two OpenMP threads fighting another
    process for 2 cores run them tens of times slower (seen here while benchmarks ran)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def write_image_folder(root: Path, n_per_class: int = 6, classes=("cat", "dog"), size=(40, 32), seed=0) -> Path:
    """A tiny image folder of distinguishable synthetic classes (different mean colours)."""
    rng = np.random.default_rng(seed)
    for ci, cname in enumerate(classes):
        d = root / cname
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.zeros((size[1], size[0], 3), np.float64)
            base[..., ci % 3] = 200
            arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{cname}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data")


def _write_fmnist_subset(out: Path, train_per_class: int, test_per_class: int) -> Path:
    if not FMNIST_DIR.is_dir():
        pytest.fail(f"{FMNIST_DIR} is missing: `make test` installs Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist as root).")
    from headstart.datasets import FASHION_MNIST_CLASSES, read_idx

    for split, stem, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images = read_idx(FMNIST_DIR / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FMNIST_DIR / f"{stem}-labels-idx1-ubyte.gz")
        for c, name in enumerate(FASHION_MNIST_CLASSES):
            d = out / split / name
            d.mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[:per_class]:
                Image.fromarray(images[i], mode="L").save(d / f"{i:05d}.png")
    return out


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """A small real Fashion-MNIST subset (30 train + 20 test images per class) as PNG folders."""
    return _write_fmnist_subset(tmp_path_factory.mktemp("fmnist") / "fmnist", 30, 20)


@pytest.fixture(scope="session")
def fmnist_tiny(tmp_path_factory) -> Path:
    """A tiny real Fashion-MNIST subset (12 train + 4 test images per class), for training-loop mechanics."""
    return _write_fmnist_subset(tmp_path_factory.mktemp("fmnist-tiny") / "fmnist", 12, 4)

MEASURED: list[str] = []  # numbers tests measured, shown in pytest's closing summary


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)
