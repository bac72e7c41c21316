"""Linux programs as protected pairs on real node processes (replica/guest_kind.py): replicated with the
backup's replay verifying the state hashes, failover after SIGKILL of the primary's node with the console
output continuing, restart after a SIGSEGV, re-protection after the backup's node died, and a backup
whose root differs refused, naming the file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import ClusterError, LocalCluster, NodeProcess, ProtectedVm

pytestmark = pytest.mark.kvm

WAIT_S = 30.0
HASH_EVERY = 20000  # NodeSettings.hash_every: the backup compares a state hash this often
# Silence that means a dead peer: above the default, so that a loaded 2-core machine does not fail a pair
# over by itself mid-test (a SIGKILL breaks the stream: it is noticed at once whatever this is).
FAILURE_TIMEOUT_MS = 1000.0

# A counter with time and randomness (events of the log). Each line also makes ~300 system calls, so the
# replay passes a state-hash position every few seconds. With argv[1] "segv" or "hang", a line's random
# byte below 6 (about one in 40) makes it read address 0 (SIGSEGV) or spin without a system call: a
# fault at a live, nondeterministic point (a restart continues live past it).
# With a fault argument it faults at random (about one iteration in 40), but never in the first iteration
# after a long gap: a guest restarted from its checkpoint resumes there (its state, `i` and `last`, rolled
# back; its clock not), and faulting again at once would mark that checkpoint bad (the query-of-death rule).
COUNTER = """
import ctypes, os, sys, time
fault = sys.argv[1] if len(sys.argv) > 1 else ""
i = 0
last = time.monotonic()
while True:
    for _ in range(300):
        os.getpid()
    r = os.urandom(1)[0]
    now = time.monotonic()
    armed = i > 3 and now - last < 0.15
    last = now
    if fault == "segv" and r < 6 and armed:
        ctypes.string_at(0)
    if fault == "hang" and r < 6 and armed:
        while True:
            pass
    print(i, r, time.time_ns() % 1000, flush=True)
    i += 1
    time.sleep(0.02)
"""


def protect_linux(
    cluster: LocalCluster,
    primary: NodeProcess,
    backup: NodeProcess | None,
    argv: list[str],
    name: str = "vm1",
    root: str = "",
    mem_mib: int = 256,
    hang_timeout_s: float = 10.0,
) -> ProtectedVm:
    spec = vmft_pb2.VmSpec(name=name, mem_mib=mem_mib, hang_timeout_s=hang_timeout_s)
    spec.linux.argv.extend(argv)
    spec.linux.root = root
    service = cluster.service_address(name, primary)
    backup_service = cluster.service_address(name, backup) if backup else ""
    request = vmft_pb2.ProtectRequest(
        spec=spec, backup_node=backup.name if backup else "", service=service, backup_service=backup_service
    )
    with cluster.channel(primary) as channel:
        try:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=60)
        except grpc.RpcError as err:
            raise ClusterError(f"protect failed: {err.details()}") from err
    return ProtectedVm(name, primary, backup, service, backup_service)


def console(node: NodeProcess, name: str = "vm1") -> bytes:
    """What the node let out of the VM's console (a backup: what its replay produced)."""
    path = node.data_dir / "console" / f"{name}.out"
    return path.read_bytes() if path.exists() else b""


def wait_lines(node: NodeProcess, lines: int, limit_s: float = WAIT_S) -> bytes:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = console(node)
        if out.count(b"\n") >= lines:
            return out
        time.sleep(0.05)
    raise AssertionError(
        f"{node.name}: fewer than {lines} console lines in {limit_s} s: {console(node)[-300:]!r}"
    )


