"""The tests' network guard, for the test process and for every Python process the tests start.

conftest.py puts this folder first on PYTHONPATH, so each child Python imports it at start-up
(Python imports `sitecustomize` by itself) and gets the same guard as the test process: a
connect to anything but loopback raises NetworkBlocked and is written to the file named by
HEADSTART_TEST_NETWORK_LOG, which the test's fixture reads after the test. Raising alone is
not enough: the download paths catch Exception and print "download failed", so a test that
reached for the network would still pass; the record cannot be swallowed.

Allowed: loopback (127.0.0.0/8, ::1, "localhost"; tests start local HTTP servers and
torch.distributed uses it) and Unix-domain sockets (DataLoader workers pass tensors through them).
Names are not resolved (resolving could itself reach a DNS server): any other name is refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket

LOG_VARIABLE = "HEADSTART_TEST_NETWORK_LOG"


class NetworkBlocked(RuntimeError):
    pass


def is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return False
    host = host.split("%", 1)[0]  # an IPv6 zone, as in fe80::1%eth0
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guarded(real, record):
    """`real` (socket.socket.connect or connect_ex), refusing non-loopback addresses; `record(message)`
    is called for each refused attempt before NetworkBlocked is raised."""

    def connect(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address):
            message = f"tests must not use the network (pid {os.getpid()} tried to connect to {address!r})"
            record(message)
            raise NetworkBlocked(message)
        return real(self, address, *args, **kwargs)

    return connect


def install(record) -> None:
    """Guard every socket of this process for good (a child process: nothing to undo)."""
    socket.socket.connect = guarded(socket.socket.connect, record)
    socket.socket.connect_ex = guarded(socket.socket.connect_ex, record)


def append_to_log(message: str) -> None:
    path = os.environ.get(LOG_VARIABLE)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # one short line per write: appends do not interleave
            f.write(message.replace("\n", " ") + "\n")


if __name__ == "sitecustomize" and os.environ.get(LOG_VARIABLE):
    install(append_to_log)
