"""Scale-out under torchrun (issue 13): the process group's backend and device, the sharding, and a
two-"node" rehearsal on one machine: two torchrun agents (--nnodes 2, one process each) meeting at
127.0.0.1, against one process with the same threads (1), on a real Fashion-MNIST subset at 32 px.

Every child binds loopback only (--rdzv-endpoint and --local-addr 127.0.0.1, GLOO_SOCKET_IFNAME=lo),
and every child is killed, with its process group, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headstart import distributed
from headstart.errors import HeadstartError

BIN = Path(sys.executable).parent
TIMEOUT = 240  # seconds for one job, far above what it takes: a hang fails the test instead of stalling it


# ---- unit tests: the environment torchrun leaves, the backend and device, the shares -------------------

def test_launch_comes_from_torchruns_environment():
    assert distributed.launch_from_env({}) == distributed.Launch()  # a plain `headstart train`
    launch = distributed.launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                                          "MASTER_PORT": "29500"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master) == (3, 4, 1, "10.0.0.2:29500")
    assert launch.distributed
    assert not distributed.launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}).distributed
    with pytest.raises(HeadstartError, match="RANK=4 is outside WORLD_SIZE=4"):
        distributed.launch_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(HeadstartError, match="not whole numbers"):
        distributed.launch_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_is_gloo_on_cpu_and_nccl_with_one_device_per_local_rank():
    # The CUDA path cannot run on these machines: the choice itself is what is tested.
    launch = distributed.Launch(rank=5, world_size=8, local_rank=1)
    assert distributed.backend_and_device(launch, "auto", cuda_available=True) == ("nccl", "cuda:1")
    assert distributed.backend_and_device(launch, "cuda", cuda_available=True) == ("nccl", "cuda:1")
    assert distributed.backend_and_device(launch, "cpu", cuda_available=True) == ("gloo", "cpu")
    assert distributed.backend_and_device(launch, "auto", cuda_available=False) == ("gloo", "cpu")
    with pytest.raises(HeadstartError, match="no CUDA device"):
        distributed.backend_and_device(launch, "cuda", cuda_available=False)


def test_a_plain_run_never_opens_a_process_group(monkeypatch):
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was opened"))
    with distributed.session() as launch:
        assert not launch.distributed and not distributed.active()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.all_gather_object({"a": 1}, "test") == [{"a": 1}]
        assert distributed.all_reduce_sum([1.5, 2], "test") == [1.5, 2.0]


def test_collective_timeout_is_configurable(monkeypatch):
    monkeypatch.delenv("HEADSTART_DIST_TIMEOUT", raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv("HEADSTART_DIST_TIMEOUT", "30")
    assert distributed.timeout_seconds() == 30.0
    monkeypatch.setenv("HEADSTART_DIST_TIMEOUT", "soon")
    with pytest.raises(HeadstartError, match="HEADSTART_DIST_TIMEOUT"):
        distributed.timeout_seconds()


@pytest.mark.parametrize("n,unit,world", [(500, 256, 2), (300, 64, 2), (10, 4, 3), (7, 1, 2), (3, 8, 4), (0, 256, 2),
                                          (1000, 64, 3)])
def test_shares_are_disjoint_whole_units_covering_everything_in_order(n, unit, world):
    shares = [distributed.share(n, unit, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # disjoint, in order, nothing left out
    for s in shares:
        if not len(s):  # more ranks than units: the last ones have nothing to do
            continue
        assert s.start % unit == 0 and (s.stop % unit == 0 or s.stop == n)  # whole units: the batches of one process
    units = [-(-len(s) // unit) for s in shares]
    assert max(units) - min(units) <= 1  # as even as whole units allow
    assert shares == [distributed.share(n, unit, r, world) for r in range(world)]  # deterministic


def test_bn_update_is_refused_on_cpu_under_torchrun(monkeypatch):
    """SyncBatchNorm runs on CUDA only in PyTorch: on gloo, --bn-update says so before any work."""
    import torch.distributed as dist

    from headstart.learn.distributed import check_supported
    from headstart.learn.finetune import FineTuneSettings

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    check_supported(FineTuneSettings(bn_update=False))
    with pytest.raises(HeadstartError, match="SyncBatchNorm.*CUDA only"):
        check_supported(FineTuneSettings(bn_update=True))


# ---- the two-"node" rehearsal ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    # One thread per process in both set-ups: equal threads give bitwise equal features.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HEADSTART_DIST_TIMEOUT": "60",
           "PYTHONUNBUFFERED": "1"}
    env.pop("HEADSTART_FAULT", None)
    return {**env, **extra}


@contextlib.contextmanager
def _started(commands: list[list[str]], env: dict, cwd: Path):
    """Start each command in its own process group; kill every group on the way out, whatever happened."""
    procs = []
    try:
        for i, cmd in enumerate(commands):
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(cwd / f"out{i}.txt", "w"),
                                          stderr=open(cwd / f"err{i}.txt", "w"), start_new_session=True))
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait(procs, timeout: float = TIMEOUT) -> list[float]:
    """Each process's exit time (monotonic); fails the test when one has not exited within `timeout`."""
    end, done = time.monotonic() + timeout, {}
    while len(done) < len(procs):
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                done[i] = time.monotonic()
        if time.monotonic() > end:
            pytest.fail(f"the job did not finish within {timeout}s (a hang?)")
        time.sleep(0.2)
    return [done[i] for i in range(len(procs))]


