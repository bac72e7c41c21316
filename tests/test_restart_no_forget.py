"""A guest-fault restart never forgets a reply a client saw: the query of death (docs/design.md, restart
after a guest fault; found by `vmft chaos --linux --query-of-death`).

A Linux key-value server reads "set k v\\nboom\\n" from one client write in one read: it replies "ok" to
the set (the client sees it), then crashes on "boom". A restart replays the log up to that "ok", which
brings the read of "boom" back: every restart crashes again, and the policy walks back to older
checkpoints until it reaches one older than the log kept for restarts. From there no restart can hold the
acknowledged set: the VM must stop and say why, never serve again without k (before commit b9f9f54 it
restarted there without replay and served on, every set since that checkpoint gone). With a backup the
backup's replay reads the crash with the set too and stops there: its log cannot serve k either. A crash
sent only after the set's reply was seen is dropped by the restart, which serves on with k.

Also: a client retrying the crashing request before any other reply is restarted again, from the checkpoint
before (the restart keeps the log from there); and with no checkpoint old enough to trust (a hang timeout
longer than the checkpoints kept) the log kept for restarts still starts at the oldest one kept."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import grpc
import pytest
from test_linux_node import protect_linux

from monitor.checkpoint.format import SUFFIX
from proto import vmft_pb2
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm
from replica.roles import is_serving

pytestmark = pytest.mark.kvm

WAIT_S = 30.0
CHECKPOINT_EVERY_S = 0.3
HANG_TIMEOUT_S = 1.0  # a restart trusts checkpoints older than this plus 0.1 s
CHECKPOINTS_FIRST = 8  # periodic checkpoints taken under sets before the query of death (several trusted)

# One connection at a time; a read may hold several lines, each handled in turn. "boom" reads address 0:
# a SIGSEGV at a point the log fixes (right after the reply to the set read with it).
KV = """
import ctypes, socket
store = {}
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 7000))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    pending = b""
    try:
        while data := conn.recv(4096):
            *lines, pending = (pending + data).split(b"\\n")
            for line in lines:
                words = line.split()
                if words[0] == b"set":
                    store[words[1]] = words[2]
                    conn.sendall(b"ok\\n")
                elif words[0] == b"get":
                    conn.sendall(store.get(words[1], b"-") + b"\\n")
                elif words[0] == b"boom":
                    ctypes.string_at(0)
    except OSError:  # a connection that died with the guest before a restart reads as reset
        pass
    conn.close()
"""


def protect_kv(
    cluster: LocalCluster,
    node: NodeProcess,
    name: str,
    backup: NodeProcess | None = None,
    hang_timeout_s: float = HANG_TIMEOUT_S,
) -> ProtectedVm:
    """The key-value program as a VM with its primary on `node` (and its backup on `backup`)."""
    return protect_linux(
        cluster, node, backup, ["/usr/bin/python3", "-c", KV], name, hang_timeout_s=hang_timeout_s
    )


class Client:
    """One connection to the service, line by line."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.pending = b""

    def send(self, text: bytes) -> None:
        self.sock.sendall(text)

    def line(self) -> bytes:
        while b"\n" not in self.pending:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()


def connect(address: str, limit_s: float = WAIT_S) -> Client:
    """A connection once the program serves (it starts listening after Python's imports)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            client = Client(address)
            client.send(b"get nothing\n")
            if client.line() == b"-":
                return client
            client.close()
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{address} did not serve within {limit_s} s"
        time.sleep(0.1)


def read_all(address: str, keys: dict[bytes, bytes]) -> dict[bytes, bytes] | None:
    """Every key's value as the service answers now, None if it does not serve (all on one connection:
    a restart's crash closes it)."""
    try:
        client = Client(address, timeout_s=3.0)
    except OSError:
        return None
    try:
        client.send(b"".join(b"get " + key + b"\n" for key in keys))
        return {key: client.line() for key in keys}
    except OSError:
        return None
    finally:
        client.close()


def checkpoints(node: NodeProcess, name: str) -> int:
    """How many the node keeps."""
    return len(list((node.data_dir / "checkpoints" / name).glob(f"*{SUFFIX}")))


def newest(node: NodeProcess, name: str) -> int:
    """How many the node has taken (files are numbered in order: 000001-full...)."""
    files = (node.data_dir / "checkpoints" / name).glob(f"*{SUFFIX}")
    return max((int(path.name.split("-", 1)[0]) for path in files), default=0)


