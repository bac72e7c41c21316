"""A burst of log while the backup is paused goes out in messages under gRPC's limit (replica/stream_sink.py
take_bounded): the audit saw a guest logging fast while its backup paused for 150 ms make one 37 MB
replication message, which broke the stream and failed a healthy pair over.

Real `vmft node` processes (LocalCluster); clients blast large requests at the kv guest (every request is
logged whole, as NET_RX data); the backup's node is SIGSTOPped for 150-300 ms (less than the failure
timeout) and resumed. Nothing may fail over: same primary, same generation, still protected, the backup
still a backup, and the clients' replies flow again. Every wait is bounded; processes stopped by PID."""

from __future__ import annotations

import collections
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from proto import vmft_pb2
from replica.cluster import LocalCluster, NodeProcess
from replica.kv_client import KvClientSync
from replica.stream_sink import merge_batches, take_bounded

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"
FAILURE_TIMEOUT_MS = 1000.0  # well above the pauses: only a broken stream can fail the pair over
REQUEST = b"GET " + b"x" * 8000  # refused by kv (key too long), but logged whole like any input
FRAME = struct.pack(">I", len(REQUEST)) + REQUEST


class Blaster:
    """Clients sending framed requests at `rate` bytes/s in all (paced: a load the machine sustains, not
    one that starves every process on it), replies read and dropped."""

    def __init__(self, address: str, rate: float, clients: int = 2) -> None:
        self.interval = len(FRAME) * 8 * clients / rate  # seconds between one client's chunks
        host, port = address.rsplit(":", 1)
        self.stop = threading.Event()
        self.sent = 0
        self.received = 0
        self.sockets = [socket.create_connection((host, int(port)), timeout=5) for _ in range(clients)]
        self.threads = [threading.Thread(target=self._send, args=(s,), daemon=True) for s in self.sockets]
        self.threads += [threading.Thread(target=self._receive, args=(s,), daemon=True) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    def _send(self, sock: socket.socket) -> None:
        chunk = FRAME * 8
        due = time.monotonic()
        try:
            while not self.stop.is_set():
                sock.sendall(chunk)
                self.sent += 8
                due += self.interval
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                else:
                    due = time.monotonic()  # behind (the guest held back): no catch-up burst
        except OSError:
            pass

    def _receive(self, sock: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                data = sock.recv(1 << 16)
                if not data:
                    return
                self.received += len(data)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(5)


def _pair_status(cluster: LocalCluster, a: NodeProcess, b: NodeProcess) -> tuple[vmft_pb2.VmStatus, ...]:
    primary, backup = cluster.vm_status(a, "vm1", timeout=15), cluster.vm_status(b, "vm1", timeout=15)
    assert primary is not None and backup is not None
    return primary, backup


RATE = 40e6  # bytes/s of requests: a 300 ms pause gathers over 4 MiB of log (gRPC's message limit)


@pytest.mark.kvm
@pytest.mark.parametrize("pause_s", [0.2, 0.3])
def test_a_log_burst_with_a_paused_backup_causes_no_failover(tmp_path: Path, pause_s: float) -> None:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster", failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = cluster.protect(KV, a, b)
        cluster.wait_for(b, vm.name, "backup", timeout=10)
        blaster = Blaster(vm.service, RATE)
        try:
            deadline = time.monotonic() + 10
            while blaster.received < 100_000 and time.monotonic() < deadline:
                time.sleep(0.05)  # the load flows (replies come back through the output rule)
            assert blaster.received >= 100_000, "the load never got going"
            rate = cluster.vm_status(a, vm.name, timeout=15)
            assert rate is not None and rate.log_bytes_per_s > 4e6, rate  # a log-heavy guest
            for _ in range(3):
                cluster.signal_node(b, signal.SIGSTOP)
                time.sleep(pause_s)
                cluster.signal_node(b, signal.SIGCONT)
                time.sleep(0.5)
            received = blaster.received
            deadline = time.monotonic() + 10
            while blaster.received < received + 100_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert blaster.received >= received + 100_000, "replies stopped after the pauses"
        finally:
            blaster.close()
        time.sleep(FAILURE_TIMEOUT_MS / 1000 * 1.5)  # a broken stream would have failed over by now
        primary, backup = _pair_status(cluster, a, b)
        assert primary.role == vmft_pb2.ROLE_PRIMARY and primary.generation == 1, primary
        assert primary.protected and primary.state == vmft_pb2.VM_STATE_RUNNING, primary
        assert backup.role == vmft_pb2.ROLE_BACKUP and backup.generation == 1, backup
        assert backup.failovers == 0 and not primary.message, (primary.message, backup.message)
        with KvClientSync(vm.addresses, timeout=5.0) as kv:
            kv.set("after", "burst")
            assert kv.get("after") == "burst"


def _events(batches: list[vmft_pb2.EventBatch]) -> list[tuple[int, int, bytes]]:
    out = []
    for batch in batches:
        position = batch.first_position
        for delta, kind, data in zip(batch.position_deltas, batch.kinds, batch.data):
            position += delta
            out.append((position, int(kind), data))
    return out


def test_take_bounded_cuts_a_backlog_into_messages_under_the_limit_keeping_every_event() -> None:
    limit = 64 << 10
    backlog = []
    position = 0
    for n in range(40):  # 40 batches of 10 events of 4 KiB (with shared positions), the last one ended
        batch = vmft_pb2.EventBatch(first_position=position)
        for i in range(10):
            batch.position_deltas.append(0 if i % 3 == 1 else 7)
            batch.kinds.append(vmft_pb2.EVENT_KIND_NET_RX)
            batch.rips.append(i)
            batch.values.append(n)
            batch.data.append(bytes([n]) * 4096)
        position = batch.first_position + sum(batch.position_deltas)
        batch.horizon = position
        backlog.append(batch)
    huge = vmft_pb2.EventBatch(
        first_position=position, horizon=position + 50, ended=True, end_position=position + 50
    )
    for i in range(50):  # one batch far over the limit: cut by events
        huge.position_deltas.append(1)
        huge.kinds.append(vmft_pb2.EVENT_KIND_NET_RX)
        huge.rips.append(i)
        huge.values.append(i)
        huge.data.append(b"h" * 8192)
    backlog.append(huge)
    pending = collections.deque(backlog)
    messages = []
    while pending:
        taken = take_bounded(pending, limit)
        assert taken
        message = merge_batches(taken)
        assert message.ByteSize() <= limit + 8192 + 64, message.ByteSize()  # one event may tip it over
        messages.append(message)
    assert len(messages) > 10
    assert _events(messages) == _events(backlog), "every event, in order, at its position"
    horizons = [m.horizon for m in messages]
    assert horizons == sorted(horizons) and horizons[-1] == huge.horizon
    assert [m.ended for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1].end_position == huge.end_position