def _headstart_args(args: list[str]) -> list[str]:
    return ["-m", "headstart", *args, "--image-size", "32", "--workers", "0", "--json"]


def one_process(args: list[str], cwd: Path, **env) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    with _started([[sys.executable, *_headstart_args(args)]], _env(**env), cwd) as procs:
        _wait(procs)
    assert procs[0].returncode == 0, (cwd / "err0.txt").read_text()[-3000:]
    return json.loads((cwd / "out0.txt").read_text())


def two_nodes(args: list[str], cwd: Path, **env) -> tuple[list, list[float]]:
    """Two torchrun agents as two nodes of one process each; (processes, exit times)."""
    cwd.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
             "--max-restarts", "0", *_headstart_args(args)] for node in (0, 1)]
    with _started(cmds, _env(**env), cwd) as procs:
        times = _wait(procs)
    return procs, times


def cached_features(cache: Path, run: Path) -> dict[str, np.ndarray]:
    """The features `run` extracted into `cache` (its namespace: a fine-tuned backbone adds its own)."""
    from safetensors import safe_open

    namespace = json.loads((run / "config.json").read_text())["cache_namespace"]
    feats = {}
    for shard in sorted(cache.glob(f"features/{namespace}/*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for k, row in zip(json.loads(f.metadata()["keys"]), f.get_tensor("features")):
                feats[k] = row
    return feats


@pytest.fixture(scope="module")
def fmnist_with_bad_images(fmnist_small, tmp_path_factory) -> Path:
    """fmnist_small (500 images, so the sorted to-do list is two chunks of 256 and 244: one per rank), with
    one undecodable image in each rank's chunk."""
    data = tmp_path_factory.mktemp("dist") / "fmnist"
    shutil.copytree(fmnist_small, data)
    (data / "test" / "Bag" / "00000-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # rank 0's chunk
    (data / "train" / "Trouser" / "99999-broken.png").write_bytes(b"not an image either")  # rank 1's chunk
    return data


@pytest.fixture(scope="module")
def feature_extraction_runs(fmnist_with_bad_images):
    work = fmnist_with_bad_images.parent
    args = ["train", str(fmnist_with_bad_images), "--strategy", "feature-extraction"]
    one = one_process([*args, "--cache-dir", str(work / "cache1"), "--out", str(work / "fe1")], work / "one")
    procs, _ = two_nodes([*args, "--cache-dir", str(work / "cache2"), "--out", str(work / "fe2")], work / "two")
    assert [p.returncode for p in procs] == [0, 0], (work / "two" / "err0.txt").read_text()[-3000:]
    return work, one, json.loads((work / "two" / "out0.txt").read_text())


@pytest.mark.slow
def test_two_nodes_extract_bitwise_the_one_process_features_and_metrics(feature_extraction_runs):
    work, one, two = feature_extraction_runs
    a, b = cached_features(work / "cache1", work / "fe1"), cached_features(work / "cache2", work / "fe2")
    assert len(a) == 500 and set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) for k in a), "features differ from the one-process run's"
    shards = list((work / "cache2").glob(f"features/{json.loads((work / 'fe2' / 'config.json').read_text())['cache_namespace']}/*.safetensors"))
    assert len({s.name.split("-")[1] for s in shards}) == 2  # written by two processes (pid in the shard name)
    for key in ("accuracy", "confusion_matrix", "macro_f1"):
        assert one["test"][key] == two["test"][key]
    assert one["val_accuracy"] == two["val_accuracy"]
    assert two["extraction"]["computed"] == 500 and two["extraction"]["failed"] == 2
    # Only rank 0 prints the run; rank 1 wrote nothing into it.
    assert (work / "two" / "out1.txt").read_text().strip() == ""
    assert not list(work.glob("fe2.partial-*")) and (work / "fe2" / "metrics.json").is_file()


@pytest.mark.slow
def test_each_ranks_bad_image_is_in_the_runs_skipped_list(feature_extraction_runs):
    work, _, _ = feature_extraction_runs
    def skipped(run):
        return sorted(Path(s["path"]).name for s in json.loads((work / run / "skipped.json").read_text()))
    assert skipped("fe2") == skipped("fe1") == ["00000-broken.png", "99999-broken.png"]
    # Each is warned about once by the job, not once per rank.
    stderr = (work / "two" / "err0.txt").read_text() + (work / "two" / "err1.txt").read_text()
    assert [line for line in stderr.splitlines() if "skipping" in line and "broken.png" in line and
            "00000" in line].__len__() == 1, stderr[-3000:]
    assert sum("skipping" in line and "99999-broken.png" in line for line in stderr.splitlines()) == 1


@pytest.mark.slow
def test_two_nodes_fine_tune_as_one_process_and_resume_after_a_rank_dies(feature_extraction_runs):
    work, _, _ = feature_extraction_runs
    data = str(work / "fmnist")
    # fp32 asked for: the rule's bf16 on AMX rounds the two ranks' halves of a batch otherwise than one process
    # rounds the whole (train loss 1.1242 against 1.1218 there), and the comparison below is to 1e-3.
    args = ["train", data, "--strategy", "fine-tune", "--epochs", "2", "--unfreeze", "2", "--ft-precision", "fp32"]
    one = one_process([*args, "--cache-dir", str(work / "cache1"), "--out", str(work / "ft1")], work / "ft-one")
    # Rank 1 is killed once epoch 1 is done: rank 0 has written the checkpoint, and stops at the next all-reduce.
    run = str(work / "ft2")
    # No hang: two_nodes fails the test when the job is not over within TIMEOUT (240 s), and the collective timeout
    # is set far above that, so rank 0 stopped because gloo saw rank 1's sockets close, not because time ran out.
    # (The gap between the two exit times was asserted instead: a race between two timings on two busy cores.)
    procs, _ = two_nodes([*args, "--cache-dir", str(work / "cache2"), "--out", run], work / "ft-killed",
                         HEADSTART_FAULT="epoch:1@1", HEADSTART_DIST_TIMEOUT=str(10 * TIMEOUT))
    err = (work / "ft-killed" / "err0.txt").read_text()
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "another rank stopped or could not be reached during fine-tuning" in err, err[-3000:]
    assert "world size 2" in err
    procs, _ = two_nodes(["train", "--resume", run], work / "ft-resumed")
    err = (work / "ft-resumed" / "err0.txt").read_text()
    assert [p.returncode for p in procs] == [0, 0], err[-3000:]
    assert "resumed fine-tuning after epoch 1" in err
    two = json.loads((work / "ft-resumed" / "out0.txt").read_text())
    h1, h2 = one["fine_tune"]["history"], two["fine_tune"]["history"]
    assert h1["epoch"] == h2["epoch"] == [1, 2]
    for key in ("train_loss", "val_loss"):
        assert np.allclose(h1[key], h2[key], rtol=0, atol=1e-3), (key, h1[key], h2[key])
    assert abs(one["test"]["accuracy"] - two["test"]["accuracy"]) <= 0.005
    assert two["fine_tune"]["world_size"] == 2 and [r["rank"] for r in two["fine_tune"]["memory_per_rank"]] == [0, 1]


@pytest.mark.slow
def test_a_dead_rank_stops_extraction_with_a_clear_message_and_its_chunks_are_reused(feature_extraction_runs):
    from headstart.engines.features import FeatureCache

    work, _, _ = feature_extraction_runs
    cache = work / "cache3"
    # No hang: over within TIMEOUT, far below the collective timeout (as in the fine-tuning test above).
    procs, _ = two_nodes(["train", str(work / "fmnist"), "--strategy", "feature-extraction", "--cache-dir",
                          str(cache), "--out", str(work / "fe3")], work / "killed", HEADSTART_FAULT="chunk:1@1",
                         HEADSTART_DIST_TIMEOUT=str(10 * TIMEOUT))
    assert procs[1].returncode != 0 and procs[0].returncode != 0  # torchrun exits 1 when its worker failed
    err = (work / "killed" / "err0.txt").read_text()
    assert "headstart: error: rank 0 of 2: another rank stopped or could not be reached during feature " \
           "extraction" in err, err[-3000:]
    assert not (work / "fe3").exists()
    # Rank 1 stored its chunk before it died: a new start finds those features in the cache.
    namespace = json.loads(next(cache.glob("features/*/namespace.json")).read_text())
    namespace.pop("format")
    stored = FeatureCache(cache, namespace)
    stored.refresh()
    complete = cached_features(work / "cache2", work / "fe2")
    assert len(complete) == 500 and all(stored.contains(k) for k in complete)  # both ranks' chunks
    # Started again (as `headstart extract`, under torchrun too), the job computes nothing.
    procs, _ = two_nodes(["extract", str(work / "fmnist"), "--cache-dir", str(cache)], work / "again")
    assert [p.returncode for p in procs] == [0, 0], (work / "again" / "err0.txt").read_text()[-3000:]
    again = json.loads((work / "again" / "out0.txt").read_text())
    assert (again["from_cache"], again["computed"], again["failed"], again["world_size"]) == (500, 0, 2, 2)
    assert (work / "again" / "out1.txt").read_text().strip() == ""  # rank 0 reports for every rank


def test_extract_fills_the_cache_only_and_reports_throughput(image_folder, tmp_path, capsys, one_torch_thread):
    from headstart import cli

    cache = tmp_path / "cache"
    cache.mkdir()
    assert cli.main(["extract", str(image_folder), "--image-size", "32", "--cache-dir", str(cache), "--workers", "0",
                     "--engine", "torch", "--weights", "none"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: 12 images computed in" in out and "images/s" in out
    assert "in all: 12 images, 0 from cache, 12 computed" in out and "world size 1" in out
    assert sorted(p.name for p in cache.iterdir()) == ["features"]  # the cache, and nothing else anywhere
    assert len(list(cache.glob("features/*/*.safetensors"))) == 1
    assert cli.main(["extract", str(image_folder), "--image-size", "32", "--cache-dir", str(cache), "--workers", "0",
                     "--engine", "torch", "--weights", "none", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["from_cache"], again["computed"], again["world_size"]) == (12, 0, 1)
    # everything cached: said plainly, not "12 from cache, 0 computed in 0.0s (-)" (issue 29)
    assert cli.main(["extract", str(image_folder), "--image-size", "32", "--cache-dir", str(cache), "--workers", "0",
                     "--engine", "torch", "--weights", "none"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: none to compute" in out and "in all: 12 images, all 12 from cache on world size 1" in out
    assert "0 computed" not in out
