"""The fault-injecting TCP relay (replica/relay.py) against a plain echo server: forwarding, delay, cut
(connections reset, new ones refused), silent cut (bytes held, delivered after heal) and heal."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import readline_within

from replica.relay import Relay


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_relay_forwards_and_delays(echo: str) -> None:
    with Relay(echo) as relay, _connect(relay.address) as sock:
        assert _roundtrip(sock, b"hello") == b"hello"
        relay.set_delay(0.05)
        start = time.monotonic()
        assert _roundtrip(sock, b"slow") == b"slow"
        elapsed = time.monotonic() - start
        assert 0.09 <= elapsed < 1.0  # 50 ms each way
        relay.set_delay(0)
        start = time.monotonic()
        assert _roundtrip(sock, b"fast") == b"fast"
        assert time.monotonic() - start < 0.05
        assert relay.stats.accepted == 1


def test_relay_cut_resets_and_refuses_then_heals(echo: str) -> None:
    with Relay(echo) as relay:
        sock = _connect(relay.address)
        assert _roundtrip(sock, b"x") == b"x"
        relay.cut()
        assert relay.is_cut and relay.connections == 0
        with pytest.raises(OSError):
            # The reset connection fails at once (a read sees RST or EOF; a write then fails).
            sock.sendall(b"y")
            if not sock.recv(10):
                raise ConnectionResetError("EOF")
        sock.close()
        with pytest.raises(OSError):
            refused = _connect(relay.address)  # the relay accepts, then resets at once
            try:
                refused.settimeout(2)
                if not refused.recv(10):
                    raise ConnectionResetError("EOF")
            finally:
                refused.close()
        assert relay.stats.refused >= 1
        relay.heal()
        with _connect(relay.address) as again:
            assert _roundtrip(again, b"back") == b"back"


def test_relay_silent_cut_holds_bytes_until_heal(echo: str) -> None:
    with Relay(echo) as relay, _connect(relay.address) as sock:
        assert _roundtrip(sock, b"a") == b"a"
        relay.cut(silent=True)
        sock.sendall(b"held")
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        relay.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"held"


def test_relay_process_mode_commands(echo: str) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "replica.relay", "--target", echo],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = readline_within(proc.stdout, 10, "the relay's address").split()
        assert first[0] == "relay"
        address = first[1]
        with _connect(address) as sock:
            assert _roundtrip(sock, b"p") == b"p"
        for command in ("delay 0.01", "cut", "heal"):
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            assert readline_within(proc.stdout, 10, f"an answer to {command}").strip() == "ok"
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
