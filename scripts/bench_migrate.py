"""Migration under load: a 256 MiB kv guest, protected on node A with its backup on node B, moved to node C
(`Node.Migrate`: C seeded from a live checkpoint, caught up, then a planned switch), then back to A, and so
on (--count), with kv clients writing all along. Each migration keeps B as the backup (the new primary
re-protects onto it).

Client-seen pause: per client, from its last reply before the switch (the primary's vCPU parked) to its
first reply after it. The checked clients (Python, replica/workload.py: a record per operation, history
checked: no acknowledged write lost, none applied twice) and a heavier C load (build/kvload --reconnect, its
own keys; each broken connection's recovery) both know the two addresses the VM is served on (A's, C's).

References, measured in the same run: for the total time, the new primary's re-protection onto B right
after the switch (the same VM, the same live-checkpoint road, without the catch-up and the switch); for the
pause, the switch as the nodes see it (A's vCPU parked -> C serving) and the protocol's failure timeout
(what an unplanned failover waits before it starts)."""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import kvload
from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm
from replica.workload import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=6, help="migrations, alternately to C and A (default 6)")
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--clients", type=int, default=4, help="checked kv clients (default 4)")
    parser.add_argument("--load-connections", type=int, default=8,
                        help="connections of the C load beside the checked clients (default 8; 0: none)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of load between migrations")
    parser.add_argument("--quick", action="store_true", help="one migration of a 64 MiB guest (smoke test)")
    parser.add_argument("--keep", metavar="DIR", help="run the cluster in DIR and keep the node logs")


def _migrate(cluster: LocalCluster, vm: ProtectedVm, source: NodeProcess, target: NodeProcess
             ) -> vmft_pb2.MigrateReply:  # fmt: skip
    request = vmft_pb2.MigrateRequest(
        name=vm.name, target_node=target.name, target_service=cluster.service_address(vm.name, target)
    )
    with cluster.channel(source) as channel:
        reply: vmft_pb2.MigrateReply = vmft_pb2_grpc.NodeStub(channel).Migrate(request, timeout=300)
    return reply


def _pauses(workload: Workload, parked_at: float, live_at: float) -> list[float]:
    """Per checked client, the longest wait between two of its replies from its last reply before the
    primary's vCPU was parked to its first reply after the target served (seconds). Replies released
    during the switch (logged before the park, acknowledged after it) count as replies."""
    pauses = []
    for index in range(workload.clients):
        ends = sorted(op.end for op in workload.history if op.client == index and op.ok)
        before = [t for t in ends if t <= parked_at]
        between = [t for t in ends if parked_at < t <= live_at]
        after = [t for t in ends if t > live_at]
        if before and after:
            points = [before[-1], *between, after[0]]
            pauses.append(max(b - a for a, b in zip(points, points[1:])))
    return pauses


async def _reprotected(cluster: LocalCluster, node: NodeProcess, name: str, limit_s: float = 120.0
                       ) -> vmft_pb2.VmStatus:  # fmt: skip
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(cluster.vm_status, node, name)
        if status is not None and status.protected and status.reprotect_s > 0:
            return status
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} on {node.name} was not re-protected within {limit_s:.0f} s")


async def _run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    image = benchlib.guest_path("kv.elf")
    with LocalCluster(workdir) as cluster:
        a, b, c = cluster.add_node(), cluster.add_node(), cluster.add_node()
        vm = cluster.protect(image, a, b, mem_mib=args.mem)
        await asyncio.to_thread(cluster.wait_for, b, vm.name, "backup", 60)
        addresses = [cluster.service_address(vm.name, a), cluster.service_address(vm.name, c)]
        workload = Workload(addresses, clients=args.clients)
        bulk = None
        if args.load_connections:
            bulk = kvload.start(addresses, args.load_connections, 1200.0, reconnect=True, key_prefix="load",
                                tag="M", cpu=kvload.cpu_layout()[0])  # fmt: skip
        load = asyncio.create_task(workload.run())
        replies: list[vmft_pb2.MigrateReply] = []
        reprotects: list[float] = []
        pauses: list[float] = []
        try:
            await asyncio.sleep(args.settle)
            source, target = a, c
            for _ in range(args.count):
                reply = await asyncio.to_thread(_migrate, cluster, vm, source, target)
                replies.append(reply)
                status = await _reprotected(cluster, target, vm.name)
                reprotects.append(status.reprotect_s)
                await asyncio.sleep(args.settle)
                parked_at = reply.parked_at - (time.time() - time.monotonic())  # one machine: one clock
                pauses += _pauses(workload, parked_at, parked_at + reply.switch_ms / 1000)
                source, target = target, source
        finally:
            workload.stop()
            await asyncio.wait_for(load, 60)
            bulk_result = await asyncio.to_thread(bulk.stop) if bulk is not None else None
        verdict = await asyncio.wait_for(workload.verify_final(), 60)
        return {
            "replies": replies,
            "reprotects": reprotects,
            "pauses": pauses,
            "bulk": list(bulk_result.recoveries) if bulk_result is not None else [],
            "verdict": verdict,
            "failure_timeout_ms": cluster.failure_timeout_ms,
        }


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    if args.quick:
        args.count, args.mem, args.settle = 1, 64, 0.5
    with tempfile.TemporaryDirectory(prefix="vmft-bench-migrate.") as tmp:
        result = asyncio.run(_run(args, Path(args.keep) if args.keep else Path(tmp)))
    ms = 1000.0
    replies: list[vmft_pb2.MigrateReply] = result["replies"]
    verdict = result["verdict"]
    if not verdict.ok:
        print(f"bench migrate: {verdict.summary()}")
    total = [r.total_s for r in replies]
    switch = [r.switch_ms for r in replies]
    pauses = [p * ms for p in result["pauses"]]
    bulk = [p * ms for p in result["bulk"]]
    timeout_ms = result["failure_timeout_ms"]
    n = len(replies)
    mem = args.mem
    switch_p50 = benchlib.percentile(switch, 50)
    figures = [
        benchlib.Figure(f"migration total time, {mem} MiB guest, p50", benchlib.percentile(total, 50), "s",
                        benchlib.percentile(result["reprotects"], 50),
                        f"re-protection of the same VM (same run); {n} migrations"),
        benchlib.Figure("migration seed (live checkpoint to the target), p50",
                        benchlib.percentile([r.seed_s for r in replies], 50), "s",
                        benchlib.percentile(result["reprotects"], 50), "re-protection of the same VM"),
        benchlib.Figure("migration switch (vCPU parked -> target serving), p50", switch_p50, "ms",
                        timeout_ms, "failure timeout (an unplanned failover waits this long first)"),
        benchlib.Figure("migration client-seen pause p50", benchlib.percentile(pauses, 50), "ms", switch_p50,
                        "switch as the nodes see it (target < 20 ms)"),
        benchlib.Figure("migration client-seen pause max", max(pauses, default=math.nan), "ms", switch_p50,
                        "switch as the nodes see it (target < 20 ms)"),
        benchlib.Figure("migration writes lost", float(len(verdict.violations)), "writes",
                        float(verdict.acknowledged_writes), "acknowledged writes checked"),
    ]  # fmt: skip
    if args.load_connections:
        figures += [
            benchlib.Figure(f"migration C load pause p50, {args.load_connections} connections",
                            benchlib.percentile(bulk, 50), "ms", switch_p50, "switch as the nodes see it"),
            benchlib.Figure(f"migration C load pause max, {args.load_connections} connections",
                            max(bulk, default=math.nan), "ms", switch_p50, "switch as the nodes see it"),
        ]  # fmt: skip
    return figures
