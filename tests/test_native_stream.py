"""The native gRPC client stream (replica/native_stream.py over build/_grpc_stream.so) against real grpc.aio
servers of the project's Replication.Stream method on loopback: mutual TLS from replica/tls.py, plaintext
where it is allowed.

The client blocks its calling thread, so each server runs on a thread of its own with its own event loop.
Every wait is bounded: the stream's own timeouts, and join(timeout) for the threads a test starts.
"""

from __future__ import annotations

import asyncio
import enum
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from proto import vmft_pb2, vmft_pb2_grpc
from replica import native_stream, tls
from replica.native_stream import ClientStream, NativeStreamError
from replica.replication import STREAM_METHOD

pytestmark = pytest.mark.skipif(
    not native_stream.LIBRARY.exists(), reason=f"{native_stream.LIBRARY} not built (scripts/setup)"
)

ROOT = Path(__file__).resolve().parents[1]
WAIT = 10.0  # the bound on any one wait that should succeed at once


class Mode(enum.Enum):
    ACK = "ack"  # one Ack per request (received = the call's count so far), Ack(replayed=count) at the end
    SILENT = "silent"  # reads nothing, says nothing, until the call is cancelled
    DENY = "deny"  # aborts the call: PERMISSION_DENIED "no"


class Backup(vmft_pb2_grpc.ReplicationServicer):
    """A grpc.aio server of Replication.Stream on a thread and event loop of its own."""

    def __init__(self, mode: Mode, identity: tls.Identity | None) -> None:
        self.mode, self.identity = mode, identity
        self.received: list[vmft_pb2.PrimaryMessage] = []
        self.ended = threading.Event()  # the server saw the end of its request stream
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def Stream(  # noqa: N802 (the generated servicer's name)
        self, request_iterator: AsyncIterator[vmft_pb2.PrimaryMessage], context: Any
    ) -> AsyncIterator[vmft_pb2.BackupMessage]:
        if self.mode is Mode.DENY:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        if self.mode is Mode.SILENT:
            await asyncio.Event().wait()  # until the call is cancelled
        count = 0
        async for message in request_iterator:
            self.received.append(message)
            count += 1
            yield vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(received=count))
        self.ended.set()
        yield vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(replayed=count))

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        # Without BDP probing a stream's window stays at 64 KiB while the server reads nothing (SILENT).
        server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0)])
        vmft_pb2_grpc.add_ReplicationServicer_to_server(self, server)
        self.port = tls.bind(server, "127.0.0.1:0", self.identity, insecure=self.identity is None)
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(None)

    def __enter__(self) -> Backup:
        self._thread.start()
        assert self._ready.wait(WAIT), "the server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    """The cluster's primary and backup nodes, and a backup certified by another CA."""
    ca = tls.init_ca(tmp_path_factory.mktemp("ca"))
    other = tls.init_ca(tmp_path_factory.mktemp("other-ca"), "other")
    return {
        "primary": tls.issue(ca, tls.Role.NODE, "primary"),
        "backup": tls.issue(ca, tls.Role.NODE, "backup"),
        "stranger": tls.issue(other, tls.Role.NODE, "backup"),
    }


def heartbeat(position: int) -> bytes:
    return vmft_pb2.PrimaryMessage(heartbeat=vmft_pb2.Heartbeat(position=position)).SerializeToString()


def ack(data: bytes | None) -> vmft_pb2.Ack:
    assert data is not None, "the stream ended"
    return vmft_pb2.BackupMessage.FromString(data).ack


def send(stream: ClientStream, data: bytes) -> None:
    assert stream.start_send(data)
    assert stream.send_done(WAIT) == 1


