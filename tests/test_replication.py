"""Replication with real `vmft node` processes on loopback (replica.cluster.LocalCluster): SIGKILL of the
primary and of the backup under a write load, the link between the nodes cut (through replica.relay) while
both reach the arbiter, the old primary coming back (restarted, or SIGCONTed after a SIGSTOP) fenced, and
peers refused for another protocol version, image or memory size.

Every wait is bounded; every cluster is closed (its node processes stopped by PID)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from monitor.loader import load_image_file
from monitor.record import make_header
from proto import vmft_pb2, vmft_pb2_grpc
from replica import tls
from replica.arbiter import SqliteArbiter
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm, free_port
from replica.node_client import ClientAuth
from replica.relay import Relay
from replica.roles import SERVING_WIRE
from replica.vm_common import PROTOCOL_VERSION
from replica.workload import Verdict, Workload

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"
CLIENTS = 4
MAX_GAP_S = 3.0  # a client's recovery gap must stay below this (the failure timeout is 0.3 s)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as c:
        yield c


def _pair(cluster: LocalCluster) -> tuple[NodeProcess, NodeProcess, ProtectedVm]:
    a, b = cluster.add_node(), cluster.add_node()
    vm = cluster.protect(KV, a, b)
    cluster.wait_for(b, vm.name, "backup", timeout=10)
    return a, b, vm


async def _load_around(
    workload: Workload, fault: object, before_s: float = 0.6, after_s: float = 0.8
) -> tuple[float, Verdict]:
    """Run the workload, call `fault()` (in a thread) after `before_s`, go on for `after_s` after it
    returns, then check the history. Returns (fault time, verdict)."""
    assert callable(fault)
    load = asyncio.create_task(workload.run())
    try:
        await asyncio.sleep(before_s)
        fault_at = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(fault), 30)
        await asyncio.sleep(after_s)
    finally:
        workload.stop()
        await asyncio.wait_for(load, 30)
    verdict = await asyncio.wait_for(workload.verify_final(), 30)
    return fault_at, verdict


def _ok_after(workload: Workload, t: float) -> int:
    return sum(1 for op in workload.history if op.ok and op.start > t)


def _roles(cluster: LocalCluster, nodes: list[NodeProcess], name: str) -> list[vmft_pb2.VmStatus | None]:
    out: list[vmft_pb2.VmStatus | None] = []
    for node in nodes:
        try:
            out.append(cluster.vm_status(node, name, timeout=1.0) if node.alive() else None)
        except grpc.RpcError:
            out.append(None)
    return out


# ----- SIGKILL ---------------------------------------------------------------------------------------


async def test_sigkill_primary_under_load_loses_nothing(cluster: LocalCluster) -> None:
    a, b, vm = _pair(cluster)
    workload = Workload(vm.addresses, clients=CLIENTS, seed=1)

    def fault() -> None:
        cluster.kill_node(a)
        cluster.wait_for(b, vm.name, "serving", timeout=10)

    fault_at, verdict = await _load_around(workload, fault)
    assert verdict.ok, verdict.summary() + "".join(f"\n{v}" for v in verdict.violations[:5])
    assert verdict.acknowledged_writes > 50
    gaps = workload.recovery_after(fault_at)
    assert len(gaps) == CLIENTS, "every client must see the failover and recover"
    assert 0 < max(gaps) < MAX_GAP_S, gaps
    promoted = cluster.vm_status(b, vm.name)
    assert promoted is not None and promoted.generation == 2 and promoted.failovers == 1
    assert _ok_after(workload, fault_at + 0.1) > 0


async def test_sigkill_backup_primary_goes_on_unprotected(cluster: LocalCluster) -> None:
    a, b, vm = _pair(cluster)
    before = cluster.vm_status(a, vm.name)
    assert before is not None and before.protected and before.generation == 1
    workload = Workload(vm.addresses, clients=CLIENTS, seed=2)

    def fault() -> None:
        cluster.kill_node(b)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = cluster.vm_status(a, vm.name)
            if status is not None and status.generation == 2 and not status.protected:
                return
            time.sleep(0.02)
        raise AssertionError(f"the primary did not go on alone: {cluster.vm_status(a, vm.name)}")

    fault_at, verdict = await _load_around(workload, fault)
    assert verdict.ok, verdict.summary()
    status = cluster.vm_status(a, vm.name)
    assert status is not None
    assert status.role == vmft_pb2.ROLE_PRIMARY and not status.protected and status.generation == 2
    assert status.state in SERVING_WIRE, status.state
    assert status.held_outputs == 0
    assert _ok_after(workload, fault_at + 0.5) > 20, "clients must keep getting replies"
    gaps = workload.recovery_after(fault_at)
    assert gaps and max(gaps) < MAX_GAP_S, gaps


# ----- the link cut --------------------------------------------------------------------------------------


@pytest.mark.parametrize("silent", [False, True], ids=["reset", "silent"])
async def test_link_cut_leaves_exactly_one_primary(cluster: LocalCluster, silent: bool) -> None:
    """Both nodes reach the arbiter; only the link between them breaks (reset at once, or silently so
    that only the heartbeat timeouts notice). Exactly one of them is primary afterwards. Silently (a
    partition), both notice at the same timeout and the primary, which its clients can still reach, must
    win: the backup defers its claim after silence."""
    # The relay sits in front of the backup node's replication port, which the node advertises instead.
    port = free_port()
    with Relay(f"127.0.0.1:{port}") as relay:
        a = cluster.add_node()
        b = cluster.add_node(["--replication-port", str(port), "--replication-advertise", relay.address])
        vm = cluster.protect(KV, a, b)
        cluster.wait_for(b, vm.name, "backup", timeout=10)
        workload = Workload(vm.addresses, clients=CLIENTS, seed=3)
        outcome: list[list[vmft_pb2.VmStatus | None]] = []

        def fault() -> None:
            relay.cut(silent=silent)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                roles = _roles(cluster, [a, b], vm.name)
                primaries = [s for s in roles if s is not None and s.role == vmft_pb2.ROLE_PRIMARY]
                stopped = [s for s in roles if s is not None and s.role == vmft_pb2.ROLE_STOPPED]
                if len(primaries) == 1 and len(stopped) == 1 and primaries[0].generation == 2:
                    outcome.append(roles)
                    return
                time.sleep(0.02)
            raise AssertionError(f"no single primary after the cut: {_roles(cluster, [a, b], vm.name)}")

        _fault_at, verdict = await _load_around(workload, fault)
        assert verdict.ok, verdict.summary() + "".join(f"\n{v}" for v in verdict.violations[:5])
        # Still exactly one primary once the dust has settled, and the link healing changes nothing.
        relay.heal()
        await asyncio.sleep(0.3)
        roles = _roles(cluster, [a, b], vm.name)
        assert [s.role if s else None for s in roles].count(vmft_pb2.ROLE_PRIMARY) == 1, roles
        winner = next(s for s in roles if s is not None and s.role == vmft_pb2.ROLE_PRIMARY)
        assert winner.generation == 2 and not winner.protected
        loser = next(s for s in roles if s is not None and s.role == vmft_pb2.ROLE_STOPPED)
        if silent:
            assert winner is roles[0], f"the old primary lost generation 2 after silence: {roles}"
        if loser is roles[0]:
            # The old primary lost generation 2 to the backup: fenced, says to whom, serves nothing more.
            assert loser.state == vmft_pb2.VM_STATE_FENCED, loser
            assert "generation 2" in loser.message and b.node_id in loser.message, loser.message
            assert _refuses(cluster.service_address(vm.name, a)), "a fenced primary still serves"
        else:
            # The backup lost generation 2 to the primary: it stopped, and says to whom it lost.
            assert loser.state == vmft_pb2.VM_STATE_STOPPED, loser
            assert "generation 2" in loser.message and a.node_id in loser.message, loser.message


# ----- the old primary comes back ------------------------------------------------------------------------


async def test_restarted_old_primary_is_fenced(cluster: LocalCluster) -> None:
    a, b, vm = _pair(cluster)
    cluster.kill_node(a)
    cluster.wait_for(b, vm.name, "serving", timeout=10)
    cluster.start_node(a)  # same address, same data directory
    status = cluster.vm_status(a, vm.name)
    assert status is not None, "the restarted node must remember the VM it ran"
    assert status.role == vmft_pb2.ROLE_STOPPED and status.state == vmft_pb2.VM_STATE_FENCED, status
    assert "generation 2" in status.message and b.node_id in status.message, status.message
    host, port = vm.service.rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()  # it serves nothing
    new = cluster.vm_status(b, vm.name)
    assert new is not None and new.role == vmft_pb2.ROLE_PRIMARY and new.generation == 2


def _refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return True
    return False


def _kv_request(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


async def test_sigstopped_primary_resumed_after_failover_stops_and_withholds(cluster: LocalCluster) -> None:
    a, b, vm = _pair(cluster)
    workload = Workload(vm.addresses, clients=CLIENTS, seed=4)
    host, port = vm.service.rsplit(":", 1)
    probe = socket.create_connection((host, int(port)), timeout=5)
    probe_reply: list[bytes] = []

    def fault() -> None:
        cluster.signal_node(a, signal.SIGSTOP)
        # A write sent to the stopped primary: the kernel queues it; the old primary may run it once it
        # is resumed, but must never let its reply out (the backup will not acknowledge it).
        probe.sendall(_kv_request("SET probe:1 stopped-write must-not-be-acknowledged"))
        cluster.wait_for(b, vm.name, "serving", timeout=10)
        cluster.signal_node(a, signal.SIGCONT)
        cluster.wait_for(a, vm.name, "stopped", timeout=10)
        probe.settimeout(1.0)
        try:
            probe_reply.append(probe.recv(4096))
        except TimeoutError:
            probe_reply.append(b"(timeout)")
        except OSError:
            probe_reply.append(b"(reset)")

    try:
        _fault_at, verdict = await _load_around(workload, fault)
    finally:
        probe.close()
    assert verdict.ok, verdict.summary() + "".join(f"\n{v}" for v in verdict.violations[:5])
    old = cluster.vm_status(a, vm.name)
    assert old is not None and old.role == vmft_pb2.ROLE_STOPPED, old
    # Resumed, it found its backup gone, asked the arbiter for generation 2 and learnt that B holds it.
    assert old.state == vmft_pb2.VM_STATE_FENCED, old
    assert "generation 2" in old.message and b.node_id in old.message, old.message
    assert probe_reply and not probe_reply[0].startswith(b"\x00"), f"a reply escaped: {probe_reply!r}"
    new = cluster.vm_status(b, vm.name)
    assert new is not None and new.role == vmft_pb2.ROLE_PRIMARY and new.generation == 2
    assert a.alive(), "the node process lives on; only its VM stopped"


# ----- refused peers ----------------------------------------------------------------------------------------


def _hello(protocol_version: int = PROTOCOL_VERSION, mem_mib: int = 64, header_mem_mib: int = 64,
           header_image: str | None = None) -> vmft_pb2.Hello:  # fmt: skip
    image = load_image_file(KV)
    spec = vmft_pb2.VmSpec(
        name="probe", image=image.data, image_sha256=image.sha256, mem_mib=mem_mib, hang_timeout_s=2.0
    )
    header = make_header(image, header_mem_mib << 20)
    if header_image is not None:
        header.image_sha256 = header_image
    return vmft_pb2.Hello(
        protocol_version=protocol_version,
        spec=spec,
        generation=1,
        header=header,
        primary_node="test-client",
        backup_service="127.0.0.1:1",
        heartbeat_interval_ms=5,
        failure_timeout_ms=300,
    )


def _send_hello(cluster: LocalCluster, node: NodeProcess, hello: vmft_pb2.Hello) -> vmft_pb2.HelloReply:
    """Send `hello` as the node "test-client", which holds the VM's generation in the arbiter (a
    replication stream is accepted only from the VM's current primary: tests/test_security.py)."""
    SqliteArbiter(cluster.arbiter_path).claim(hello.spec.name, hello.generation, "test-client")
    auth = ClientAuth(cluster.identity(tls.Role.NODE, "test-client"))
    with auth.channel(cluster.replication_address(node)) as channel:
        call = vmft_pb2_grpc.ReplicationStub(channel).Stream(
            iter([vmft_pb2.PrimaryMessage(hello=hello)]), timeout=10
        )
        first = next(call)
        call.cancel()
    assert first.HasField("hello_reply")
    reply: vmft_pb2.HelloReply = first.hello_reply
    return reply


