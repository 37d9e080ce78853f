"""`headstart serve` end to end: a real server process on a free 127.0.0.1 port, a real browser.

The server runs a tiny feature-extraction run (Fashion-MNIST, 64 px, real MobileNetV2 weights)
and is asked what `headstart predict` answers for the same files, and where the model looked (the maps
`Model.explain` draws). The page is driven in Debian's headless Chromium through Playwright; a missing
browser fails the test, it does not skip.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MEASURED

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The server, the run and `predict` are compared to 1e-5: pinned to fp32, since on a native-bf16 CPU the
# rule's bf16 could differ by more when the server batches requests together.
PRECISION = "fp32"
MAX_UPLOAD_MB = 2  # over the form parser's 1 MB in-memory spool, so a part can reach the disk


# --- a real server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`headstart serve` in a subprocess, with its own temp folder (to prove nothing is left in it)."""

    def __init__(self, run: Path, workdir: Path, *args: str):
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.tmp = workdir / f"tmp-{self.port}"
        self.tmp.mkdir(parents=True)
        self.log = workdir / f"server-{self.port}.log"
        env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONPATH": os.pathsep.join(
            [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        env.pop("HEADSTART_TOKEN", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headstart.cli", "serve", str(run), "--port", str(self.port),
                 "--cache-dir", str(workdir / "cache"), "--max-upload-mb", str(MAX_UPLOAD_MB),
                 "--precision", PRECISION, *args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.tmp_at_start: list[str] = []

    def wait_ready(self, timeout: float = 180) -> "Server":
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.tmp_at_start = sorted(os.listdir(self.tmp))  # torch's own start-up files
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"headstart serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if request(self, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"headstart serve was not ready after {timeout}s:\n{self.log.read_text()}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def holds(self, conn: http.client.HTTPConnection) -> bool:
        """Whether the server has accepted `conn` (holds its end as an open file), read from the kernel's tables.

        A connection waiting in the listen backlog has a row in /proc/net/tcp with inode 0; once the server
        accepts it, the row gets the inode of a socket among the server's open files. Counting the server's
        files instead races with the readiness probe's connection closing at the same time."""
        client_port = conn.sock.getsockname()[1]
        wanted = (f"0100007F:{self.port:04X}", f"0100007F:{client_port:04X}")
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                inode = fields[9]
        if inode in (None, "0"):
            return False
        target = f"socket:[{inode}]"
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                pass  # closed meanwhile
        return False

    def deleted_open_files(self) -> list[str]:
        """Open files of the server that were deleted: where a spooled upload left open would show."""
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        targets = []
        for fd in fd_dir.iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                pass  # closed meanwhile
        return sorted(t for t in targets if t.endswith("(deleted)"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def until(condition, timeout: float = 60) -> bool:
    """Whether `condition()` came true within `timeout` seconds, asked every 0.05 s: a wait for what the server
    does in its own time, whose timeout is only a hang guard (no assertion on how long it took)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def request(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict | str]:
    c = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        is_json = r.getheader("content-type", "").startswith("application/json")
        return r.status, json.loads(data) if is_json else data.decode()
    finally:
        if conn is None:
            c.close()


def multipart(*files: tuple[str, bytes], field: str = "file") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}", **AUTH}


def upload(server: Server, *files: tuple[str, bytes], query: str = "", conn=None, path: str = "/predict"):
    body, headers = multipart(*files)
    return request(server, "POST", path + query, body, headers, conn)


def explain(server: Server, *files: tuple[str, bytes], query: str = "", conn=None):
    return upload(server, *files, query=query, conn=conn, path="/explain")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def run_dir(fmnist_tiny, workdir, one_torch_thread) -> Path:
    import headstart

    return headstart.train(fmnist_tiny, strategy="feature-extraction", image_size=64, out=str(workdir / "run"),
                           cache_dir=str(workdir / "cache"), precision=PRECISION).run_dir


@pytest.fixture(scope="module")
def server(run_dir, workdir, request):
    s = Server(run_dir, workdir, "--token", TOKEN)
    try:
        request.getfixturevalue("expected")  # while the server starts
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def test_images(fmnist_tiny) -> list[Path]:
    return [sorted((fmnist_tiny / "test" / c).glob("*.png"))[0] for c in ("Sneaker", "Trouser", "Bag", "Shirt")]


@pytest.fixture(scope="module")
def expected(run_dir, test_images, workdir, one_torch_thread):
    """What `headstart predict --top-k 3` answers for each file, computed one file at a time."""
    from headstart import load
    from headstart.runs.predict import predict_files

    model = load(run_dir)
    out = {}
    for p in test_images:
        rows, _ = predict_files(model, [p], top_k=3, cache_dir=workdir / "predict-cache", precision=PRECISION)
        out[p.name] = rows[0]["predictions"]
    return out


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [g["class"] for g in got] == [w["class"] for w in want]
    assert np.allclose([g["probability"] for g in got], [w["probability"] for w in want], rtol=0, atol=1e-5)


# --- the API ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_answers_what_headstart_predict_answers(server, test_images, expected):
    for p in test_images:
        status, body = upload(server, (p.name, p.read_bytes()), query="?top_k=3")
        assert status == 200, body
        assert body["results"][0]["name"] == p.name
        assert_same(body["results"][0]["predictions"], expected[p.name])
    # several files in one request, in order; one image as the raw body
    status, body = upload(server, *[(p.name, p.read_bytes()) for p in test_images[:2]], query="?top_k=3")
    assert status == 200 and [r["name"] for r in body["results"]] == [p.name for p in test_images[:2]]
    for r in body["results"]:
        assert_same(r["predictions"], expected[r["name"]])
    p = test_images[2]
    status, body = request(server, "POST", f"/predict?top_k=3&name={p.name}", p.read_bytes(), AUTH)
    assert status == 200 and body["results"][0]["name"] == p.name
    assert_same(body["results"][0]["predictions"], expected[p.name])
    status, body = upload(server, (p.name, p.read_bytes()))  # the server's --top-k default
    assert len(body["results"][0]["predictions"]) == 3


@pytest.mark.slow
def test_a_photo_is_decoded_as_predict_decodes_it(server, run_dir, test_images, workdir, one_torch_thread):
    """A large EXIF-rotated JPEG: predict decodes it in draft mode and turns it; so must the server."""
    from headstart import load
    from headstart.runs.predict import predict_files

    im = Image.open(test_images[0]).convert("RGB").resize((600, 450), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = workdir / "photo.jpg"
    im.save(photo, quality=92, exif=exif)
    rows, _ = predict_files(load(run_dir), [photo], top_k=5, cache_dir=workdir / "predict-cache",
                            precision=PRECISION)
    status, body = upload(server, ("photo.jpg", photo.read_bytes()), query="?top_k=5")
    assert status == 200, body
    assert_same(body["results"][0]["predictions"], rows[0]["predictions"])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data (as in tests/reliability_helpers.py)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.slow
def test_bad_requests_get_a_4xx_json_that_says_what_is_wrong(server, test_images):
    fds_before = server.open_fds()
    png = test_images[0].read_bytes()
    cases = [
        (upload(server, ("notes.txt", b"these are not pixels\n" * 50)), 415, "notes.txt: not an image"),
        (upload(server, ("cut.png", png[: len(png) // 2])), 422, "cut.png: truncated file"),
        (upload(server, ("huge.png", _png_header_only(20_000, 20_000))), 422, "huge.png: too many pixels"),
        (upload(server, ("empty.png", b"")), 400, "empty.png: empty file"),
        (upload(server), 400, "no file"),
        (request(server, "POST", "/predict", b"", AUTH), 400, "no file"),
        (upload(server, ("a.png", png), query="?top_k=many"), 400, "top_k"),
        (upload(server, ("a.png", png), query="?top_k=0"), 400, "top_k: must be at least 1, not 0"),
        (upload(server, ("a.png", png), query="?top_k=-1"), 400, "top_k: must be at least 1, not -1"),
        (request(server, "GET", "/nowhere", headers=AUTH), 404, "Not Found"),
        (request(server, "POST", "/predict", b"--nope\r\ngarbage", {**AUTH, "Content-Type":
                 "multipart/form-data; boundary=other"}), 400, "multipart"),
        (upload(server, *[(f"{i}.png", png) for i in range(65)]), 400, "Too many files"),
    ]
    for (status, body), want_status, want in cases:
        assert status == want_status and isinstance(body, dict) and want in body["error"], (status, body)
    # one bad file among good ones: the request fails and names it
    status, body = upload(server, ("good.png", png), ("bad.png", b"GIF89a nonsense"))
    assert status == 415 and [f["name"] for f in body["files"]] == ["bad.png"], body
    # damaged files of every kind: each gets an answer, never a 500, and the server stays up
    rng = np.random.default_rng(0)
    jpg = io.BytesIO()
    Image.open(test_images[1]).convert("RGB").resize((90, 90)).save(jpg, "JPEG")
    for i in range(40):
        data = bytearray((png, jpg.getvalue())[i % 2])
        for j in rng.integers(0, len(data), size=1 + i % 8):
            data[j] = rng.integers(0, 256)
        status, body = upload(server, (f"flipped-{i}", bytes(data)))
        assert status == 200 or (status in (400, 415, 422) and body["error"].startswith(f"flipped-{i}: ")), body
    # The server closes its side of each connection just after the client: waited for, not timed (a hang guard).
    assert until(lambda: server.open_fds() <= fds_before), "a file or socket was left open"
    assert request(server, "GET", "/healthz")[0] == 200


def _send_big(server: Server, body_size: int, chunked: bool, as_form_part: bool = False,
              path: str = "/predict") -> tuple[int, dict]:
    """POST about body_size bytes, with Content-Length or chunked; the server may answer before the end."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        c.putrequest("POST", path)
        c.putheader("Authorization", AUTH["Authorization"])
        c.putheader("Content-Type", "multipart/form-data; boundary=xyz" if as_form_part else "application/octet-stream")
        c.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(body_size))))
        c.endheaders()
        block = os.urandom(64 * 1024)
        try:
            if as_form_part:  # a file part that never ends
                head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
                c.send(b"%x\r\n%s\r\n" % (len(head), head) if chunked else head)
            for _ in range(body_size // len(block)):
                c.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: read its answer
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.mark.slow
def test_a_body_over_the_limit_gets_413_without_being_buffered(server, test_images):
    rss_before = server.rss_mb()
    for chunked in (False, True):  # refused by Content-Length, and by counting a streamed body
        status, body = _send_big(server, 3 * 2**20, chunked)
        assert status == 413 and f"limit of {MAX_UPLOAD_MB} MB" in body["error"], body
    status, body = _send_big(server, 40 * 2**20, chunked=True)  # 40x the limit
    assert status == 413
    assert server.rss_mb() < rss_before + 20
    big = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)  # ~3 MB as PNG
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    status, body = upload(server, ("big.png", buf.getvalue()))
    assert status == 413, body
    assert upload(server, (test_images[0].name, test_images[0].read_bytes()))[0] == 200


@pytest.mark.slow
def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(server):
    """The header alone gets the 413: 3 MiB announced, not one byte sent. A server that read the body first
    would wait for bytes that never come (its streaming count refuses only what it has read), so no
    answer would arrive before the client's timeout, which fails the test."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        c.putrequest("POST", "/predict")
        for k, v in {**AUTH, "Content-Type": "application/octet-stream", "Content-Length": str(3 * 2**20)}.items():
            c.putheader(k, v)
        c.endheaders()  # and no body
        r = c.getresponse()
        body = json.loads(r.read())
    finally:
        c.close()
    assert r.status == 413 and f"request body of {3 * 2**20:,} bytes is over the server's limit of " \
        f"{MAX_UPLOAD_MB} MB" in body["error"], body


@pytest.mark.slow
def test_no_temporary_file_is_left_behind(server, test_images):
    """Parts over 1 MB are spooled to disk by the form parser: even those are gone after the request."""
    deleted_before = server.deleted_open_files()
    png = test_images[0].read_bytes()
    padding = os.urandom(1_500_000)
    status, _ = upload(server, ("a.png", png), ("pad.png", padding))  # 1.5 MB part: spooled to disk
    assert status == 415
    status, _ = upload(server, ("a.png", png), ("b.png", png))
    assert status == 200
    status, _ = _send_big(server, 3 * 2**20, chunked=True, as_form_part=True)  # cut off in mid-part, on disk
    assert status == 413
    body, headers = multipart(("a.png", png), ("pad.png", padding))
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # a client that goes away
    c.putrequest("POST", "/predict")
    for k, v in {**headers, "Content-Length": str(len(body))}.items():
        c.putheader(k, v)
    c.endheaders()
    c.send(body[: len(body) * 3 // 4])
    time.sleep(0.3)  # most often the server has spooled part of it by then; what follows holds either way
    c.close()
    assert request(server, "GET", "/healthz")[0] == 200
    # Cleaning up after a client that went away is waited for, not given a fixed time (a race on busy cores).
    assert until(lambda: sorted(os.listdir(server.tmp)) == server.tmp_at_start
                 and server.deleted_open_files() == deleted_before), (os.listdir(server.tmp),
                                                                      server.deleted_open_files())


@pytest.mark.slow
def test_token_is_required_except_for_healthz_and_the_page(server, test_images):
    png = test_images[0].read_bytes()
    body, headers = multipart(("a.png", png))
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, answer = request(server, "POST", "/predict", body, {"Content-Type": headers["Content-Type"], **h})
        assert status == 401 and "token" in answer["error"]
        assert request(server, "GET", "/model", headers=h)[0] == 401
    assert request(server, "GET", "/healthz")[0] == 200
    status, page = request(server, "GET", "/")
    assert status == 200 and "<input id=\"files\" type=\"file\"" in page
    assert request(server, "POST", "/predict", body, headers)[0] == 200


@pytest.mark.slow
def test_model_describes_the_model_and_the_run(server, run_dir):
    status, info = request(server, "GET", "/model", headers=AUTH)
    assert status == 200
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["backbone"] == "mobilenet_v2" and info["image_size"] == 64 and len(info["classes"]) == 10
    assert info["engine"]["engine"] == config["engine"]["engine"] and info["engine"]["precision"] == PRECISION
    assert info["metrics"]["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert request(server, "GET", "/docs")[0] in (401, 404)  # no Swagger UI from a CDN
    assert request(server, "GET", "/docs", headers=AUTH)[0] == 404
    assert request(server, "GET", "/redoc", headers=AUTH)[0] == 404


@pytest.mark.slow
def test_schemathesis_finds_the_server_true_to_its_openapi_document(server, tmp_path):
    """Schemathesis (property-based requests made from /openapi.json) with every check, against the live server
    and its token: each answer is documented with its body, schema-valid requests are served and invalid
    ones refused, undeclared methods get 405 with `Allow`, requests without the token 401. Bounded: 25
    examples per operation and phase, fixed seed; its hooks (named by schemathesis.toml) send real images."""
    config = (ROOT / "schemathesis.toml").read_text()
    hooks = ROOT / re.search(r'^hooks\s*=\s*"([^"]+)"', config, re.M).group(1)
    assert hooks.is_file(), hooks
    served_before = request(server, "GET", "/model", headers=AUTH)[1]["served"]["images"]
    # Run in tmp_path: Schemathesis keeps its caches (.schemathesis, .hypothesis) in the working folder.
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.origin}/openapi.json", "--checks", "all",
         "--max-examples", "25", "--seed", "0", "--workers", "1", "--generation-database", "none",
         "--request-timeout", "60", "--header", f"Authorization: {AUTH['Authorization']}", "--no-color"],
        cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0 and "No issues found" in done.stdout, (done.stdout + done.stderr)[-8000:]
    assert "5 selected / 5 total" in done.stdout, done.stdout[-3000:]
    served = request(server, "GET", "/model", headers=AUTH)[1]["served"]["images"] - served_before
    MEASURED.append(f"serve: Schemathesis, all checks: {re.search(r'[0-9]+ generated', done.stdout).group(0)} "
                    f"test cases, {served} images classified")
    assert served > 0  # its images were classified, not only refused


@pytest.mark.slow
def test_concurrent_requests_all_succeed_and_memory_stays_flat(server, test_images, expected):
    images = [(p.name, p.read_bytes()) for p in test_images]
    local = threading.local()

    def one(i: int) -> tuple[int, str, list | dict]:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        name, data = images[i % len(images)]
        status, body = upload(server, (name, data), query="?top_k=3", conn=local.conn)
        return status, name, body["results"][0]["predictions"] if status == 200 else body

    def burst(n: int) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(n)))
        seconds = time.perf_counter() - t0
        assert all(s == 200 for s, _, _ in results), [r for r in results if r[0] != 200][:3]
        for _, name, predictions in results:  # batched with other requests or not, the same answer
            assert_same(predictions, expected[name])
        return seconds

    served_before = request(server, "GET", "/model", headers=AUTH)[1]["served"]
    burst(100)
    rss_100 = server.rss_mb()
    seconds = burst(200)
    burst(100)
    rss_400 = server.rss_mb()
    served = request(server, "GET", "/model", headers=AUTH)[1]["served"]
    images_run = served["images"] - served_before["images"]
    batches = served["batches"] - served_before["batches"]
    MEASURED.append(f"serve: 200 requests from 8 threads in {seconds:.1f}s ({200 / seconds:.0f}/s); "
                    f"400 images in {batches} batches; RSS {rss_100:.0f} MB after 100, {rss_400:.0f} MB after 400")
    assert images_run == 400
    assert batches < images_run  # waiting requests were batched together
    assert rss_400 - rss_100 < 25, (rss_100, rss_400)


@pytest.mark.slow
def test_a_gray_upload_decodes_as_one_channel_and_answers_as_its_rgb_copy(run_dir, test_images, workdir,
                                                                         one_torch_thread):
    """Gray images are resized as one channel (a third of the work); in a batch with colour images they are
    repeated to three. The answers are those of the same pixels as RGB, alone or batched with others."""
    import torch

    from headstart import load
    from headstart.serve.app import Predictor

    predictor = Predictor(load(run_dir), engine="onnxruntime", precision="fp32", cache_dir=workdir / "cache")
    decoded = [predictor.decode(p.read_bytes()) for p in test_images]
    assert all(x.shape[0] == 1 for x in decoded)  # Fashion-MNIST is grayscale
    rgb = [x.expand(3, -1, -1).clone() for x in decoded]
    alone = np.concatenate([predictor.submit([x]).result(60) for x in rgb])
    assert np.allclose(predictor.submit(decoded).result(60), alone, rtol=0, atol=1e-5)  # a gray batch
    mixed = predictor.submit([decoded[0], rgb[1], decoded[2], rgb[3]]).result(60)  # gray among colour
    assert np.allclose(mixed, alone, rtol=0, atol=1e-5)
    colour = predictor.decode(_png_rgb(test_images[0]))  # the same image saved as RGB
    assert colour.shape[0] == 3 and all(torch.equal(c, decoded[0][0]) for c in colour)


def _png_rgb(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="PNG")
    return out.getvalue()


# --- start-up, shutdown and the network --------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(run_dir, workdir, test_images, expected):
    server = Server(run_dir, workdir)  # no token
    try:
        server.wait_ready()
        p = test_images[0]
        body, headers = multipart((p.name, p.read_bytes()))
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        c.putrequest("POST", "/predict?top_k=3")
        c.putheader("Content-Type", headers["Content-Type"])
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        c.send(body[:100])  # the request is in flight: headers in, body half sent
        # Once the server holds the connection it reads the headers, already sent, before its next shutdown check
        # (uvicorn looks every 0.1 s): waited for, where a sleep of 1.5 s raced it on busy cores, and read from
        # the kernel's socket tables, where a count of the server's open files raced the probe's closing.
        assert until(lambda: server.holds(c)), "the server never accepted the connection"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.proc.poll() is None, "the server exited with a request in flight"
        c.send(body[100:])
        r = c.getresponse()
        answer = json.loads(r.read())
        assert r.status == 200
        assert_same(answer["results"][0]["predictions"], expected[p.name])
        c.close()
        t0 = time.monotonic()
        assert server.proc.wait(timeout=20) == 0
        MEASURED.append(f"serve: exited {time.monotonic() - t0:.2f}s after its last request was answered")
        with pytest.raises(OSError):
            request(server, "GET", "/healthz")  # no longer listening
    finally:
        server.stop()


@pytest.mark.slow
def test_a_port_in_use_is_exit_2_naming_it(run_dir, workdir):
    # A child process, as a user runs it: uvicorn configures logging onto the process's stderr, which in
    # this process would be pytest's capture of one test (closed after it, and written to by later ones).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "headstart.cli", "serve", str(run_dir), "--cache-dir",
                               str(workdir / "cache"), "--port", str(port), "--precision", PRECISION],
                              capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.slow
def test_host_0000_says_it_is_reachable_from_the_network(run_dir, workdir, monkeypatch, capsys, one_torch_thread):
    """The CLI path with uvicorn replaced: nothing but 127.0.0.1 is ever bound by this suite."""
    from headstart import cli
    from headstart.serve import app as serve

    calls = []
    monkeypatch.setattr(serve, "run_server", lambda app, **kw: calls.append(kw))
    common = ["serve", str(run_dir), "--cache-dir", str(workdir / "cache"), "--port", "8123"]
    assert cli.main(common) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8123
    assert "reachable from the network" not in capsys.readouterr().err
    assert cli.main(common + ["--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert "0.0.0.0:8123, reachable from the network" in err and "add --token" in err
    assert "add --token" not in serve.exposure_note("0.0.0.0", 8123, "t")
    assert serve.exposure_note("::1", 8000, None) is None and serve.exposure_note("localhost", 8000, None) is None
    from headstart import load
    from headstart.engines.rule import choose_engine

    bundle = run_dir / "model"  # a bare bundle has no run metrics; a run directory has them
    assert serve.model_info(load(bundle), choose_engine(), bundle)["metrics"] is None
    assert serve.model_info(load(run_dir), choose_engine(), run_dir)["metrics"]["test"]["n_images"] == 40


# --- where the model looked: /explain ------------------------------------------------------------------------------


def png_of(result: dict) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(result["png"])))
    im.load()
    return im


def map_of(result: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in result["map"]], dtype=np.float64)


@pytest.fixture(scope="module")
def maps(run_dir, test_images, workdir, one_torch_thread) -> dict:
    """`Model.explain`'s map of each test image, in this process, as the server's engine runs it."""
    from headstart import load

    model = load(run_dir)
    return {p.name: e for p, e in zip(test_images, model.explain(test_images, cache_dir=workdir / "cache",
                                                                   precision=PRECISION))}


@pytest.mark.slow
def test_explain_answers_predicts_class_with_the_models_map_at_the_images_size(server, test_images, expected, maps):
    for p in test_images:
        status, body = explain(server, (p.name, p.read_bytes()), query="?format=both")
        assert status == 200, body
        (r,) = body["results"]
        want = expected[p.name][0]
        assert r["name"] == p.name and r["class"] == want["class"] and r["predicted"]["class"] == want["class"]
        assert r["probability"] == r["predicted"]["probability"]
        assert abs(r["probability"] - want["probability"]) <= 1e-5
        assert r["method"] == "cam"  # the run's head is linear
        with Image.open(p) as im:
            size = im.size  # 28 x 28: under 256 px, the map has the image's own size
        assert (r["width"], r["height"]) == (r["image_width"], r["image_height"]) == size
        png, values = png_of(r), map_of(r)
        assert png.format == "PNG" and png.mode == "RGBA" and png.size == size
        assert values.shape == (size[1], size[0])
        # The model's own map (Model.explain on the file), to the 5 digits answered; the PNG is transparent
        # exactly where the centre crop cut the image away (NaN, null in the JSON) and drawn elsewhere.
        own = maps[p.name]
        assert own.class_ == want["class"]
        assert np.array_equal(np.isnan(values), np.isnan(own.map))
        top = np.nanmax(np.abs(own.map))
        assert np.nanmax(np.abs(values - own.map)) <= 1e-4 * top
        alpha = np.asarray(png)[..., 3]
        assert np.array_equal(alpha == 0, np.isnan(values)) and (alpha > 0).any()
        assert np.unique(alpha).tolist() == [0, 128]
    # Another class's map, on request; the predicted class is still said.
    shoe, trouser = test_images[0], test_images[1]
    status, body = explain(server, (shoe.name, shoe.read_bytes()), query="?class=Trouser&format=array")
    assert status == 200, body
    (r,) = body["results"]
    assert r["class"] == "Trouser" and r["predicted"]["class"] == expected[shoe.name][0]["class"]
    assert r["probability"] < r["predicted"]["probability"] and "png" not in r and len(r["map"]) == 28
    # Several files in one request, in the order sent; one image as the raw body; the PNG alone by default.
    status, body = explain(server, *[(p.name, p.read_bytes()) for p in test_images])
    assert status == 200 and [r["name"] for r in body["results"]] == [p.name for p in test_images]
    assert [r["class"] for r in body["results"]] == [expected[p.name][0]["class"] for p in test_images]
    assert all("png" in r and "map" not in r for r in body["results"])
    status, body = request(server, "POST", f"/explain?name={trouser.name}", trouser.read_bytes(), AUTH)
    assert status == 200 and body["results"][0]["name"] == trouser.name
    assert body["results"][0]["class"] == expected[trouser.name][0]["class"]


@pytest.mark.slow
def test_explain_of_a_photo_is_its_map_at_most_256_px_a_side(server, run_dir, test_images, workdir,
                                                              one_torch_thread):
    """A large EXIF-rotated JPEG: /predict's class, and the model's map of the whole file (placed on the
    600 x 450 photo as the user sees it) shrunk to 192 x 256: the server draws it on the draft-decoded
    image, so the two agree to interpolation, not to the digit."""
    from headstart import load
    from headstart.runs.predict import predict_files

    im = Image.open(test_images[0]).convert("RGB").resize((600, 450), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: shown 450 wide, 600 high
    photo = workdir / "explain-photo.jpg"
    im.save(photo, quality=92, exif=exif)
    model = load(run_dir)
    rows, _ = predict_files(model, [photo], top_k=1, cache_dir=workdir / "predict-cache", precision=PRECISION)
    (own,) = model.explain([photo], cache_dir=workdir / "cache", precision=PRECISION)
    status, body = explain(server, ("photo.jpg", photo.read_bytes()), query="?format=both")
    assert status == 200, body
    (r,) = body["results"]
    assert r["class"] == rows[0]["predictions"][0]["class"] == own.class_
    assert (r["image_width"], r["image_height"]) == (450, 600) and (r["width"], r["height"]) == (192, 256)
    assert png_of(r).size == (192, 256)
    values = map_of(r)
    assert values.shape == (256, 192) and own.map.shape == (600, 450)
    shrunk = np.asarray(Image.fromarray(own.map).resize((192, 256), Image.BILINEAR))
    both = np.isfinite(values) & np.isfinite(shrunk)
    assert both.mean() > 0.5 and abs(np.isnan(values).mean() - np.isnan(shrunk).mean()) < 0.02
    assert np.abs(values - shrunk)[both].max() <= 0.05 * np.abs(shrunk[both]).max()


@pytest.mark.slow
def test_explain_refuses_what_predict_refuses_and_an_unknown_class(server, test_images):
    png = test_images[0].read_bytes()
    body, headers = multipart(("a.png", png))
    status, answer = request(server, "POST", "/explain", body, {"Content-Type": headers["Content-Type"]})
    assert status == 401 and "token" in answer["error"]
    cases = [
        (explain(server, ("notes.txt", b"these are not pixels\n" * 50)), 415, "notes.txt: not an image"),
        (explain(server, ("cut.png", png[: len(png) // 2])), 422, "cut.png: truncated file"),
        (explain(server, ("huge.png", _png_header_only(20_000, 20_000))), 422, "huge.png: too many pixels"),
        (explain(server, ("empty.png", b"")), 400, "empty.png: empty file"),
        (explain(server), 400, "no file"),
        (request(server, "POST", "/explain", b"", AUTH), 400, "curl -F file=@shoe.png .../explain"),
        (explain(server, ("a.png", png), query="?class=Unicorn"), 400,
         "query class: class 'Unicorn' is not one of the model's classes (Ankle_boot, Bag,"),
        (explain(server, ("a.png", png), query="?class=trouser"), 400, "not one of the model's classes"),
        (explain(server, ("a.png", png), query="?format=jpeg"), 400, "query format: one of png, array, both"),
        (explain(server, *[(f"{i}.png", png) for i in range(65)]), 400, "Too many files"),
        (_send_big(server, 3 * 2**20, chunked=False, path="/explain"), 413, f"limit of {MAX_UPLOAD_MB} MB"),
        (_send_big(server, 3 * 2**20, chunked=True, path="/explain"), 413, f"limit of {MAX_UPLOAD_MB} MB"),
    ]
    for (status, answer), want_status, want in cases:
        assert status == want_status and isinstance(answer, dict) and want in answer["error"], (status, answer)
    status, answer = explain(server, ("good.png", png), ("bad.png", b"GIF89a nonsense"))
    assert status == 415 and [f["name"] for f in answer["files"]] == ["bad.png"], answer
    assert request(server, "GET", "/healthz")[0] == 200


@pytest.mark.slow
def test_explain_and_predict_at_once_answer_as_alone(server, test_images, expected):
    """Maps are drawn on the inference thread between predict batches: 48 requests of both kinds from 8
    threads all answer what each answers alone."""
    images = [(p.name, p.read_bytes()) for p in test_images]
    local = threading.local()

    def one(i: int):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        name, data = images[i % len(images)]
        status, body = upload(server, (name, data), query="?top_k=3", conn=local.conn,
                              path="/explain" if i % 2 else "/predict")
        return i, name, status, body

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(48)))
    for i, name, status, body in answers:
        assert status == 200, body
        (r,) = body["results"]
        if i % 2:
            assert r["class"] == expected[name][0]["class"]
            assert abs(r["probability"] - expected[name][0]["probability"]) <= 1e-5
            assert png_of(r).size == (28, 28)
        else:
            assert_same(r["predictions"], expected[name])


@pytest.mark.slow
def test_an_ensemble_explains_the_class_it_predicts(run_dir, test_images, workdir, one_torch_thread):
    """Members that decode an image at two sizes (64 px, and 96 px with flips): /explain draws the mean of
    their maps (Ensemble.explain) for the class /predict answers, at the image's size."""
    import dataclasses

    from headstart import load
    from headstart.models.ensemble import Ensemble
    from headstart.serve import app as serve

    small = load(run_dir)
    wide = dataclasses.replace(load(run_dir), tta="flip", preprocessing=small.preprocessing.scaled(96))
    ensemble = Ensemble([small, wide], names=["64 px", "96 px, flips"])
    predictor = serve.Predictor(ensemble, engine="onnxruntime", precision=PRECISION, cache_dir=workdir / "cache")
    app = serve.Guard(serve.create_app(predictor, {}), max_bytes=2**20)
    for p in test_images[:2]:
        data = p.read_bytes()
        status, predicted = _asgi_post(app, f"/predict?top_k=1&name={p.name}", data, {"content-type": "image/png"})
        assert status == 200, predicted
        status, body = _asgi_post(app, f"/explain?format=both&name={p.name}", data, {"content-type": "image/png"})
        assert status == 200, body
        (r,) = body["results"]
        assert r["class"] == predicted["results"][0]["predictions"][0]["class"]
        assert r["probability"] == predicted["results"][0]["predictions"][0]["probability"]
        assert r["method"] == "mean of cam, cam" and png_of(r).size == (28, 28)
        (own,) = ensemble.explain([p], class_=r["class"], engine="onnxruntime", precision=PRECISION,
                                  cache_dir=workdir / "cache")
        values = map_of(r)
        assert np.array_equal(np.isnan(values), np.isnan(own.map))
        assert np.nanmax(np.abs(values - own.map)) <= 1e-4 * np.nanmax(np.abs(own.map))


# --- the page, in a real browser ----------------------------------------------------------------------------------


def test_the_page_has_no_external_url():
    from importlib import resources

    page = resources.files("headstart.serve").joinpath("static/index.html").read_text()
    assert "http:" not in page and "https:" not in page and "//cdn" not in page and "src=\"//" not in page


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, test_images, expected, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium).")
    from playwright.sync_api import expect, sync_playwright


    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all\n")
    shoe = test_images[0]
    want = expected[shoe.name][0]["class"]
    requests: list[str] = []
    console: list[tuple] = []  # the errors the browser's console shows, uncaught exceptions included
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"])
        expect.set_options(timeout=30_000)  # two cores shared with other tests
        try:
            page = browser.new_page(viewport={"width": 900, "height": 400})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: console.append((m.text, m.location.get("url", "")))
                    if m.type == "error" else None)
            page.on("pageerror", lambda exc: console.append((f"uncaught: {exc}", "")))
            # Listening from the start turns on Playwright's file-chooser interception before any key is
            # pressed; enabled only by expect_file_chooser, the first Enter raced it (2 in 20 missed here).
            page.on("filechooser", lambda chooser: None)
            page.goto(server.origin + "/")
            # The token form shows up (this server needs one); then the model is described.
            page.get_by_label("This server needs a token").fill(TOKEN)
            page.get_by_role("button", name="Use token").click()
            expect(page.locator("#about")).to_contain_text("mobilenet_v2, 64 px, 10 classes")
            # Keyboard: the first Tab stop is the real file input, which has a label.
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "files"
            assert page.get_by_label("Choose images").get_attribute("type") == "file"
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Enter")  # the keyboard opens the file picker
            assert chooser.value.is_multiple()
            chooser.value.set_files([str(shoe), str(notes)])
            card = page.locator(".card", has_text=shoe.name)
            expect(card.locator(".row").first).to_contain_text(want)
            expect(card.locator(".row")).to_have_count(3)
            expect(page.locator(".card", has_text="notes.png").locator(".error")).to_contain_text("not an image")
            expect(page.locator(".card .name")).to_have_text([shoe.name, "notes.png"])  # in the order chosen
            # Drag and drop: a Trouser image dropped on the zone gets its own card.
            trouser = test_images[1]
            dropped = page.evaluate_handle(
                """([name, bytes]) => { const dt = new DataTransfer();
                     dt.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"})); return dt; }""",
                [trouser.name, list(trouser.read_bytes())])
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            expect(page.locator(".card", has_text=trouser.name).locator(".row").first).to_contain_text(
                expected[trouser.name][0]["class"])
            expect(page.locator(".card .name")).to_have_text([shoe.name, "notes.png", trouser.name])
            # Where it looked: off by default; switched on, each classified card gets one overlay, the heatmap
            # of its predicted class laid over its thumbnail (the text file's card gets none).
            switch = page.get_by_role("switch", name="Show where it looked")
            expect(switch).not_to_be_checked()
            bare = card.locator(".thumb").screenshot()
            switch.check()
            expect(page.locator(".card .overlay")).to_have_count(2)
            bag = test_images[2]
            page.set_input_files("#files", str(bag))  # chosen while on: its card gets one too
            expect(page.locator(".card .overlay")).to_have_count(3)
            expect(page.locator(".card .name")).to_have_text([shoe.name, "notes.png", trouser.name, bag.name])
            expect(page.locator(".card", has_text="notes.png").locator(".overlay")).to_have_count(0)
            for p in (shoe, trouser, bag):
                photo = page.locator(".card", has_text=p.name).locator(".photo")
                overlay = page.locator(".card", has_text=p.name).locator(".overlay")
                expect(overlay).to_have_count(1)
                expect(overlay).to_be_visible()
                expect(overlay).to_have_attribute("alt", f"Where the model looked for {expected[p.name][0]['class']}")
                page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
                assert overlay.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [28, 28]
                assert overlay.bounding_box() == photo.bounding_box()  # over the thumbnail, the same box
            assert card.locator(".thumb").screenshot() != bare  # drawn: the thumbnail looks different
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"))
            switch.uncheck()
            expect(page.locator(".card .overlay:visible")).to_have_count(0)
            assert card.locator(".thumb").screenshot() == bare
            switch.check()  # shown again, not asked for again
            expect(page.locator(".card .overlay:visible")).to_have_count(3)
        finally:
            expect.set_options(timeout=5_000)  # Playwright's default, for any later test
            browser.close()
    assert any(u.endswith("/predict?top_k=3") for u in requests), requests
    assert sum(u == server.origin + "/explain" for u in requests) == 3, requests  # one per image card
    outside = [u for u in requests if not (u.startswith(server.origin + "/") or u.startswith("blob:" + server.origin))]
    assert outside == [], outside
    # The browser logs every answer that is not 2xx; the two this test asked for are all there is: the 401
    # before the token was given and the 415 for the text file. No favicon 404, no script error.
    answers = {(text.partition("responded with a status of ")[2][:3], url.removeprefix(server.origin))
               for text, url in console}
    assert answers == {("401", "/model"), ("415", "/predict?top_k=3")} and len(console) == 2, console


