"""The native gRPC stream server (replica/native_stream.py's StreamServer over build/_grpc_stream.so) on
loopback, serving Replication.Stream to two kinds of client: the project's ClientStream (C core) and
Python's own gRPC (a sync stub fed from a queue). Mutual TLS from replica/tls.py, plaintext where allowed.

One thread accepts (`Serving`); the test's own threads serve the streams. Every wait is bounded: the
streams' timeouts, the Python calls' deadlines, join(timeout) for every thread a test starts. A stream
dropped without a status is freed too (the test at the end: it hung once).
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from proto import vmft_pb2, vmft_pb2_grpc
from replica import native_stream, tls
from replica.native_stream import ClientStream, NativeStreamError, ServerStream, StreamServer
from replica.replication import STREAM_METHOD

pytestmark = pytest.mark.skipif(
    not native_stream.LIBRARY.exists(), reason=f"{native_stream.LIBRARY} not built (scripts/setup)"
)

ROOT = Path(__file__).resolve().parents[1]
WAIT = 10.0  # the bound on any one wait that should succeed at once
OTHER_METHOD = "/vmft.v1.Node/Status"


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    """The backup (server), a primary node and an admin of the cluster, and a node of another CA."""
    ca = tls.init_ca(tmp_path_factory.mktemp("ca"))
    other = tls.init_ca(tmp_path_factory.mktemp("other-ca"), "other")
    return {
        "backup": tls.issue(ca, tls.Role.NODE, "backup"),
        "primary": tls.issue(ca, tls.Role.NODE, "primary"),
        "admin": tls.issue(ca, tls.Role.ADMIN, "alice"),
        "stranger": tls.issue(other, tls.Role.NODE, "primary"),
    }


class Serving:
    """A StreamServer on 127.0.0.1 whose one accepting thread queues each stream until accept returns
    None. On exit: shut down, the thread joined, every stream not yet finished finished."""

    def __init__(self, identity: tls.Identity | None) -> None:
        self.server = StreamServer("127.0.0.1:0", STREAM_METHOD, identity, insecure=identity is None)
        self.target = f"127.0.0.1:{self.server.port}"
        self.accepted: queue.Queue[ServerStream] = queue.Queue()
        self.streams: list[ServerStream] = []
        self.returned: list[None] = []  # accept's None
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while (stream := self.server.accept()) is not None:
            self.streams.append(stream)
            self.accepted.put(stream)
        self.returned.append(None)

    def next(self) -> ServerStream:
        return self.accepted.get(timeout=WAIT)

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        join(self.thread)
        assert self.returned == [None], "accept did not return None"
        for stream in self.streams:
            try:
                stream.finish(grpc.StatusCode.CANCELLED, "test over")
            except RuntimeError:  # the test finished it (finish is once)
                pass


class PyClient:
    """Python gRPC's Replication.Stream, requests fed from a queue; `creds` overrides the identity's."""

    def __init__(
        self, target: str, identity: tls.Identity | None, creds: Any = None, timeout: float = 3 * WAIT
    ) -> None:
        if creds is None and identity is not None:
            creds = tls.channel_credentials(identity)
        self.channel = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)
        self.requests: queue.Queue[vmft_pb2.PrimaryMessage | None] = queue.Queue()
        stub = vmft_pb2_grpc.ReplicationStub(self.channel)
        self.call: Any = stub.Stream(iter(self.requests.get, None), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.requests.put(vmft_pb2.PrimaryMessage.FromString(data))

    def recv(self) -> bytes | None:
        try:
            return bytes(next(self.call).SerializeToString())
        except StopIteration:
            return None

    def half_close(self) -> None:
        self.requests.put(None)

    def status(self) -> str:  # ClientStream.status's form
        code, details = self.call.code(), self.call.details()
        return f"{code.name}: {details}" if details and code != grpc.StatusCode.OK else str(code.name)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class NativeClient:
    """ClientStream with PyClient's methods."""

    def __init__(self, target: str, identity: tls.Identity | None) -> None:
        self.stream = ClientStream(target, STREAM_METHOD, identity, insecure=identity is None, timeout=WAIT)

    def send(self, data: bytes) -> None:
        send(self.stream, data)

    def recv(self) -> bytes | None:
        return self.stream.recv(WAIT)

    def half_close(self) -> None:
        assert self.stream.done_writing()

    def status(self) -> str:
        return self.stream.status(WAIT)

    def close(self) -> None:
        self.stream.cancel()


