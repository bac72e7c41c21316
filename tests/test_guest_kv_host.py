"""The kv guest's logic and replica.kv_client, without a VM: guests/build/kv-host is kv.c built for the host
over a stand-in for the devices (guests/host/host_runtime.c: TCP with the monitor's framing, a file disk)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from conftest import readline_within

from replica.kv_client import KvClient, KvClientSync, KvError, KvUnavailable

ROOT = Path(__file__).resolve().parent.parent
KV_HOST = ROOT / "guests" / "build" / "kv-host"


def free_port() -> int:
    """A port nothing listens on (for an address that must refuse connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    result = subprocess.run(["make", "-C", str(ROOT / "guests"), f"PYTHON={sys.executable}", "host"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


class KvHost:
    """kv-host on an ephemeral port (VMFT_HOST_PORT=0: it binds port 0 and says which on stderr, so no
    port is picked by bind-then-close and raced for); a restart binds the same port again."""

    def __init__(self, disk: Path | None) -> None:
        self.port = 0
        self.disk = disk
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []

    def start(self) -> str:
        env = dict(os.environ, VMFT_HOST_PORT=str(self.port), VMFT_HOST_DISK=str(self.disk or ""))
        self.proc = subprocess.Popen(
            [str(KV_HOST)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        listening = threading.Event()
        if self.port:
            listening.set()  # a restart: the port is known
        self.stderr = lines = []

        def drain(stream: IO[str]) -> None:  # all of stderr, so that the pipe never fills
            for line in stream:
                lines.append(line)
                match = re.match(r"host runtime: listening on 127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    listening.set()

        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()
        try:
            assert listening.wait(10), f"kv-host did not say its port: {lines}"
            line = readline_within(self.proc.stdout, 10, "ready line from kv-host")
            assert line.startswith("kv: ready"), line
        except BaseException:
            self.stop()  # a host that never became ready must not outlive the test
            raise
        return line

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


@pytest.fixture
def kv_host(disk: Path) -> Iterator[KvHost]:
    host = KvHost(disk)
    host.start()
    try:
        yield host
    finally:
        host.stop()


def raw(address: str, *requests: str) -> list[str]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for r in requests:
            s.sendall(struct.pack(">I", len(r.encode())) + r.encode())
        replies = []
        f = s.makefile("rb")
        for _ in requests:
            (n,) = struct.unpack(">I", f.read(4))
            replies.append(f.read(n).decode())
        return replies


def test_protocol(kv_host: KvHost) -> None:
    replies = raw(
        kv_host.address,
        "GET a", "SET c:1 a hello world", "GET a", "SET c:1 a other", "GET a", "SET c:0 a x",
        "INCR c:2 n 5", "INCR c:3 n -7", "INCR c:3 n -7", "INCR c:4 a 1", "DEL c:5 a", "DEL c:6 a",
        "GET a", "STATS", "BOGUS", "", "SET c k v", "GET " + "k" * 129, "SET c:7 " + "k" * 129 + " v",
        "SET c:8 k " + "v" * 1025, "INCR c:9 n x", "GET n\n",
    )
    assert replies == [
        "NOTFOUND", "OK", "VALUE hello world", "OK", "VALUE hello world", "ERR stale",
        "VALUE 5", "VALUE -2", "VALUE -2", "ERR not an integer", "OK", "NOTFOUND",
        "NOTFOUND", f"STATS keys=1 {replies[13].split()[2]} writes=6",
        "ERR unknown command", "ERR empty request", "ERR bad request id (want clientid:seq)",
        "ERR usage: GET key",
        "ERR key too long", "ERR value too long", "ERR bad delta", "VALUE -2",
    ]


def test_timer_ticks(kv_host: KvHost) -> None:
    first = int(raw(kv_host.address, "STATS")[0].split()[2].split("=")[1])
    time.sleep(0.3)
    second = int(raw(kv_host.address, "STATS")[0].split()[2].split("=")[1])
    assert second >= first + 3  # 50 ms period


def test_log_replay_restores_data_and_dedup(kv_host: KvHost) -> None:
    with KvClientSync([kv_host.address], "p1") as kv:
        for i in range(300):
            kv.set(f"k{i}", "x" * (i % 50))
        kv.incr("n", 3)
        kv.delete("k0")
        last_seq = kv.client._seq
    kv_host.stop()
    line = kv_host.start()
    assert line.startswith("kv: ready (300 keys restored")
    with KvClientSync([kv_host.address], "p2") as kv:
        assert kv.get("k0") is None
        assert kv.get("k299") == "x" * (299 % 50)
        assert kv.get("n") == "3"
        assert kv.stats()["keys"] == 300
    # The dedup state survived too: a retry of p1's last write gets its cached reply, an older one is stale.
    assert raw(kv_host.address, f"DEL p1:{last_seq} k0", f"SET p1:{last_seq - 1} k1 y") == ["OK", "ERR stale"]


def test_no_disk_still_serves() -> None:
    host = KvHost(None)
    try:
        assert "no disk" in host.start()
        assert raw(host.address, "SET c:1 a b", "GET a") == ["OK", "VALUE b"]
    finally:
        host.stop()


def test_faults_end_the_process(kv_host: KvHost) -> None:
    assert raw(kv_host.address, "SET c:1 a b") == ["OK"]
    host, port = kv_host.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(struct.pack(">I", 8) + b"SCRIBBLE")
        # Fail-stop before output: the integrity check before a batch's replies panics, so no reply
        # computed from the corrupted table (not even SCRIBBLE's own) is ever sent.
        assert s.makefile("rb").read() == b""
    assert kv_host.proc is not None
    assert kv_host.proc.wait(timeout=5) == 101


class FlakyProxy:
    """Forwards frames to `target`; drops the connection after forwarding every `drop_every`-th request
    and before its reply, so the client must retry a request the service has already applied."""

    def __init__(self, target: str, drop_every: int) -> None:
        self.target = target
        self.drop_every = drop_every
        self.count = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        up_r, up_w = await asyncio.open_connection(host, int(port))
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">I", head)[0])
                up_w.write(head + body)
                await up_w.drain()
                rhead = await asyncio.wait_for(up_r.readexactly(4), 10)
                rbody = await asyncio.wait_for(up_r.readexactly(struct.unpack(">I", rhead)[0]), 10)
                self.count += 1
                if self.count % self.drop_every == 0:
                    self.dropped += 1
                    break
                writer.write(rhead + rbody)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            up_w.close()


async def test_client_retries_apply_writes_exactly_once(kv_host: KvHost) -> None:
    proxy = FlakyProxy(kv_host.address, drop_every=3)
    dead = f"127.0.0.1:{free_port()}"
    address = await proxy.start()
    async with KvClient([dead, address], "x1", timeout=1.0) as kv:
        total = 0
        for i in range(1, 31):
            total += i
            assert await kv.incr("counter", i) == total
        assert kv.reconnects > 0
    assert proxy.dropped >= 9
    assert raw(kv_host.address, "GET counter") == [f"VALUE {total}"]


async def test_client_errors(kv_host: KvHost) -> None:
    async with KvClient([kv_host.address], "e1", timeout=1.0) as kv:
        await kv.set("s", "abc")
        with pytest.raises(KvError) as info:
            await kv.incr("s")
        assert info.value.reason == "not an integer"
        assert await kv.delete("missing") is False
        assert (await kv.command("GET s")) == "VALUE abc"
        with pytest.raises(ValueError):
            await kv.set("bad key", "v")
    async with KvClient([f"127.0.0.1:{free_port()}"], "e2", timeout=0.2, total_timeout=0.5) as kv:
        start = time.monotonic()
        with pytest.raises(KvUnavailable):
            await kv.get("k")
        assert time.monotonic() - start < 2.0


async def test_client_survives_a_restart(kv_host: KvHost) -> None:
    async with KvClient([kv_host.address], "r1", timeout=1.0, total_timeout=10.0) as kv:
        await kv.set("a", "1")
        kv_host.stop()

        async def restart() -> None:
            await asyncio.sleep(0.5)
            kv_host.start()

        restarter = asyncio.create_task(restart())
        assert await kv.incr("b", 2) == 2
        await restarter
        assert await kv.get("a") == "1"