def test_serve_errors_before_binding_exit_2_with_the_fix(tmp_path, monkeypatch, capsys):
    from headstart import cli

    assert cli.main(["serve", str(tmp_path / "no-such-run")]) == 2
    assert "no model found at" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be a positive" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--top-k", "0"]) == 2
    assert "--top-k must be a whole number of at least 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert cli.main(["serve", str(tmp_path)]) == 2
    assert "pip install 'headstart[serve]'" in capsys.readouterr().err


def _asgi_post(app, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    """One POST straight into an ASGI app (for a fault no real client can cause): its status and JSON."""
    status, _, data = _asgi(app, "POST", path, body, headers)
    return status, json.loads(data)


def _asgi(app, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request straight into an ASGI app: status, headers (lower-case names) and body."""
    import asyncio

    sent = []
    headers = headers or {}

    async def go():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path.split("?")[0], "raw_path": path.split("?")[0].encode(),
                 "query_string": path.partition("?")[2].encode(), "root_path": "",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        try:
            await app(scope, receive, send)
        except Exception:
            pass  # Starlette re-raises after answering, for the server's log
    asyncio.run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


class _NoModel:
    """A predictor for requests that never reach the network."""

    model = type("M", (), {"classes": ["a", "b"]})()

    def stats(self):
        return {"images": 0, "batches": 0}


def test_undeclared_methods_get_405_with_allow_and_bad_queries_get_400():
    from headstart.serve import app as serve

    app = serve.Guard(serve.create_app(_NoModel(), {}), max_bytes=2**20)
    for path, allowed in (("/", "GET, HEAD"), ("/healthz", "GET, HEAD"), ("/model", "GET, HEAD"),
                          ("/predict", "POST"), ("/explain", "POST")):
        posted = allowed == "POST"
        if not posted:
            assert _asgi(app, "HEAD", path)[0] == 200
        for method in ("TRACE", "PUT", "DELETE", "PATCH", "OPTIONS") + (("GET", "HEAD") if posted else ()):
            status, headers, body = _asgi(app, method, path)
            assert status == 405 and set(headers.get("allow", "").split(", ")) == set(allowed.split(", ")), (
                method, path, status, headers)
            assert json.loads(body) == {"error": "Method Not Allowed"}
    for k in ("0", "-1"):
        status, _, body = _asgi(app, "POST", f"/predict?top_k={k}", b"x", {"content-type": "image/png"})
        assert status == 400 and json.loads(body)["error"] == f"query top_k: must be at least 1, not {k}"
    # Refused before the body is read, let alone decoded: this predictor could decode nothing.
    for query, want in (("class=c", "query class: class 'c' is not one of the model's classes (a, b)"),
                        ("class=", "query class: class '' is not one of the model's classes"),
                        ("format=svg", "query format: one of png, array, both, not 'svg'")):
        status, _, body = _asgi(app, "POST", f"/explain?{query}", b"x", {"content-type": "image/png"})
        assert status == 400 and json.loads(body)["error"].startswith(want), body


def test_the_openapi_document_lists_the_token_only_when_it_is_required():
    from headstart.serve import app as serve

    for secured in (False, True):
        app = serve.Guard(serve.create_app(_NoModel(), {}, secured=secured, max_upload_mb=2), max_bytes=2**20,
                          token="t" if secured else None)
        status, _, body = _asgi(app, "GET", "/openapi.json", headers={"authorization": "Bearer t"})
        doc = json.loads(body)
        predict = doc["paths"]["/predict"]["post"]
        assert status == 200 and predict["requestBody"]["required"]
        assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream"}
        assert "limit (2 MB)" in predict["responses"]["413"]["description"]
        classes = predict["responses"]["200"]["content"]["application/json"]["schema"]
        assert classes["properties"]["results"]["items"]["properties"]["predictions"]["items"]["properties"][
            "class"]["enum"] == ["a", "b"]
        locked = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m, op in ops.items()
                  if "401" in op["responses"] and op.get("security")}
        assert locked == ({"GET /model", "POST /predict", "POST /explain"} if secured else set())
        explain = doc["paths"]["/explain"]["post"]
        assert explain["requestBody"] == predict["requestBody"]
        assert set(explain["responses"]) == set(predict["responses"]) == {"200", "400", "413", "415", "422", "500"} | (
            {"401"} if secured else set())
        query = {q["name"]: q["schema"] for q in explain["parameters"]}
        assert query["class"]["enum"] == ["a", "b"] and query["format"]["enum"] == list(serve.FORMATS)
        result = explain["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["results"]["items"]
        assert "limit (2 MB)" in explain["responses"]["413"]["description"]
        assert f"fit {serve.MAP_SIDE} px" in result["properties"]["width"]["description"]
        assert ("components" in doc) == secured


@pytest.mark.slow
def test_a_failure_inside_inference_is_a_json_500_and_the_next_request_works(test_images):
    from concurrent.futures import Future

    import torch

    from headstart.serve import app as serve

    class Flaky:
        """Decodes for real; its network fails once, as a broken engine would."""

        model = type("M", (), {"classes": ["a", "b"]})()
        calls = 0

        def decode(self, data):
            serve.load_image(data)  # an ImageError for a bad file, as the real one
            return torch.zeros(3, 4, 4, dtype=torch.uint8)

        def submit(self, images):
            Flaky.calls += 1
            f = Future()
            if Flaky.calls == 1:
                f.set_exception(RuntimeError("engine fell over"))
            else:
                f.set_result(np.tile([[0.25, 0.75]], (len(images), 1)))
            return f

        def stats(self):
            return {}

    app = serve.Guard(serve.create_app(Flaky(), {}), max_bytes=2**20)
    png = test_images[0].read_bytes()
    status, body = _asgi_post(app, "/predict?name=x.png", png, {"content-type": "image/png"})
    assert status == 500 and "internal error (RuntimeError)" in body["error"]
    status, body = _asgi_post(app, "/predict?name=x.png", png, {"content-type": "image/png"})
    assert status == 200 and body["results"][0]["predictions"][0] == {"class": "b", "probability": 0.75}


def test_the_token_can_come_from_the_environment(monkeypatch):
    """$HEADSTART_TOKEN keeps the token out of the process list; --token still wins."""
    from headstart import cli

    monkeypatch.setenv("HEADSTART_TOKEN", "from-env")
    assert cli.get_parser().parse_args(["serve", "run"]).token == "from-env"
    assert cli.get_parser().parse_args(["serve", "run", "--token", "flag"]).token == "flag"
    monkeypatch.delenv("HEADSTART_TOKEN")
    assert cli.get_parser().parse_args(["serve", "run"]).token is None
