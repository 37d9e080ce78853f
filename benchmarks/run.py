"""headstart's benchmark suite: `make bench` (full) and `make bench-smoke` (checks it runs).

Everything is measured in this one process or in fresh subprocesses it starts, on this
machine, in the same session, and reported as ratios against the plain baselines in
benchmarks/baselines/ (written as the tutorials write them). Each timing is the median of
`--repeats` runs taken in alternating order. Results go to benchmarks/results-<kind>.json and
a Markdown table in benchmarks/results-<kind>.md, one pair per CPU kind (kinds.py: avx2,
avx512_bf16), which the docs' "Benchmarks per CPU kind" page (docs/guides/benchmarks.md) includes side by side.

    python benchmarks/run.py                 # the full suite (under 60 min on 2 cores)
    python benchmarks/run.py --smoke         # a few images, tiny sizes, results in a temp folder
    python benchmarks/run.py --only serve    # some sections: their results replace theirs in this kind's file
    python benchmarks/run.py --only scaling  # 1 process x 2 threads against 2 torchrun processes x 1 thread
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import explaining, inspect_scale, kinds, scale, serving  # noqa: E402
from benchmarks import scaling as scale_out  # noqa: E402
from benchmarks.peak import Peaks  # noqa: E402
from benchmarks.baselines import plain  # noqa: E402
from headstart.nets.registry import get_backbone  # noqa: E402
from headstart.engines.choice import EngineChoice  # noqa: E402
from headstart.engines.onnx_engine import call_batch
from headstart.engines.rule import installed, make_engine, native_bf16
from headstart.learn.precision import PAYS  # noqa: E402
from headstart.nets.weights import load_backbone  # noqa: E402

HEADSTART = [Path(sys.executable).with_name("headstart")]
SECTIONS = ["peak", "extraction", "decoding", "pipeline", "int8", "end_to_end", "finetune_epoch", "finetune_bf16",
            "memory", "scale", "inspect_scale", "serve", "scaling", "explain"]
SECTION_KEYS = {"peak": ["peak_gflops"], "extraction": ["extraction", "peak_gflops"], "decoding": ["decoding"],
                "pipeline": ["pipeline"], "int8": ["int8"],
                "end_to_end": ["end_to_end", "e2e_repeats"], "finetune_epoch": ["finetune_epoch"],
                "finetune_bf16": ["finetune_bf16"],
                "memory": ["memory"], "scale": ["scale"], "inspect_scale": ["inspect_scale"], "serve": ["serve"],
                "scaling": ["scaling"],
                "explain": ["explain"]}
ENGINES = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median_alternating(fns: dict, repeats: int) -> dict:
    """Run each callable `repeats` times, forward order on even rounds and reversed on odd ones."""
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            samples[k].append(fns[k]())
    return {k: statistics.median(v) for k, v in samples.items()}


# --- the machine -------------------------------------------------------------------------------

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    import onnxruntime

    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    if installed("openvino"):
        import openvino

        versions["openvino"] = openvino.__version__
    flags = open("/proc/cpuinfo").read()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512": " avx512f" in flags, "native_bf16": native_bf16(), "cpu_kind": kinds.cpu_kind(),
            "versions": versions}


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.deepcopy(model).eval()(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())  # multiply-adds count twice: FLOPs = 2 x MACs


# --- extraction throughput ---------------------------------------------------------------------

def engine_throughput(model: torch.nn.Module, size: int, engine: str, precision: str, seconds: float,
                      cache_root: Path, streams: int | None = 1) -> float:
    """Images/s of the engine alone on random batches (calls_per_second; `streams` None: the streams
    extraction would run, default_streams)."""
    from headstart.data.decoding import default_streams

    eng = make_engine(copy.deepcopy(model), EngineChoice(engine, precision, "cpu", "bench"), cache_root)
    x = torch.randn(plain.BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    streams = default_streams("cpu", eng) if streams is None else streams
    eng(x, threads=max(1, torch.get_num_threads() // streams)) if streams > 1 else eng(x)  # conversion, warm-up
    return calls_per_second(eng, x, seconds, streams)


def calls_per_second(eng, x: torch.Tensor, seconds: float, streams: int = 1, calls: int = 2) -> float:
    """Images/s of `eng` (warmed up) on the batch `x`: one caller on all of torch's threads, or `streams`
    callers side by side on their share each; each caller makes at least `calls` calls and goes on for
    `seconds`."""
    import threading

    threads = None if streams == 1 else max(1, torch.get_num_threads() // streams)
    counts = [0] * streams

    def call(i: int) -> None:
        while counts[i] < calls or time.perf_counter() - t0 < seconds:
            eng(x, threads=threads) if threads else eng(x)
            counts[i] += 1

    t0 = time.perf_counter()
    callers = [threading.Thread(target=call, args=(i,)) for i in range(streams)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    return sum(counts) * len(x) / (time.perf_counter() - t0)


def extraction(models, sizes, seconds: float, repeats: int, peaks: Peaks, work: Path) -> list[dict]:
    rows = []
    for name in models:
        entry = get_backbone(name)
        ours, _ = load_backbone(entry, "none", seed=0)  # random weights: speed does not depend on them
        base = plain.feature_model(name, weights=None)
        for size in sizes:
            flops = flops_per_image(base, size)
            fns = {("baseline", "fp32"): lambda: plain.network_throughput(base, size, seconds)}
            for engine, precision in ENGINES:
                # Emulated bf16 is not worth timing (a ResNet-50 batch at 224 px takes minutes) and the
                # rule never picks it; it is measured where the CPU has native bf16.
                if installed(engine) and (precision == "fp32" or native_bf16()):
                    fns[(engine, precision)] = (lambda e=engine, p=precision:
                                                engine_throughput(ours, size, e, p, seconds, work / "engines"))
            log(f"extraction {name} {size}px: {len(fns)} configurations x {repeats}")
            rates = median_alternating(fns, repeats)
            base_rate = rates[("baseline", "fp32")]
            for (engine, precision), rate in rates.items():
                gflops = rate * flops / 1e9
                rows.append({"model": name, "size": size, "engine": engine, "precision": precision,
                             "images_per_second": round(rate, 1), "vs_baseline": round(rate / base_rate, 2),
                             "gflops": round(gflops, 1), "native": precision == "fp32" or native_bf16()})
    return against_peak(rows, peaks)


def against_peak(rows: list[dict], peaks: Peaks) -> list[dict]:
    """Each row's GFLOP/s as a fraction of the peak of its own precision (measured again first, the best
    kept: the machine may have got quieter since the first measurement).

    The fraction is reported as measured, never clipped: on two shared cores an engine timed in a quiet
    moment can beat GEMMs timed in a busy one (415 GFLOP/s against the peak of one short run on the
    AVX-512 bf16 kind), and the report then says so (`markdown`) instead of a test failing on the race."""
    peaks.update(sorted({r["precision"] for r in rows}))
    for r in rows:
        r["fraction_of_peak"] = round(r["gflops"] / peaks.peak(r["precision"]), 3)
    return rows


# --- decoding ------------------------------------------------------------------------------------

def decoding(fmnist_dir: Path, sizes, seconds: float, work: Path) -> list[dict]:
    """Decode + resize + normalise images/s in one process, for PNG (Fashion-MNIST) and JPEG photos."""
    from PIL import Image

    from headstart.data.images import load_image

    pngs = sorted(fmnist_dir.rglob("*.png"))[:200]
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(8):  # photo-like 640x480: gradients, shapes and noise, quality 90
        h, w = 480, 640
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 1) % 256), (yy * 2 + i * 30) % 256, ((xx + yy) // 3) % 256], -1).astype(float)
        img += rng.normal(0, 12, img.shape)
        p = work / f"photo{i}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        jpegs.append(p)
    entry = get_backbone("mobilenet_v2")
    rows = []
    for size in sizes:
        prep = entry.preprocessing.scaled(size)
        t = prep.transform()
        for kind, files, draft in (("png 28x28", pngs, False), ("jpeg 640x480", jpegs, False),
                                   ("jpeg 640x480", jpegs, True)):
            side = prep.resize_size if draft else None
            k, t0 = 0, time.perf_counter()
            while k < len(files) or time.perf_counter() - t0 < seconds:
                t(load_image(files[k % len(files)], side))
                k += 1
            rows.append({"format": kind, "size": size, "draft": draft,
                         "images_per_second": round(k / (time.perf_counter() - t0), 1)})
    return rows


# --- the extraction pipeline against the engine alone (issue 15 item 2) ---------------------------

def _auto_size_setup(data: Path, strategy: str = "auto", size: int | None = None):
    """What `headstart train DATA --strategy STRATEGY` extracts with by default: the training images, the
    automatic image size for that strategy (or `size`), the rule's engine, batch and workers."""
    from headstart.data.folders import load_data
    from headstart.engines.rule import choose_engine
    from headstart.settings import Runtime
    from headstart.runs.train import auto_image_size

    entry = get_backbone("mobilenet_v2")
    images, _ = load_data(data)
    if size is None:
        size, _ = auto_image_size(images, entry.input_size, strategy)
    prep = entry.preprocessing.scaled(size)
    model, info = load_backbone(entry, None)
    return entry, prep, model, info, choose_engine("cpu"), [s.path for s in images.samples], Runtime().batch_size


