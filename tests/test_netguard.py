"""The network guard itself (conftest.py, tests/netguard): a test that reaches for the network fails,
even when it catches the error, in the test process or a child; loopback stays usable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from conftest import NETGUARD_DIR, netguard

# 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so even an unguarded attempt reaches no one.
INNER_TESTS = '''
import socket, subprocess, sys, threading

SWALLOW = "import socket\\ntry:\\n    socket.create_connection(('192.0.2.1', 80), timeout=2)\\nexcept Exception:\\n    pass\\n"


def test_swallowed_in_process():
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=2)
    except Exception:
        pass


def test_swallowed_in_a_child_process():
    subprocess.run([sys.executable, "-c", SWALLOW], check=True, timeout=60)


def test_loopback_in_process_and_in_a_child():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: [server.accept()[0].close() for _ in range(2)], daemon=True).start()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    child = f"import socket\\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\\n"
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
'''


def test_an_attempt_fails_the_test_even_when_caught_in_process_or_in_a_child(tmp_path):
    """A pytest run of its own, with this suite's conftest: the two tests that swallow the error fail."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    shutil.copytree(NETGUARD_DIR, tmp_path / "netguard")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    # The inner pytest process logs to a file of its own; its conftest names another for its tests.
    env = {**os.environ, netguard.LOG_VARIABLE: str(tmp_path / "runner.log"), "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "PASSED test_inner.py::test_loopback_in_process_and_in_a_child" in out, out
    for name in ("test_swallowed_in_process", "test_swallowed_in_a_child_process"):
        assert f"FAILED test_inner.py::{name} - Failed: the test tried to reach the network" in out, out
    assert out.count("192.0.2.1', 80)") >= 2 and "2 failed, 1 passed" in out, out


def test_loopback_is_allowed_here_and_in_children():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: [accepted.append(server.accept()[0].close()) for _ in range(3)],
                              daemon=True)
    thread.start()
    for host in ("127.0.0.1", "localhost"):
        socket.create_connection((host, port), timeout=5).close()
    child = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    thread.join(10)
    server.close()
    assert len(accepted) == 3


def test_what_counts_as_loopback():
    for address in (("127.0.0.1", 80), ("127.8.9.10", 1), ("::1", 80, 0, 0), ("localhost", 8000), "LOCALHOST"):
        assert netguard.is_loopback(address), address
    for address in (("10.0.0.1", 80), ("192.0.2.1", 80), ("::ffff:192.0.2.1", 80), ("example.com", 443),
                    ("localhost.example.com", 80), ("", 80), (None, 80)):
        assert not netguard.is_loopback(address), address


def test_children_inherit_the_guard():
    """The environment a child inherits puts the guard first on its path and names the log."""
    script = textwrap.dedent("""
        import socket, sitecustomize
        print(sitecustomize.__file__)
        print(socket.socket.connect.__qualname__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path, qualname = done.stdout.split()
    assert Path(path) == NETGUARD_DIR / "sitecustomize.py" and qualname == "guarded.<locals>.connect"
    assert Path(os.environ[netguard.LOG_VARIABLE]).parent.is_dir()