def run_sets(node: NodeProcess, service: str, taken: int = 0) -> tuple[dict[bytes, bytes], Client]:
    """Sets, acknowledged one by one, while the node takes several periodic checkpoints (and at least
    `taken` in all); the connection stays open."""
    acked: dict[bytes, bytes] = {}
    client = connect(service)
    deadline = time.monotonic() + WAIT_S
    while checkpoints(node, "vm1") < CHECKPOINTS_FIRST or len(acked) < 50 or newest(node, "vm1") < taken:
        assert time.monotonic() < deadline, f"{newest(node, 'vm1')} checkpoints in {WAIT_S} s"
        key, value = f"s{len(acked)}".encode(), f"v{len(acked)}".encode()
        client.send(b"set " + key + b" " + value + b"\n")
        assert client.line() == b"ok"
        acked[key] = value
    return acked, client


def status_of(cluster: LocalCluster, node: NodeProcess, name: str) -> vmft_pb2.VmStatus | None:
    try:
        return cluster.vm_status(node, name, timeout=2.0)
    except grpc.RpcError:
        return None


@pytest.mark.parametrize(
    ("backup", "one_read"), [(False, True), (True, True), (False, False)], ids=["alone", "pair", "after"]
)
def test_a_query_of_death_restart_serves_every_acknowledged_set_or_stops_saying_why(
    tmp_path: Path, backup: bool, one_read: bool
) -> None:
    """one_read: the set and the crash arrive in one write and are read together ("alone": no backup;
    "pair": with one). "after": the crash is sent only once the set's reply is seen, so it is read after
    the last reply and a restart drops it: the VM serves on with k."""
    extra = ["--checkpoint-every", str(CHECKPOINT_EVERY_S)]
    with LocalCluster(tmp_path, failure_timeout_ms=1000.0) as cluster:
        node = cluster.add_node(extra)
        other_node = cluster.add_node(extra) if backup else None
        vm = protect_kv(cluster, node, "vm1", other_node)
        nodes = [node] + ([other_node] if other_node else [])
        services = dict(zip([n.name for n in nodes], vm.addresses))

        acked, client = run_sets(node, vm.service)
        client.close()
        client = connect(vm.service)
        if one_read:  # the query of death: the set and the crash in one write, read at once
            client.send(b"set k v\nboom\n")
            assert client.line() == b"ok"  # the client saw the reply: k must never be forgotten
        else:
            client.send(b"set k v\n")
            assert client.line() == b"ok"
            client.send(b"boom\n")
        acked[b"k"] = b"v"
        client.close()

        # Whenever the VM serves from here on (on either node), it answers every acknowledged set. It
        # either serves on (a restart that holds k and got past the crash: none can, the crash was read
        # with k) or stops everywhere.
        deadline = time.monotonic() + 60.0
        verified = 0
        while verified < 5:  # 5 full answers: it serves on, every acknowledged set held
            statuses = {n.name: status_of(cluster, n, "vm1") for n in nodes}
            if all(s is None or s.role == vmft_pb2.ROLE_STOPPED for s in statuses.values()):
                break
            for name, status in statuses.items():
                if status is None or not is_serving(status) or status.faults_recovered + status.failovers < 1:
                    continue  # (before the crash, the guest may still look as if it served)
                answers = read_all(services[name], acked)
                if answers is not None:
                    lost = sorted(key for key in acked if answers[key] != acked[key])
                    assert not lost, (
                        f"{name} serves without {len(lost)} acknowledged sets "
                        f"({b', '.join(lost[:5]).decode()} ...): {status.message}"
                    )
                    verified += 1
            assert time.monotonic() < deadline, f"neither stopped nor serving on after the crash: {statuses}"
            time.sleep(0.1)

        status = statuses[node.name]
        assert status is not None
        if not one_read:  # the crash came after the last reply: the restart dropped it and serves on
            assert verified >= 5 and status.faults_recovered == 1, status
            assert "restarted from checkpoint" in status.message and "SIGSEGV" in status.message, status
        if verified < 5:
            # The status names the reason: the restart would have forgotten replies clients saw, after the
            # guest crashed (SIGSEGV) again on each restart that kept them.
            assert status.state == vmft_pb2.VM_STATE_STOPPED, status
            assert "restart after crashed failed" in status.message, status.message
            assert "would forget replies clients saw" in status.message, status.message
            assert "SIGSEGV" in status.message, status.message
            assert all(read_all(address, acked) is None for address in vm.addresses)  # nothing serves
        if other_node is not None:
            # The backup's log holds everything, but it replays into the same crash (its replay reads
            # "boom" with k): no handover could serve with k either.
            replayed = statuses[other_node.name]
            assert replayed is not None and replayed.role == vmft_pb2.ROLE_STOPPED, replayed
            assert "SIGSEGV" in replayed.message or "exit code 139" in replayed.message, replayed.message

        # The node stays healthy: it answers, and a new VM on it serves.
        assert cluster.status(node).pid == node.pid
        other = protect_kv(cluster, node, "vm2")
        client = connect(other.service)
        client.send(b"set a b\nget a\n")
        assert (client.line(), client.line()) == (b"ok", b"b")
        client.close()


