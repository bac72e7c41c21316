"""A node re-protects its primary by itself: after a failover (onto the old primary's node once it is
back) and after losing its backup (onto the backup's node once it is back), with no acknowledged write
lost along the way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proto import vmft_pb2
from replica.cluster import LocalCluster, NodeProcess
from replica.workload import Workload

pytestmark = pytest.mark.kvm


async def protected_again(
    cluster: LocalCluster, node: NodeProcess, limit_s: float = 20.0
) -> vmft_pb2.VmStatus:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(cluster.vm_status, node, "vm1")
        if status is not None and status.protected and status.state == vmft_pb2.VM_STATE_RUNNING:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"not re-protected within {limit_s} s: {status}")


async def status_until(
    cluster: LocalCluster, node: NodeProcess, what: str, predicate: Callable[[vmft_pb2.VmStatus], bool],
    limit_s: float = 20.0,
) -> vmft_pb2.VmStatus:
    deadline = time.monotonic() + limit_s
    status = None
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(cluster.vm_status, node, "vm1")
        if status is not None and predicate(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {limit_s} s: {status}")


async def replies_after(workload: Workload, t: float, count: int = 20, limit_s: float = 20.0) -> None:
    """Until the clients have `count` more successful replies to requests sent after `t`."""
    deadline = time.monotonic() + limit_s
    while sum(1 for op in list(workload.history) if op.ok and op.start > t) < count:
        assert time.monotonic() < deadline, f"fewer than {count} replies within {limit_s} s"
        await asyncio.sleep(0.02)


async def test_the_node_reprotects_after_failover_and_after_losing_its_backup(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with LocalCluster(tmp_path, auto_reprotect_s=0.2) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        cluster.protect(guest_image("kv"), a, b)
        cluster.wait_for(b, "vm1", "backup")
        workload = Workload(cluster.service_addresses("vm1"), clients=3)
        load = asyncio.create_task(workload.run())
        try:
            await replies_after(workload, 0.0)
            # Failover: B takes over from the killed A, and re-protects onto A once A runs again.
            await asyncio.to_thread(cluster.kill_node, a)
            await asyncio.to_thread(cluster.wait_for, b, "vm1", "serving")
            await asyncio.sleep(0.5)
            assert not (await asyncio.to_thread(cluster.vm_status, b, "vm1")).protected  # A is still down
            await asyncio.to_thread(cluster.start_node, a)
            status = await protected_again(cluster, b)
            assert status.generation == 2 and "re-protected by" in status.message
            assert (await asyncio.to_thread(cluster.vm_status, a, "vm1")).role == vmft_pb2.ROLE_BACKUP
            # Backup lost: B goes on alone, then re-protects onto A once A runs again.
            await replies_after(workload, time.monotonic())
            await asyncio.to_thread(cluster.kill_node, a)
            status = await status_until(
                cluster, b, "B alone in generation 3", lambda s: not s.protected and s.generation == 3
            )
            assert status.role == vmft_pb2.ROLE_PRIMARY, status
            await asyncio.to_thread(cluster.start_node, a)
            await protected_again(cluster, b)
            await replies_after(workload, time.monotonic())  # served while protected again
        finally:
            workload.stop()
            await asyncio.wait_for(load, 30)
        verdict = await workload.verify_final()
        assert verdict.ok and verdict.acknowledged_writes > 0, verdict.summary()