def in_thread(fn: Any, out: list[Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_round_trip_half_close_and_ok_status(ids: dict[str, tls.Identity]) -> None:
    with Backup(Mode.ACK, ids["backup"]) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, ids["primary"], timeout=WAIT)
        for i in range(5):
            send(stream, heartbeat(100 + i))
        assert [ack(stream.recv(WAIT)).received for _ in range(5)] == [1, 2, 3, 4, 5]
        assert [m.heartbeat.position for m in backup.received] == [100, 101, 102, 103, 104]
        assert not backup.ended.is_set()
        assert stream.status(0.1) == "not ended"
        stream.done_writing()
        assert backup.ended.wait(WAIT), "the server did not see the end of its request stream"
        assert ack(stream.recv(WAIT)).replayed == 5
        assert stream.recv(WAIT) is None
        assert stream.status(WAIT) == "OK"
        assert stream.recv(WAIT) is None  # and stays ended


def test_large_message_and_many_small_ones(ids: dict[str, tls.Identity]) -> None:
    big = os.urandom(1 << 20)
    with Backup(Mode.ACK, ids["backup"]) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, ids["primary"], timeout=WAIT)
        send(stream, vmft_pb2.PrimaryMessage(checkpoint_record=big).SerializeToString())
        assert ack(stream.recv(WAIT)).received == 1
        assert backup.received[0].checkpoint_record == big

        # One thread sends while this one receives (the primary's two threads on its stream).
        def send_all() -> None:
            for i in range(2000):
                send(stream, heartbeat(i))

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        acks = [ack(stream.recv(WAIT)).received for _ in range(2000)]
        sender.join(WAIT)
        assert not sender.is_alive()
        assert acks == list(range(2, 2002))
        assert [m.heartbeat.position for m in backup.received[1:]] == list(range(2000))
        stream.done_writing()
        assert ack(stream.recv(WAIT)).replayed == 2001
        assert stream.recv(WAIT) is None and stream.status(WAIT) == "OK"


def test_recv_timeout_leaves_the_read_pending(ids: dict[str, tls.Identity]) -> None:
    with Backup(Mode.ACK, ids["backup"]) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, ids["primary"], timeout=WAIT)
        with pytest.raises(TimeoutError):
            stream.recv(0.2)  # nothing was sent: no reply
        with pytest.raises(TimeoutError):
            stream.recv(0)
        send(stream, heartbeat(7))
        assert ack(stream.recv(WAIT)).received == 1  # the pending read gets it
        stream.cancel()


def test_cancel_from_another_thread_ends_a_blocked_recv_and_send(ids: dict[str, tls.Identity]) -> None:
    with Backup(Mode.SILENT, ids["backup"]) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, ids["primary"], timeout=WAIT)
        # The server reads nothing and its stream window stays at 64 KiB (no BDP probing): 1 MiB never
        # goes out, whatever the load.
        assert stream.start_send(
            vmft_pb2.PrimaryMessage(checkpoint_record=bytes(1 << 20)).SerializeToString()
        )
        assert stream.send_done(0.3) == -1
        received: list[bytes | None] = []
        sent: list[int] = []
        threads = [in_thread(stream.recv, received), in_thread(stream.send_done, sent)]
        time.sleep(0.2)  # let both block (the outcome is the same if they have not yet)
        assert received == [] and sent == []
        stream.cancel()
        for thread in threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in threads), "cancel did not end the blocked calls"
        assert received == [None] and sent == [0]
        assert stream.status(WAIT).startswith("CANCELLED")
        assert stream.start_send(heartbeat(1)) is True and stream.send_done(WAIT) == 0  # stays broken


def test_server_abort_names_its_status(ids: dict[str, tls.Identity]) -> None:
    with Backup(Mode.DENY, ids["backup"]) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, ids["primary"], timeout=WAIT)
        assert stream.recv(WAIT) is None
        assert stream.status(WAIT) == "PERMISSION_DENIED: no"
        assert backup.received == []


