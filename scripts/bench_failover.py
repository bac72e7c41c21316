"""Failover under load: SIGKILL of the primary's node process, again and again (a fresh pair of `vmft node`
processes on loopback each time), with kv clients writing through the client library (both addresses,
request ids, retries). Recovery is what a client sees: from its last reply before the kill to its first
after it. Every run's history is checked: no acknowledged write lost, none applied twice.

Beside those checked clients (Python, replica/workload.py: the history checker needs a record per operation)
runs a heavier load, build/kvload (scripts/kvload.c, --reconnect: a broken connection reopens to the other
address and sends its unanswered requests again with the same ids) on its own keys, pinned to the last core;
its connections' recoveries are figures too. Its writes are not history-checked. --load-connections 0: none.

Reference: the protocol's failure timeout (the setting, 300 ms by default): what detecting a silent
primary costs. A killed process is noticed sooner, when its connections break."""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import kvload
from replica.cluster import LocalCluster
from replica.workload import Workload

_SERVING = re.compile(r"serving \+([0-9.]+) ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the primary (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent kv clients (default 8)")
    parser.add_argument("--before", type=float, default=0.4, help="seconds of load before each kill")
    parser.add_argument("--after", type=float, default=0.4, help="seconds of load after the failover")
    parser.add_argument("--load-connections", type=int, default=8,
                        help="connections of the C load beside the checked clients (default 8; 0: none)")
    parser.add_argument("--quick", action="store_true", help="two kills (smoke test)")
    parser.add_argument("--keep", metavar="DIR", help="run the clusters in DIR and keep the node logs")
    parser.add_argument("--hosts", type=int, default=0, metavar="N",
                        help="N namespace hosts with etcd (root): kills and isolations (failover_hosts.py)")


async def _one_kill(
    cluster: LocalCluster, image: Path, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    a, b = cluster.add_node(), cluster.add_node()
    try:
        vm = cluster.protect(image, a, b, name=f"f{index}")
        await asyncio.to_thread(cluster.wait_for, b, vm.name, "backup", 20)
        workload = Workload(vm.addresses, clients=args.clients, seed=index)
        bulk = None
        if args.load_connections:
            bulk = kvload.start(vm.addresses, args.load_connections, 600.0, reconnect=True, key_prefix="load",
                                tag=f"F{index}L", cpu=kvload.cpu_layout()[0])  # fmt: skip
        load = asyncio.create_task(workload.run())
        try:
            await asyncio.sleep(args.before)
            fault_at = time.monotonic()
            cluster.kill_node(a)
            promoted = await asyncio.to_thread(cluster.wait_for, b, vm.name, "serving", 20)
            await asyncio.sleep(args.after)
        finally:
            workload.stop()
            await asyncio.wait_for(load, 60)
            bulk_result = await asyncio.to_thread(bulk.stop) if bulk is not None else None
        verdict = await asyncio.wait_for(workload.verify_final(), 60)
        gaps = workload.recovery_after(fault_at)
        match = _SERVING.search(promoted.message)
        return {
            "gaps": gaps,
            "bulk_gaps": list(bulk_result.recoveries) if bulk_result is not None else [],
            "clients": args.clients,
            "failover_ms": float(match.group(1)) if match else float("nan"),
            "violations": len(verdict.violations),
            "writes": verdict.acknowledged_writes,
            "summary": verdict.summary(),
        }
    finally:
        cluster.kill_node(a)
        cluster.stop_node(b, timeout=5)


async def _all(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    image = benchlib.guest_path("kv.elf")
    results = []
    with LocalCluster(workdir) as cluster:
        for index in range(args.kills):
            results.append(await _one_kill(cluster, image, index, args))
        timeout_ms = cluster.failure_timeout_ms
    for r in results:
        r["failure_timeout_ms"] = timeout_ms
    return results


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    if args.hosts:
        import failover_hosts

        return failover_hosts.run(args)
    if args.quick:
        args.kills, args.before, args.after = 2, 0.3, 0.2
    with tempfile.TemporaryDirectory(prefix="vmft-bench-failover.") as tmp:
        results = asyncio.run(_all(args, Path(args.keep) if args.keep else Path(tmp)))
    ms = 1000.0
    gaps = [g * ms for r in results for g in r["gaps"]]
    per_kill = [max(r["gaps"]) * ms for r in results if r["gaps"]]
    failover = [r["failover_ms"] for r in results]
    violations = sum(r["violations"] for r in results)
    writes = sum(r["writes"] for r in results)
    missing = sum(r["clients"] - len(r["gaps"]) for r in results)
    if violations or missing:
        bad = [r["summary"] for r in results if r["violations"]]
        print(f"bench failover: {violations} violations, {missing} clients without a recovery: {bad[:3]}")
    timeout_ms = results[0]["failure_timeout_ms"] if results else float("nan")
    reference = f"failure timeout (setting); {len(results)} kills"
    worst = max(gaps, default=float("nan"))
    p50 = benchlib.percentile(gaps, 50)
    bulk = [g * ms for r in results for g in r["bulk_gaps"]]
    conns = args.load_connections
    figures = [
        benchlib.Figure("client-seen recovery p50", p50, "ms", timeout_ms, reference),
        benchlib.Figure("client-seen recovery p99", benchlib.percentile(gaps, 99), "ms", timeout_ms,
                        reference + " (target p99 < 100 ms)"),
        benchlib.Figure("client-seen recovery max", worst, "ms", timeout_ms, reference),
        benchlib.Figure("slowest client per kill, p50", benchlib.percentile(per_kill, 50), "ms", timeout_ms,
                        reference),
        benchlib.Figure("backup failover (suspected -> serving) p50", benchlib.percentile(failover, 50), "ms",
                        timeout_ms, reference),
        benchlib.Figure("acknowledged writes lost or duplicated", float(violations), "writes", float(writes),
                        "acknowledged writes checked"),
        benchlib.Figure("clients that never recovered", float(missing), "clients",
                        float(sum(r["clients"] for r in results)), "clients in all runs"),
    ]  # fmt: skip
    if conns:  # kvload fails the run if a connection finds no address: every recovery is here
        figures += [
            benchlib.Figure(f"C load recovery p50, {conns} connections", benchlib.percentile(bulk, 50), "ms",
                            timeout_ms, reference),
            benchlib.Figure(f"C load recovery max, {conns} connections", max(bulk, default=math.nan), "ms",
                            timeout_ms, reference),
        ]  # fmt: skip
    return figures