def wait_status(
    cluster: LocalCluster, node: NodeProcess, what: str, check: object, limit_s: float = WAIT_S
) -> vmft_pb2.VmStatus:
    assert callable(check)
    deadline = time.monotonic() + limit_s
    status = None
    while time.monotonic() < deadline:
        try:
            status = cluster.vm_status(node, "vm1", timeout=2.0)
        except grpc.RpcError:
            status = None
        if status is not None and check(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {limit_s} s (last: {status})")


def counter_lines(out: bytes) -> list[int]:
    return [int(line.split()[0]) for line in out.splitlines()]


def assert_counts_on(out: bytes) -> None:
    """The counter's lines run 0, 1, 2, ... with none missing or repeated."""
    counts = counter_lines(out)
    assert counts == list(range(len(counts))), counts[:50]


def test_a_linux_pair_replicates_and_fails_over_with_the_console_continuing(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", COUNTER])
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        # The backup replays past two state-hash positions: the hashes matched (a mismatch stops it).
        backup = wait_status(
            cluster, b, "replayed past two state hashes", lambda s: s.position > 2 * HASH_EVERY + 1000
        )
        assert backup.role == vmft_pb2.ROLE_BACKUP and backup.state == vmft_pb2.VM_STATE_REPLAYING, backup
        seen = wait_lines(a, 15)
        assert_counts_on(seen)

        cluster.kill_node(a)
        promoted = wait_status(cluster, b, "promoted", lambda s: s.role == vmft_pb2.ROLE_PRIMARY)
        assert promoted.generation == 2
        after = wait_lines(b, seen.count(b"\n") + 10)
        # Nothing a reader of the old primary's console saw is lost: it is a prefix of the new one's.
        assert after.startswith(seen), (seen[-200:], after[: len(seen) + 100][-300:])
        assert_counts_on(after)


@pytest.mark.parametrize("fault", ["segv", "hang"])
def test_a_linux_program_that_segfaults_or_hangs_is_restarted_from_its_checkpoint(
    tmp_path: Path, fault: str
) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", COUNTER, fault], hang_timeout_s=2.0)
        node, restarted = restarted_on(cluster, [a, b])
        expected = "SIGSEGV" if fault == "segv" else "hung"
        assert f"after {'crashed' if fault == 'segv' else 'hung'}" in restarted.message, restarted.message
        assert expected in restarted.message, restarted.message
        before = console(node).count(b"\n")
        out = wait_lines(node, before + 5)  # it continues, and nothing it had let out is taken back
        assert_counts_on(out)


def restarted_on(
    cluster: LocalCluster, nodes: list[NodeProcess], limit_s: float = 60.0
) -> tuple[NodeProcess, vmft_pb2.VmStatus]:
    """The node whose primary restarted its guest (on a loaded machine the backup may have taken over
    first, after a silence: then it is the one that restarts)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for node in nodes:
            status = cluster.vm_status(node, "vm1", timeout=2.0)
            if status is not None and status.faults_recovered >= 1:
                return node, status
        time.sleep(0.05)
    raise AssertionError(f"no restart within {limit_s} s")


def test_a_linux_pair_is_reprotected_after_its_backup_node_died(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", COUNTER])
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        wait_lines(a, 5)
        cluster.kill_node(b)
        wait_status(cluster, a, "alone", lambda s: s.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED)
        cluster.start_node(b)
        status = cluster.reprotect(vm, a, b)
        assert status.protected, status
        # The new backup, seeded from a live checkpoint, replays on past a state hash.
        start = wait_status(
            cluster, b, "replaying", lambda s: s.state == vmft_pb2.VM_STATE_REPLAYING
        ).position
        backup = wait_status(
            cluster, b, "replayed past a state hash", lambda s: s.position > start + HASH_EVERY
        )
        assert backup.state == vmft_pb2.VM_STATE_REPLAYING, backup
        assert_counts_on(wait_lines(a, console(a).count(b"\n") + 5))


def test_a_backup_whose_root_differs_is_refused_naming_the_file(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        make_root(a, "i=0\nwhile true; do echo $i; i=$((i+1)); done\n")
        make_root(b, "echo other\n")
        vm = protect_linux(cluster, a, b, ["/bin/busybox", "sh", "/srv/run.sh"], root="app")
        refused = wait_status(cluster, b, "refused", lambda s: s.role == vmft_pb2.ROLE_STOPPED)
        assert "/srv/run.sh" in refused.message and "differs" in refused.message, refused.message
        alone = wait_status(cluster, a, "alone", lambda s: s.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED)
        assert not alone.protected
        wait_lines(a, 100)  # the primary runs on, unprotected
        # A new backup seeded from a live checkpoint is refused the same way, before it replays anything:
        # the checkpoint's program had read /srv/run.sh.
        try:
            cluster.reprotect(vm, a, b)
        except ClusterError:
            pass
        again = wait_status(
            cluster,
            b,
            "refused again",
            lambda s: s.generation > refused.generation and s.role == refused.role,
        )
        assert "seeding failed" in again.message and "/srv/run.sh" in again.message, again.message
        wait_status(cluster, a, "alone again", lambda s: s.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED)


def make_root(node: NodeProcess, script: str, name: str = "app") -> None:
    """A prepared root in the node's DATA_DIR/roots/NAME: busybox and a script."""
    root = node.data_dir / "roots" / name
    (root / "bin").mkdir(parents=True)
    (root / "srv").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "srv" / "run.sh").write_text(script)


def vmft(cluster: LocalCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.client_env()}
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", *argv], capture_output=True, text=True, env=env, timeout=90
    )


