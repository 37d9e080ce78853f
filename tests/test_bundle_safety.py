"""Reliability (issue 6), untrusted model bundles: loading unpickles nothing, and damaged, edited
or foreign bundles are refused clearly.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import pytest

import headstart

from conftest import write_image_folder
from reliability_helpers import TINY, _png
from test_cli import run_cli


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bundle")
    data = write_image_folder(base / "data", n_per_class=5, classes=("ant", "bee", "cow"), size=(8, 8))
    code, _, stderr = run_cli("train", data, *TINY, "--out", base / "run", "--test-fraction", "0")
    assert code == 0, stderr
    return base / "run" / "model"


@pytest.fixture
def copy_of(bundle, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "model"))


_UNPICKLED: list | None = None  # while a no_unpickling block runs: every class a pickle asked for
_KEPT_ASIDE_UNPICKLER = pickle.Unpickler  # taken before any test patches it, for the control below


def _record_find_class(event: str, args) -> None:
    if event == "pickle.find_class" and _UNPICKLED is not None:
        _UNPICKLED.append(args)


sys.addaudithook(_record_find_class)  # audit hooks cannot be removed: this one records only inside the block


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point raises: the pickle module's (C and pure-Python), torch.load at both its
    names and torch's weights-only unpickler; any class looked up by any unpickler is also recorded
    through Python's audit event, for a loader reached some other way."""
    import _pickle
    import pickle

    import torch
    import torch._weights_only_unpickler
    import torch.serialization

    global _UNPICKLED

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    paths = [(pickle, n) for n in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler")]
    paths += [(_pickle, n) for n in ("load", "loads", "Unpickler")]
    paths += [(torch, "load"), (torch.serialization, "load"), (torch.serialization, "_load"),
              (torch.serialization, "_legacy_load"), (torch._weights_only_unpickler, "load"),
              (torch._weights_only_unpickler, "Unpickler")]
    for module, name in paths:
        monkeypatch.setattr(module, name, refuse)
    _UNPICKLED = []
    yield _UNPICKLED
    _UNPICKLED = None


def test_the_unpickling_block_catches_each_way_in(no_unpickling, tmp_path):
    """Control for the test below: each loader, reached by its usual name, is stopped."""
    import _pickle

    import numpy
    import torch

    data = pickle.dumps({"x": 1})
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    numpy.save(tmp_path / "o.npy", numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    ways = {"pickle.loads": lambda: pickle.loads(data), "_pickle.loads": lambda: _pickle.loads(data),
            "pickle.Unpickler": lambda: pickle.Unpickler(io.BytesIO(data)).load(),
            "torch.load": lambda: torch.load(tmp_path / "w.pt", weights_only=True),
            "torch.serialization.load": lambda: torch.serialization.load(tmp_path / "w.pt"),
            "numpy.load": lambda: numpy.load(tmp_path / "o.npy", allow_pickle=True)}
    for way, call in ways.items():
        try:
            call()
        except AssertionError as exc:
            assert "unpickled" in str(exc), way
        else:
            pytest.fail(f"{way} was not blocked")
    # A loader the patches miss (the C unpickler, kept aside before the block) is caught by the record.
    assert _KEPT_ASIDE_UNPICKLER(io.BytesIO(pickle.dumps(Path("x")))).load() == Path("x")
    assert ("pathlib", "PosixPath") in no_unpickling


def test_bundle_loads_without_unpickling_anything(copy_of, no_unpickling, tmp_path):
    model = headstart.load(copy_of)
    assert model.classes == ["ant", "bee", "cow"]
    image = _png(tmp_path / "x.png", size=(8, 8))
    # workers=0: a decoding worker's tensors come back pickled (its own IPC, not a file), which would cloud this.
    assert model.predict([image], cache_dir="none", workers=0)[0].top[0][0] in model.classes
    assert no_unpickling == []  # no class was looked up by any unpickler, however it was reached


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _edit_json(d: Path, change) -> None:
    meta = json.loads((d / "model.json").read_text())
    change(meta)
    (d / "model.json").write_text(json.dumps(meta))


def _edit_tensors(d: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    change(tensors)
    save_file(tensors, d / "model.safetensors")


def _damage(d: Path, how: str, tmp_path: Path) -> str:
    """Damage the bundle in `d`; return words the refusal must contain."""
    import torch

    if how == "truncated tensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "cannot be read"
    if how == "pickle posing as safetensors":
        torch.save({"head.0.weight": _Payload(str(tmp_path / "pwned"))}, d / "model.safetensors")
        return "cannot be read"
    if how == "tensors missing":
        (d / "model.safetensors").unlink()
        return "cannot be read"
    if how == "json not json":
        (d / "model.json").write_text("{'format': 'headstart-bundle',")
        return "not readable JSON"
    if how == "foreign json":
        (d / "model.json").write_text(json.dumps({"format": "keras", "layers": []}))
        return "not a headstart bundle"
    if how == "newer format version":
        _edit_json(d, lambda m: m.update(format_version=2))
        return "format version 2"
    if how == "one class fewer":
        _edit_json(d, lambda m: m.update(classes=m["classes"][:2]))
        return "shape mismatches"
    if how == "duplicate classes":
        _edit_json(d, lambda m: m.update(classes=["ant", "ant", "cow"]))
        return "distinct non-empty names"
    if how == "class that is not a name":
        _edit_json(d, lambda m: m.update(classes=["ant", 7, "cow"]))
        return "distinct non-empty names"
    if how == "100,000 classes":
        _edit_json(d, lambda m: m.update(classes=[f"c{i}" for i in range(10**5)]))  # checked on meta tensors
        return "shape mismatches"
    if how == "huge hidden layer":
        _edit_json(d, lambda m: m.update(head={"kind": "mlp", "hidden": 10**12, "dropout": 0.5}))
        return "missing keys"
    if how == "negative hidden layer":
        _edit_json(d, lambda m: m.update(head={"kind": "mlp", "hidden": -3, "dropout": 0.5}))
        return "incomplete or edited"
    if how == "unknown head kind":
        _edit_json(d, lambda m: m["head"].update(kind="forest"))
        return "unknown head kind"
    if how == "unknown backbone":
        _edit_json(d, lambda m: m.update(backbone="alexnet_9000"))
        return "incomplete or edited"
    if how == "preprocessing edited":
        _edit_json(d, lambda m: m["preprocessing"].update(crop_size=0))
        return "out of range"
    if how == "std of zero":
        _edit_json(d, lambda m: m["preprocessing"].update(std=[0.5, 0.0, 0.5]))
        return "std > 0"
    if how == "key missing from json":
        _edit_json(d, lambda m: m.pop("preprocessing"))
        return "incomplete or edited"
    if how == "tensor shape edited":
        _edit_tensors(d, lambda t: t.update({"head.0.weight": t["head.0.weight"][:, :64].contiguous()}))
        return "shape mismatches"
    if how == "extra tensor":
        _edit_tensors(d, lambda t: t.update({"optimizer.state": torch.zeros(3)}))
        return "unexpected tensors"
    if how == "another model's tensors":
        from safetensors.torch import save_file

        from headstart.nets.registry import seeded_init

        other = seeded_init(headstart.get_backbone("mobilenet_v2"), 0).state_dict()
        save_file({f"backbone.{k}": v.contiguous() for k, v in other.items()}, d / "model.safetensors")
        return "does not fit the small_cnn backbone"
    raise AssertionError(how)


DAMAGE = ["truncated tensors", "pickle posing as safetensors", "tensors missing", "json not json", "foreign json",
          "newer format version", "one class fewer", "duplicate classes", "class that is not a name",
          "100,000 classes", "huge hidden layer", "negative hidden layer", "unknown head kind", "unknown backbone",
          "preprocessing edited", "std of zero", "key missing from json", "tensor shape edited", "extra tensor",
          "another model's tensors"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_edited_or_foreign_bundle_is_refused_clearly(copy_of, tmp_path, how):
    from headstart.errors import BundleError

    words = _damage(copy_of, how, tmp_path)
    with pytest.raises(BundleError, match=words.replace("(", r"\(")) as err:
        headstart.load(copy_of)
    assert str(copy_of) in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    code, _, stderr = run_cli("predict", copy_of.parent, _png(tmp_path / "x.png"))
    assert code == 2 and "Traceback" not in stderr and words in stderr


class RealAllocations:
    """Element counts of the tensors torch's factory functions (what modules build their parameters and
    buffers with) create on a real device inside the block; an allocation that fails counts as "failed".

    A torch function mode, so it sees the call after `with torch.device("meta")` has set the device.
    """

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        made: list = []
        factories = {torch.empty, torch.zeros, torch.ones, torch.full, torch.empty_strided, torch.rand,
                     torch.randn}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                try:
                    out = func(*args, **(kwargs or {}))
                except RuntimeError:
                    if func in factories:
                        made.append("failed")
                    raise
                if func in factories and out.device.type != "meta":
                    made.append(out.numel())
                return out

        self.made, self.mode = made, Mode()

    def __enter__(self) -> list:
        self.mode.__enter__()
        return self.made

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("how", ["100,000 classes", "huge hidden layer"])
def test_sizes_edited_into_the_json_allocate_nothing(copy_of, tmp_path, how):
    """The edited sizes are checked on the meta device: no real tensor is built before the refusal.
    Control: the same counter sees the modules of a bundle that loads."""
    from headstart.errors import BundleError

    with RealAllocations() as made:
        model = headstart.load(copy_of)
    n_params = sum(p.numel() for p in [*model.backbone.parameters(), *model.head.parameters()])
    assert sum(n for n in made if n != "failed") >= n_params  # the counter sees real modules being built
    words = _damage(copy_of, how, tmp_path)
    with RealAllocations() as made, pytest.raises(BundleError, match=words):
        headstart.load(copy_of)
    assert made == []
