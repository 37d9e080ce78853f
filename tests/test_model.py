"""Using a loaded Model: one answer per input in order, one engine per choice, several threads at once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.engines import onnx_engine, openvino_engine
from headstart.models import model as model_mod
from headstart.data.images import ImageError
from headstart.models.model import Model, Prediction

from conftest import write_image_folder
from test_cli import run_cli

TINY = ("--strategy", "feature-extraction", "--backbone", "small_cnn", "--weights", "none", "--image-size", "32",
        "--workers", "0")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small trained run and a few of its images: (run dir, [png paths])."""
    base = tmp_path_factory.mktemp("model")
    data = write_image_folder(base / "data", n_per_class=6, classes=("ant", "bee", "cow"), size=(12, 10))
    code, _, stderr = run_cli("train", data, *TINY, "--out", base / "run", "--test-fraction", "0",
                              "--cache-dir", "none")
    assert code == 0, stderr
    return base / "run", sorted(str(p) for p in data.rglob("*.png"))[::3]


@pytest.fixture
def broken(tmp_path) -> str:
    path = tmp_path / "broken.jpg"
    path.write_text("<html>not an image</html>")
    return str(path)


def test_predict_returns_one_entry_per_input_in_order(tiny, broken, tmp_path):
    run, images = tiny
    model = headstart.load(run)
    missing = str(tmp_path / "missing.png")
    inputs = [broken, images[0], missing, images[1]]
    preds = model.predict(inputs, top_k=2, cache_dir="none", workers=0)
    assert [p.input for p in preds] == inputs
    assert [p.ok for p in preds] == [False, True, False, True]
    assert "not" in preds[0].error and "cannot read" in preds[2].error and preds[0].top == [] and preds[0].label is None
    alone = model.predict([images[0], images[1]], top_k=2, cache_dir="none", workers=0)
    assert preds[1] == alone[0] and preds[3] == alone[1]  # the bad inputs moved nothing
    assert all(len(p.top) == 2 and p.label == p.top[0][0] in model.classes for p in alone)


def test_predict_proba_raises_naming_the_file_or_gives_nan_rows(tiny, broken):
    run, images = tiny
    model = headstart.load(run)
    with pytest.raises(ImageError, match="broken.jpg") as err:
        model.predict_proba([broken, images[0]], cache_dir="none", workers=0)
    assert "errors='nan'" in str(err.value)
    proba = model.predict_proba([broken, images[0]], errors="nan", cache_dir="none", workers=0)
    assert proba.shape == (2, len(model.classes))
    assert np.isnan(proba[0]).all() and np.allclose(proba[1].sum(), 1.0)
    assert np.array_equal(proba[1], model.predict_proba([images[0]], cache_dir="none", workers=0)[0])
    with pytest.raises(ValueError, match="errors must be"):
        model.predict_proba(images[:1], errors="skip")


def test_a_single_path_or_image_is_one_input(tiny):
    run, images = tiny
    model = headstart.load(run)
    one = model.predict(images[0], cache_dir="none", workers=0)  # on main: each character was a file
    assert len(one) == 1 and one[0].ok and one[0].input == images[0]
    assert model.predict_proba(Path(images[0]), cache_dir="none", workers=0).shape == (1, len(model.classes))
    with Image.open(images[0]) as im:
        pil = model.predict(im, cache_dir="none", workers=0)  # the same engine as the mixed call below
    assert len(pil) == 1 and pil[0].input == "<image 0>" and pil[0].label == one[0].label
    mixed = model.predict([images[1], Image.open(images[0]), 42], cache_dir="none", workers=0)
    assert [p.ok for p in mixed] == [True, True, False] and "int" in mixed[2].error
    # Same features; the head then scores a batch of 2 here and of 1 above, and BLAS may sum those in
    # another order (measured: 5e-11 apart), so the probabilities agree to rounding, the labels exactly.
    assert [c for c, _ in mixed[1].top] == [c for c, _ in pil[0].top]
    assert [p for _, p in mixed[1].top] == pytest.approx([p for _, p in pil[0].top], rel=1e-9)