def test_vmft_protect_linux_runs_a_program_from_a_named_root_as_a_pair(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        for node in (a, b):
            make_root(node, 'i=0\nwhile [ $i -lt 400 ]; do echo "line $i $GREETING"; i=$((i+1)); done\n')
        done = vmft(
            cluster, "protect", "--linux", "--root", "app", "--env", "GREETING=hi", "--cwd", "/srv",
            "--mem", "64", "--primary", a.name, "--backup", b.name, "--json",
            "vm1", "--", "/bin/busybox", "sh", "run.sh",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["name"] == "vm1" and reply["generation"] == 1 and reply["backup"] == b.name
        expected = "".join(f"line {i} hi\n" for i in range(400)).encode()
        deadline = time.monotonic() + WAIT_S
        while console(a) != expected or console(b) != expected:  # the backup's replay, too
            assert time.monotonic() < deadline, (console(a)[-100:], console(b)[-100:])
            time.sleep(0.05)
        ended = wait_status(cluster, b, "replayed to the end", lambda s: s.role == vmft_pb2.ROLE_STOPPED)
        assert "exited" in ended.message and "code 0" in ended.message, ended.message
        assert not list((b.data_dir / "layers").iterdir())  # its writable layer went with it

        missing = vmft(
            cluster, "protect", "--linux", "--root", "nosuch", "--primary", a.name, "vm2", "--", "/bin/sh"
        )
        assert missing.returncode == 1 and "root nosuch" in missing.stderr, missing.stderr
        escape = vmft(cluster, "protect", "--linux", "--root", "..", "--primary", a.name, "vm2", "--", "/x")
        assert escape.returncode == 1 and "bad root name" in escape.stderr, escape.stderr


ECHO = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 7000))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    try:
        while data := conn.recv(4096):
            conn.sendall(data.upper())
    except OSError as err:  # a connection that died with the old primary reads as reset
        print("reset", type(err).__name__, flush=True)
    conn.close()
"""


def ask(address: str, text: bytes, limit_s: float = WAIT_S) -> bytes:
    """Send `text` to the service at `address` and read the reply (retrying until it serves)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(text)
                reply = b""
                while len(reply) < len(text):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                if reply:
                    return reply
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{address} did not answer within {limit_s} s"
        time.sleep(0.1)


def test_a_linux_tcp_service_is_served_by_the_pair_and_after_failover(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", ECHO])
        assert ask(vm.service, b"hello pair\n") == b"HELLO PAIR\n"
        cluster.kill_node(a)
        wait_status(cluster, b, "promoted", lambda s: s.role == vmft_pb2.ROLE_PRIMARY)
        assert ask(vm.backup_service, b"after failover\n") == b"AFTER FAILOVER\n"
        assert console(b).startswith(b"listening\n")
