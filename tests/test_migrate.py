"""Migration (replica/migration.py) on real node processes with real clients: the primary moves to another
node through a planned switch, and every acknowledged write is there afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from etcd_helpers import etcd_under_ca

from proto import vmft_pb2, vmft_pb2_grpc
from replica import node_client, tls
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm
from replica.workload import Workload

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent


async def replies_after(workload: Workload, t: float, count: int = 30, limit_s: float = 20.0) -> None:
    """Until the clients have `count` more successful replies to requests sent after `t`."""
    deadline = time.monotonic() + limit_s
    while sum(1 for op in list(workload.history) if op.ok and op.start > t) < count:
        assert time.monotonic() < deadline, f"fewer than {count} replies within {limit_s} s"
        await asyncio.sleep(0.02)


def migrate(
    cluster: LocalCluster, vm: ProtectedVm, source: NodeProcess, target: NodeProcess
) -> vmft_pb2.MigrateReply:
    request = vmft_pb2.MigrateRequest(
        name=vm.name, target_node=target.name, target_service=cluster.service_address(vm.name, target)
    )
    with cluster.channel(source) as channel:
        reply: vmft_pb2.MigrateReply = vmft_pb2_grpc.NodeStub(channel).Migrate(request, timeout=120)
    return reply


async def test_migration_to_a_third_node_loses_no_acknowledged_write(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with LocalCluster(tmp_path) as cluster:
        a, b, c = cluster.add_node(), cluster.add_node(), cluster.add_node()
        vm = cluster.protect(guest_image("kv"), a, b)
        cluster.wait_for(b, vm.name, "backup")
        cluster.service_address(vm.name, c)  # the clients know where the VM may be served
        workload = Workload(cluster.service_addresses(vm.name), clients=4)
        load = asyncio.create_task(workload.run())
        try:
            await replies_after(workload, 0.0)
            began = time.monotonic()
            reply = await asyncio.to_thread(migrate, cluster, vm, a, c)
            # C serves in a newer generation; the clients carry on against it.
            assert reply.target_node == c.name and reply.generation > 1 and reply.seed_s > 0
            assert reply.next_backup_node == b.name  # the pair keeps its backup
            await replies_after(workload, time.monotonic())
            # C re-protects onto B, the old backup, from a live checkpoint.
            status = await asyncio.to_thread(cluster.wait_for, b, vm.name, "backup", 30)
            assert status.generation == reply.generation
        finally:
            workload.stop()
            await asyncio.wait_for(load, 60)
        verdict = await asyncio.wait_for(workload.verify_final(), 60)
        assert verdict.ok, verdict.summary()
        assert verdict.acknowledged_writes > 50
        # Writes acknowledged before the switch were read back from C (the verification ran there).
        assert any(op.ok and op.end < began for op in workload.history if op.kind in ("set", "incr"))
        c_status = cluster.vm_status(c, vm.name)
        assert c_status is not None and c_status.role == vmft_pb2.ROLE_PRIMARY
        a_status = cluster.vm_status(a, vm.name)
        assert a_status is not None and a_status.role == vmft_pb2.ROLE_STOPPED  # fenced: released


async def test_migration_to_the_backup_swaps_the_roles_through_the_command_line(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with LocalCluster(tmp_path) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = cluster.protect(guest_image("kv"), a, b)
        cluster.wait_for(b, vm.name, "backup")
        workload = Workload(cluster.service_addresses(vm.name), clients=3)
        load = asyncio.create_task(workload.run())
        try:
            await replies_after(workload, 0.0)
            argv = [sys.executable, "-m", "replica.cli", "migrate", vm.name, "--to", b.name,
                    "--node", a.name, "--node", b.name, "--json"]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, timeout=120, cwd=ROOT,
                env={**os.environ, **cluster.client_env()},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            outcome = json.loads(done.stdout)
            assert outcome["to"] == b.name and outcome["from"] == a.name and outcome["seed_s"] == 0
            assert outcome["next_backup"] == a.name  # the old primary's node becomes the backup
            await replies_after(workload, time.monotonic())
            status = await asyncio.to_thread(cluster.wait_for, a, vm.name, "backup", 30)
            assert status.generation == outcome["generation"]
            b_status = cluster.vm_status(b, vm.name)
            assert b_status is not None and b_status.role == vmft_pb2.ROLE_PRIMARY
        finally:
            workload.stop()
            await asyncio.wait_for(load, 60)
        verdict = await asyncio.wait_for(workload.verify_final(), 60)
        assert verdict.ok, verdict.summary()


def test_migrate_is_refused_without_an_admin_certificate_and_onto_the_primarys_own_node(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with LocalCluster(tmp_path) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = cluster.protect(guest_image("kv"), a, b)
        cluster.wait_for(b, vm.name, "backup")
        request = vmft_pb2.MigrateRequest(name=vm.name, target_node=a.name)  # where it runs already
        with cluster.channel(a) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                vmft_pb2_grpc.NodeStub(channel).Migrate(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # A node certificate is not an admin's: another node cannot move the VM.
        node_auth = node_client.ClientAuth(cluster.identity(tls.Role.NODE, "node-intruder"))
        with node_auth.channel(a.name) as channel:
            with pytest.raises(grpc.RpcError) as denied:
                vmft_pb2_grpc.NodeStub(channel).Migrate(
                    vmft_pb2.MigrateRequest(name=vm.name, target_node=b.name), timeout=30
                )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # ... nor hand it over to its backup: only the VM's current primary may.
        with node_auth.channel(b.name) as channel:
            with pytest.raises(grpc.RpcError) as forged:
                vmft_pb2_grpc.NodeStub(channel).Handover(
                    vmft_pb2.HandoverRequest(name=vm.name, generation=1, position=1), timeout=30
                )
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nothing moved.
        status = cluster.vm_status(a, vm.name)
        assert status is not None and status.role == vmft_pb2.ROLE_PRIMARY and status.protected


async def test_a_migration_the_target_refuses_leaves_the_vm_protected_where_it_was(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    with LocalCluster(tmp_path) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        full = cluster.add_node(["--max-vms", "0"])  # answers, but takes no VM
        vm = cluster.protect(guest_image("kv"), a, b)
        cluster.wait_for(b, vm.name, "backup")
        workload = Workload(cluster.service_addresses(vm.name), clients=3)
        load = asyncio.create_task(workload.run())
        try:
            await replies_after(workload, 0.0)
            with pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(migrate, cluster, vm, a, full)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "limit" in (refused.value.details() or "")
            # A serves on, and its old backup protects it again (a fresh live checkpoint).
            deadline = time.monotonic() + 30
            while True:
                status = await asyncio.to_thread(cluster.vm_status, a, vm.name)
                if status is not None and status.protected and status.peer == b.name:
                    break
                assert time.monotonic() < deadline, f"not protected by B again: {status}"
                await asyncio.sleep(0.05)
            assert status.role == vmft_pb2.ROLE_PRIMARY
            await replies_after(workload, time.monotonic())
        finally:
            workload.stop()
            await asyncio.wait_for(load, 60)
        assert cluster.vm_status(full, vm.name) is None
        verdict = await asyncio.wait_for(workload.verify_final(), 60)
        assert verdict.ok, verdict.summary()


def test_bench_migrate_quick_reports_its_figures_as_json() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "migrate", "--quick", "--json",
         "--load-connections", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "VMFT_BENCH_SET_UP": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {f["name"]: f for f in map(json.loads, done.stdout.splitlines())}
    lost = figures["migration writes lost"]
    assert lost["value"] == 0 and lost["reference"] > 0  # writes were checked, none lost
    pause = figures["migration client-seen pause max"]
    assert pause["unit"] == "ms" and pause["value"] > 0
    assert figures["migration total time, 64 MiB guest, p50"]["value"] > 0


async def test_migration_on_etcd_goes_only_to_a_live_member(
    tmp_path: Path, guest_image: Callable[[str], Path]
) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd-server is not installed")
    with etcd_under_ca(tmp_path) as (ca, endpoints):
        with LocalCluster(tmp_path / "cluster", ca_dir=ca, etcd=endpoints) as cluster:
            a, b, c = cluster.add_node(), cluster.add_node(), cluster.add_node()
            vm = cluster.protect(guest_image("kv"), a, b)
            cluster.wait_for(b, vm.name, "backup")
            stranger = vmft_pb2.MigrateRequest(name=vm.name, target_node="127.0.0.1:1", target_service="")
            with cluster.channel(a) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    vmft_pb2_grpc.NodeStub(channel).Migrate(stranger, timeout=30)
            assert "not a live member" in (refused.value.details() or "")
            cluster.service_address(vm.name, c)
            workload = Workload(cluster.service_addresses(vm.name), clients=3)
            load = asyncio.create_task(workload.run())
            try:
                await replies_after(workload, 0.0)
                reply = await asyncio.to_thread(migrate, cluster, vm, a, c)
                # Generation 2: the primary alone (its backup released); 3: the target, claimed in etcd.
                assert reply.generation == 3
                await replies_after(workload, time.monotonic())
                status = await asyncio.to_thread(cluster.wait_for, b, vm.name, "backup", 30)
                assert status.generation == 3
            finally:
                workload.stop()
                await asyncio.wait_for(load, 60)
            verdict = await asyncio.wait_for(workload.verify_final(), 60)
            assert verdict.ok, verdict.summary()