def test_a_client_retrying_the_crashing_request_before_any_new_reply_is_restarted_again(
    tmp_path: Path,
) -> None:
    """A request that crashes the program, read after the last reply: the restart drops it and serves
    on. Its client saw no reply and retries at once, before any other reply went out: the guest crashes
    again with no progress, so the policy distrusts the checkpoint the first restart used and takes the
    one before it (none taken since the first restart is trusted yet, when the retry comes within the
    hang timeout). The log kept for restarts must still reach back to that one: the VM serves on."""
    extra = ["--checkpoint-every", str(CHECKPOINT_EVERY_S)]
    with LocalCluster(tmp_path, failure_timeout_ms=1000.0) as cluster:
        node = cluster.add_node(extra)
        vm = protect_kv(cluster, node, "vm1")
        # The first "boom" on the connection of the sets, after their last reply: a request on a new
        # connection could arrive with the old one's end, and the guest's close of that one is output
        # (the client sees it) after the request was read: a query of death again.
        acked, client = run_sets(node, vm.service)
        for restarts in (1, 2):
            if restarts == 2:  # the retry, on a connection of its own (the first died with the guest)
                client = connect_quietly(vm.service)
            client.send(b"boom\n")
            with pytest.raises(OSError):
                client.line()  # no reply: the guest crashed
            client.close()
            # Serving again (no request yet: a reply would be progress).
            deadline = time.monotonic() + 60.0
            while True:
                status = status_of(cluster, node, "vm1")
                stopped = status is not None and status.role == vmft_pb2.ROLE_STOPPED
                assert not stopped, f"stopped after {restarts} crashes: {status.message if status else None}"
                if status is not None and is_serving(status) and status.faults_recovered >= restarts:
                    break
                assert time.monotonic() < deadline, f"not serving after {restarts} restarts: {status}"
                time.sleep(0.02)
        assert status is not None
        answers = read_all(vm.service, acked)
        assert answers is not None
        lost = sorted(key for key in acked if answers[key] != acked[key])
        assert not lost, f"serves without {len(lost)} acknowledged sets: {status.message}"
        assert status.faults_recovered == 2 and "restarted from checkpoint" in status.message, status


def connect_quietly(address: str, limit_s: float = WAIT_S) -> Client:
    """A connection, no request: retried while the service does not accept."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return Client(address)
        except OSError:
            assert time.monotonic() < deadline, f"{address} did not accept within {limit_s} s"
            time.sleep(0.05)


def test_with_no_checkpoint_old_enough_to_trust_the_log_kept_for_restarts_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hang timeout longer than the store keeps checkpoints (here 60 s, a Linux program's default,
    against 10 to 20 checkpoints of 0.3 s): no checkpoint is ever trusted, a restart takes the newest.
    The log kept for restarts still starts no earlier than the oldest checkpoint kept (it was kept from
    position 0, growing without bound), and the restart replays it to serve every acknowledged set."""
    monkeypatch.setenv("VMFT_LOG", "INFO")  # the node logs where the kept log starts at a restart
    extra = ["--checkpoint-every", str(CHECKPOINT_EVERY_S)]
    with LocalCluster(tmp_path, failure_timeout_ms=1000.0) as cluster:
        node = cluster.add_node(extra)
        vm = protect_kv(cluster, node, "vm1", hang_timeout_s=60.0)
        acked, client = run_sets(node, vm.service, taken=25)  # two chains of 10 pruned at least once
        client.send(b"boom\n")  # after the last reply: the restart drops it
        with pytest.raises(OSError):
            client.line()
        client.close()
        deadline = time.monotonic() + 60.0
        while True:
            status = status_of(cluster, node, "vm1")
            assert status is None or status.role != vmft_pb2.ROLE_STOPPED, status
            if status is not None and is_serving(status) and status.faults_recovered == 1:
                break
            assert time.monotonic() < deadline, f"not serving after the restart: {status}"
            time.sleep(0.05)
        answers = read_all(vm.service, acked)
        assert answers is not None
        lost = sorted(key for key in acked if answers[key] != acked[key])
        assert not lost, f"serves without {len(lost)} acknowledged sets: {status.message}"
        restart = re.search(
            r"restart from \w+ \(position (\d+), saved ([\d.]+) s ago\), log kept from (\d+)",
            node.log_path.read_text(),
        )
        assert restart is not None, node.log_path.read_text()[-2000:]
        position, age_s, kept_from = int(restart[1]), float(restart[2]), int(restart[3])
        assert age_s < 60.0  # an untrusted checkpoint: none was old enough
        assert 0 < kept_from <= position, restart[0]
