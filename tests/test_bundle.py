"""bundle.py: a Model saved and loaded back unchanged, older bundle layouts, where a bundle is found.

Refusing damaged, edited or foreign files is tests/test_bundle_safety.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headstart
from headstart.models import bundle
from headstart.errors import BundleError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_save_then_load_gives_the_same_model(small_run, tmp_path):
    model = bundle.load(small_run)
    out = bundle.save(model, tmp_path / "a" / "b")  # parents made
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # no temporary left
    again = bundle.load(out)
    assert again.classes == model.classes == ["ant", "bee", "cow"]
    assert again.preprocessing == model.preprocessing and again.weights == model.weights
    assert again.head_config == model.head_config and again.strategy == model.strategy
    assert again.backbone_identity == model.backbone_identity and again.entry.name == "small_cnn"
    for a, b in ((model.backbone, again.backbone), (model.head, again.head)):
        sa, sb = _state(a), _state(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not again.backbone.training and not again.head.training  # loaded for use
    feats = np.random.default_rng(0).normal(size=(5, model.entry.feature_dim)).astype(np.float32)
    assert np.array_equal(model.proba_from_features(feats), again.proba_from_features(feats))
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "headstart-bundle" and meta["format_version"] == bundle.FORMAT_VERSION
    assert meta["headstart_version"] == headstart.__version__ and meta["feature_dim"] == model.entry.feature_dim


def test_a_run_directory_and_its_model_folder_load_alike(small_run, tmp_path):
    a, b = bundle.load(small_run), bundle.load(small_run / "model")
    assert a.classes == b.classes and torch.equal(next(iter(a.head.state_dict().values())),
                                                  next(iter(b.head.state_dict().values())))
    with pytest.raises(BundleError, match=f"no model found at {tmp_path}: expected a run directory"):
        bundle.load(tmp_path)


def test_an_older_bundle_without_strategy_or_identity_loads_with_the_defaults(small_run, tmp_path):
    """Bundles written before fine-tuning (no "strategy") and before the cache keyed on the backbone's
    identity (no "backbone_identity") still load: what they hold is a feature-extraction model."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small_run / "model", old)
    meta = json.loads((old / "model.json").read_text())
    del meta["strategy"], meta["backbone_identity"]
    (old / "model.json").write_text(json.dumps(meta))
    model = bundle.load(old)
    assert model.strategy == "feature-extraction" and model.backbone_identity is None
    # its features are keyed on the weights' identity then, as the run keyed them
    ref = bundle.load(small_run)
    choice = ref.engine(engine="torch").choice
    assert model.namespace(choice) == ref.namespace(choice)


def test_an_mlp_head_round_trips(small_run, tmp_path):
    from headstart.learn.heads import make_head

    model = bundle.load(small_run)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, model.entry.feature_dim)).astype(np.float32)
    y = np.arange(60) % 3
    head = make_head("mlp", seed=0).set_params(max_epochs=3).fit(X, y)
    model.head, model.head_config = head.to_torch(), {**head.config(), "in_features": model.entry.feature_dim,
                                                      "n_classes": 3}
    again = bundle.load(bundle.save(model, tmp_path / "mlp"))
    assert again.head_config["kind"] == "mlp"
    assert np.array_equal(again.proba_from_features(X[:7]), model.proba_from_features(X[:7]))
    assert np.allclose(model.proba_from_features(X[:7]), head.predict_proba(X[:7]), atol=1e-5)
