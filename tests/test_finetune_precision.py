"""Fine-tuning's precision rule (finetune_precision.py), its record in the run, a real bf16-autocast
step, and the memory released around fine-tuning (engine.release, memory.trim)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import headstart
from headstart import memory
from headstart.learn import precision as finetune_precision
from headstart.nets.registry import get_backbone
from headstart.learn.finetune import FineTuneNet, FineTuneSettings, compute_boundary, fit
from headstart.learn.precision import choose_precision as choose
from headstart.nets.weights import load_backbone

ENTRY = get_backbone("mobilenet_v2")


def test_auto_is_fp32_without_native_bf16_and_without_a_measurement(fake_cpu, monkeypatch):
    fake_cpu(native_bf16=False)
    c = choose("auto")
    assert (c.precision, c.reason) == ("fp32", "fp32: no native bf16 on this CPU")
    fast = finetune_precision.Measured(3.0, True, 0.0, "test")
    assert choose("auto", measured=fast).precision == "fp32"  # a measurement cannot make emulation pay
    fake_cpu(native_bf16=True)
    monkeypatch.setattr(finetune_precision, "MEASURED", {})
    c = choose("auto")
    assert c.precision == "fp32" and "no measurement" in c.reason and "avx512_bf16" in c.reason


def test_auto_follows_the_measurement_of_the_cpus_own_bf16_units(fake_cpu):
    """make bench on 2026-12-01: bf16 with channels-last 1.32x on AVX512-BF16 (AMD EPYC) and 1.28x on AMX
    (Intel Xeon), both under 1.5x: fp32, each reason naming its own units' measurement; a recipe that paid
    on AMX would be taken whole (bf16, laid out channels-last)."""
    fake_cpu(native_bf16=True)
    c = choose("auto")
    assert (c.precision, c.channels_last) == ("fp32", False) and "measured 1.32x" in c.reason
    fake_cpu(native_bf16=True, amx=True)
    c = choose("auto")
    assert (c.precision, c.channels_last) == ("fp32", False) and "1.28x" in c.reason and "amx" in c.reason
    paid = choose("auto", measured=finetune_precision.Measured(1.55, True, 0.09, "make bench"))
    assert (paid.precision, paid.channels_last) == ("bf16", True) and "amx" in paid.reason
    assert choose("fp32").precision == "fp32"  # asked for: always honoured


def test_auto_picks_bf16_only_where_the_measurement_pays(fake_cpu):
    fake_cpu(native_bf16=True)
    M = finetune_precision.Measured
    assert choose("auto", measured=M(1.7, False, -0.3, "t")).precision == "bf16"  # within 0.3 points
    fast = choose("auto", measured=M(1.7, False, 0.1, "t"))
    assert (fast.precision, fast.channels_last) == ("bf16", False)
    slow = choose("auto", measured=M(1.2, True, 0.0, "t"))
    assert slow.precision == "fp32" and "1.20x" in slow.reason
    worse = choose("auto", measured=M(1.7, True, -0.31, "t"))  # faster, but not within 0.3 points
    assert worse.precision == "fp32" and "-0.31 points" in worse.reason
    assert choose("auto", measured=M(1.7, True, 0.0, "t"), device="cuda").precision == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_asked_for_is_honoured_on_either_kind(fake_cpu, native):
    fake_cpu(native_bf16=native)
    fast = finetune_precision.Measured(9.0, True, 0.0, "test")
    assert choose("bf16").precision == "bf16" and choose("fp32", measured=fast).precision == "fp32"
    assert ("no native bf16" in choose("bf16").reason) is not native
    assert choose("bf16", channels_last=True).channels_last


@pytest.mark.slow  # 5 s: bf16 emulated on CPUs without it
def test_a_bf16_autocast_step_really_runs_in_bf16_and_trains_fp32_weights(fmnist_tiny, one_torch_thread):
    """One batch at 32 px through the real MobileNetV2 top under bf16 autocast (emulated on a CPU without
    native bf16: slow, but correct), channels-last: the trained blocks compute in bf16 on channels-last
    input, the weights and their update stay fp32 and finite."""
    from headstart.data.folders import scan_folder

    torch.manual_seed(0)
    model, _ = load_backbone(ENTRY)
    net = FineTuneNet(ENTRY, model, nn.Linear(ENTRY.feature_dim, 10), 2)
    samples = scan_folder(fmnist_tiny / "train").samples[:16]
    prep = ENTRY.preprocessing.scaled(32)
    b = compute_boundary(net, [s.path for s in samples], [s.label for s in samples], prep.transform(), 16, 0, "t")
    conv = next(m for m in net.top.modules() if isinstance(m, nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda m, inp, out: seen.append(
        (out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last), net.training)))
    before = conv.weight.detach().clone()
    r = fit(net, FineTuneSettings(epochs=1, batch_size=16), seed=0, train_data=b, val=b,
            precision=choose("bf16", channels_last=True))
    trained = [(dtype, cl) for dtype, cl, training in seen if training]
    assert trained == [(torch.bfloat16, True)]  # the one training batch
    assert all(dtype == torch.float32 for dtype, _, training in seen if not training)  # validation in fp32
    assert conv.weight.dtype == torch.float32 and torch.isfinite(conv.weight).all()
    assert not torch.equal(conv.weight, before)
    assert conv.weight.is_contiguous()  # back to the layout export and the bundle expect
    assert torch.isfinite(torch.tensor(r.history["train_loss"])).all()


def test_trim_and_status():
    assert memory.trim() is True  # glibc here; elsewhere it returns False instead of failing
    s = memory.status()
    assert 0 < s["RssAnon"] <= s["VmRSS"] <= s["VmHWM"]


@pytest.mark.slow  # an ONNX export and two compilations
def test_release_frees_the_session_and_the_engine_still_runs(one_torch_thread, tmp_path):
    from headstart.engines.choice import EngineChoice
    from headstart.engines.rule import make_engine

    model, _ = load_backbone(ENTRY)
    engine = make_engine(model, EngineChoice("onnxruntime", "fp32", "cpu", "test"), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    first = engine(x)
    assert len(engine._runners) == 1
    engine.release()
    assert engine._runners == {}
    torch.testing.assert_close(engine(x), first)  # compiled again from the cached export


@pytest.mark.slow
def test_a_fine_tune_run_records_its_precision_and_releases_both_sessions(fmnist_tiny, tmp_path, monkeypatch,
                                                                           fake_cpu):
    """The extraction session and the frozen part's session are freed before the epochs (issue 15:
    together 0.8 GB of ONNX Runtime arena held through fine-tuning); the precision's choice and reason
    land in config.json and metrics.json."""
    from headstart.engines.onnx_engine import _ConvertedEngine

    fake_cpu(native_bf16=True)  # still fp32: the recorded measurement (1.32x) is under the 1.5x that pays
    released = []
    real = _ConvertedEngine.release
    monkeypatch.setattr(_ConvertedEngine, "release",
                        lambda self: released.append((id(self), len(self._runners))) or real(self))
    # Its own empty cache: with features already cached (an earlier test's), extraction never opens a session.
    run = headstart.train(fmnist_tiny, strategy="fine-tune", out=tmp_path / "ft", image_size=32, workers=0, seed=0,
                          engine="onnxruntime", precision="fp32", finetune=dict(unfreeze=2, epochs=1),
                          cache_dir=tmp_path / "cache")
    assert len({engine for engine, _ in released}) == 2 and all(n == 1 for _, n in released)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    want = {"precision": "fp32", "channels_last": False,
            "reason": "fp32: bf16 with channels-last fine-tuning measured 1.32x fp32 on a CPU with avx512_bf16, "
                      "under the 1.5x that pays"}
    assert config["finetune_precision"] == run.metrics["fine_tune"]["precision"] == want
    assert config["finetune"]["ft_precision"] == "auto"
