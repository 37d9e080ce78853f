"""A strategy is one registry entry: one defined here, in this file alone, is trained, evaluated, predicted,
served, exported and compared like a built-in one, and the built-in entries say what they need."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import headstart
from headstart.errors import HeadstartError
from headstart.strategies import compare_rows, get_strategy, list_strategies, register
from headstart.strategies.fitting import fit_args, fitted_head
from headstart.strategies.registry import _REGISTRY, Strategy
from test_cli import run_cli


class NearestClassMean:
    """A head that predicts the class whose mean feature is nearest: a linear layer in disguise,
    since -|x - m_c|^2 = 2 m_c.x - |m_c|^2 - |x|^2 and the last term is the same for every class."""

    def fit(self, X: np.ndarray, y: np.ndarray, *_):
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])  # (n_classes, d)
        return self

    def config(self) -> dict:
        return {"kind": "linear", "toy": "nearest class mean"}

    def to_torch(self) -> nn.Module:
        linear = nn.Linear(self.means_.shape[1], self.means_.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(2 * self.means_))
            linear.bias.copy_(torch.as_tensor(-(self.means_ ** 2).sum(axis=1)))
        return nn.Sequential(linear)


@dataclass(frozen=True)
class NearestMean(Strategy):
    def fit(self, ctx):
        t0 = time.perf_counter()
        X, y, _, _ = fit_args(ctx.feats)
        return fitted_head(ctx, NearestClassMean().fit(X, y), self.name, t0)


@pytest.fixture
def toy_strategy():
    toy = register(NearestMean("nearest-mean", "the nearest class mean of the frozen features",
                               compare=(("nearest-mean", {}),)))
    yield toy
    del _REGISTRY[toy.name]


def test_a_strategy_defined_in_a_test_file_works_everywhere(toy_strategy, fmnist_tiny, tmp_path, one_torch_thread):
    assert "nearest-mean" in list_strategies() and compare_rows()["nearest-mean"] == {"strategy": "nearest-mean"}
    # train (through the CLI, whose --strategy choices read the registry), then evaluate RUN
    run_dir = tmp_path / "run"
    code, stdout, stderr = run_cli("train", fmnist_tiny, "--strategy", "nearest-mean", "--image-size", "32",
                                   "--workers", "0", "--cache-dir", tmp_path / "cache", "--out", run_dir, "--json")
    assert code == 0, stderr
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert config["strategy"] == config["resolved_strategy"] == "nearest-mean" and config["finetune"] == {}
    assert config["head_settings"]["toy"] == "nearest class mean"
    assert metrics["test"]["accuracy"] > 0.3  # 4 classes: well above chance on real images
    own = headstart.evaluate(run_dir, cache_dir=tmp_path / "cache")
    assert own["accuracy"] == metrics["test"]["accuracy"]

    # the saved head is the nearest class mean: its choice on the cached features is the nearest mean's
    model = headstart.load(run_dir)
    assert model.strategy == "nearest-mean"
    test_images = sorted((fmnist_tiny / "test").rglob("*.png"))
    preds = model.predict(test_images[:6])
    assert all(p.ok and p.label in model.classes for p in preds)
    code, stdout, stderr = run_cli("predict", run_dir, test_images[0], "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["predictions"][0]["predictions"][0]["class"] == preds[0].label

    # serve: the HTTP API answers with the same class as predict
    from fastapi.testclient import TestClient

    from headstart.serve import app as serve_app

    predictor = serve_app.Predictor(model, engine="torch", precision="fp32", cache_dir="none")
    client = TestClient(serve_app.create_app(predictor, {}))
    buf = io.BytesIO()
    Image.open(test_images[0]).save(buf, format="PNG")
    answer = client.post("/predict", files={"files": ("a.png", buf.getvalue(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["predictions"][0]["class"] == preds[0].label

    # export to ONNX
    code, stdout, stderr = run_cli("export", run_dir, "--out", tmp_path / "onnx")
    assert code == 0, stderr
    assert any(p.suffix == ".onnx" for p in (tmp_path / "onnx").iterdir())

    # compare lists it as a row of its own
    from headstart.runs.compare import compare

    result = compare(fmnist_tiny, out=tmp_path / "cmp", strategies=["nearest-mean"],
                                            image_size=32, workers=0)
    assert [r["strategy"] for r in result["runs"]] == ["nearest-mean"]
    assert result["runs"][0]["test_accuracy"] == metrics["test"]["accuracy"]


def test_the_built_in_entries_say_what_they_need():
    assert list_strategies()[:5] == ["auto", "scratch", "feature-extraction", "fine-tune", "ensemble"]
    assert not get_strategy("feature-extraction").trains_backbone and get_strategy("fine-tune").trains_backbone
    assert [name for name in list_strategies() if get_strategy(name).int8] == ["feature-extraction"]
    assert [name for name in list_strategies() if not get_strategy(name).torchrun] == ["ensemble"]
    assert list(compare_rows()) == ["scratch", "feature-extraction-linear", "feature-extraction-mlp", "fine-tune"]
    with pytest.raises(HeadstartError, match="--strategy must be one of auto, scratch"):
        get_strategy("finetune")


def test_train_refuses_an_unknown_strategy_before_any_work(image_folder, tmp_path):
    with pytest.raises(HeadstartError, match="--strategy must be one of"):
        headstart.train(image_folder, strategy="nearest-mean", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
