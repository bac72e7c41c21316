"""TCP servers in Linux guests: Debian's redis-server with the real redis-cli, a Python server on
nonblocking sockets and epoll, record and replay of a session, resets and broken pipes, a checkpoint of
a listening server with an open connection (docs/linux.md, "Network")."""

from __future__ import annotations

import errno
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from monitor.checkpoint.take import Checkpointer
from monitor.devices.net import RESET, NetMessage
from monitor.guest_abi import NetKind
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.linux import fdtable as fdt
from monitor.linux.mm import LinuxError
from monitor.linux.sockets import AF_INET, AF_INET6, NetStack, pack_sockaddr, parse_sockaddr
from monitor.machine import Machine, StopReason
from monitor.record import QueueSource, RecordJournal, ReplayJournal
from proto import vmft_pb2
from linux_helpers import run_guest, run_native

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0
REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis = pytest.mark.skipif(
    REDIS is None or REDIS_CLI is None,
    reason="redis-server and redis-tools are not installed (scripts/setup)",
)


class GuestService:
    """`vmft run --linux --service 127.0.0.1:0 ...` as a process: its service address, its exit."""

    def __init__(self, argv: list[str], layer: Path, record: Path | None = None, services: int = 1) -> None:
        cmd = [sys.executable, "-m", "replica.cli", "run", "--linux", "--layer", str(layer)]
        cmd += ["--service", "127.0.0.1:0"] * services
        cmd += [*(["--record", str(record)] if record else []), "--", *argv]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self.stderr = bytearray()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.addresses = [self._service_address() for _ in range(services)]
        self.address = self.addresses[0]

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line
            self._lines.put(line)

    def _service_address(self) -> tuple[str, int]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(b"vmft: service on "):
                host, port = line.split()[-1].decode().rsplit(":", 1)
                return host, int(port)
        self.stop()
        raise AssertionError(f"no service address: {bytes(self.stderr)!r}")

    def wait(self) -> tuple[int, bytes]:
        """The exit status and stdout (the guest stopped by itself)."""
        stdout, _ = self.proc.communicate(timeout=WAIT_S)
        return self.proc.returncode, stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def redis_cli(address: tuple[str, int], *args: str) -> str:
    assert REDIS_CLI is not None
    done = subprocess.run(
        [REDIS_CLI, "-h", address[0], "-p", str(address[1]), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def replay(log: Path, argv: list[str], layer: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`vmft replay --linux` (on a copy of the layer as the recording began, if it had files)."""
    options = ["--layer", str(layer)] if layer is not None else []
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", "replay", "--linux", *options, str(log), "--", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )


@needs_redis
def test_redis_cli_set_get_incr(tmp_path: Path) -> None:
    assert REDIS is not None
    argv = [REDIS, "--port", "6379", "--save", "", "--appendonly", "no"]
    service = GuestService(argv, tmp_path / "layer")
    try:
        assert redis_cli(service.address, "PING") == "PONG"
        assert redis_cli(service.address, "SET", "greeting", "hello from the guest") == "OK"
        assert redis_cli(service.address, "GET", "greeting") == "hello from the guest"
        assert [redis_cli(service.address, "INCR", "n") for _ in range(3)] == ["1", "2", "3"]
        assert redis_cli(service.address, "GET", "missing") == ""
        assert redis_cli(service.address, "SHUTDOWN", "NOSAVE") == ""  # redis-cli: the server went away
        status, _ = service.wait()
        assert status == 0, bytes(service.stderr)
    finally:
        service.stop()


def _raw_session(address: tuple[str, int]) -> bytes:
    """Pipelined commands on one connection (the redis protocol as redis-py would send it)."""
    with socket.create_connection(address, timeout=WAIT_S) as conn:
        conn.sendall(b"".join(b"*3\r\n$3\r\nSET\r\n$2\r\nk%d\r\n$2\r\nv%d\r\n" % (i, i) for i in range(10)))
        want = b"+OK\r\n" * 10
        got = b""
        while len(got) < len(want):
            chunk = conn.recv(4096)
            assert chunk, f"the server closed after {got!r}"
            got += chunk
        return got


@needs_redis
def test_redis_session_with_aof_records_and_replays_to_the_same_state(tmp_path: Path) -> None:
    assert REDIS is not None
    argv = [REDIS, "--port", "6379", "--save", "", "--appendonly", "yes", "--dir", "/tmp"]
    log = tmp_path / "redis.log"
    layer = tmp_path / "layer"
    service = GuestService(argv, layer, record=log)
    try:
        assert _raw_session(service.address) == b"+OK\r\n" * 10
        clients = [
            threading.Thread(target=redis_cli, args=(service.address, "INCR", "hits")) for _ in range(4)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(WAIT_S)
        assert redis_cli(service.address, "GET", "hits") == "4"
        assert redis_cli(service.address, "MGET", "k0", "k9") == "v0\nv9"
        redis_cli(service.address, "SHUTDOWN")
        status, _ = service.wait()
        assert status == 0, bytes(service.stderr)
    finally:
        service.stop()
    aof = (layer / "tmp" / "appendonlydir").glob("*.incr.aof")
    assert b"INCR" in b"".join(p.read_bytes() for p in aof)  # the AOF went into the writable layer
    replayed = replay(log, argv)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "verdict: IDENTICAL" in replayed.stdout


SERVER = r"""
import errno, os, selectors, socket, sys
sel = selectors.EpollSelector()
lst = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
lst.bind(("::", 8080))
lst.listen(16)
lst.setblocking(False)
print("listening", lst.getsockname()[:2], lst.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0)
sel.register(lst, selectors.EVENT_READ)
for kind, target in ((socket.SOCK_STREAM, ("127.0.0.1", 80)), (socket.SOCK_DGRAM, None)):
    try:
        out = socket.socket(socket.AF_INET, kind)
        out.connect(target)
    except OSError as err:
        print("outbound", kind, errno.errorcode[err.errno])
other = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
other.bind(("127.0.0.1", 8081))
other.listen(1)  # a second port: the service address stays with the first
try:
    other.accept()
except BlockingIOError:
    print("accept would block")
served = 0
while served < 3:
    for key, _ in sel.select(timeout=30):
        if key.fileobj is lst:
            conn, peer = lst.accept()
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(conn, selectors.EVENT_READ)
            continue
        conn = key.fileobj
        data = conn.recv(65536)
        if data:
            conn.sendall(data.upper())
        else:
            sel.unregister(conn)
            conn.close()
            served += 1
print("served", served)
"""


def test_python_server_on_nonblocking_sockets_and_epoll(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "server.py").write_text(SERVER)
    service = GuestService(["/usr/bin/python3", "/tmp/server.py"], layer)
    try:
        conns = [socket.create_connection(service.address, timeout=WAIT_S) for _ in range(3)]
        for i, conn in enumerate(conns):  # three clients at once, interleaved
            conn.sendall(b"hello %d " % i)
        for conn in reversed(conns):
            conn.sendall(b"x" * 100_000)
        conns[2].shutdown(socket.SHUT_WR)  # a half-close: the replies still come, then the server's end
        for i, conn in enumerate(conns):
            want = (b"hello %d " % i).upper() + b"X" * 100_000
            got = b""
            while len(got) < len(want):
                chunk = conn.recv(1 << 16)
                assert chunk, f"closed after {len(got)} bytes"
                got += chunk
            assert got == want
            if conn is conns[2]:
                assert conn.recv(100) == b""
            conn.close()
        status, stdout = service.wait()
    finally:
        service.stop()
    assert status == 0, bytes(service.stderr)
    assert stdout.decode().splitlines() == [
        "listening ('::', 8080) True",
        "outbound 1 ENETUNREACH",
        "outbound 2 EACCES",
        "accept would block",
        "served 3",
    ]


RESET_SERVER = r"""
import signal, socket, sys
sys.stdout.reconfigure(line_buffering=True)
s = socket.socket()
s.bind(("127.0.0.1", 9000)); s.listen(1)
conn, peer = s.accept()
print("peer", peer[0], conn.recv(100))
try:
    print("more", conn.recv(100))
except ConnectionResetError:
    print("reset")
print("after", conn.recv(100))
try:
    conn.send(b"late")
except BrokenPipeError:
    print("broken pipe")
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
conn.send(b"again")
print("not reached")
"""


def _program(tmp_path: Path, text: str) -> Path:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True, exist_ok=True)
    (layer / "tmp" / "prog.py").write_text(text)
    return layer


def _captured(machine: Machine) -> list[NetMessage]:
    sent: list[NetMessage] = []
    machine.net_backend.transmit = sent.extend  # the outputs, as a NIC server would get them
    return sent


def test_reset_connection_reads_econnreset_and_writes_raise_epipe_then_sigpipe(tmp_path: Path) -> None:
    layer = _program(tmp_path, RESET_SERVER)
    personality = LinuxPersonality(
        LinuxConfig("/usr/bin/python3", ["/usr/bin/python3", "/tmp/prog.py"], layer)
    )
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    sent = _captured(machine)
    for kind, payload in ((NetKind.OPEN, b""), (NetKind.DATA, b"first"), (NetKind.CLOSE, RESET)):
        machine.net_backend.push(NetMessage(1, kind, payload))  # queued before the guest listens
    try:
        result = machine.run_blocking(WAIT_S)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 128 + 13, result.describe()  # SIGPIPE
    assert out.decode().splitlines() == ["peer 127.0.0.1 b'first'", "reset", "after b''", "broken pipe"]
    assert sent == []  # nothing reached the dead connection


CHECKPOINTED = r"""
import selectors, socket
sel = selectors.DefaultSelector()
s = socket.socket(); s.bind(("0.0.0.0", 7000)); s.listen(8); s.setblocking(False)
sel.register(s, selectors.EVENT_READ)
store = {}
while True:
    for key, _ in sel.select(timeout=5):  # a deadline: its clock reading is an event of the waiting exit
        if key.fileobj is s:
            c, _ = s.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ); continue
        c = key.fileobj
        try:
            data = c.recv(1000)
        except ConnectionResetError:
            data = b""
            print("reset", flush=True)
        if not data:
            sel.unregister(c); c.close(); continue
        cmd, _, rest = data.decode().strip().partition(" ")
        if cmd == "set":
            k, v = rest.split(); store[k] = v; c.send(b"ok\n")
        elif cmd == "get":
            c.send((store.get(rest, "-") + "\n").encode())
        elif cmd == "quit":
            raise SystemExit(0)
"""


def _until_sent(sent: list[NetMessage], count: int, machine: Machine) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(sent) < count and time.monotonic() < deadline and machine.is_running():
        time.sleep(0.01)
    assert len(sent) >= count, f"the guest sent {sent}"


def test_checkpoint_of_a_listening_server_with_an_open_connection_restores(tmp_path: Path) -> None:
    layer = _program(tmp_path, CHECKPOINTED)
    argv = ["/usr/bin/python3", "/tmp/prog.py"]
    personality = LinuxPersonality(LinuxConfig(argv[0], argv, layer))
    machine = build_linux(personality)
    sent = _captured(machine)
    checkpoint = tmp_path / "server.ckpt"
    try:
        machine.start()
        for kind, payload in ((NetKind.OPEN, b""), (NetKind.DATA, b"set a 1\n")):
            machine.net_backend.push(NetMessage(1, kind, payload))
        _until_sent(sent, 1, machine)
        assert sent == [NetMessage(1, NetKind.DATA, b"ok\n")]
        Checkpointer(machine).save(checkpoint)  # the server waits in epoll with connection 1 open
    finally:
        machine.stop()
        machine.close()
        personality.close()
    # Restored live elsewhere: connection 1's client is gone (it reads as reset), the listener serves on.
    again = LinuxPersonality(LinuxConfig(argv[0], argv, _program(tmp_path / "fresh", "")))
    restored = restore_linux(again, checkpoint)
    out = bytearray()
    again.on_stream = lambda number, data: out.extend(data)
    resent = _captured(restored)
    first = restored.next_conn_id()
    assert first == 2
    try:
        restored.start()
        for kind, payload in ((NetKind.OPEN, b""), (NetKind.DATA, b"get a\n")):
            restored.net_backend.push(NetMessage(first, kind, payload))
        _until_sent(resent, 1, restored)
        restored.net_backend.push(NetMessage(first, NetKind.DATA, b"quit\n"))
        result = restored.wait_blocking(WAIT_S)
    finally:
        restored.close()
        again.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert NetMessage(first, NetKind.DATA, b"1\n") in resent
    assert out == b"reset\n"


def test_sigterm_while_the_server_waits_ends_a_recording_that_replays(tmp_path: Path) -> None:
    """SIGTERM to a recording while every thread waits for clients: forwarded to the program (an event of
    the log that ends the wait), whose default action ends it; the replay takes it from the log."""
    layer = _program(tmp_path, CHECKPOINTED)
    shutil.copytree(layer, tmp_path / "replay-layer")
    log = tmp_path / "server.log"
    argv = ["/usr/bin/python3", "/tmp/prog.py"]
    service = GuestService(argv, layer, record=log)
    try:
        with socket.create_connection(service.address, timeout=WAIT_S) as conn:
            conn.sendall(b"set x 42\n")
            assert conn.recv(10) == b"ok\n"
            service.proc.terminate()
            status, _ = service.wait()
        assert status == 128 + 15, bytes(service.stderr)  # the program's default action for SIGTERM
    finally:
        service.stop()
    replayed = replay(log, argv, tmp_path / "replay-layer")
    assert "verdict: IDENTICAL" in replayed.stdout, replayed.stdout + replayed.stderr
    assert os.path.getsize(log) > 0


def _http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=WAIT_S) as reply:
        return reply.status, reply.read()


def _memcached_session(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=WAIT_S) as conn:
        conn.sendall(b"set a 0 0 5\r\nhello\r\nget a\r\nset n 0 0 1\r\n5\r\nincr n 3\r\n")
        want = b"STORED\r\nVALUE a 0 5\r\nhello\r\nEND\r\nSTORED\r\n8\r\n"
        got = b""
        while len(got) < len(want):
            chunk = conn.recv(4096)
            assert chunk, f"closed after {got!r}"
            got += chunk
        return got


@pytest.mark.parametrize("service", ["memcached", "http.server", "busybox httpd"])
def test_services_answer_their_clients(tmp_path: Path, service: str) -> None:
    """memcached (threads, the text protocol), python3 -m http.server, busybox httpd (a process per
    connection), each with its own client."""
    layer = tmp_path / "layer"
    (layer / "tmp" / "www").mkdir(parents=True)
    (layer / "tmp" / "www" / "index.html").write_text("hello from the guest\n")
    argv = {
        "memcached": ["/usr/bin/memcached", "-u", "root", "-p", "11211", "-t", "4"],
        "http.server": ["/usr/bin/python3", "-m", "http.server", "-d", "/tmp/www", "8000"],
        "busybox httpd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/tmp/www"],
    }[service]
    if not os.access(argv[0], os.X_OK):
        pytest.skip(f"{argv[0]} is not installed (scripts/setup)")
    guest = GuestService(argv, layer)
    try:
        if service == "memcached":
            assert _memcached_session(guest.address).endswith(b"8\r\n")
        else:
            for _ in range(2):
                assert _http_get(guest.address, "/index.html") == (200, b"hello from the guest\n")
    finally:
        guest.stop()


PORTS = r"""
import select, socket
listeners = []
for port in (7001, 7002):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen(4)
    listeners.append(s)
served = 0
while served < 4:
    ready, _, _ = select.select(listeners, [], [], 30.0)
    for s in ready:
        conn, _ = s.accept()
        conn.sendall(b"port %d\n" % s.getsockname()[1])
        conn.close()
        served += 1
print("served", served)
"""


def test_several_service_addresses_map_to_the_ports_in_listening_order(tmp_path: Path) -> None:
    """Two --service addresses: the first serves the first port the guest listens on, the second the
    second (here with blocking sockets and select)."""
    layer = _program(tmp_path, PORTS)
    guest = GuestService(["/usr/bin/python3", "/tmp/prog.py"], layer, services=2)
    try:
        for address in guest.addresses * 2:
            with socket.create_connection(address, timeout=WAIT_S) as conn:
                got = b""
                while chunk := conn.recv(100):
                    got += chunk
            assert got == (b"port 7001\n" if address == guest.addresses[0] else b"port 7002\n")
        status, stdout = guest.wait()
    finally:
        guest.stop()
    assert (status, stdout) == (0, b"served 4\n"), bytes(guest.stderr)


WAITING = r"""
import os, select, threading, time
fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
try:
    os.eventfd_read(fd)
except BlockingIOError:
    print("empty")
os.eventfd_write(fd, 3)
print(select.select([fd], [fd], [], 0) == ([fd], [fd], []))
print([os.eventfd_read(fd) for _ in range(3)])
r, w = os.pipe()
print(select.select([r], [], [], 0.05))
threading.Thread(target=lambda: (time.sleep(0.05), os.write(w, b"x"))).start()
print(select.select([r], [], [], 5) == ([r], [], []))
blocking = os.eventfd(0)
threading.Thread(target=lambda: (time.sleep(0.05), os.eventfd_write(blocking, 7))).start()
print(os.eventfd_read(blocking))
import fcntl, socket, struct, termios
a, b = socket.socketpair()
a.send(b"hello")
print(struct.unpack("i", fcntl.ioctl(b, termios.FIONREAD, bytes(4)))[0])
print(os.readv(b.fileno(), [bytearray(5), bytearray(5)]))  # the data fills the first buffer exactly
r2, w2 = os.pipe()
os.write(w2, b"12345")
print(os.readv(r2, [bytearray(5), bytearray(5)]))
ep = select.epoll()
ep.register(r, select.EPOLLIN | select.EPOLLONESHOT)
os.write(w, b"y")
print(len(ep.poll(0)), len(ep.poll(0)))  # fired once, then disabled
ep.modify(r, select.EPOLLIN | select.EPOLLONESHOT)
print(len(ep.poll(0)))
"""


def test_eventfd_and_select_as_natively() -> None:
    """eventfd (nonblocking, semaphore, a blocking read woken by a thread), select (ready at once, a
    timeout with nothing ready, a wait woken by a pipe), FIONREAD on a socket, a readv whose data
    fills its first buffer (the second must not wait) and EPOLLONESHOT, as natively."""
    argv = ["/usr/bin/python3", "-c", WAITING]
    guest, native = run_guest(argv), run_native(argv)
    assert (
        (guest.status, guest.stdout)
        == (native.status, native.stdout)
        == (
            0,
            b"empty\nTrue\n[1, 1, 1]\n([], [], [])\nTrue\n7\n5\n5\n5\n1 0\n1\n",
        )
    ), guest.stderr


class _Forward:
    """A primary's log sink feeding a backup's replay source, until the primary "dies"."""

    def __init__(self, source: QueueSource) -> None:
        self.source = source
        self.alive = True

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        if self.alive:
            self.source.put(batch)

    def close(self) -> None:
        pass


class _Nowhere:
    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_backup_that_goes_live_while_the_server_waits_serves_and_resets_old_connections(
    tmp_path: Path,
) -> None:
    """The primary records while a server waits for clients (with a connection open); its log stops
    (the primary died); the replaying backup goes live: it serves new connections at once, the open one
    reads as reset, and the data written through the old primary is there."""
    argv = ["/usr/bin/python3", "/tmp/prog.py"]
    source = QueueSource()
    forward = _Forward(source)
    primary_p = LinuxPersonality(LinuxConfig(argv[0], argv, _program(tmp_path / "a", CHECKPOINTED)))
    primary = build_linux(primary_p, RecordJournal(forward, flush_on_output=True, flush_interval_s=0.002))
    sent = _captured(primary)
    backup_p = LinuxPersonality(LinuxConfig(argv[0], argv, _program(tmp_path / "b", CHECKPOINTED)))
    replaying = ReplayJournal(source)
    backup = build_linux(backup_p, replaying)

    def promote(position: int) -> RecordJournal:
        backup.net.connections_lost()  # the connections in the log died with the primary
        return RecordJournal(_Nowhere(), start_position=position, flush_on_output=True)

    replaying.promote = promote
    out = bytearray()
    backup_p.on_stream = lambda number, data: out.extend(data)
    resent = _captured(backup)
    try:
        primary.start()
        backup.start()
        for kind, payload in ((NetKind.OPEN, b""), (NetKind.DATA, b"set a 1\n")):
            primary.net_backend.push(NetMessage(1, kind, payload))
        _until_sent(sent, 1, primary)
        time.sleep(0.3)  # the server waits in epoll again (with a deadline: clock events at that exit)
        forward.alive = False  # the primary dies
        source.close()
        first = backup.next_conn_id()
        for kind, payload in ((NetKind.OPEN, b""), (NetKind.DATA, b"get a\n")):
            backup.net_backend.push(NetMessage(first, kind, payload))
        _until_sent(resent, 1, backup)
        backup.net_backend.push(NetMessage(first, NetKind.DATA, b"quit\n"))
        result = backup.wait_blocking(WAIT_S)
    finally:
        for machine, personality in ((primary, primary_p), (backup, backup_p)):
            machine.stop()
            machine.close()
            personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert first == 2 and NetMessage(first, NetKind.DATA, b"1\n") in resent
    assert out == b"reset\n"


def test_the_stack_binds_listens_and_maps_service_addresses_in_listening_order() -> None:
    """NetStack without a machine: bind conflicts per family, ephemeral ports, the service mapping."""
    stack = NetStack()
    any4, any6 = bytes(4), bytes(16)
    v4, v6, other = (stack.new_socket(f, fdt.O_NONBLOCK) for f in (AF_INET, AF_INET6, AF_INET))
    stack.bind(v4, any4, 6379)
    stack.bind(v6, any6, 6379)  # the same port in the other family (redis binds both)
    with pytest.raises(LinuxError) as taken:
        stack.bind(other, any4, 6379)
    assert taken.value.errno == errno.EADDRINUSE
    with pytest.raises(LinuxError) as foreign:
        stack.bind(other, bytes([10, 0, 0, 1]), 80)
    assert foreign.value.errno == errno.EADDRNOTAVAIL  # the guest has only loopback
    stack.listen(other)  # unbound: an ephemeral port
    assert other.local == (any4, 32768)
    stack.listen(v6)
    stack.listen(v4)
    assert stack.service_listener(0) is other and stack.service_listener(1) is v6
    assert stack.service_listener(2) is None
    with pytest.raises(LinuxError) as empty:
        stack.accept(v6)
    assert empty.value.errno == errno.EAGAIN
    other.close()
    assert stack.service_listener(0) is v6  # the remaining ports move up
    family, address, port = parse_sockaddr(pack_sockaddr(AF_INET6, bytes(15) + b"\x01", 8080))
    assert (family, address, port) == (AF_INET6, bytes(15) + b"\x01", 8080)