def test_a_node_takes_streams_on_its_own_replication_port(cluster: LocalCluster) -> None:
    """The port asked for, reported in the node's status (what a primary reads before it opens a link);
    the node API's port does not take streams."""
    port = free_port()
    node = cluster.add_node(["--replication-port", str(port)])
    assert cluster.replication_address(node) == f"127.0.0.1:{port}"
    with cluster.channel(node) as channel:
        full = vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=10)
    assert full.replication == f"127.0.0.1:{port}" and full.node == node.name
    other = cluster.add_node()  # a free port of its own by default
    assert cluster.replication_address(other) not in ("", other.name, f"127.0.0.1:{port}")
    reply = _send_hello(cluster, node, _hello(protocol_version=99))
    assert not reply.accepted and "99" in reply.reason


def test_peer_of_another_version_is_refused(cluster: LocalCluster) -> None:
    node = cluster.add_node()
    reply = _send_hello(cluster, node, _hello(protocol_version=99))
    assert not reply.accepted
    assert "99" in reply.reason and str(PROTOCOL_VERSION) in reply.reason, reply.reason
    assert reply.protocol_version == PROTOCOL_VERSION
    assert cluster.vm_status(node, "probe") is None, "a refused peer must leave nothing behind"


@pytest.mark.parametrize(
    "hello_args, words",
    [
        ({"header_mem_mib": 32}, ["32 MiB", "64 MiB"]),
        ({"header_image": "ab" * 32}, ["image", "abababab"]),
    ],
    ids=["memory-size", "image"],
)
def test_peer_with_another_image_or_memory_is_refused(
    cluster: LocalCluster, hello_args: dict[str, object], words: list[str]
) -> None:
    node = cluster.add_node()
    reply = _send_hello(cluster, node, _hello(**hello_args))  # type: ignore[arg-type]
    assert not reply.accepted
    for word in words:
        assert word in reply.reason, reply.reason
    status = cluster.vm_status(node, "probe")
    assert status is None or status.role == vmft_pb2.ROLE_STOPPED


