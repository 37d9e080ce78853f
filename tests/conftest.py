"""Test isolation: private TORCH_HOME, XDG_CACHE_HOME and HOME, and no network at all (children included)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _load_netguard():
    """tests/netguard/sitecustomize.py under its own name: the same guard code in this process and its children."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headstart_netguard", NETGUARD_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NETGUARD_DIR = Path(__file__).parent / "netguard"
netguard = _load_netguard()
NetworkBlocked = netguard.NetworkBlocked
_NETWORK = pytest.StashKey[dict]()


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Private TORCH_HOME, XDG_CACHE_HOME and HOME, HEADSTART_OFFLINE=1, and the network guard in every
    child Python (tests/netguard first on PYTHONPATH, its refused attempts logged to one file)."""
    home = tmp_path_factory.mktemp("home")
    names = ("TORCH_HOME", "XDG_CACHE_HOME", "HOME", "HEADSTART_OFFLINE", "PYTHONPATH", netguard.LOG_VARIABLE)
    saved = {k: os.environ.get(k) for k in names}
    pythonpath = os.pathsep.join(p for p in (str(NETGUARD_DIR), os.environ.get("PYTHONPATH")) if p)
    os.environ.update({"TORCH_HOME": str(home / "torch"), "XDG_CACHE_HOME": str(home / "cache"),
                       "HOME": str(home), "HEADSTART_OFFLINE": "1", "PYTHONPATH": pythonpath,
                       netguard.LOG_VARIABLE: str(tmp_path_factory.mktemp("netguard") / "attempts.log")})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _network_attempts(state: dict) -> list[str]:
    """Attempts logged since the test began (or since they were last reported), by any process."""
    log = Path(os.environ[netguard.LOG_VARIABLE])
    seen = []
    if log.exists():
        with open(log, encoding="utf-8") as f:
            f.seek(state["offset"])
            seen += f.read().splitlines()
            state["offset"] = f.tell()
    return seen


def _fail_on_network(state: dict) -> None:
    attempts = _network_attempts(state)
    if attempts:
        pytest.fail("the test tried to reach the network (even if the error was caught):\n  "
                    + "\n  ".join(attempts), pytrace=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, request):
    """Any attempt to reach the network fails the test that made it, in this process or a child.

    The attempt raises NetworkBlocked and is logged to a file (so forked children's attempts arrive
    too); the test fails on the log after its call (pytest_runtest_call below) or at teardown, so an
    `except Exception` around the attempt changes nothing.
    Loopback and Unix-domain sockets stay allowed (tests/netguard/sitecustomize.py says why).
    """
    log = Path(os.environ[netguard.LOG_VARIABLE])
    state = {"offset": log.stat().st_size if log.exists() else 0}
    request.node.stash[_NETWORK] = state
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, netguard.guarded(getattr(socket.socket, name),
                                                                  netguard.append_to_log))
    yield
    _fail_on_network(state)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that caught NetworkBlocked and passed is failed here: FAILED, not an error at teardown."""
    result = yield
    if _NETWORK in item.stash:
        _fail_on_network(item.stash[_NETWORK])
    return result


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, `root` included, not following links: kind, content hash or link target,
    mode and mtime. Folders are entries too, so a folder created, removed or re-moded shows, and so
    does a file created and removed again (its folder's mtime moved)."""
    import hashlib
    import stat

    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                what = ("dir" if stat.S_ISDIR(st.st_mode) else "other",)
            state[os.path.relpath(p, root)] = (*what, st.st_mode, st.st_mtime_ns)
    return state


def count_network_batches(monkeypatch) -> list[int]:
    """Batch sizes every backbone engine is called with from now on, whichever engine runs.

    Every class of the engine modules (headstart.engines.*_engine) with a `__call__` of its own is patched
    (TorchEngine and the converted engines' base class today), so a new engine is counted without editing this.
    """
    import importlib
    import inspect
    import pkgutil

    import headstart.engines
    from headstart.engines import onnx_engine, torch_engine

    modules = [importlib.import_module(f"headstart.engines.{m.name}") for m in pkgutil.iter_modules(
        headstart.engines.__path__) if m.name.endswith("_engine")]
    sizes: list[int] = []
    patched = [cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
               if cls.__module__ == module.__name__ and "__call__" in vars(cls)]
    assert torch_engine.TorchEngine in patched and onnx_engine._ConvertedEngine in patched, patched
    for cls in patched:
        real = vars(cls)["__call__"]
        monkeypatch.setattr(cls, "__call__",
                            lambda self, x, *a, real=real, **kw: sizes.append(len(x)) or real(self, x, *a, **kw))
    return sizes


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and two OpenMP threads fighting another
    process for 2 cores run them tens of times slower (seen here while benchmarks ran)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def fake_cpu_code(native_bf16: bool, missing: tuple[str, ...] = ()) -> str:
    """Python lines that fake the CPU kind and missing engines in a fresh process, before headstart runs.

    The fake sits where the rule looks: the CPU's flags (cpu.cpu_flags) and the import system
    (a None entry in sys.modules makes both `import openvino` and find_spec treat it as absent).
    """
    flags = "{'avx2', 'avx512f', 'avx512_bf16'}" if native_bf16 else "{'avx2'}"
    return (f"import sys\nfor name in {tuple(missing)!r}: sys.modules[name] = None\n"
            f"import headstart.cpu\nheadstart.cpu.cpu_flags = lambda: frozenset({flags})\n")


@pytest.fixture
def fake_cpu(monkeypatch):
    """`fake_cpu(native_bf16=True, missing=("openvino",))` makes this process look like that machine
    (`amx=True`: one whose bf16 runs on AMX tiles).

    Both CPU kinds, with and without each engine, then run the rule and the code after it on any
    machine (the real flags only decide which kind the rest of the suite runs as).
    """
    import sys

    from headstart import cpu
    from headstart.engines import rule as engine

    def fake(native_bf16: bool, missing: tuple[str, ...] = (), amx: bool = False):
        flags = {"avx2", "avx512f", "avx512_bf16"} if native_bf16 else {"avx2"}
        if amx:  # the AMX machines: AVX512-BF16 and the tile units
            assert native_bf16, "AMX comes with native bf16"
            flags |= {"amx_bf16", "amx_int8", "amx_tile"}
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
        for name in missing:
            monkeypatch.setitem(sys.modules, name, None)
        assert engine.native_bf16() is native_bf16 and not any(engine.installed(m) for m in missing)

    return fake


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
    from headstart.data.datasets import FASHION_MNIST_CLASSES, read_idx

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


@pytest.fixture(autouse=True)
def _carry_measured(request):
    """Under pytest-xdist a test runs in a worker process: the lines it adds to MEASURED travel to the
    controller, which prints the summary, with its report (user_properties), and are gathered there."""
    start = len(MEASURED)
    yield
    request.node.user_properties.extend(("measured", line) for line in MEASURED[start:])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    if hasattr(report, "node"):  # set on the reports a controller receives from its pytest-xdist workers
        if report.when == "teardown":
            MEASURED.extend(line for key, line in report.user_properties if key == "measured")
        return
    # Captured output may hold undecodable file names (surrogate escapes, as the tests of odd names print them);
    # a report travels from a worker to the controller as UTF-8, which cannot carry them: escaped here, first.
    if any(_has_surrogates(text) for _, text in report.sections):
        report.sections = [(title, _escaped(text)) for title, text in report.sections]
    if report.longrepr is not None and _has_surrogates(str(report.longrepr)):
        report.longrepr = _escaped(str(report.longrepr))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A small trained run (small_cnn, random weights, 32 px, feature extraction, linear head) on three
    synthetic classes, with a test split: for the bundle and predict tests, which only read it."""
    import headstart

    base = tmp_path_factory.mktemp("small-run")
    data = write_image_folder(base / "data", n_per_class=8, classes=("ant", "bee", "cow"), size=(12, 10))
    headstart.train(data, out=base / "run", strategy="feature-extraction", backbone="small_cnn", weights="none",
                    image_size=32, workers=0, cache_dir="none", test_fraction=0.25)
    return base / "run"