def pipeline(data: Path, n_images: int, repeats: int, work: Path, size: int | None = None) -> dict:
    """Whole extraction (decoding, normalising, engine; `features.extract` as `train` runs it) against the
    engine alone on random tensors of the same size and batch, alternating in this process; and the other
    ways extraction can run: one stream in the main process, one decoding worker beside the engine.
    The breakdown is CPU time per image of each stage on one thread: it bounds the share (see `bound`)."""
    from headstart.data.decoding import default_streams, default_workers, iter_batches
    from headstart.engines.features import FeatureCache, extract, make_namespace
    from headstart.data.images import load_image

    entry, prep, model, info, choice, paths, batch = _auto_size_setup(data, "auto", size)
    paths = paths[:n_images]
    engine = make_engine(model, choice, work / "engines")
    transform = prep.transform()
    x = torch.randn(batch, 3, prep.crop_size, prep.crop_size)
    workers = default_workers(choice.device)
    streams = 1 if workers else default_streams(choice.device, engine)
    per_stream = max(1, torch.get_num_threads() // streams)
    engine(x)
    engine(x, threads=per_stream)
    pixels = torch.zeros(batch, 3, prep.crop_size, prep.crop_size, dtype=torch.uint8)
    engine(pixels, normalize=prep.normalizer, **({"threads": per_stream} if streams > 1 else {}))  # pixels.py

    def alone():
        return calls_per_second(engine, x, 0.0, 1, -(-n_images // batch))

    def alone_streams():  # the engine alone as the streams run it: `streams` threads, per_stream threads each
        return calls_per_second(engine, x, 0.0, streams, max(1, n_images // batch // streams))

    def whole(**kw):  # no arguments: the default, as `train` runs it
        cache = FeatureCache(None, make_namespace(entry.name, info.identity(), prep, choice))
        result = extract(engine, transform, paths, cache, batch_size=batch, **kw)
        return result.n_computed / result.seconds

    rates = median_alternating({"engine_alone": alone, "engine_streams": alone_streams, "whole_extraction": whole,
                                "one_stream": lambda: whole(workers=0, streams=1),
                                "other": lambda: whole(workers=1)}, repeats)

    def cpu_us(fn, n):  # the better of two runs: the first may read files from disk
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return round(best / n * 1e6, 1)

    sample = paths[:512]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # As features._Images decodes: grayscale files stay one channel until normalisation.
        decoded = [load_image(p, gray=True) for p in sample]
        stages = {"read + decode file": cpu_us(lambda: [load_image(p, gray=True) for p in sample], len(sample)),
                  "resize + crop (worker)": cpu_us(lambda: [transform.decode(im) for im in decoded], len(sample))}
        # Batches as extraction makes them in this process (gray files stay one channel, normalised per batch):
        # the stages above, normalising, and what is left, batching (the transfer from a worker is shared
        # memory, not measured here). Until 2026-12-01 this ran the per-image part alone, in RGB, which
        # counted an RGB conversion and three-channel resizing that extraction does not do as batching.
        # A converted engine normalises the uint8 batch in its own graph (pixels.py, since 2026-12-01): its
        # cost is in the engine's, and the batches stay uint8 here.
        in_engine = choice.engine != "torch"
        u8 = torch.stack([transform.decode(im) for im in decoded[:batch]])
        normalise = 0.0 if in_engine else cpu_us(lambda: [transform.normalize(u8) for _ in range(8)], 8 * batch)
        loader = cpu_us(lambda: [None for _ in iter_batches(sample, transform, batch, 0, normalize=not in_engine)],
                        len(sample))
        stages["collate"] = round(max(0.0, loader - sum(stages.values()) - normalise), 1)
        if not in_engine:
            stages["normalise (main)"] = normalise
    finally:
        torch.set_num_threads(saved)
    engine_cpu = round(torch.get_num_threads() / rates["engine_alone"] * 1e6, 1)  # its threads, all busy
    decode_us = sum(stages.values())
    # The bound is the cores' time: per image, the engine's CPU time as extraction runs it (all its threads busy;
    # streams run 1-thread sessions, which cost less CPU per image than one 2-thread session) plus the stages'.
    # No arrangement of the stages beats it; one that runs them between batches, on idle cores, does worse.
    ran_as = streams * per_stream / rates["engine_streams"] if streams > 1 else torch.get_num_threads() / rates[
        "engine_alone"]
    cores = os.cpu_count() or 1
    bound = min(1.0, cores / (ran_as * 1e6 + decode_us) * 1e6 / rates["engine_alone"])
    return {"image_size": prep.crop_size, "batch": batch, "workers": workers, "streams": streams,
            "decoding": "beside the streams" if streams > 1 else "between batches",
            "normalising": "in the engine" if in_engine else "decoding thread",
            "images_per_call": call_batch(prep.crop_size, prep.crop_size),
            "threads_per_stream": per_stream, "images": len(paths),
            "engine": f"{choice.engine} {choice.precision}", "cores": os.cpu_count(),
            "engine_alone_images_per_second": round(rates["engine_alone"], 1),
            "engine_streams_images_per_second": round(rates["engine_streams"], 1),
            "whole_extraction_images_per_second": round(rates["whole_extraction"], 1),
            "share": round(rates["whole_extraction"] / rates["engine_alone"], 3),
            "one_stream_images_per_second": round(rates["one_stream"], 1),
            "share_one_stream": round(rates["one_stream"] / rates["engine_alone"], 3),
            "other_workers": 1, "other_images_per_second": round(rates["other"], 1),
            "share_other": round(rates["other"] / rates["engine_alone"], 3),
            "cpu_us_per_image": {"engine (all its threads)": engine_cpu, **stages},
            "bound_on_cores": round(bound, 3),
            "load_average": round(os.getloadavg()[0], 2)}


# --- int8 against fp32 (issue 15 item 8) -----------------------------------------------------------

def int8(data: Path, repeats: int, seconds: float, work: Path, size: int | None = None) -> dict:
    """int8 (quantize.py) against fp32 on the rule's engine at the automatic size: engine speed alternating in
    this process, and FMNIST-TL test accuracy of feature extraction + linear head with each."""
    from headstart.engines.features import image_key
    from headstart.engines.quantize import calibration_from, options

    entry, prep, model, info, choice, paths, batch = _auto_size_setup(data, "feature-extraction", size)
    source = calibration_from([p for p in paths if "/train/" in p], prep.transform(), image_key)
    engines = {p: make_engine(copy.deepcopy(model), EngineChoice(choice.engine, p, "cpu", "bench"),
                              work / "engines", source if p == "int8" else None) for p in ("fp32", "int8")}
    from headstart.data.decoding import default_streams

    x = torch.randn(batch, 3, prep.crop_size, prep.crop_size)
    streams = default_streams("cpu", engines["fp32"])
    threads = None if streams == 1 else max(1, torch.get_num_threads() // streams)
    t0 = time.perf_counter()
    for e in engines.values():
        e(x, threads=threads) if threads else e(x)
    conversion = time.perf_counter() - t0
    # As extraction runs the engine (in streams where it can; until 2026-12-01 one caller on every thread,
    # which favoured int8 once engine calls took call_batch images: 1,370-1,476 images/s in 4-image calls
    # against 1,798-1,804 in 16-image calls, where two streams ran 1,855-1,894 and 1,892-1,950).
    rates = median_alternating({p: (lambda e=e: calls_per_second(e, x, seconds, streams))
                                for p, e in engines.items()}, repeats)
    accuracy = {}
    for precision in ("fp32", "int8"):
        out, cache = work / f"int8-run-{precision}", work / f"int8-cache-{precision}"
        run([*HEADSTART, "-q", "train", data, "--strategy", "feature-extraction", "--precision", precision,
             "--image-size", prep.crop_size,
             "--out", out, "--cache-dir", cache])
        _, proc = run([*HEADSTART, "-q", "evaluate", out, data / "test", "--cache-dir", cache, "--json"])
        accuracy[precision] = json.loads(proc.stdout)["accuracy"]
    return {"engine": choice.engine, "image_size": prep.crop_size, "batch": batch, "streams": streams,
            "quantisation": options(),
            "calibration_images": len(source.images), "conversion_seconds": round(conversion, 1),
            "fp32_images_per_second": round(rates["fp32"], 1), "int8_images_per_second": round(rates["int8"], 1),
            "speedup": round(rates["int8"] / rates["fp32"], 2), "fp32_accuracy": accuracy["fp32"],
            "int8_accuracy": accuracy["int8"],
            "accuracy_change_points": round(100 * (accuracy["int8"] - accuracy["fp32"]), 2),
            "load_average": round(os.getloadavg()[0], 2)}


# --- end to end ----------------------------------------------------------------------------------

def run(cmd: list, **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc


def end_to_end(data: Path, repeats: int, work: Path, probe_size: int) -> dict:
    """`headstart train` + `headstart evaluate` (feature extraction, defaults, empty cache) against
    the baseline linear probe, each in a fresh process."""
    counter = iter(range(1000))

    def ours():
        i = next(counter)
        out, cache = work / f"e2e-run{i}", work / f"e2e-cache{i}"
        t1, _ = run([*HEADSTART, "-q", "train", data, "--strategy", "feature-extraction", "--out", out,
                     "--cache-dir", cache])
        t2, proc = run([*HEADSTART, "-q", "evaluate", out, data / "test", "--cache-dir", cache, "--json"])
        acc = json.loads(proc.stdout)["accuracy"]
        samples["headstart"].append({"seconds": t1 + t2, "train_seconds": t1, "evaluate_seconds": t2,
                                     "accuracy": acc, **_run_breakdown(out)})
        return t1 + t2

    def probe():
        seconds, proc = run([sys.executable, "-m", "benchmarks.baselines.probe", data / "train", data / "test",
                             "--size", probe_size], cwd=ROOT)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        samples["baseline"].append({**result, "process_seconds": seconds})
        return seconds

    samples: dict[str, list] = {"headstart": [], "baseline": []}
    median_alternating({"headstart": ours, "baseline": probe}, repeats)
    out = {}
    for k, runs in samples.items():
        mid = sorted(runs, key=lambda r: r["seconds"] if k == "headstart" else r["process_seconds"])[len(runs) // 2]
        out[k] = {**mid, "all_seconds": [round(r.get("process_seconds", r["seconds"]), 1) for r in runs]}
    out["speedup"] = round(out["baseline"]["process_seconds"] / out["headstart"]["seconds"], 2)
    out["accuracy_difference"] = round(out["headstart"]["accuracy"] - out["baseline"]["accuracy"], 4)
    out["floor"] = end_to_end_floor(out["headstart"], out["baseline"]["process_seconds"], work)
    return out


def _run_breakdown(run: Path) -> dict:
    """Where a train run's time went, from its own records: extraction, head, the rest."""
    m, c = json.loads((run / "metrics.json").read_text()), json.loads((run / "config.json").read_text())
    return {"backbone": c["backbone"], "image_size": c["image_size"], "engine": c["engine"]["engine"],
            "precision": c["engine"]["precision"],
            "images": m["extraction"]["computed"], "extraction_seconds": m["extraction"]["seconds"],
            "head_seconds": m["head_seconds"]}


def end_to_end_floor(ours: dict, probe_seconds: float, work: Path, goal: float = 4.0) -> dict:
    """What no pipeline around this engine can beat on this machine: the engine alone on the run's images
    (same backbone, size, engine and precision, timed here) plus two process start-ups (train and
    evaluate each import torch, torchvision and scikit-learn), against the time the goal allows."""
    model, _ = load_backbone(get_backbone(ours["backbone"]), "none", seed=0)  # speed does not depend on weights
    # The faster of one caller on every thread and the streams extraction runs (2026-12-01: the streams are
    # faster since engine calls take call_batch images; the floor took one caller only until then).
    rate = max(engine_throughput(model, ours["image_size"], ours["engine"], ours["precision"], 5.0,
                                 work / "engines", s) for s in (1, None))
    starts = []
    for _ in range(3):  # a process that imports what `train` does and exits as the command does (cli._quick_exit)
        t, _ = run([sys.executable, "-c", "import atexit, gc, headstart.runs.train; atexit.register(gc.freeze)"])
        starts.append(t)
    engine_s, start_s = ours["images"] / rate, min(starts)
    return {"goal": goal, "allowed_seconds": round(probe_seconds / goal, 1),
            "engine_alone_images_per_second": round(rate, 1), "engine_alone_seconds": round(engine_s, 1),
            "process_start_seconds": round(start_s, 2), "floor_seconds": round(engine_s + 2 * start_s, 1),
            "best_speedup": round(probe_seconds / (engine_s + 2 * start_s), 2)}


def finetune_epoch(data: Path, work: Path, size: int, unfreeze: int, max_batches: int | None) -> dict:
    """One fine-tuning epoch: headstart's (boundary cache) against plain PyTorch's (whole network)."""
    out = work / "ft-run"
    _, _ = run([*HEADSTART, "-q", "train", data, "--strategy", "fine-tune", "--epochs", "1", "--unfreeze", unfreeze,
                "--image-size", size, "--out", out, "--cache-dir", work / "ft-cache"])
    ft = json.loads((out / "metrics.json").read_text())["fine_tune"]
    ours = ft["history"]["seconds"][0]
    n_train = json.loads((out / "metrics.json").read_text())["n_train"]
    base = plain.finetune_epoch(str(data / "train"), size, unfreeze, max_batches=max_batches)
    base_epoch = base["seconds"] * n_train / base["images"]  # scaled to the same number of images
    return {"image_size": size, "unfreeze": unfreeze, "images": n_train,
            "headstart_epoch_seconds": ours, "headstart_boundary_seconds": ft["boundary_seconds"],
            "baseline_epoch_seconds": round(base_epoch, 1), "baseline_images_timed": base["images"],
            "speedup": round(base_epoch / ours, 2)}


def finetune_bf16(data: Path, work: Path, epochs: int, smoke: bool) -> dict:
    """fp32 against bf16-autocast fine-tuning (issue 15 item 3), the same short run each (`--epochs`), on a CPU
    with native bf16 only: elsewhere torch emulates bf16, and the rule (finetune_precision.choose_precision) never picks it.
    The fp32 run goes first and fills the feature cache; epochs are compared by their median seconds."""
    if not native_bf16():
        return {"measured": False, "reason": "not measured: no native bf16"}
    size = ["--image-size", "32"] if smoke else []
    runs = {}
    for name, flags in (("fp32", ["--ft-precision", "fp32"]), ("bf16", ["--ft-precision", "bf16"]),
                        ("bf16_channels_last", ["--ft-precision", "bf16", "--channels-last"])):
        out = work / f"ft-{name}"
        seconds, _ = run([*HEADSTART, "-q", "train", data, "--strategy", "fine-tune", "--epochs", epochs, *flags,
                          *size, "--out", out, "--cache-dir", work / "ft-bf16-cache"])
        m = json.loads((out / "metrics.json").read_text())
        runs[name] = {"epoch_seconds": statistics.median(m["fine_tune"]["history"]["seconds"]),
                      "test_accuracy": m["test"]["accuracy"], "wall_seconds": round(seconds, 1)}
    for name in ("bf16", "bf16_channels_last"):
        r = runs[name]
        r["speedup"] = round(runs["fp32"]["epoch_seconds"] / r["epoch_seconds"], 2)
        r["accuracy_change_points"] = round(100 * (r["test_accuracy"] - runs["fp32"]["test_accuracy"]), 2)
        r["pays"] = r["speedup"] >= PAYS and abs(r["accuracy_change_points"]) <= 0.3  # issue 15's goal
    return {"measured": True, "epochs": epochs, **runs, "load_average": os.getloadavg()[0]}


def finetune_bf16_markdown(f: dict) -> list[str]:
    if not f.get("measured"):
        return ["", f"bf16 fine-tuning: {f['reason']} (the rule keeps fp32 here)."]
    lines = ["", f"bf16 fine-tuning ({f['epochs']} epochs each, median epoch; goal 1.5x at test accuracy within "
             f"0.3 points; load average {f['load_average']:.1f}):", "",
             "| trained part | epoch s | x fp32 | test accuracy | change (points) |", "|---|---|---|---|---|",
             f"| fp32 | {f['fp32']['epoch_seconds']:.1f} | 1.00 | {f['fp32']['test_accuracy']:.4f} | |"]
    lines += [f"| {name.replace('_', ', ').replace('channels, last', 'channels-last')} | "
              f"{f[name]['epoch_seconds']:.1f} | {f[name]['speedup']:.2f} | {f[name]['test_accuracy']:.4f} | "
              f"{f[name]['accuracy_change_points']:+.2f} |" for name in ("bf16", "bf16_channels_last")]
    return lines


# --- memory --------------------------------------------------------------------------------------

MEMORY_SCRIPT = """
import sys
from pathlib import Path
from headstart.nets.registry import get_backbone
from headstart.engines.rule import choose_engine, make_engine
from headstart.engines.features import FeatureCache, extract, make_namespace
from headstart.nets.weights import load_backbone
folder, n, cache = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
paths = sorted(str(p) for p in folder.rglob("*.png"))[:n]
assert len(paths) == n, (len(paths), n)
entry = get_backbone("mobilenet_v2")
prep = entry.preprocessing.scaled(int(sys.argv[4]))
model, info = load_backbone(entry, None)
choice = choose_engine("cpu")
engine = make_engine(model, choice, cache)
result = extract(engine, prep.transform(), paths, FeatureCache(cache, make_namespace(entry.name, info.identity(),
                 prep, choice)))
print(result.n_computed, engine.n_images)
"""


# Linux carries a process's high-water RSS across fork and exec, so a child of this (large)
# process would report at least our own RSS: a small launcher starts the measured process.
LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
out = p.stdout.read()
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"status": status, "maxrss_kib": usage.ru_maxrss, "stdout": out}))
"""


def max_rss(*cmd) -> tuple[float, str]:
    """(peak RSS in MiB, stdout) of `cmd` run in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], capture_output=True, text=True,
                          check=True)
    r = json.loads(proc.stdout)
    if r["status"] != 0:
        raise RuntimeError(f"{cmd[:3]}... failed with status {r['status']}")
    return r["maxrss_kib"] / 1024, r["stdout"]


def peak_memory(folder: Path, counts, size: int, work: Path) -> list[dict]:
    rows = []
    for n in counts:
        t0 = time.perf_counter()
        mib, out = max_rss(sys.executable, "-c", MEMORY_SCRIPT, folder, n, work / f"mem-cache-{n}", size)
        seconds = time.perf_counter() - t0
        if int(out.split()[0]) != n:
            raise RuntimeError(f"memory run for {n} images computed {out!r}")
        rows.append({"images": n, "image_size": size, "peak_rss_mib": round(mib, 1), "seconds": round(seconds, 1)})
        log(f"peak memory {n} images: {mib:.0f} MiB in {seconds:.0f}s")
    mib, _ = max_rss(sys.executable, "-c", "import torch, onnxruntime, headstart.engines.features")
    rows.append({"images": 0, "what": "imports only (torch, onnxruntime, headstart)", "peak_rss_mib": round(mib, 1)})
    return rows


def finetune_memory(data: Path, work: Path, smoke: bool) -> dict:
    """Peak RSS of the default fine-tune (`train --strategy fine-tune`, defaults) in a fresh process with an
    empty cache. Two epochs, not up to 14: the peak is reached once the boundary activations are held,
    before epoch 1 (issue 15 item 4: 3.97 GB with them in float32, the goal 2,048 MiB)."""
    out, epochs = work / "ft-mem-run", 1 if smoke else 2
    size = ["--image-size", "32"] if smoke else []
    t0 = time.perf_counter()
    mib, _ = max_rss(*HEADSTART, "-q", "train", data, "--strategy", "fine-tune", "--epochs", epochs, *size,
                     "--out", out, "--cache-dir", work / "ft-mem-cache")
    m = json.loads((out / "metrics.json").read_text())
    return {"what": f"fine-tune, defaults ({epochs} epochs, boundary activations in 16 bits)",
            "images": m["n_train"] + m["n_val"] + m["n_test"],
            "peak_rss_mib": round(mib, 1), "seconds": round(time.perf_counter() - t0, 1),
            "test_accuracy": m.get("test", {}).get("accuracy"), "load_average": os.getloadavg()[0]}


# --- report --------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    m, peak = r["machine"], r.get("peak_gflops")
    lines = [f"Measured by `make bench` on {r['date']}: {m['cpu']}, {m['cores']} cores, "
             f"AVX-512 {'yes' if m['avx512'] else 'no'}, native bf16 {'yes' if m['native_bf16'] else 'no'}"
             + (f"; {peak_text(peak)}" if peak else "")
             + f". Median of {r['repeats']} runs in alternating order."
             + (f" The whole run took {r['total_seconds'] / 60:.0f} min." if r.get("total_seconds") else "")
             + ("" if m["native_bf16"] else " bf16 engines are not timed: this CPU has no native bf16, and "
                "headstart's rule never picks bf16 here.")]
    if r.get("extraction"):
        lines += ["", "| model | px | engine | precision | images/s | x baseline | GFLOP/s | of peak |",
                  "|---|---|---|---|---|---|---|---|"]
    for row in r.get("extraction", []):
        engine = "plain PyTorch (baseline)" if row["engine"] == "baseline" else row["engine"]
        note = ""
        above = " (above the GEMMs' best in this run)" if row["fraction_of_peak"] > 1 else ""
        lines.append(f"| {row['model']} | {row['size']} | {engine} | {row['precision']}{note} | "
                     f"{row['images_per_second']:.1f} | {row['vs_baseline']:.2f} | {row['gflops']:.0f} | "
                     f"{row['fraction_of_peak']:.0%}{above} |")
    if r.get("end_to_end"):
        e = r["end_to_end"]
        lines += ["", f"End to end, median of {r.get('e2e_repeats', r['repeats'])} in alternating order, each a "
                  "fresh process with an empty cache:", "",
                  "| FMNIST-TL, train + evaluate | wall s | test accuracy |", "|---|---|---|",
                  f"| baseline linear probe ({e['baseline']['image_size']} px, sklearn C search) | "
                  f"{e['baseline']['process_seconds']:.0f} | {e['baseline']['accuracy']:.4f} |",
                  f"| headstart, feature extraction, defaults | {e['headstart']['seconds']:.0f} | "
                  f"{e['headstart']['accuracy']:.4f} |",
                  f"| **speed-up** | **{e['speedup']:.1f}x** | {e['accuracy_difference']:+.4f} |"]
        h, f = e["headstart"], e.get("floor")
        if "extraction_seconds" in h:
            other = h["train_seconds"] - h["extraction_seconds"] - h["head_seconds"]
            lines += ["", f"Where headstart's {h['seconds']:.0f} s went: train {h['train_seconds']:.1f} s (extracting "
                      f"{h['images']:,} images at {h['image_size']} px on {h['engine']} {h['precision']} "
                      f"{h['extraction_seconds']:.1f} s, the linear head {h['head_seconds']:.1f} s, start-up, data "
                      f"checks and reports {other:.1f} s), evaluate {h['evaluate_seconds']:.1f} s."]
        if f:
            lines += [f"{f['goal']:.0f}x the probe allows {f['allowed_seconds']:.0f} s. The engine alone on the same "
                      f"{h['images']:,} images needs {f['engine_alone_seconds']:.1f} s ({f['engine_alone_images_per_second']:.0f}"
                      f" images/s, timed in this run) and a process starts in {f['process_start_seconds']:.1f} s, "
                      f"twice: no pipeline around this engine gets below {f['floor_seconds']:.0f} s "
                      f"({f['best_speedup']:.1f}x) on this machine."]
    if r.get("finetune_epoch"):
        f = r["finetune_epoch"]
        lines += ["", f"One fine-tuning epoch ({f['images']} images, {f['image_size']} px, top {f['unfreeze']} blocks): "
                  f"headstart {f['headstart_epoch_seconds']:.1f} s with the boundary cache (built once in "
                  f"{f['headstart_boundary_seconds']:.0f} s), plain PyTorch {f['baseline_epoch_seconds']:.1f} s: "
                  f"**{f['speedup']:.1f}x**."]
    if r.get("finetune_bf16"):
        lines += finetune_bf16_markdown(r["finetune_bf16"])
    lines += pipeline_markdown(r)
    if r.get("decoding"):
        lines += ["", "| decode + resize + normalise | px | JPEG draft | images/s (1 core) |", "|---|---|---|---|"]
        lines += [f"| {d['format']} | {d['size']} | {'yes' if d['draft'] else 'no'} | {d['images_per_second']:.0f} |"
                  for d in r["decoding"]]
    if r.get("memory"):
        lines += ["", "| peak RSS in a fresh process | images | MiB | s |", "|---|---|---|---|"]
        lines += [f"| {m.get('what', 'extract, %d px' % m.get('image_size', 0))} | {m['images']} | "
                  f"{m['peak_rss_mib']:.0f} | {m.get('seconds', '')} |" for m in r["memory"]]
    if r.get("scale"):
        lines += scale.markdown(r["scale"])
    if r.get("inspect_scale"):
        lines += inspect_scale.markdown(r["inspect_scale"])
    if r.get("serve"):
        lines += serving.markdown(r["serve"])
    if r.get("scaling"):
        lines += scale_out.markdown(r["scaling"])
    if r.get("explain"):
        lines += explaining.markdown(r["explain"])
    return "\n".join(lines) + "\n"


def pipeline_markdown(r: dict) -> list[str]:
    lines = []
    if r.get("pipeline"):
        p = r["pipeline"]
        stages = "; ".join(f"{k} {v:.0f}" for k, v in p["cpu_us_per_image"].items())
        if p["workers"]:
            where = f"{p['workers']} decoding worker beside the engine"
        elif p.get("streams", 1) > 1:
            decoded = ("batches decoded by one thread beside them" if p.get("decoding") == "beside the streams"
                       else "each decoding its own chunks")  # the way until 2026-12-01
            where = (f"{p['streams']} streams of {p['threads_per_stream']} thread(s), {decoded} "
                     f"(engine alone that way: {p['engine_streams_images_per_second']:.0f} images/s)")
        else:
            where = "decoding in the main process between the engine's batches"
        ways = []  # the ways the default did not take (results before 2026-11-30 lack them)
        if "one_stream_images_per_second" in p:
            ways.append(f"one stream decoding between the engine's batches: {p['one_stream_images_per_second']:.0f} "
                        f"images/s, {p['share_one_stream']:.0%}")
        if "other_workers" in p:
            ways.append(f"{'one worker beside the engine' if p['other_workers'] else 'decoding in the main process'}"
                        f": {p['other_images_per_second']:.0f} images/s, {p['share_other']:.0%}")
        compared = f" ({'; '.join(ways)})" if ways else ""
        calls = f" in engine calls of {p['images_per_call']}" if "images_per_call" in p else ""
        if p.get("normalising") == "in the engine":
            calls += ", uint8 pixels normalised in the engine"
        lines += ["", f"Extraction pipeline ({p['engine']}, {p['image_size']} px, batch {p['batch']}{calls}, {where}, "
                  f"{p['images']} FMNIST-TL images, load average {p['load_average']}): whole "
                  f"extraction {p['whole_extraction_images_per_second']:.0f} images/s against the engine alone "
                  f"{p['engine_alone_images_per_second']:.0f}: **{p['share']:.0%}** (goal 85%){compared}. CPU time "
                  f"per image (us, one thread): {stages}; on {p['cores']} cores these bound the share at "
                  f"{p['bound_on_cores']:.0%}."]
    if r.get("int8"):
        q = r["int8"]
        ran = f", {q['streams']} streams" if q.get("streams", 1) > 1 else ""
        lines += ["", f"int8 ({q['engine']}{ran}, {q['image_size']} px, weights {q['quantisation']['weights']}, "
                  f"{q['calibration_images']} calibration images, load average {q['load_average']}): "
                  f"{q['int8_images_per_second']:.0f} images/s against fp32 {q['fp32_images_per_second']:.0f} "
                  f"(**{q['speedup']:.2f}x**); FMNIST-TL test accuracy {q['int8_accuracy']:.4f} against "
                  f"{q['fp32_accuracy']:.4f} ({q['accuracy_change_points']:+.2f} points)."]
    return lines


def peak_text(peak: dict) -> str:
    if not isinstance(peak.get("fp32"), dict):  # results from before the peak was a bound: torch.mm at one size
        return f"torch.mm peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16"
    parts = [f"{p} {v['gflops']:.0f} GFLOP/s (best of GEMMs: {v['best_of']}; theoretical at the nominal clock "
             f"{v['theoretical_nominal']:.0f})" for p, v in peak.items()]
    return "peak per precision, each engine's \"of peak\" against its own: " + ", ".join(parts)



def prepare(out: Path, per_class: int | None, test_per_class: int | None = None) -> Path:
    from headstart.data.datasets import prepare_fashion_mnist

    prepare_fashion_mnist(out, per_class=per_class, test_per_class=test_per_class, progress=False)
    return out


def torch_home_with_weights(work: Path) -> None:
    """The baseline loads weights the tutorial way, from torch's hub cache: put the MobileNetV2 file
    there (a link to the copy headstart found) in a private TORCH_HOME, so nothing is downloaded."""
    from headstart.nets.weights import weights_available

    entry = get_backbone("mobilenet_v2")
    source = weights_available(entry)
    if source is None:
        raise SystemExit("MobileNetV2's ImageNet weights are missing: run `make install` first.")
    home = work / "torch-home"
    target = home / "hub" / "checkpoints" / entry.weights.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(Path(source).resolve())
    os.environ["TORCH_HOME"] = str(home)  # for this process and the subprocesses it starts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few images at tiny sizes: checks the suite runs")
    p.add_argument("--repeats", type=int, default=None, help="runs per timing (default 3; smoke 1)")
    p.add_argument("--e2e-repeats", type=int, default=None,
                   help="runs of the end-to-end comparison (default: --repeats; each pair takes minutes)")
    p.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data", help="where data sets are prepared")
    p.add_argument("--only", nargs="*", default=None,
                   help=f"sections: {' '.join(SECTIONS)}")
    p.add_argument("--scale-images", type=int, default=None,
                   help="images in the scale section's folder (default 200,000; smoke 1,000)")
    p.add_argument("--inspect-images", type=int, default=None,
                   help="synthetic images of the inspect_scale section (default 200,000 and a quarter; smoke 2,000)")
    a = p.parse_args(argv)
    smoke = a.smoke
    repeats = a.repeats or (1 if smoke else 3)
    sections = set(a.only or SECTIONS)
    if not sections <= set(SECTIONS):
        p.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {' '.join(SECTIONS)}")
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    out_dir = work if smoke else ROOT / "benchmarks"
    data_dir = work / "data" if smoke else a.data
    result: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": smoke, "repeats": repeats, "machine": machine()}
    log(f"machine: {result['machine']}; work folder {work}")
    section_seconds: dict[str, float] = {}  # each section's wall time: the total stays under 60 min (issue 15)
    torch_home_with_weights(work)

    seconds = 0.05 if smoke else 4.0
    peaks = Peaks(smoke=smoke, seconds=0.05 if smoke else 1.0)
    if sections & {"peak", "extraction"}:  # extraction reports fractions of the peak
        peaks.update()
        result["peak_gflops"] = peaks.to_dict()
        log(f"peak: {result['peak_gflops']}")
    if "extraction" in sections:
        t_section = time.perf_counter()
        result["extraction"] = extraction(["mobilenet_v2"] if smoke else ["mobilenet_v2", "resnet50"],
                                          [32] if smoke else [96, 224], seconds, repeats, peaks, work)
        result["peak_gflops"] = peaks.to_dict()  # the best of the measurements before and after the engines
        section_seconds["extraction"] = round(time.perf_counter() - t_section, 1)
    if sections & {"decoding", "pipeline", "int8", "end_to_end", "finetune_epoch", "finetune_bf16", "memory"} or smoke:
        tl = prepare(data_dir / ("fmnist-smoke" if smoke else "fmnist-tl"), 4 if smoke else 1000,
                     2 if smoke else None)
    if "decoding" in sections:
        t_section = time.perf_counter()
        result["decoding"] = decoding(tl, [32] if smoke else [96, 224], 0.05 if smoke else 3.0, work)
        section_seconds["decoding"] = round(time.perf_counter() - t_section, 1)
    if "pipeline" in sections:
        t_section = time.perf_counter()
        result["pipeline"] = pipeline(tl, 600 if smoke else 3000, repeats, work, 32 if smoke else None)
        pl = result["pipeline"]
        log(f"pipeline: whole extraction {pl['whole_extraction_images_per_second']} images/s against the engine "
            f"alone {pl['engine_alone_images_per_second']}: share {pl['share']:.0%} (goal 85%); CPU us per image "
            f"{pl['cpu_us_per_image']} bound on {pl['cores']} cores {pl['bound_on_cores']:.0%}; "
            f"load {pl['load_average']}")
        section_seconds["pipeline"] = round(time.perf_counter() - t_section, 1)
    if "int8" in sections:
        t_section = time.perf_counter()
        result["int8"] = int8(tl, repeats, seconds, work, 32 if smoke else None)
        log(f"int8: {result['int8']}")
        section_seconds["int8"] = round(time.perf_counter() - t_section, 1)
    if "end_to_end" in sections:
        t_section = time.perf_counter()
        result["e2e_repeats"] = a.e2e_repeats or repeats
        result["end_to_end"] = end_to_end(tl, result["e2e_repeats"], work, 32 if smoke else 96)
        e = result["end_to_end"]
        log(f"end to end: headstart {e['headstart']['seconds']:.1f}s ({e['headstart']['accuracy']:.4f}), "
            f"baseline {e['baseline']['process_seconds']:.1f}s ({e['baseline']['accuracy']:.4f}): {e['speedup']}x")
        section_seconds["end_to_end"] = round(time.perf_counter() - t_section, 1)
    if "finetune_epoch" in sections:
        t_section = time.perf_counter()
        result["finetune_epoch"] = finetune_epoch(tl, work, 32 if smoke else 128, 8, 2 if smoke else None)
        log(f"fine-tune epoch: {result['finetune_epoch']}")
        section_seconds["finetune_epoch"] = round(time.perf_counter() - t_section, 1)
    if "finetune_bf16" in sections:
        t_section = time.perf_counter()
        result["finetune_bf16"] = finetune_bf16(tl, work, 1 if smoke else 2, smoke)
        log(f"bf16 fine-tuning: {result['finetune_bf16']}")
        section_seconds["finetune_bf16"] = round(time.perf_counter() - t_section, 1)
    if "memory" in sections:
        t_section = time.perf_counter()
        full = tl if smoke else prepare(data_dir / "fmnist-full", None)
        result["memory"] = peak_memory(full, [20, 40] if smoke else [7000, 70000], 32 if smoke else 128, work)
        result["memory"].append(finetune_memory(tl, work, smoke))
        log(f"fine-tune peak memory: {result['memory'][-1]}")
        section_seconds["memory"] = round(time.perf_counter() - t_section, 1)
    if "scale" in sections:
        t_section = time.perf_counter()
        result["scale"] = scale.scale(HEADSTART, work, a.scale_images or (1_000 if smoke else 200_000), max_rss,
                                      smoke=smoke, synthetic=not smoke)
        log(f"scale: {result['scale']}")
        section_seconds["scale"] = round(time.perf_counter() - t_section, 1)
    if "inspect_scale" in sections:
        t_section = time.perf_counter()
        result["inspect_scale"] = inspect_scale.measure(a.inspect_images or (2_000 if smoke else 200_000), max_rss,
                                                        smoke=smoke, log=log, work=work)
        log(f"inspect_scale: {result['inspect_scale']['time_ratio_4x_images']}")
        section_seconds["inspect_scale"] = round(time.perf_counter() - t_section, 1)

    if "serve" in sections:
        t_section = time.perf_counter()
        # The model's quality does not matter here: a small training set keeps the section short.
        data = prepare(data_dir / ("fmnist-smoke" if smoke else "fmnist-serve"), 4 if smoke else 100,
                       2 if smoke else 20)
        result["serve"] = serving.serving(HEADSTART, data, work / "serve-run", work, smoke=smoke)
        result["serve"]["date"] = time.strftime("%Y-%m-%d %H:%M")
        log(f"serving: {result['serve']}")
        section_seconds["serve"] = round(time.perf_counter() - t_section, 1)
    if "scaling" in sections:
        t_section = time.perf_counter()
        data = prepare(data_dir / ("fmnist-smoke" if smoke else "fmnist-scaling"), 4 if smoke else 200,
                       2 if smoke else 20)
        result["scaling"] = scale_out.scaling(data, work, 32 if smoke else 96, 8)
        log(f"scaling: {result['scaling']}")
        section_seconds["scaling"] = round(time.perf_counter() - t_section, 1)
    if "explain" in sections:
        t_section = time.perf_counter()
        data = prepare(data_dir / ("fmnist-smoke" if smoke else "fmnist-explain"), 4 if smoke else 20,
                       2 if smoke else 5)
        result["explain"] = explaining.explaining(data, work, smoke=smoke)
        log(f"explain: {result['explain']}")
        section_seconds["explain"] = round(time.perf_counter() - t_section, 1)
    total = time.perf_counter() - t_start
    result["section_seconds"] = section_seconds
    json_path, md_path = kinds.results_paths(out_dir, result["machine"]["cpu_kind"])
    if a.only is None:
        result["total_seconds"] = round(total, 1)
    elif not smoke and json_path.exists():
        # Some sections only: the others keep their previous numbers (and the header its date).
        previous = json.loads(json_path.read_text())
        result = {**previous, **{k: result[k] for s in sections for k in SECTION_KEYS[s] if k in result},
                  "section_seconds": {**previous.get("section_seconds", {}), **section_seconds}}
    table = markdown(result)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(table)
    print(table)
    log(f"wrote {json_path} and {md_path}")
    log(f"total {total / 60:.1f} min ({', '.join(sorted(sections))}); per section (s): {section_seconds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
