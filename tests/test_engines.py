"""The converted-model engines (ONNX Runtime, OpenVINO) against torch fp32, on real weights and images.

`make test` installs both engines, so a missing one fails here rather than skipping.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.nets.spec import PIPELINE
from headstart.nets.registry import get_backbone
from headstart.data.folders import scan_folder
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import ENGINES, choose_engine, make_engine
from headstart.engines.features import FeatureCache, extract, make_namespace
from headstart.nets.weights import load_backbone

try:
    from conftest import MEASURED, fake_cpu_code
except ImportError:  # imported by the OpenVINO check's own process
    MEASURED = []

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENTRY = get_backbone("mobilenet_v2")
PRE = ENTRY.preprocessing.scaled(64)
# Relative to the largest feature: ONNX Runtime and OpenVINO fuse BatchNorm into the convolutions
# and reorder sums, so fp32 results differ from eager torch in the last bits (measured ~1e-6).
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images(fmnist_tiny):
    return sorted(s.path for s in scan_folder(fmnist_tiny / "train").samples)[:24]


@pytest.fixture(scope="module")
def reference(images):
    return reference_of(images)


def _rgb(path):
    from headstart.data.images import load_image

    return load_image(path)


ALTSTACK_SCRIPT = """
import gc, os, signal, subprocess, sys
import torch
from headstart.engines.choice import EngineChoice
from headstart.engines.rule import make_engine
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
x = torch.randn(2, 3, 16, 16)
choice = EngineChoice("openvino", "fp32", "cpu", "test")
first = make_engine(model, choice, sys.argv[1])
first(x)
second = make_engine(model, choice, sys.argv[1])
second(x)
first.release(); del first; gc.collect()  # freed in the order they were made
second.release(); del second; gc.collect()
import threading  # extraction's streams: a runner compiled in a helper thread, used from both, freed in main
streams = make_engine(model, choice, sys.argv[1])
helper = threading.Thread(target=lambda: streams(x, threads=1))
helper.start(); helper.join()
streams(x, threads=1)
streams.release(); del streams; gc.collect()
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader does; Python handlers use the alt stack
for _ in range(3):
    subprocess.run(["true"], check=True)
pid = os.fork()  # a forked child (as tests' CLI children are) still compiles and runs
if pid == 0:
    signal.alarm(120)
    third = make_engine(model, choice, sys.argv[1])
    os._exit(0 if third(x).shape == (2, 4) else 1)