def test_vmft_protect_prints_the_backups_refusal(cluster: LocalCluster, tmp_path: Path) -> None:
    """A backup node of another protocol version (PROTOCOL_VERSION patched to 99 in that process)."""
    wrapper = tmp_path / "python-v99"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec {sys.executable} -c "import sys, runpy, replica.vm_common as v; v.PROTOCOL_VERSION = 99; '
        "sys.argv = ['vmft', *sys.argv[3:]]; runpy.run_module('replica.cli', run_name='__main__')\" \"$@\"\n"
    )
    wrapper.chmod(0o755)
    primary = cluster.add_node()
    with LocalCluster(tmp_path / "v99", python=str(wrapper), ca_dir=cluster.ca_dir) as other:
        old = other.add_node()
        assert other.status(old).protocol_version == 99
        result = subprocess.run(
            [sys.executable, "-m", "replica.cli", "protect", str(KV),
             "--primary", primary.name, "--backup", old.name, "--name", "vm9"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **cluster.client_env()},
        )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "refused" in result.stderr and "99" in result.stderr, result.stderr
    assert str(PROTOCOL_VERSION) in result.stderr, result.stderr
    status = cluster.vm_status(primary, "vm9")
    assert status is None or status.role == vmft_pb2.ROLE_STOPPED, status