def test_a_killed_server_ends_a_blocked_recv() -> None:
    # The backup's process dies (SIGKILL): the kernel closes its end, the primary's recv learns of it.
    serve = "from tests.test_native_stream import Backup, Mode; import time; b = Backup(Mode.ACK, None)"
    child = subprocess.Popen(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", serve + "; print(b.__enter__().port, flush=True); time.sleep(60)"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and select.select([child.stdout], [], [], 30)[0], "no port"
        stream = ClientStream(f"127.0.0.1:{int(child.stdout.readline())}", STREAM_METHOD, None, insecure=True)
        send(stream, heartbeat(1))
        assert ack(stream.recv(WAIT)).received == 1
        received: list[bytes | None] = []
        reader = in_thread(stream.recv, received)
        os.kill(child.pid, signal.SIGKILL)
        reader.join(WAIT)
        assert received == [None]
        assert stream.status(WAIT).startswith("UNAVAILABLE")
    finally:
        child.kill()
        child.wait(WAIT)


def test_no_server_is_refused_within_the_timeout(ids: dict[str, tls.Identity]) -> None:
    # Nobody listening: refused at once. A listener that never answers (no handshake): the open's timeout.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        for port, why in (
            (free_port(), "could not be started"),
            (mute.getsockname()[1], "within the timeout"),
        ):
            started = time.monotonic()
            with pytest.raises(NativeStreamError, match=f"127.0.0.1:{port}: .*{why}"):
                ClientStream(f"127.0.0.1:{port}", STREAM_METHOD, ids["primary"], timeout=1.0)
            assert time.monotonic() - started < 1.0 + 4.0, "the open outlived its timeout"


@pytest.mark.parametrize("server, client", [("stranger", "primary"), ("backup", "stranger")])
def test_a_certificate_from_another_ca_is_refused(
    ids: dict[str, tls.Identity], server: str, client: str
) -> None:
    # Either side's handshake fails: the open itself is refused (not a stream that ends UNAVAILABLE later).
    with Backup(Mode.ACK, ids[server]) as backup:
        with pytest.raises(NativeStreamError, match="could not be started"):
            ClientStream(backup.target, STREAM_METHOD, ids[client], timeout=WAIT)
        assert backup.received == []


def test_plaintext_off_loopback_is_refused_before_any_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_extension() -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(native_stream, "_extension", no_extension)
    for target, insecure in (
        ("192.0.2.1:7000", True),
        ("[2001:db8::1]:7000", True),
        ("127.0.0.1:7000", False),
    ):
        with pytest.raises(tls.TlsError):
            ClientStream(target, STREAM_METHOD, None, insecure=insecure, timeout=0.5)


def test_plaintext_on_loopback_and_one_write_in_flight() -> None:
    with Backup(Mode.ACK, None) as backup:
        stream = ClientStream(backup.target, STREAM_METHOD, None, insecure=True, timeout=WAIT)
        assert stream.start_send(heartbeat(1))
        with pytest.raises(RuntimeError, match="in flight"):
            stream.start_send(heartbeat(2))  # the first write was not collected
        assert stream.send_done(WAIT) == 1
        assert stream.send_done(0) == 1  # nothing in flight
        send(stream, heartbeat(3))
        assert [ack(stream.recv(WAIT)).received for _ in range(2)] == [1, 2]
        assert [m.heartbeat.position for m in backup.received] == [1, 3]
        stream.cancel()


def _churn(target: str, identity: tls.Identity | None, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(file descriptors, threads) of this process before and after `n` streams opened, used and dropped:
    some with a read pending, some half-closed."""

    def counts() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    def one(i: int) -> None:
        stream = ClientStream(target, STREAM_METHOD, identity, insecure=identity is None, timeout=WAIT)
        send(stream, heartbeat(i))
        assert ack(stream.recv(WAIT)).received == 1
        if i % 2:
            with pytest.raises(TimeoutError):
                stream.recv(0)
        if i % 3 == 0:
            stream.done_writing()

    for i in range(10):  # gRPC's own threads and pollers come up with the first streams
        one(i)
    before = counts()
    for i in range(n):
        one(i)
    return before, counts()


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "mtls"])
def test_streams_opened_and_dropped_do_not_leak_threads(ids: dict[str, tls.Identity], secure: bool) -> None:
    with Backup(Mode.ACK, ids["backup"] if secure else None) as backup:
        (_, threads), (_, threads_after) = _churn(backup.target, ids["primary"] if secure else None, 200)
        assert len(backup.received) == 210
    assert threads_after <= threads + 8, f"threads {threads} -> {threads_after} after 200 streams"


def test_streams_opened_and_dropped_do_not_leak_file_descriptors() -> None:
    with Backup(Mode.ACK, None) as backup:
        (fds, _), (fds_after, _) = _churn(backup.target, None, 200)
    assert fds_after <= fds + 16, f"file descriptors {fds} -> {fds_after} after 200 streams"
