"""The benchmark suite's helpers: the peak each engine is reported against, results per CPU kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import kinds  # noqa: E402
from benchmarks.peak import Peaks, flops_per_cycle, theoretical  # noqa: E402

AVX2 = frozenset({"avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16", "avx512_vnni"}


def test_cpu_kind_from_flags():
    assert kinds.cpu_kind(AVX2) == "avx2"
    assert kinds.cpu_kind(AVX512_BF16) == "avx512_bf16"
    assert kinds.cpu_kind(AVX2 | {"avx512f"}) == "avx512"
    assert kinds.cpu_kind(AVX512_BF16 | {"amx_bf16", "amx_int8", "amx_tile"}) == "avx512_amx"
    # Files written before the kind was recorded: from their flags.
    assert kinds.kind_of({"avx512": False, "native_bf16": False}) == "avx2"
    assert kinds.kind_of({"avx512": True, "native_bf16": True}) == "avx512_bf16"


def test_theoretical_flops_per_cycle():
    assert flops_per_cycle("fp32", AVX2) == 32  # 8 lanes x FMA (2) x 2 units
    assert flops_per_cycle("fp32", AVX512_BF16) == 64
    assert flops_per_cycle("bf16", AVX512_BF16) == 128
    assert flops_per_cycle("bf16", AVX2) == 32  # emulated: never faster than fp32
    assert flops_per_cycle("int8", AVX2) == 128
    assert theoretical("fp32") >= 0


def test_engine_rows_are_set_against_the_best_gemm_measured_before_and_after_them(monkeypatch):
    """`make bench` times the GEMMs before and after its engine rows and sets each row against the best of all
    of them, or the theoretical figure when that is higher. The GEMM timings are scripted here: what is checked
    is that bookkeeping, never a race between an engine's timing and a GEMM's (on the AVX-512 bf16 kind an
    engine timed at 415 GFLOP/s in a quiet moment beat GEMMs timed in a busy one, and the test failed)."""
    from benchmarks import peak, run

    rates = iter([100.0, 90.0, 130.0, 120.0])  # GFLOP/s of GEMMs a, b; then a, b again after the engines
    monkeypatch.setattr(peak, "gemms", lambda precision, smoke=False: {"a": (None, 1.0), "b": (None, 1.0)})
    monkeypatch.setattr(peak, "_rate", lambda fn, flops, seconds: next(rates))
    monkeypatch.setattr(peak, "theoretical", lambda precision: 110.0)
    peaks = Peaks().update(["fp32"])
    assert (peaks.measured["fp32"], peaks.peak("fp32")) == (100.0, 110.0)  # the theoretical figure was higher
    rows = run.against_peak([{"precision": "fp32", "gflops": 125.0}, {"precision": "fp32", "gflops": 65.0}], peaks)
    assert (peaks.measured["fp32"], peaks.best_of["fp32"], peaks.peak("fp32")) == (130.0, "a", 130.0)
    assert [r["fraction_of_peak"] for r in rows] == [0.962, 0.5]
    assert peaks.to_dict()["fp32"] == {"gflops": 130.0, "measured": 130.0, "best_of": "a",
                                       "theoretical_nominal": 110.0}


def test_an_engine_above_the_peak_is_reported_as_measured_and_said_so(monkeypatch):
    """A row faster than every GEMM of its run is neither clipped nor a failure: the table says so."""
    from benchmarks import peak, run

    monkeypatch.setattr(peak, "theoretical", lambda precision: 0.0)  # the clock unknown: the GEMMs' best alone
    peaks = Peaks(measured={"fp32": 100.0}, best_of={"fp32": "numpy 2048"})
    peaks.update = lambda precisions=(): peaks  # no GEMM timed again here
    row = {"model": "resnet50", "size": 96, "engine": "openvino", "precision": "fp32", "images_per_second": 50.0,
           "vs_baseline": 1.5, "gflops": 104.0}
    [row] = run.against_peak([row], peaks)
    assert row["fraction_of_peak"] == 1.04
    report = run.markdown({"date": "2026-12-07", "repeats": 3, "extraction": [row], "machine": {
        "cpu": "test", "cores": 2, "avx512": True, "native_bf16": True}})
    assert "| 104 | 104% (above the GEMMs' best in this run) |" in report
    row["gflops"], row["fraction_of_peak"] = 96.0, 0.96
    report = run.markdown({"date": "2026-12-07", "repeats": 3, "extraction": [row], "machine": {
        "cpu": "test", "cores": 2, "avx512": True, "native_bf16": True}})
    assert "| 96 | 96% |" in report


def test_finetune_bf16_is_recorded_as_not_measured_without_native_bf16(fake_cpu, tmp_path, monkeypatch):
    from benchmarks import run as bench

    fake_cpu(native_bf16=False)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("no run may be timed without native bf16"))
    f = bench.finetune_bf16(tmp_path / "data", tmp_path, 2, smoke=False)
    assert f == {"measured": False, "reason": "not measured: no native bf16"}
    assert "not measured: no native bf16" in "\n".join(bench.finetune_bf16_markdown(f))


def test_finetune_bf16_times_fp32_against_bf16_on_a_native_bf16_cpu(fake_cpu, tmp_path, monkeypatch):
    """The runs are faked (this CPU may lack native bf16); what is checked is the recording: each run's
    flags, the ratio of median epochs, the accuracy change and whether it pays (1.5x, 0.3 points)."""
    from benchmarks import run as bench

    fake_cpu(native_bf16=True)
    epochs = {"fp32": [12.0, 10.0, 10.5], "bf16": [7.0, 6.0, 6.5], "bf16_channels_last": [9.0, 8.0, 8.5]}
    accuracy = {"fp32": 0.9000, "bf16": 0.8990, "bf16_channels_last": 0.8950}
    seen = []

    def fake_run(cmd, **kw):
        cmd = [str(c) for c in cmd]
        name = cmd[cmd.index("--ft-precision") + 1] + ("_channels_last" if "--channels-last" in cmd else "")
        seen.append((name, cmd[cmd.index("--epochs") + 1]))
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({"fine_tune": {"history": {"seconds": epochs[name]}},
                                                      "test": {"accuracy": accuracy[name]}}))
        return 1.0, None

    monkeypatch.setattr(bench, "run", fake_run)
    f = bench.finetune_bf16(tmp_path / "data", tmp_path, 3, smoke=False)
    assert seen == [("fp32", "3"), ("bf16", "3"), ("bf16_channels_last", "3")]
    assert f["measured"] and f["fp32"]["epoch_seconds"] == 10.5
    assert (f["bf16"]["speedup"], f["bf16"]["accuracy_change_points"], f["bf16"]["pays"]) == (1.62, -0.1, True)
    assert (f["bf16_channels_last"]["speedup"], f["bf16_channels_last"]["pays"]) == (1.24, False)
    table = "\n".join(bench.finetune_bf16_markdown(f))
    assert "| bf16 | 6.5 | 1.62 | 0.8990 | -0.10 |" in table and "| bf16, channels-last | 8.5 | 1.24 |" in table


def test_the_inspect_scale_section_is_listed_and_its_table_written():
    """The section's figures (scripted here: the section itself takes minutes at 200,000) as make bench writes
    them: each step's seconds at n/4 and n, the ratio, the peak RSS and what the step found."""
    from benchmarks import inspect_scale, run

    assert "inspect_scale" in run.SECTIONS and run.SECTION_KEYS["inspect_scale"] == ["inspect_scale"]
    found = {"labels": {"recall": 0.95, "precision": 0.9}, "strays": {"planted_listed": 1.0},
             "near_copies": {"planted_found": 1.0, "planted": 1000, "wrong_pairs": 2}}
    rows = [{"step": step, "images": n, "make_seconds": 1.0, "seconds": 0.0 if step == "data" else n / 10_000,
             "peak_rss_mib": n / 100, **found.get(step, {})} for n in (50_000, 200_000) for step in inspect_scale.STEPS]
    s = {"images": 200_000, "quarter": 50_000, "classes": 10, "width": 1280, "smoke": False, "rows": rows,
         "time_ratio_4x_images": {"components": 4.0, "labels": 4.0, "strays": 4.0, "near_copies": 4.0},
         "exact_up_to": 60_000, "load_average": 1.0}
    table = "\n".join(inspect_scale.markdown(s))
    assert "| s at 50,000 | s at 200,000 | time ratio (4x images) |" in table
    assert "| near copies (4 searches + pixel check) | 5.0 | 20.0 | 4.0 | 500 | 2000 | 100% of 1000 planted copies, " \
           "2 other pairs |" in table
    assert "recall 0.95, precision 0.90" in table and "each step in a fresh process" in table
