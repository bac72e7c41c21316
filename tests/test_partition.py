"""Availability under partitions on namespace hosts (replica/hosts.py): node A (the primary) and node B
(the backup) each on its own host, etcd (the arbiter) on a third, clients outside every host (the root
namespace, on the bridge). Real links are taken down: isolating the backup's host leaves the primary
serving; isolating the primary's host makes the backup serve. Either way the side that can serve does so
soon after the failure timeout (asserted with a generous bound: no timed tests; `scripts/bench failover`
measures it), and no acknowledged write is lost. Needs root (network namespaces), etcd and KVM."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proto import vmft_pb2
from replica import hosts
from replica.host_nodes import HostCluster, HostNode
from replica.hosts import HostNetwork
from replica.roles import is_serving
from replica.workload import Workload

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available())),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed"),
]

FAILURE_TIMEOUT_MS = 300
# Generous: the protocol promises the failure timeout plus 50 ms; a loaded two-core machine adds its own.
RECOVERY_BOUND_S = 3.0
# A client gives up on an address after this long: a silent host is noticed by the client too.
ATTEMPT_S = 0.1


@pytest.fixture
def pair(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> Iterator[tuple[HostCluster, HostNode, HostNode]]:
    """A protected kv pair: primary on host a, backup on host b, etcd on host e."""
    with HostNetwork(tmp_path / "hosts", root_address=True) as net:
        cluster = HostCluster(net, tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS)
        try:
            a, b = cluster.add_node("a"), cluster.add_node("b")
            cluster.protect(guest_image("kv"), a, b)
            cluster.wait(b, "b is the backup", lambda vm: vm.role == vmft_pb2.ROLE_BACKUP)
            yield cluster, a, b
        finally:
            cluster.close()


async def replies_after(workload: Workload, t: float, count: int = 30, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while sum(1 for op in list(workload.history) if op.ok and op.start > t) < count:
        assert time.monotonic() < deadline, f"fewer than {count} replies within {limit_s} s"
        await asyncio.sleep(0.02)


async def partition(cluster: HostCluster, cut: str, workload: Workload) -> tuple[list[float], float]:
    """Cut host `cut` off while the clients write; heal it once they have been served again; return each
    client's recovery (its last reply before the cut to its first after) and when the cut was (unix)."""
    load = asyncio.create_task(workload.run())
    try:
        await replies_after(workload, 0.0)
        cut_at, cut_wall = time.monotonic(), time.time()
        await asyncio.to_thread(cluster.net.cut, cut)
        await replies_after(workload, cut_at + FAILURE_TIMEOUT_MS / 1000, count=50)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.net.heal, cut)
        await replies_after(workload, time.monotonic())
    finally:
        workload.stop()
        await asyncio.wait_for(load, 60)
    recoveries = workload.recovery_after(cut_at, window_s=RECOVERY_BOUND_S + 2)
    print(f"{cut} cut: client-seen recoveries {sorted(round(r * 1000, 1) for r in recoveries)} ms")
    return recoveries, cut_wall


async def test_isolating_the_backups_host_leaves_the_primary_serving(
    pair: tuple[HostCluster, HostNode, HostNode],
) -> None:
    cluster, a, b = pair
    workload = Workload([a.service, b.service], clients=3, attempt_timeout_s=ATTEMPT_S)
    recoveries, _ = await partition(cluster, "b", workload)
    assert len(recoveries) == workload.clients  # every client was served again ...
    assert max(recoveries) < RECOVERY_BOUND_S, recoveries  # ... soon after the failure timeout
    # The primary that clients could still reach won the arbiter's next generation and serves alone.
    status = await asyncio.to_thread(cluster.wait, a, "a serves alone", lambda vm: is_serving(vm))
    assert status.generation == 2 and not status.protected
    b_status = await asyncio.to_thread(cluster.vm, b)
    assert b_status is None or not is_serving(b_status)  # the isolated backup lost the race
    verdict = await asyncio.wait_for(workload.verify_final(), 60)
    assert verdict.ok, verdict.summary()


async def test_isolating_the_primarys_host_makes_the_backup_serve(
    pair: tuple[HostCluster, HostNode, HostNode],
) -> None:
    cluster, a, b = pair
    workload = Workload([a.service, b.service], clients=3, attempt_timeout_s=ATTEMPT_S)
    recoveries, cut_wall = await partition(cluster, "a", workload)
    assert len(recoveries) == workload.clients
    assert max(recoveries) < RECOVERY_BOUND_S, recoveries
    status = await asyncio.to_thread(cluster.wait, b, "b serves", lambda vm: is_serving(vm))
    assert status.generation == 2
    print(f"a cut: b serving {(status.serving_at - cut_wall) * 1000:.1f} ms after the cut")
    assert status.serving_at - cut_wall < RECOVERY_BOUND_S
    # Healed, the old primary knows it is superseded and serves nothing (its outputs wait for acks that
    # never come), so clients that reach it again move on to b.
    lost = {vmft_pb2.VM_STATE_SUPERSEDED, vmft_pb2.VM_STATE_FENCED, vmft_pb2.VM_STATE_STOPPED}
    old = await asyncio.to_thread(cluster.wait, a, "a knows it lost", lambda vm: vm.state in lost)
    assert not is_serving(old)
    verdict = await asyncio.wait_for(workload.verify_final(), 60)
    assert verdict.ok, verdict.summary()
