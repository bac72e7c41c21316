"""The main job (`scripts/demo`). Act 1: a replicated kv VM on two node processes, a client load, the
primary killed with SIGKILL, the failover, and what the clients saw. Act 2 (replica/demo_redis.py): the
same with Debian's redis-server as the guest, redis-benchmark as load and checking clients of our own.
`--act kv` or `--act redis` runs one act alone."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from replica.cluster import LocalCluster
from replica.workload import Workload, median

REPO = Path(__file__).resolve().parent.parent


async def demo(image: Path, clients: int, before_s: float, after_s: float, workdir: Path) -> int:
    with LocalCluster(workdir) as cluster:
        primary = cluster.add_node()
        backup = cluster.add_node()
        print(f"demo: node A {primary.name} (pid {primary.pid}), node B {backup.name} (pid {backup.pid})")
        print(f"demo: every link mutual TLS, certificates from the cluster CA in {cluster.ca_dir}")
        vm = cluster.protect(image, primary, backup)
        print(
            f"demo: protected kv guest: primary on A, backup on B; service {vm.service}, "
            f"after failover {vm.backup_service}"
        )
        cluster.wait_for(backup, vm.name, "backup")
        workload = Workload(vm.addresses, clients=clients, seed=int(time.time()))
        load = asyncio.create_task(workload.run())
        await asyncio.sleep(before_s)
        status = cluster.vm_status(primary, vm.name)
        if status is not None:
            print(
                f"demo: before the fault: position {status.position}, "
                f"backup acknowledged {status.acked_position}, "
                f"log {status.log_bytes_per_s / 1024:.1f} KiB/s, "
                f"{len(workload.history)} operations so far"
            )
        print(f"demo: SIGKILL node A (pid {primary.pid}), the primary")
        fault_at = time.monotonic()
        cluster.kill_node(primary)
        promoted = cluster.wait_for(backup, vm.name, "serving", timeout=10)
        detected_in = time.monotonic() - fault_at
        await asyncio.sleep(after_s)
        workload.stop()
        await load
        verdict = await workload.verify_final()
        gaps = workload.recovery_after(fault_at)
        print(f"demo: node B is primary in generation {promoted.generation} ({promoted.message})")
        print(f"demo: failover seen by the controller within {detected_in * 1000:.0f} ms of the kill")
        if gaps:
            print(
                f"demo: recovery time seen by {len(gaps)} clients "
                "(last reply before the fault to first after): "
                f"median {median(gaps) * 1000:.1f} ms, max {max(gaps) * 1000:.1f} ms"
            )
        print(f"demo: history checked: {verdict.summary()}")
        for violation in verdict.violations[:10]:
            print(f"demo: VIOLATION client {violation.client} {violation.kind}: {violation.detail}")
        return 0 if verdict.ok and gaps else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", default=str(REPO / "guests/build/kv.elf"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--before", type=float, default=2.0, help="seconds of load before the fault")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of load after the fault")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (node logs)")
    parser.add_argument(
        "--act", choices=["both", "kv", "redis"], default="both", help="which act (default: both, kv first)"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vmft-demo."))
    print(f"demo: work directory {workdir}")
    try:
        status = 0
        if args.act in ("both", "kv"):
            status |= asyncio.run(demo(Path(args.image), args.clients, args.before, args.after, workdir))
        if args.act in ("both", "redis"):
            from replica import demo_redis

            status |= asyncio.run(demo_redis.act(workdir / "redis", args.clients, args.before, args.after))
        return status
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
