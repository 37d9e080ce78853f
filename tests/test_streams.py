"""Extraction's streams (features._compute_streams, decoding.default_streams): engine calls side by side in
one process, each on a 1-thread ONNX Runtime session or OpenVINO stream, while the calling thread decodes
the next batches. They must give the features, failures and cache shards one stream gives, use the threads
they are given, and stop cleanly on an error."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from headstart.data import decoding
from headstart.nets.registry import get_backbone, seeded_init
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import installed, make_engine
from headstart.engines.features import CHUNK, FeatureCache, extract, make_namespace

ENTRY = get_backbone("mobilenet_v2")
PRE = ENTRY.preprocessing.scaled(32)
ORT = EngineChoice("onnxruntime", "fp32", "cpu", "tests")
BATCH = 16


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    """640 images (3 chunks of 256, the last partial) and one undecodable file in the second chunk."""
    root = write_image_folder(tmp_path_factory.mktemp("streams") / "data", n_per_class=320, size=(36, 36))
    files = sorted(str(p) for p in root.rglob("*.png"))
    broken = files[300]
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    return files


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def engine(request, tmp_path_factory):
    if not installed(request.param):
        pytest.skip(f"{request.param} is not installed")
    choice = EngineChoice(request.param, "fp32", "cpu", "tests")
    return make_engine(seeded_init(ENTRY, 0), choice, tmp_path_factory.mktemp("engines"))


@pytest.fixture
def two_torch_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


class Recording:
    """The engine, noting which thread called it with how many threads; `fail_in` raises in that thread.

    With `meet` = 2, each stream's first call waits until the other stream is in a call too: the pool starts
    its second thread only while the first is busy, and a sleep standing for "busy" lost the race to decoding
    on busy cores (the first thread then ran every batch). A barrier makes it certain, and its timeout turns a
    second stream that never comes into a failure instead of a hang."""

    parallel_calls = True

    def __init__(self, engine, fail_in: str | None = None, meet: int = 1):
        self.engine, self.choice, self.fail_in = engine, engine.choice, fail_in
        self.calls: set[tuple[str, int | None]] = set()
        self.barrier = threading.Barrier(meet, timeout=120) if meet > 1 else None
        self.met: set[str] = set()

    def __call__(self, x, threads=None, **kw):
        name = threading.current_thread().name
        self.calls.add((name, threads))
        if self.fail_in and name.startswith(self.fail_in):
            raise RuntimeError(f"engine failed in {name}")
        if self.barrier is not None and name not in self.met:
            self.met.add(name)
            self.barrier.wait()
        return self.engine(x, threads=threads, **kw)


def _extract(engine, paths, root=None, **kw):
    cache = FeatureCache(root, make_namespace(ENTRY.name, {"kind": "random", "seed": 0}, PRE, ORT))
    result = extract(engine, PRE.transform(), paths, cache, batch_size=BATCH, workers=0, **kw)
    return result, cache


def test_two_streams_give_one_streams_features_failures_and_shards(engine, paths, tmp_path, two_torch_threads):
    assert len(paths) > 2 * CHUNK
    streams = min(2, decoding.os.cpu_count() or 1)
    recording = Recording(engine, meet=streams)
    two, cache2 = _extract(recording, paths, tmp_path / "two")  # the default here: 2 threads, 2 cores or more
    assert torch.get_num_threads() == 2  # given back after the streams' 1 thread each
    torch.set_num_threads(1)
    one, cache1 = _extract(engine, paths, tmp_path / "one", streams=1)
    if streams == 2:  # both streams ran, on 1 thread each; the main thread only decoded
        assert recording.calls == {("headstart-stream_0", 1), ("headstart-stream_1", 1)}
    assert two.keys == one.keys and two.failures == one.failures
    assert list(two.failures) == [paths[300]] and two.n_computed == one.n_computed == len(paths) - 1
    keys = [k for k in two.keys if k]
    assert np.array_equal(cache2.get(keys), cache1.get(keys))  # bitwise: a batch's features do not depend on it
    shards = sorted((tmp_path / "two").rglob("*.safetensors"))
    assert len(shards) == len(list((tmp_path / "one").rglob("*.safetensors"))) == 3  # one per chunk either way


def test_an_error_in_one_stream_stops_them_all_and_is_raised(engine, paths, two_torch_threads):
    if (decoding.os.cpu_count() or 1) < 2:
        pytest.skip("one core: one stream")
    with pytest.raises(RuntimeError, match="engine failed in headstart-stream_"):
        _extract(Recording(engine, fail_in="headstart-stream_"), paths)
    assert not [t for t in threading.enumerate() if t.name.startswith("headstart-stream")]
    assert torch.get_num_threads() == 2


def test_fine_tuning_boundary_in_two_streams_is_one_streams(engine, paths, two_torch_threads):
    """Fine-tuning's pass over the frozen bottom runs its engine as extraction does (decoding.map_batches):
    two streams give bitwise one stream's activations and mirror images, and skip the same file."""
    from torch import nn

    from headstart.learn.finetune import FineTuneNet, compute_boundary

    net = FineTuneNet(ENTRY, seeded_init(ENTRY, 0), nn.Linear(ENTRY.feature_dim, 2), 2)
    streams = min(2, decoding.os.cpu_count() or 1)
    net.frozen_engine = Recording(make_engine(net.frozen, engine.choice), meet=streams)
    labels = np.arange(len(paths)) % 2
    two = compute_boundary(net, paths, labels, PRE.transform(), BATCH, 0, "boundary", flip=True)
    if streams == 2:
        assert {threads for _, threads in net.frozen_engine.calls} == {1}
        assert {name for name, _ in net.frozen_engine.calls} == {"headstart-stream_0", "headstart-stream_1"}
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    net.frozen_engine = net.frozen_engine.engine
    one = compute_boundary(net, paths, labels, PRE.transform(), BATCH, 0, "boundary", flip=True)
    assert len(two.y) == len(paths) - 1  # the broken file is left out either way
    assert torch.equal(two.x, one.x) and torch.equal(two.x_flip, one.x_flip) and torch.equal(two.y, one.y)


