"""Unmodified Debian services as protected pairs on real node processes, each used by its real client
before and after SIGKILL of the primary's node: memcached (threads; a value stored before the kill is read
from the new primary), python3 -m http.server and busybox httpd (a process per connection), serving files
of the root's system view."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from test_linux_node import FAILURE_TIMEOUT_MS, WAIT_S, protect_linux, wait_status

from proto import vmft_pb2
from replica.cluster import LocalCluster

pytestmark = pytest.mark.kvm

SERVED = Path("/usr/share/common-licenses")
SERVICES = {
    "memcached": ["/usr/bin/memcached", "-u", "root", "-p", "11211", "-t", "4"],
    "http.server": ["/usr/bin/python3", "-m", "http.server", "-d", str(SERVED), "8000"],
    "busybox httpd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", str(SERVED)],
}


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _until(what: str, attempt: Callable[[], bytes]) -> bytes:
    """Retry while the service comes up (the program is still starting) or a failover completes."""
    deadline = time.monotonic() + WAIT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return attempt()
        except OSError as err:
            last = err
            time.sleep(0.2)
    raise AssertionError(f"{what}: no answer within {WAIT_S} s ({last})")


def _memcached(address: str, request: bytes, want_end: bytes) -> bytes:
    with socket.create_connection(_split(address), timeout=5) as conn:
        conn.sendall(request)
        got = b""
        while not got.endswith(want_end):
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionResetError(f"closed after {got!r}")
            got += chunk
        return got


def _http(address: str, path: str) -> bytes:
    host, port = _split(address)
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as reply:
        assert reply.status == 200
        return bytes(reply.read())


@pytest.mark.parametrize("service", list(SERVICES))
def test_a_service_is_used_by_its_client_through_the_pair_and_after_failover(
    tmp_path: Path, service: str
) -> None:
    argv = SERVICES[service]
    if not os.access(argv[0], os.X_OK) or not (SERVED / "GPL-3").exists():
        pytest.fail(f"{argv[0]} or {SERVED}/GPL-3 is missing: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = protect_linux(cluster, a, b, argv)
        wait_status(cluster, a, "protected", lambda s: s.protected)
        if service == "memcached":
            stored = _until(
                "set",
                lambda: _memcached(
                    vm.service, b"set k 0 0 5\r\nhello\r\nset n 0 0 1\r\n5\r\n", b"STORED\r\n" * 2
                ),
            )
            assert stored == b"STORED\r\nSTORED\r\n"
            assert _memcached(vm.service, b"incr n 3\r\n", b"\r\n") == b"8\r\n"
        else:
            assert _until("GET", lambda: _http(vm.service, "/GPL-3")) == (SERVED / "GPL-3").read_bytes()
        cluster.kill_node(a)
        wait_status(cluster, b, "promoted", lambda s: s.role == vmft_pb2.ROLE_PRIMARY)
        if service == "memcached":  # what the client was told before the kill is there after it
            got = _until("get", lambda: _memcached(vm.backup_service, b"get k\r\nincr n 1\r\n", b"9\r\n"))
            assert got == b"VALUE k 0 5\r\nhello\r\nEND\r\n9\r\n"
        else:
            for _ in range(2):  # busybox httpd: a new process per connection, on the new primary too
                assert (
                    _until("GET", lambda: _http(vm.backup_service, "/GPL-3"))
                    == (SERVED / "GPL-3").read_bytes()
                )
