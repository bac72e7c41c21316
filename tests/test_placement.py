"""Re-placement on etcd membership (replica/placement.py): a primary whose backup's node stays dead
re-protects by itself onto another live member that can host the VM (not merely the one with the most free
memory), and that new backup takes over when the primary's node dies in turn, with every acknowledged
write. A cluster of real node processes on a real etcd under the cluster's CA."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from etcd_helpers import etcd_under_ca

from proto import vmft_pb2
from replica.cluster import LocalCluster
from replica.placement import choose, service_address
from replica.membership import MemberInfo
from replica.workload import Workload

ETCD = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")


def test_choose_prefers_free_memory_among_members_that_can_host_the_vm() -> None:
    full = MemberInfo("full", "10.0.0.2:1", memory_mib=8192, max_vms=2, vms=2)
    small = MemberInfo("small", "10.0.0.3:1", memory_mib=48, max_vms=16)
    busy = MemberInfo("busy", "10.0.0.4:1", memory_mib=4096, max_vms=16, vms=3, memory_used_mib=2048)
    idle = MemberInfo("idle", "10.0.0.5:1", memory_mib=1024, max_vms=16)
    members = [full, small, busy, idle]
    assert choose(members, 64, exclude=set()) == busy  # 2048 MiB free; `full` has no VM slot left
    assert choose(members, 64, exclude={busy.address}) == idle
    assert choose(members, 4096, exclude=set()) is None
    # Another host: the primary's port there; the same host: a port free on it.
    assert service_address("10.0.0.5:7400", "10.0.0.2:7411") == "10.0.0.5:7411"
    local = service_address("127.0.0.1:7400", "127.0.0.1:7411")
    assert local.startswith("127.0.0.1:") and local != "127.0.0.1:7411"


async def primary_protected_by(
    cluster: LocalCluster, node: object, peer: str, limit_s: float = 30.0
) -> vmft_pb2.VmStatus:
    deadline = time.monotonic() + limit_s
    status = None
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(cluster.vm_status, node, "vm1")  # type: ignore[arg-type]
        if status is not None and status.protected and status.peer == peer:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"not protected by {peer} within {limit_s} s: {status}")


@ETCD
@pytest.mark.kvm
async def test_a_primary_whose_backup_node_stays_dead_reprotects_onto_a_member_that_can_host_it(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with etcd_under_ca(tmp_path) as (ca, endpoints):
        with LocalCluster(tmp_path / "cluster", ca_dir=ca, etcd=endpoints, auto_reprotect_s=0.3) as cluster:
            a, b = cluster.add_node(), cluster.add_node()
            full = cluster.add_node(["--max-vms", "0"])  # the most free memory, but no VM slot
            spare = cluster.add_node(["--memory-mib", "1024"])
            vm = cluster.protect(guest_image("kv"), a, b)
            cluster.wait_for(b, vm.name, "backup")
            workload = Workload(vm.addresses, clients=3)
            load = asyncio.create_task(workload.run())
            try:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cluster.kill_node, b)  # and it stays dead
                status = await primary_protected_by(cluster, a, spare.name)
                assert status.generation == 2  # A claimed generation 2 alone, then re-protected
                await asyncio.sleep(0.5)
            finally:
                workload.stop()
                await asyncio.wait_for(load, 60)
            assert cluster.vm_status(full, vm.name) is None  # never placed where it cannot run
            # The placed backup is a real one: it takes over when A's node dies too.
            await asyncio.to_thread(cluster.kill_node, a)
            promoted = await asyncio.to_thread(cluster.wait_for, spare, vm.name, "serving", 20)
            assert promoted.generation == 3
            workload.addresses = [promoted.service]  # where the placed backup serves
            verdict = await asyncio.wait_for(workload.verify_final(), 60)
            assert verdict.ok, verdict.summary()
            assert verdict.acknowledged_writes > 20