@pytest.mark.parametrize("cores, threads, device, parallel_calls, expected", [
    (2, 2, "cpu", True, 2),  # ONNX Runtime on 2 cores: two 1-thread streams
    (8, 4, "cpu", True, 4),  # one per thread the engine would use
    (2, 1, "cpu", True, 1),
    (2, 2, "cpu", False, 1),  # torch: one stream, all threads in each call
    (2, 2, "cuda", True, 1),
])
def test_default_streams_one_per_engine_thread_on_an_engine_that_runs_calls_side_by_side(
        monkeypatch, cores, threads, device, parallel_calls, expected):
    monkeypatch.setattr(decoding.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(decoding.torch, "get_num_threads", lambda: threads)
    engine = type("Engine", (), {"parallel_calls": parallel_calls})()
    assert decoding.default_streams(device, engine) == expected


def test_openvino_compiles_one_stream_per_caller_for_streams(tmp_path):
    """Two callers on one OpenVINO model compiled as one 1-thread stream ran one after the other (both
    pinned to one core); a `threads`-thread runner gets cores // threads streams, so the streams' calls
    run side by side, and a runner on every core stays one stream (the LATENCY hint)."""
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    cores = decoding.os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: one stream")
    eng = make_engine(seeded_init(ENTRY, 0), EngineChoice("openvino", "fp32", "cpu", "tests"), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    eng(x, threads=1)
    eng(x, threads=cores)
    compiled = {k[2]: r.compiled for k, r in eng._runners.items()}
    assert int(compiled[1].get_property("NUM_STREAMS")) == cores
    assert int(compiled[1].get_property("INFERENCE_NUM_THREADS")) == cores
    assert int(compiled[cores].get_property("NUM_STREAMS")) == 1
    eng.release()



FIRST_CALLS = """
import sys, threading, numpy as np, torch
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import make_engine
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
engine = make_engine(model, EngineChoice("openvino", "fp32", "cpu", "test"), sys.argv[1])
runner = engine._compile(engine._onnx_file((16, 16)), 1)  # compiled as extraction's streams compile it
requests = [runner.compiled.create_infer_request() for _ in range(2)]
x = np.zeros((2, 3, 16, 16), np.float32)
sys.setswitchinterval(1e-6)  # the GIL changes hands as often as it can: the race is then likely
barrier = threading.Barrier(2)
def first_call(request):
    barrier.wait()  # both threads' first infer at once, as two streams start
    assert request.infer({0: x})[0].shape == (2, 4)
threads = [threading.Thread(target=first_call, args=(r,)) for r in requests]
for t in threads: t.start()
for t in threads: t.join()
print("done")
"""


@pytest.mark.slow  # 8 short processes
def test_first_openvino_calls_from_two_threads_do_not_deadlock(tmp_path):
    """The first numpy array OpenVINO's Python module makes builds its bridge (a pybind11 static); two
    threads making theirs together could deadlock, one holding the GIL, the other the static's guard.
    Without engine._openvino_numpy_bridge (run where every runner is compiled) this script hung in 8 of 12
    processes; with it in none of 16. A deadlock here is a timeout: each process gets 60 s."""
    import subprocess
    import sys

    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    for i in range(8):  # one at a time: the race needs both threads on a core of their own
        p = subprocess.Popen([sys.executable, "-c", FIRST_CALLS, str(tmp_path / str(i))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("two threads' first OpenVINO calls deadlocked")
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
