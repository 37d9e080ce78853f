"""Results per CPU kind, side by side: benchmarks/results-<kind>.{json,md}.

headstart's rule picks its engine and precision from the CPU's flags (engines/rule.native_bf16), so
numbers from one kind say little about the other: `make bench` files its results under the
kind it ran on, and the docs' "Benchmarks per CPU kind" page includes every kind's file.
"""

from __future__ import annotations

from pathlib import Path

from headstart.cpu import cpu_flags

# The kinds the project is run on, in the docs' order; another CPU gets its own file and section.
from headstart.engines.rule import bf16_units
KINDS = {"avx2": "AVX2, no AVX-512, no native bf16",
         "avx512_bf16": "AVX-512 with native bf16 (AVX512-BF16, no AMX)",
         "avx512_amx": "AVX-512 with native bf16 and AMX tiles (bf16 and int8 matrix units)"}


def cpu_kind(flags: frozenset[str] | None = None) -> str:
    """avx512_amx or avx512_bf16 where bf16 is native (the rule picks bf16 on both), else avx512, avx2 or
    baseline. AMX gets its own results: its tile units multiply bf16 and int8 matrices several times faster
    than AVX512-BF16's vector instructions, so bf16 fine-tuning and the peaks differ between the two."""
    flags = cpu_flags() if flags is None else flags
    units = bf16_units(flags)
    if units is not None:
        return "avx512_amx" if units == "amx" else "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def kind_of(machine: dict) -> str:
    """The kind a results file came from (files written before kinds were recorded have the flags)."""
    if "cpu_kind" in machine:
        return machine["cpu_kind"]
    return "avx512_bf16" if machine.get("native_bf16") else "avx512" if machine.get("avx512") else "avx2"


def results_paths(out_dir: Path, kind: str) -> tuple[Path, Path]:
    return out_dir / f"results-{kind}.json", out_dir / f"results-{kind}.md"
