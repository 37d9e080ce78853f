"""The `scaling` section of benchmarks/run.py: the same cores as 1 process x 2 threads and as 2 processes
x 1 thread (torchrun, gloo), for feature extraction (`headstart extract`) and one fine-tuning epoch.

Scaling efficiency = throughput with 2 processes / throughput with 1 process, both on the same 2
cores: 1.0 means splitting the work between ranks costs nothing (no barrier wait, no all-reduce),
which is what N nodes of the same kind would add up to. The load average is recorded beside each
timing, since other work on the machine changes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _run(cmd: list, env: dict) -> tuple[float, str, float]:
    """(wall seconds, stdout, load average at the start) of `cmd`."""
    load, t0 = _load(), time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout, load


def _launchers(headstart_module: list[str]) -> dict[str, tuple[list[str], dict]]:
    base = {**os.environ, "HEADSTART_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return {
        "1x2": ([sys.executable, *headstart_module], {**base, "OMP_NUM_THREADS": "2"}),
        "2x1": ([torchrun, "--standalone", "--nproc_per_node", "2", *headstart_module], {**base, "OMP_NUM_THREADS": "1"}),
    }


def scaling(data: Path, work: Path, size: int, unfreeze: int) -> dict:
    launchers = _launchers(["-m", "headstart"])
    out: dict = {"image_size": size, "unfreeze": unfreeze, "extraction": {}, "finetune_epoch": {}}
    for name, (cmd, env) in launchers.items():
        cache = work / f"scaling-cache-{name}"
        wall, stdout, load = _run([*cmd, "-q", "extract", data, "--image-size", size, "--cache-dir", cache,
                                   "--workers", "0", "--json"], env)
        r = json.loads(stdout)
        out["extraction"][name] = {"images": r["computed"], "seconds": r["seconds"], "wall_seconds": round(wall, 1),
                                   "images_per_second": r["images_per_second"], "ranks": r["ranks"], "load": load}
    for name, (cmd, env) in launchers.items():
        cache, run = work / f"scaling-cache-{name}", work / f"scaling-ft-{name}"
        wall, stdout, load = _run([*cmd, "-q", "train", data, "--strategy", "fine-tune", "--epochs", "1",
                                   "--unfreeze", unfreeze, "--image-size", size, "--cache-dir", cache, "--out", run,
                                   "--workers", "0", "--json"], env)
        m = json.loads(stdout)
        ft = m["fine_tune"]
        epoch = ft["history"]["seconds"][0]
        out["finetune_epoch"][name] = {"images": m["n_train"], "epoch_seconds": epoch,
                                       "steps": -(-m["n_train"] // ft["settings"]["batch_size"]),
                                       "boundary_seconds": ft["boundary_seconds"],
                                       "images_per_second": round(m["n_train"] / epoch, 1),
                                       "memory_per_rank": ft.get("memory_per_rank"), "wall_seconds": round(wall, 1),
                                       "load": load}
    for part, key in (("extraction", "images_per_second"), ("finetune_epoch", "images_per_second")):
        one, two = out[part]["1x2"][key], out[part]["2x1"][key]
        out[part]["efficiency"] = round(two / one, 3) if one and two else None
    e1, e2 = out["finetune_epoch"]["1x2"], out["finetune_epoch"]["2x1"]
    # What a step costs beyond its share of the compute: the DDP all-reduce and the split of the batch.
    out["finetune_epoch"]["step_overhead_ms"] = round(1000 * (e2["epoch_seconds"] - e1["epoch_seconds"]) / e2["steps"], 1)
    ranks = out["extraction"]["2x1"]["ranks"]
    # The barrier: how long the faster rank waited for the slower one.
    out["extraction"]["barrier_wait_seconds"] = round(max(r["seconds"] for r in ranks) - min(r["seconds"] for r in ranks), 2)
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    return out


def markdown(s: dict) -> list[str]:
    x, f = s["extraction"], s["finetune_epoch"]
    lines = ["", f"Scaling out on this machine's 2 cores ({s['date']}, {s['image_size']} px, MobileNetV2): "
             "1 process x 2 threads against 2 torchrun processes x 1 thread (gloo).", "",
             "| | 1 x 2 images/s | 2 x 1 images/s | efficiency | load average |", "|---|---|---|---|---|",
             f"| extraction ({x['1x2']['images']} images) | {x['1x2']['images_per_second']} | "
             f"{x['2x1']['images_per_second']} | {x['efficiency']} | {x['1x2']['load']} / {x['2x1']['load']} |",
             f"| fine-tuning epoch ({f['1x2']['images']} images, top {s['unfreeze']} blocks) | "
             f"{f['1x2']['images_per_second']} | {f['2x1']['images_per_second']} | {f['efficiency']} | "
             f"{f['1x2']['load']} / {f['2x1']['load']} |", "",
             f"Per rank in extraction: " + ", ".join(f"rank {r['rank']} {r['computed']} images in {r['seconds']} s"
                                                    for r in x["2x1"]["ranks"])
             + f" (barrier wait {x['barrier_wait_seconds']} s); fine-tuning: "
             + (f"{f['step_overhead_ms']} ms more per step with 2 processes ({f['2x1']['steps']} steps)"
                if f["step_overhead_ms"] > 0 else "no cost per step seen (the 2-process epoch was the faster)") + "."]
    return lines