Client = Callable[[str, tls.Identity | None], PyClient | NativeClient]
CLIENTS: dict[str, Client] = {"native": NativeClient, "python": PyClient}


def heartbeat(position: int) -> bytes:
    return vmft_pb2.PrimaryMessage(heartbeat=vmft_pb2.Heartbeat(position=position)).SerializeToString()


def reply(received: int) -> bytes:
    return vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(received=received)).SerializeToString()


def position(data: bytes | None) -> int:
    assert data is not None, "the stream ended"
    return int(vmft_pb2.PrimaryMessage.FromString(data).heartbeat.position)


def received(data: bytes | None) -> int:
    assert data is not None, "the stream ended"
    return int(vmft_pb2.BackupMessage.FromString(data).ack.received)


def send(stream: ClientStream | ServerStream, data: bytes) -> None:
    assert stream.start_send(data)
    assert stream.send_done(WAIT) == 1


def in_thread(fn: Callable[[], Any], out: list[Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread


def join(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"


@pytest.mark.parametrize("secure", [True, False], ids=["mtls", "plaintext"])
@pytest.mark.parametrize("kind", ["native", "python"])
def test_round_trip_half_close_and_ok(ids: dict[str, tls.Identity], kind: str, secure: bool) -> None:
    # A node's certificate through one client kind, an admin's through the other: both are read back.
    who = ("primary" if kind == "native" else "admin") if secure else None
    with Serving(ids["backup"] if secure else None) as serving:
        client = CLIENTS[kind](serving.target, ids[who] if who else None)
        client.send(heartbeat(100))
        stream = serving.next()
        auth = stream.auth_context()
        if who:
            assert auth["transport_security_type"] == [b"ssl"]
            assert auth["x509_pem_cert"] == [ids[who].cert.read_bytes()]
            assert tls.peer_identity(stream) == tls.Peer(ids[who].name, ids[who].role)
        else:
            assert auth["transport_security_type"] == [b"insecure"] and tls.peer_identity(stream) is None
        assert stream.peer().startswith("ipv4:127.0.0.1:")
        for i in range(1, 5):
            client.send(heartbeat(100 + i))
        assert [position(stream.recv(WAIT)) for _ in range(5)] == [100, 101, 102, 103, 104]
        for i in range(5):
            send(stream, reply(i + 1))
        assert [received(client.recv()) for _ in range(5)] == [1, 2, 3, 4, 5]
        client.half_close()
        assert stream.recv(WAIT) is None
        send(stream, reply(99))  # the server may still speak after the client's half-close
        assert stream.finish(grpc.StatusCode.OK)
        assert received(client.recv()) == 99 and client.recv() is None
        assert client.status() == "OK" and not stream.cancelled()
        client.close()


@pytest.mark.parametrize("client", ["stranger", "no certificate"])
def test_an_unproven_client_never_reaches_accept(ids: dict[str, tls.Identity], client: str) -> None:
    with Serving(ids["backup"]) as serving:
        if client == "stranger":  # the C core client: the open itself is refused
            with pytest.raises(NativeStreamError, match="could not be started"):
                ClientStream(serving.target, STREAM_METHOD, ids["stranger"], timeout=WAIT)
        ca_only = grpc.ssl_channel_credentials(root_certificates=ids["primary"].ca.read_bytes())
        for _ in range(3):  # Python's client: the call fails, without a reply
            py = PyClient(serving.target, ids["stranger"], None if client == "stranger" else ca_only, WAIT)
            py.send(heartbeat(1))
            with pytest.raises(grpc.RpcError) as failure:
                py.recv()
            # At once (while a thread accepts: with none, the no-certificate call waits for its deadline).
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            py.close()
        good = NativeClient(serving.target, ids["primary"])  # a proven client is still served
        good.send(heartbeat(7))
        assert position(serving.next().recv(WAIT)) == 7  # the first stream accepted is that one
        assert serving.accepted.empty() and len(serving.streams) == 1
        good.close()


def test_other_methods_end_unimplemented_and_errors_reach_the_client(ids: dict[str, tls.Identity]) -> None:
    with Serving(ids["backup"]) as serving:
        with grpc.secure_channel(serving.target, tls.channel_credentials(ids["admin"])) as channel:
            with pytest.raises(grpc.RpcError) as unary:
                channel.unary_unary(OTHER_METHOD)(b"", timeout=WAIT)
        assert unary.value.code() == grpc.StatusCode.UNIMPLEMENTED
        other = ClientStream(serving.target, OTHER_METHOD, ids["primary"], timeout=WAIT)
        assert other.recv(WAIT) is None and other.status(WAIT).startswith("UNIMPLEMENTED")
        # Neither was accepted: the next streams accepted are these two, each refused with a reason.
        clients: list[PyClient | NativeClient] = [PyClient(serving.target, ids["primary"])]
        clients.append(NativeClient(serving.target, ids["primary"]))
        for _ in clients:
            assert serving.next().finish(grpc.StatusCode.PERMISSION_DENIED, "why")
        with pytest.raises(grpc.RpcError) as denied:
            clients[0].recv()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and denied.value.details() == "why"
        assert clients[1].recv() is None and clients[1].status() == "PERMISSION_DENIED: why"
        assert serving.accepted.empty() and len(serving.streams) == 2
        clients[0].close()


@pytest.mark.parametrize("who", ["native", "python", "server"])
def test_a_cancel_ends_the_servers_blocked_recv(ids: dict[str, tls.Identity], who: str) -> None:
    with Serving(ids["backup"]) as serving:
        client = CLIENTS["native" if who == "server" else who](serving.target, ids["primary"])
        client.send(heartbeat(1))
        stream = serving.next()
        assert position(stream.recv(WAIT)) == 1 and not stream.cancelled()
        got: list[bytes | None] = []
        reader = in_thread(lambda: stream.recv(WAIT), got)
        if who == "server":
            stream.cancel()  # from another thread than the reader's
        else:
            client.close()  # ClientStream.cancel, or the Python call's cancel
        join(reader)
        assert got == [None] and stream.cancelled()
        assert stream.finish(grpc.StatusCode.OK) is False  # the call is over
        if who == "server":
            assert client.recv() is None and client.status().startswith("CANCELLED")
        client.close()


def test_accept_and_recv_timeouts_leave_them_pending() -> None:
    server = StreamServer("127.0.0.1:0", STREAM_METHOD, None, insecure=True)
    with pytest.raises(TimeoutError):
        server.accept(0.1)
    client = NativeClient(f"127.0.0.1:{server.port}", None)
    stream = server.accept(WAIT)
    assert stream is not None
    for timeout in (0.2, 0):
        with pytest.raises(TimeoutError):
            stream.recv(timeout)
    client.send(heartbeat(5))
    assert position(stream.recv(WAIT)) == 5  # the pending read gets it
    assert stream.finish(grpc.StatusCode.OK)
    server.shutdown()
    assert server.accept(WAIT) is None and server.accept(0) is None  # and stays shut
    client.close()


@pytest.mark.parametrize("kind", ["native", "python"])
def test_a_mebibyte_both_ways_then_two_thousand_small(ids: dict[str, tls.Identity], kind: str) -> None:
    up, down = os.urandom(1 << 20), os.urandom(1 << 19).hex()  # (a BackupMessage's one large field: a str)
    with Serving(ids["backup"]) as serving:
        client = CLIENTS[kind](serving.target, ids["primary"])
        client.send(vmft_pb2.PrimaryMessage(checkpoint_record=up).SerializeToString())
        stream = serving.next()
        got = stream.recv(WAIT)
        assert got is not None and vmft_pb2.PrimaryMessage.FromString(got).checkpoint_record == up
        send(stream, vmft_pb2.BackupMessage(hello_reply=vmft_pb2.HelloReply(reason=down)).SerializeToString())
        back = client.recv()
        assert back is not None and vmft_pb2.BackupMessage.FromString(back).hello_reply.reason == down

        def echo() -> list[int]:  # all 2,000 read, then acknowledged last first
            positions = [position(stream.recv(WAIT)) for _ in range(2000)]
            for p in positions[::-1]:
                send(stream, reply(p))
            return positions

        positions: list[list[int]] = []
        server = in_thread(echo, positions)
        for i in range(2000):
            client.send(heartbeat(i))
        acks = [received(client.recv()) for _ in range(2000)]
        join(server)
        assert positions == [list(range(2000))] and acks == list(range(1999, -1, -1))
        assert stream.finish(grpc.StatusCode.OK) and client.recv() is None
        client.close()


def test_shutdown_from_another_thread_ends_open_calls(ids: dict[str, tls.Identity]) -> None:
    with Serving(ids["backup"]) as serving:
        native, py = NativeClient(serving.target, ids["primary"]), PyClient(serving.target, ids["admin"])
        native.send(heartbeat(1))
        py.send(heartbeat(2))
        streams = [serving.next(), serving.next()]
        assert sorted(position(s.recv(WAIT)) for s in streams) == [1, 2]
        got: list[bytes | None] = []
        readers = [in_thread(lambda s=s: s.recv(WAIT), got) for s in streams]  # type: ignore[misc]
        join(in_thread(serving.server.shutdown, []))
        join(serving.thread, *readers)
        assert serving.returned == [None] and serving.server.accept(WAIT) is None
        assert got == [None, None] and all(s.cancelled() for s in streams)
        assert native.recv() is None and native.status() == "UNAVAILABLE: Cancelling all calls"
        with pytest.raises(grpc.RpcError) as ended:
            py.recv()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        py.close()
        with pytest.raises(NativeStreamError):  # nobody listens any more
            ClientStream(serving.target, STREAM_METHOD, ids["primary"], timeout=WAIT)


def test_concurrent_streams_do_not_mix(ids: dict[str, tls.Identity]) -> None:
    n, count = 6, 100
    with Serving(ids["backup"]) as serving:
        clients = [CLIENTS["native" if i % 2 else "python"](serving.target, ids["primary"]) for i in range(n)]
        for i, client in enumerate(clients):
            client.send(heartbeat(i * 1000))
        streams = [serving.next() for _ in range(n)]

        def serve(stream: ServerStream) -> bool:  # each position echoed, until the half-close
            while (data := stream.recv(WAIT)) is not None:
                send(stream, reply(position(data)))
            return stream.finish(grpc.StatusCode.OK)

        def talk(i: int) -> list[int]:
            for k in range(1, count):
                clients[i].send(heartbeat(i * 1000 + k))
            acks = [received(clients[i].recv()) for _ in range(count)]
            clients[i].half_close()
            assert clients[i].recv() is None and clients[i].status() == "OK"
            return acks

        finished: list[bool] = []
        servers = [in_thread(lambda s=s: serve(s), finished) for s in streams]  # type: ignore[misc]
        results: list[list[list[int]]] = [[] for _ in range(n)]
        talkers = [in_thread(lambda i=i: talk(i), results[i]) for i in range(n)]  # type: ignore[misc]
        join(*talkers, *servers)
        assert finished == [True] * n
        for i, got in enumerate(results):
            assert got == [[i * 1000 + k for k in range(count)]], f"client {i}"
        for client in clients:
            client.close()


def test_a_stream_is_accepted_while_another_is_live_and_nobody_reads_it(ids: dict[str, tls.Identity]) -> None:
    """While a stream is live the accepting thread leaves polling to the streams' threads (one poller per
    socket); when none of them waits (here nobody reads either stream) it still looks by itself, so a
    second stream, over mutual TLS, is accepted and its first message arrives."""
    native = CLIENTS["native"]
    with Serving(ids["backup"]) as serving:
        first = native(serving.target, ids["primary"])
        first.send(heartbeat(1))
        live = serving.next()  # accepted and live; its message stays unread
        second = native(serving.target, ids["primary"])
        second.send(heartbeat(2))
        other = serving.next()  # (bounded by WAIT)
        assert position(other.recv(WAIT)) == 2 and position(live.recv(WAIT)) == 1
        for client in (first, second):
            client.close()


def _counts() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("what", ["200 streams", "20 servers"])
def test_streams_and_servers_made_and_dropped_do_not_leak(ids: dict[str, tls.Identity], what: str) -> None:
    serving = Serving(None).__enter__()

    def a_stream(i: int) -> None:  # half end with a status, the others by the client's cancel
        client = NativeClient(serving.target, None)
        client.send(heartbeat(i))
        stream = serving.next()
        assert position(stream.recv(WAIT)) == i
        if i % 2:
            assert stream.finish(grpc.StatusCode.OK) and client.recv() is None
        client.close()
        if not i % 2:
            assert stream.recv(WAIT) is None and stream.finish(grpc.StatusCode.OK) is False
        serving.streams.remove(stream)

    def a_server(i: int) -> None:  # mutual TLS and plaintext in turn; a stream left open at shutdown
        identity = ids["backup"] if i % 2 else None
        with Serving(identity) as own:
            client = NativeClient(own.target, ids["primary"] if identity else None)
            client.send(heartbeat(i))
            assert position(own.next().recv(WAIT)) == i
        assert client.recv() is None
        client.close()

    one, n = (a_stream, 200) if what == "200 streams" else (a_server, 20)
    for i in range(6):  # gRPC's own threads and pollers come up with the first ones
        one(i)
    before = _counts()
    for i in range(n):
        one(i)
    after = _counts()
    serving.__exit__()
    assert after[0] <= before[0] + 16, f"file descriptors {before[0]} -> {after[0]} after {what}"
    assert after[1] <= before[1] + 8, f"threads {before[1]} -> {after[1]} after {what}"


def test_plaintext_off_loopback_and_a_taken_port_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: gRPC's own reuseport cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(NativeStreamError, match="cannot listen"):
            StreamServer(f"127.0.0.1:{taken.getsockname()[1]}", STREAM_METHOD, None, insecure=True)
    # Nor does a second server share the first's port (gRPC would by default, splitting the calls).
    first = StreamServer("127.0.0.1:0", STREAM_METHOD, None, insecure=True)
    try:
        with pytest.raises(NativeStreamError, match="cannot listen"):
            StreamServer(f"127.0.0.1:{first.port}", STREAM_METHOD, None, insecure=True)
    finally:
        first.shutdown()

    def no_extension() -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(native_stream, "_extension", no_extension)
    for address in ("192.0.2.1:0", "0.0.0.0:0", "[::]:0", "[2001:db8::1]:0"):
        with pytest.raises(tls.TlsError, match="loopback"):
            StreamServer(address, STREAM_METHOD, None, insecure=True)
    with pytest.raises(tls.TlsError, match="insecure"):
        StreamServer("127.0.0.1:0", STREAM_METHOD, None)


DROP_UNFINISHED = """
from replica.native_stream import ClientStream, StreamServer
from replica.replication import STREAM_METHOD
server = StreamServer("127.0.0.1:0", STREAM_METHOD, None, insecure=True)
client = ClientStream(f"127.0.0.1:{server.port}", STREAM_METHOD, None, insecure=True, timeout=10)
stream = server.accept(10)
client.cancel()
assert stream.recv(10) is None and stream.cancelled()
del stream  # never finished: the server gave up on a call its client had cancelled
print("dropped", flush=True)
"""


def test_a_server_stream_dropped_unfinished_is_freed() -> None:
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and code)
            [sys.executable, "-c", DROP_UNFINISHED], cwd=ROOT, capture_output=True, text=True, timeout=6
        )
    except subprocess.TimeoutExpired as hung:  # run() killed it
        raise AssertionError(f"dropping the stream hung (output {hung.stdout!r})") from None
    assert done.returncode == 0 and done.stdout == "dropped\n", done.stderr