_, status = os.waitpid(pid, 0)
assert status == 0, status
print("survived")
"""


def test_openvino_engines_freed_in_any_order_leave_signals_working(tmp_path):
    """Each OpenVINO Core's CPU plugin swaps the thread's alternate signal stack and unmaps its own when
    freed; two freed first-in-first-out left an unmapped stack, and the next Python signal handler (a
    DataLoader's SIGCHLD) killed the process with SIGSEGV. signal_stack.keep_signal_stack puts the stack back;
    a forked child still compiles (one Core for the whole process would hang it)."""
    proc = subprocess.run([sys.executable, "-c", ALTSTACK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "survived", (proc.returncode, proc.stderr[-3000:])


@pytest.mark.slow
def test_openvino_matches_torch_fp32(images, tmp_path):
    """The same check for OpenVINO, in its own process: tearing OpenVINO down inside this long pytest process
    once crashed a later test with SIGSEGV (the plugins' alternate signal stacks: signal_stack.keep_signal_stack)."""
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import test_engines as t; "
        "import torch; torch.set_num_threads(1); "
        "print(json.dumps(t.check_engine('openvino', t.reference_of(json.loads(sys.argv[2])), sys.argv[3])))"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), json.dumps(images),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rel = json.loads(proc.stdout.strip().splitlines()[-1])
    MEASURED.append(f"openvino fp32 vs torch fp32, MobileNetV2 64 px, 24 real images: max relative diff {rel:.2e}")


def test_onnxruntime_matches_torch_fp32(reference, tmp_path):
    rel = check_engine("onnxruntime", reference, tmp_path)
    MEASURED.append(f"onnxruntime fp32 vs torch fp32, MobileNetV2 64 px, 24 real images: max relative diff {rel:.2e}")


def reference_of(images):
    model, info = load_backbone(ENTRY, None)  # the real ImageNet weights
    engine = make_engine(model, EngineChoice("torch", "fp32", "cpu", "reference"))
    x = torch.stack([PRE.transform()(_rgb(p)) for p in images])
    return model, info, x, engine(x).numpy()


def check_engine(name, reference, tmp_path) -> float:
    """Assert engine `name` matches torch fp32 and caches its converted model; return the relative diff."""
    tmp_path = Path(tmp_path)
    model, _, x, want = reference
    engine = make_engine(model, EngineChoice(name, "fp32", "cpu", "test"), tmp_path / "cache")
    got = engine(x).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < FP32_TOLERANCE
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9  # the same strongest channel, nearly always
    # The converted model is cached: a second engine converts nothing.
    cached = sorted((tmp_path / "cache" / "engines").glob("*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = make_engine(model, EngineChoice(name, "fp32", "cpu", "test"), tmp_path / "cache")
    np.testing.assert_array_equal(again(x).numpy(), got)
    assert cached[0].stat().st_mtime_ns == mtime and len(list((tmp_path / "cache" / "engines").iterdir())) == 1
    return rel


def test_converted_engines_run_a_batch_in_calls_of_call_batch_images(reference, monkeypatch, tmp_path):
    """A batch runs as consecutive calls of `call_batch` images (cache-sized activations), whose features are
    each call's own, in order; and the feature cache's key says how many images a call took."""
    import headstart.engines.onnx_engine as engine_mod

    model, info, x, want = reference
    engine = make_engine(model, EngineChoice("onnxruntime", "fp32", "cpu", "test"), tmp_path / "cache")
    whole = engine(x).numpy()  # 24 images at 64 px: one call (call_batch(64, 64) == 32)
    monkeypatch.setattr(engine_mod, "CALL_PIXELS", 5 * 64 * 64)
    assert engine_mod.call_batch(64, 64) == 4
    sizes = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda runner, a: sizes.append(len(a)) or run(runner, a))
    got = engine(x).numpy()
    assert sizes == [4] * 6
    np.testing.assert_array_equal(got, np.concatenate([engine(x[i:i + 4]).numpy() for i in range(0, 24, 4)]))
    assert np.abs(got - whole).max() / np.abs(whole).max() < FP32_TOLERANCE
    assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE
    ns = {e: make_namespace("mobilenet_v2", info.identity(), PRE, EngineChoice(e, "fp32", "cpu", "test"))
          for e in ("onnxruntime", "torch")}
    assert ns["onnxruntime"]["images_per_call"] == 4 and "images_per_call" not in ns["torch"]
    # A converted engine normalises in its own graph (pixels.py): its features may differ in the last bits.
    assert ns["torch"]["pipeline"] == PIPELINE != ns["onnxruntime"]["pipeline"]


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_converted_engines_normalise_uint8_pixels_in_their_own_graph(reference, images, name, tmp_path):
    """Handed decoded pixels and their Normalize, a converted engine runs a model whose first nodes are
    torchvision's scaling and normalising (pixels.py), converted once: the features of the batch torch
    normalises; a gray batch's one channel is read as all three; pixels without a Normalize are refused."""
    import onnx

    model, _, x, want = reference
    pixels = torch.stack([PRE.transform().decode(_rgb(p)) for p in images])  # (24, 3, 64, 64) uint8
    norm = PRE.normalizer
    assert pixels.dtype == torch.uint8 and torch.equal(norm(pixels), x)  # bitwise the transform's tensor
    torch_engine = make_engine(model, EngineChoice("torch", "fp32", "cpu", "test"))
    np.testing.assert_array_equal(torch_engine(pixels, normalize=norm).numpy(), want)
    engine = make_engine(model, EngineChoice(name, "fp32", "cpu", "test"), tmp_path)
    floats = engine(x).numpy()
    got = engine(pixels, normalize=norm).numpy()
    assert np.abs(got - floats).max() / np.abs(floats).max() < FP32_TOLERANCE  # measured: equal
    assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE
    gray = pixels[:8, :1]
    np.testing.assert_array_equal(engine(gray, normalize=norm).numpy(),
                                  engine(gray.expand(-1, 3, -1, -1), normalize=norm).numpy())
    with pytest.raises(ValueError, match="normalize"):
        engine(pixels)
    (path,) = (tmp_path / "engines").glob("*-pixels-*.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [n.op_type for n in graph.node if n.op_type in ("Cast", "Div", "Sub", "Conv")][:4] == \
        ["Cast", "Div", "Sub", "Div"]
    engine(pixels[:4], normalize=norm)
    assert len(list((tmp_path / "engines").glob("*-pixels-*.onnx"))) == 1  # converted once


def test_call_batch_is_a_power_of_two_that_shrinks_as_images_grow():
    from headstart.engines.onnx_engine import call_batch

    sizes = [16, 32, 64, 96, 128, 160, 224, 299, 384, 512]
    calls = [call_batch(s, s) for s in sizes]
    assert all(c in (1, 2, 4, 8, 16, 32, 64) for c in calls)
    assert calls == sorted(calls, reverse=True) and calls[0] == 64 and calls[-1] == 1
    assert call_batch(128, 128) == 8  # the FMNIST-TL bench size: the measured best (onnx_engine.CALL_PIXELS)


@pytest.mark.slow
def test_converted_model_follows_the_weights(reference, tmp_path):
    """A changed backbone (fine-tuned) converts anew instead of reusing a stale export."""
    model, _, x, want = reference
    import copy

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).mul_(0.5)
    root = tmp_path / "cache"
    a = make_engine(model, EngineChoice("onnxruntime", "fp32", "cpu", "test"), root)(x).numpy()
    b = make_engine(changed, EngineChoice("onnxruntime", "fp32", "cpu", "test"), root)(x).numpy()
    assert len(list((root / "engines").glob("*.onnx"))) == 2
    assert np.abs(a - want).max() < 1e-3 < np.abs(b - want).max()


def test_extraction_through_onnxruntime_caches_features(reference, images, tmp_path):
    model, info, _, want = reference
    choice = EngineChoice("onnxruntime", "fp32", "cpu", "test")
    engine = make_engine(model, choice, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache", make_namespace(ENTRY.name, info.identity(), PRE, choice))
    result = extract(engine, PRE.transform(), images, cache, batch_size=8, workers=0)
    assert result.n_computed == len(images) and engine.n_images == len(images)
    got = cache.get(result.keys)
    assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE


# --------------------------------------------------------------------------- the rule on both CPU kinds
# conftest.fake_cpu fakes the CPU's flags and a missing engine, so every machine runs both kinds' decisions.

RULE = [  # (native bf16, engines not installed) -> the default (engine, precision)
    (True, (), ("openvino", "bf16")),
    (True, ("openvino",), ("onnxruntime", "fp32")),  # a plain pip install on a bf16 CPU: refused before
    (True, ("onnxruntime",), ("openvino", "bf16")),
    (True, ("onnxruntime", "openvino"), ("torch", "bf16")),
    (False, (), ("onnxruntime", "fp32")),
    (False, ("openvino",), ("onnxruntime", "fp32")),
    (False, ("onnxruntime",), ("openvino", "fp32")),
    (False, ("onnxruntime", "openvino"), ("torch", "fp32")),
]


@pytest.mark.parametrize("native, missing, want", RULE)
def test_the_rule_never_refuses_its_own_defaults(fake_cpu, native, missing, want):
    fake_cpu(native, missing)
    choice = choose_engine("cpu")
    assert (choice.engine, choice.precision) == want, choice.reason
    # Any installed engine with the precision left to the rule (or fp32) is a working pair.
    for engine in ["auto", *(e for e in ENGINES if e not in missing)]:
        for precision in ("auto", "fp32"):
            c = choose_engine("cpu", engine, precision)
            assert c.engine not in missing and not (c.engine == "onnxruntime" and c.precision == "bf16")
            assert c.precision == ("bf16" if native and precision == "auto" and c.engine != "onnxruntime"
                                   else "fp32"), c.reason
    assert choose_engine("cpu", precision="bf16").engine in ("openvino", "torch")


@pytest.mark.slow
def test_default_commands_on_a_native_bf16_cpu_without_openvino(fake_cpu, image_folder, tmp_path):
    """Today's rule picked ONNX Runtime there, set bf16 and refused its own pair: every default command failed."""
    from test_cli import run_cli

    fake_cpu(native_bf16=True, missing=("openvino",))
    run = tmp_path / "run"
    code, _, stderr = run_cli("train", image_folder, "--image-size", "32", "--workers", "0", "--out", run)
    assert code == 0, stderr
    engine = json.loads((run / "config.json").read_text())["engine"]
    assert (engine["engine"], engine["precision"]) == ("onnxruntime", "fp32")
    code, stdout, stderr = run_cli("predict", run, image_folder / "cat", "--json")
    assert code == 0 and len(json.loads(stdout)["predictions"]) == 6, stderr
    code, stdout, stderr = run_cli("evaluate", run, image_folder, "--json")
    assert code == 0 and json.loads(stdout)["n_images"] == 12, stderr


@pytest.mark.slow
def test_default_commands_on_a_native_bf16_cpu_with_openvino(image_folder, tmp_path):
    """The rule's bf16 choice runs OpenVINO with the bf16 hint. In its own process (OpenVINO's teardown, see
    above). On a CPU without native bf16 OpenVINO quietly computes in f32, so this is fast on both kinds."""
    run = tmp_path / "run"
    script = fake_cpu_code(native_bf16=True) + (
        "import json, openvino\n"
        "hints = []\n"
        "real = openvino.Core.compile_model\n"
        "def compile_model(self, *args, **kwargs):\n"
        "    config = args[2] if len(args) > 2 else kwargs.get('config')\n"
        "    hints.append(config['INFERENCE_PRECISION_HINT'])\n"
        "    return real(self, *args, **kwargs)\n"
        "openvino.Core.compile_model = compile_model\n"
        "from headstart.cli import main\n"
        "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'hints': hints}))\n"
    )
    commands = [["train", str(image_folder), "--image-size", "32", "--workers", "0", "--out", str(run), "-q"],
                ["predict", str(run), str(image_folder / "cat"), "-q"]]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0], proc.stderr[-3000:]
    assert result["hints"] and set(result["hints"]) == {"bf16"}
    engine = json.loads((run / "config.json").read_text())["engine"]
    assert (engine["engine"], engine["precision"]) == ("openvino", "bf16")