def test_the_engine_is_built_once_per_choice(tiny, monkeypatch):
    run, images = tiny
    model = headstart.load(run)
    built, compiled, digests = [], [], []
    real_make, real_compile, real_digest = model_mod.make_engine, onnx_engine.OnnxRuntimeEngine._compile, \
        onnx_engine.model_digest
    monkeypatch.setattr(model_mod, "make_engine", lambda *a, **k: built.append(a[1]) or real_make(*a, **k))
    monkeypatch.setattr(onnx_engine.OnnxRuntimeEngine, "_compile",
                        lambda self, path, threads: compiled.append(path) or real_compile(self, path, threads))
    monkeypatch.setattr(onnx_engine, "model_digest", lambda m: digests.append(1) or real_digest(m))
    for _ in range(3):
        model.predict(images[:2], cache_dir="none", workers=0, engine="onnxruntime", precision="fp32")
    assert len(built) == 1 and len(compiled) == 1 and len(digests) == 1  # main: 3 engines, 3 sessions, 3 hashes
    model.predict(images[:2], cache_dir="none", workers=0, engine="torch", precision="fp32")
    assert [c.engine for c in built] == ["onnxruntime", "torch"]  # another choice, its own engine


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_threads_predicting_at_once_get_the_sequential_answers(tiny, engine, monkeypatch):
    run, images = tiny
    kw = {"cache_dir": "none", "workers": 0, "engine": engine, "precision": "fp32", "batch_size": 2}
    jobs = [images[i:] + images[:i] for i in range(6)]  # each thread its own order of the images
    sequential = headstart.load(run)
    expected = [sequential.predict_proba(job, **kw) for job in jobs]
    model = headstart.load(run)
    built = []
    real_make = model_mod.make_engine
    monkeypatch.setattr(model_mod, "make_engine", lambda *a, **k: built.append(1) or real_make(*a, **k))
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(jobs))

    def work(i):
        start.wait()  # all at once: the first calls race to build the engine
        results[i] = model.predict_proba(jobs[i], **kw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    for i, want in enumerate(expected):
        assert np.allclose(results[i], want, atol=1e-6), i


def test_openvino_gives_each_thread_its_own_infer_request():
    made = []

    class Compiled:  # stands in for an ov.CompiledModel: each create_infer_request() is a new request
        def create_infer_request(self):
            made.append(object())
            return made[-1]

    requests = openvino_engine._PerThreadRequests(Compiled())
    mine = requests.get()
    assert requests.get() is mine  # one per thread, reused
    other = []
    t = threading.Thread(target=lambda: other.append(requests.get()))
    t.start()
    t.join()
    assert other[0] is not mine and len(made) == 2


def test_bundle_module_keeps_saving_and_loading(tiny, tmp_path):
    from headstart.models.bundle import Model as BundleModel
    from headstart.models.bundle import load, save

    run, images = tiny
    model = load(run)
    assert BundleModel is Model is headstart.Model and isinstance(model, Model)
    again = load(save(model, tmp_path / "copy"))
    assert again.predict(images[0], cache_dir="none", workers=0) == model.predict(images[0], cache_dir="none",
                                                                                    workers=0)
    assert isinstance(again.predict(images[0], cache_dir="none", workers=0)[0], Prediction)


# --- the command ------------------------------------------------------------------------------------------------------


def test_predict_command_reports_missing_and_broken_files_once_each(tiny, broken, tmp_path):
    run, images = tiny
    missing = tmp_path / "missing.png"
    code, stdout, stderr = run_cli("predict", run, broken, images[0], missing, "--json", "--cache-dir", "none")
    assert code == 0, stderr  # main: "missing.png does not exist", exit 2, nothing predicted
    result = json.loads(stdout)
    assert [r["path"] for r in result["predictions"]] == [images[0]]
    assert [s["path"] for s in result["skipped"]] == [broken, str(missing)]
    assert stderr.count("broken.jpg") == 1 and stderr.count("missing.png") == 1  # main: twice each

    code, stdout, stderr = run_cli("predict", run, broken, missing, "--cache-dir", "none")
    assert code == 2 and stdout == ""
    assert "none of the 2 inputs could be predicted" in stderr and stderr.count("broken.jpg") == 1
