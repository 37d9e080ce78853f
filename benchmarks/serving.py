"""The serving section of `make bench`: a real `headstart serve` under load, beside in-process prediction.

    python benchmarks/run.py --only serve           # this section alone (results merged into this CPU kind's results-<kind>.json)

Decisions:
- The load generator is Python (threads, each with its own keep-alive http.client connection,
  sending one FMNIST PNG as a multipart upload, as `curl -F` does), not wrk: it shares the two
  cores with the server, so it measures its own CPU time (time.process_time over the phase,
  all its threads) and the server's (/proc/PID/stat), and both are reported with the result.
- Every phase is bounded by a request count and a time cap; the server is started on a free
  127.0.0.1 port and killed in a `finally`, whatever happens.
- In-process prediction gets the same PNG bytes, opened with PIL inside the timed call (an image
  path would go through the feature cache, which a server never uses), so both sides decode.
  It runs twice: with torch's default threads, and with one torch thread (ONNX Runtime then
  gets one too). On this 2-core machine shared with other work, per-image preprocessing
  with 2 torch threads took 24-59 ms against 1.2 ms with one (OpenMP threads waiting for
  cores held by ONNX Runtime's and other processes' threads), so the ratios are taken
  against the faster of the two: the strongest in-process baseline.
- The naive way is one `headstart predict RUN image` process per image, on copies of the images
  under new names (the feature cache keys paths, so nothing is a cache hit) with the engine
  already converted in the cache (by training, at the same size), as a user who has trained
  once would have it.
- Server memory (VmRSS) is read after the first `rss_at[0]` requests and after `rss_at[1]` in all:
  the phases in between count towards it.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

BOUNDARY = "headstart-bench-boundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 2)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything (every process) since boot: /proc/stat minus idle and iowait."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def get_json(port: int, path: str, timeout: float = 5) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def load(port: int, bodies: list[bytes], n: int, concurrency: int, time_cap: float, server_pid: int) -> dict:
    """POST /predict `n` times from `concurrency` threads (each a keep-alive connection), at most
    `time_cap` seconds: latencies, statuses, and the CPU time of this process and of the server."""
    lock = threading.Lock()
    issued = iter(range(n))
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.perf_counter() + time_cap
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(issued, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/predict?top_k=1", body=bodies[i % len(bodies)], headers=headers)
                    r = conn.getresponse()
                    body = r.read()  # always read: the connection is reused
                    ok = r.status != 200 or json.loads(body)["results"][0]["predictions"]
                    status = r.status if ok else "200 without a prediction"
                except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
                    status = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses[str(status)] += 1
        finally:
            conn.close()

    cpu0, server0, busy0 = time.process_time(), proc_cpu_seconds(server_pid), machine_busy_seconds()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_cap + 90)  # a request in flight at the cap may take its 60 s timeout
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "requested": n,
            "capped": len(latencies) < n, "seconds": round(wall, 2),
            "requests_per_second": round(len(latencies) / wall, 1),
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "generator_cpu_cores": round((time.process_time() - cpu0) / wall, 2),
            "server_cpu_cores": round((proc_cpu_seconds(server_pid) - server0) / wall, 2),
            "machine_busy_cores": round((machine_busy_seconds() - busy0) / wall, 2),
            "statuses": dict(statuses)}


def in_process(run: Path, datas: list[bytes], singles: int, batch_images: int, batch_size: int,
               cache: Path, threads: int | None = None) -> dict:
    """`headstart.load(run).predict_proba` on the same PNG bytes: one image at a time, then in batches,
    with `threads` torch threads (None: torch's default)."""
    import torch

    import headstart

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        return _in_process(headstart.load(run), datas, singles, batch_images, batch_size, cache)
    finally:
        torch.set_num_threads(default)


def _in_process(model, datas: list[bytes], singles: int, batch_images: int, batch_size: int, cache: Path) -> dict:
    import torch
    from PIL import Image

    kw = {"cache_dir": cache, "batch_size": batch_size}

    def images(k: int, start: int = 0) -> list:
        return [Image.open(io.BytesIO(datas[(start + j) % len(datas)])) for j in range(k)]

    for j in range(5):  # engine made and warmed up, as the server does before it opens its port
        model.predict_proba(images(1, j), **kw)
    single = []
    for j in range(singles):
        t0 = time.perf_counter()
        model.predict_proba(images(1, j), **kw)
        single.append(time.perf_counter() - t0)
    model.predict_proba(images(batch_size), **kw)
    rates = []
    for r in range(3):
        t0 = time.perf_counter()
        model.predict_proba(images(batch_images, r), **kw)
        rates.append(batch_images / (time.perf_counter() - t0))
    return {"torch_threads": torch.get_num_threads(), "single_requests": singles,
            "single_p50_ms": percentile_ms(single, 50), "single_p99_ms": percentile_ms(single, 99),
            "batch_size": batch_size, "batch_images": batch_images,
            "batch_images_per_second": round(statistics.median(rates), 1)}


def naive(headstart_cmd: list, run: Path, files: list[Path], cache: Path, work: Path) -> dict:
    """Wall seconds of one `headstart predict RUN image` process per image."""
    folder = work / "naive-images"
    folder.mkdir()
    seconds = []
    for i, f in enumerate(files):
        copy = folder / f"naive-{i}-{f.name}"
        shutil.copyfile(f, copy)
        t0 = time.perf_counter()
        proc = subprocess.run([*map(str, headstart_cmd), "-q", "predict", str(run), str(copy),
                               "--cache-dir", str(cache)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"headstart predict {copy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        seconds.append(time.perf_counter() - t0)
    return {"processes": len(seconds), "median_seconds": round(statistics.median(seconds), 2),
            "all_seconds": [round(s, 2) for s in seconds]}


class Server:
    """`headstart serve RUN` on a free 127.0.0.1 port; use as a context manager (always killed on exit)."""

    def __init__(self, headstart_cmd: list, run: Path, cache: Path, log: Path):
        self.port = free_port()
        self.cmd = [*map(str, headstart_cmd), "-q", "serve", str(run), "--host", "127.0.0.1",
                    "--port", str(self.port), "--cache-dir", str(cache)]
        self.log_path = log

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"headstart serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                if get_json(self.port, "/healthz", timeout=2)[0] == 200:
                    return time.perf_counter() - t0
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"headstart serve was not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()  # SIGTERM: drains and exits
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self.log.close()


def bound_of(c8: dict, cores: int) -> str:
    """What limits throughput, from the CPU time both sides and the whole machine used (an inference,
    stated as one)."""
    share = (f"server {c8['server_cpu_cores']:.2f} + load generator {c8['generator_cpu_cores']:.2f} cores; "
             f"the whole machine {c8['machine_busy_cores']:.2f} of {cores} cores busy")
    if c8["machine_busy_cores"] >= 0.85 * cores:
        return (f"the CPU ({share}): the generator's share and other processes' are CPU the server cannot use, "
                f"so this run does not tell whether the server alone would saturate it")
    return (f"not the CPU ({share}) with {c8['concurrency']} requests always in flight, so serial work in the "
            f"server: its one Python interpreter (HTTP, form parsing, answers) and its one inference thread, "
            f"running batches of {c8['mean_batch']:.1f} images on average")


def serving(headstart_cmd: list, data: Path, run: Path, work: Path, *, smoke: bool) -> dict:
    """Train (if `run` has no model yet), measure in-process and naive prediction, then the server."""
    counts = (dict(warm=20, rss_at=(50, 300), latency=20, throughput=100, singles=10, batch=64, naive=1,
                   cap=20.0) if smoke else
              dict(warm=20, rss_at=(500, 5000), latency=300, throughput=2000, singles=100, batch=512, naive=5,
                   cap=300.0))
    cache = work / "serve-cache"
    t0 = time.perf_counter()  # the phases' seconds, to keep the smoke run short
    if not (run / "metrics.json").exists():
        size = ["--image-size", "32"] if smoke else []  # smoke: tiny; full: the default (auto) size
        proc = subprocess.run([*map(str, headstart_cmd), "-q", "train", str(data), "--strategy",
                               "feature-extraction", "--backbone", "mobilenet_v2", "--out", str(run),
                               "--cache-dir", str(cache), *size], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"headstart train for the serving benchmark failed:\n{proc.stderr[-3000:]}")
    files = sorted((data / "test").rglob("*.png"))
    datas = [f.read_bytes() for f in files]
    bodies = [multipart(f.name, d) for f, d in zip(files, datas)]
    out: dict = {"generator": "Python: threads with keep-alive http.client connections, one PNG per multipart "
                              "POST /predict; its own CPU time measured",
                 "server": "headstart -q serve (no access log)", "images": len(files),
                 "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    out["train_seconds"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    out["in_process"] = [in_process(run, datas, counts["singles"], counts["batch"], 64, cache, threads)
                         for threads in (None, 1)]
    out["in_process_seconds"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    out["naive"] = naive(headstart_cmd, run, files[:counts["naive"]], cache, work)
    t0 = time.perf_counter()
    with Server(headstart_cmd, run, cache, work / "serve.log") as server:
        out["startup_seconds"] = round(server.wait_ready(120 if smoke else 300), 1)
        _, info = get_json(server.port, "/model")
        out["engine"], out["image_size"] = info["engine"], info["image_size"]
        pid, total = server.proc.pid, 0

        def phase(n: int, concurrency: int) -> dict:
            nonlocal total
            r = load(server.port, bodies, n, concurrency, counts["cap"], pid)
            total += r["requests"]
            if set(r["statuses"]) != {"200"}:
                raise RuntimeError(f"serving benchmark: not every request answered 200: {r['statuses']}; "
                                   f"server log {server.log_path}")
            return r

        phase(counts["warm"], 1)
        phase(counts["rss_at"][0] - total, 8)
        rss = {str(total): round(rss_mib(pid), 1)}
        out["latency_c1"] = phase(counts["latency"], 1)
        before = get_json(server.port, "/model")[1]["served"]
        out["throughput_c8"] = c8 = phase(counts["throughput"], 8)
        after = get_json(server.port, "/model")[1]["served"]
        c8["mean_batch"] = round((after["images"] - before["images"]) / max(1, after["batches"] - before["batches"]), 1)
        if total < counts["rss_at"][1]:
            phase(counts["rss_at"][1] - total, 8)
        rss[str(total)] = round(rss_mib(pid), 1)
        out["memory"] = {"rss_mib_after_requests": rss, "difference_mib": round(list(rss.values())[1]
                                                                               - list(rss.values())[0], 1)}
        out["requests_total"] = total
    out["server_seconds"] = round(time.perf_counter() - t0, 1)
    best_single = min(ip["single_p50_ms"] for ip in out["in_process"])
    best_batch = max(ip["batch_images_per_second"] for ip in out["in_process"])
    out["latency_vs_in_process"] = round(out["latency_c1"]["p50_ms"] / best_single, 2)
    out["throughput_vs_in_process_batch"] = round(c8["requests_per_second"] / best_batch, 3)
    out["bound"] = bound_of(c8, os.cpu_count() or 1)
    return out


def markdown(s: dict) -> list[str]:
    c1, c8, mem = s["latency_c1"], s["throughput_c8"], s["memory"]
    (n1, r1), (n2, r2) = mem["rss_mib_after_requests"].items()
    engine = f"{s['engine']['engine']} {s['engine']['precision']}"
    return ["", f"Serving: `headstart serve` (MobileNetV2 feature extraction on FMNIST, {s['image_size']} px, "
                f"{engine}) on 127.0.0.1, one 28x28 PNG per multipart request, load average "
                f"{s['load_average_before'][0]:.1f} when the section started:", "",
            "| serving | measured | goal |", "|---|---|---|",
            f"| latency p50 / p99, concurrency 1 ({c1['requests']} requests) | {c1['p50_ms']:.1f} / "
            f"{c1['p99_ms']:.1f} ms | |",
            *(f"| in-process `predict_proba`, one image ({ip['single_requests']} calls, {ip['torch_threads']} torch "
              f"thread{'s' if ip['torch_threads'] > 1 else ''}) | {ip['single_p50_ms']:.1f} ms (p50) | |"
              for ip in s["in_process"]),
            f"| **serve p50 / faster in-process p50** | **{s['latency_vs_in_process']:.1f}x** | at most 3x |",
            f"| throughput, concurrency 8 ({c8['requests']} requests, mean batch {c8['mean_batch']:.1f}) | "
            f"{c8['requests_per_second']:.0f} images/s (p99 {c8['p99_ms']:.0f} ms) | |",
            *(f"| in-process `predict_proba`, batches of {ip['batch_size']} ({ip['torch_threads']} torch "
              f"thread{'s' if ip['torch_threads'] > 1 else ''}) | {ip['batch_images_per_second']:.0f} images/s | |"
              for ip in s["in_process"]),
            f"| **serve c=8 / faster in-process batches** | **{s['throughput_vs_in_process_batch']:.0%}** | "
            "at least 60% |",
            f"| naive: one `headstart predict` process per image ({s['naive']['processes']}) | "
            f"{s['naive']['median_seconds']:.1f} s per image | |",
            f"| server RSS after {n1} / {n2} requests | {r1:.0f} / {r2:.0f} MiB ({mem['difference_mib']:+.0f}) | "
            f"within 50 MB |",
            "", f"What bounds throughput at concurrency 8: {s['bound']}. The load generator is Python threads "
                "on keep-alive connections, on the same cores."]
