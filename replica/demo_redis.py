"""The main job's second act (`scripts/demo`, after the kv act; `--act redis` alone): Debian's redis-server,
unmodified, as a protected pair on two node processes, loaded by Debian's redis-benchmark and checked by
clients of our own (SETs of unique keys, INCRs of shared counters: replica/redis_service.py); the
primary's node is SIGKILLed under that load; the act prints the failover, the recovery each checking
client saw, redis-benchmark's rate on the old and the new primary, and the history check."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from replica.cluster import LocalCluster
from replica.redis_service import RedisWorkload, protect_redis
from replica.workload import median

BENCHMARK = "/usr/bin/redis-benchmark"
BENCH_CONNECTIONS = 20
REDIS_ARGV = ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no"]
PREFIX = "demo redis:"


@dataclass
class BenchRun:
    """redis-benchmark looping SETs (-l -q) against one address until it is stopped or its server dies."""

    process: subprocess.Popen[str]

    @classmethod
    def start(cls, address: str) -> BenchRun:
        host, port = address.rsplit(":", 1)
        command = [BENCHMARK, "-h", host, "-p", port, "-c", str(BENCH_CONNECTIONS), "-t", "set"]
        command += ["-r", "1000000", "-l", "-q"]
        return cls(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def finish(self, timeout: float = 10.0) -> tuple[float | None, str]:
        """(its overall rate in requests/s from its last progress line, the error it ended with or '');
        stops it (by its PID) if it still runs."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate(timeout=timeout)
        rates = re.findall(r"overall: ([\d.]+)\) avg_msec", out)
        errors = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("Error")]
        return (float(rates[-1]) if rates else None), (errors[-1] if errors else "")


def say(text: str) -> None:
    print(f"{PREFIX} {text}", flush=True)


async def act(workdir: Path, clients: int, before_s: float, after_s: float) -> int:
    say("act 2: Debian's redis-server, unmodified, as the protected guest; Debian's redis-benchmark as load")
    with LocalCluster(workdir) as cluster:
        primary, backup = cluster.add_node(), cluster.add_node()
        say(f"node A {primary.name} (pid {primary.pid}), node B {backup.name} (pid {backup.pid})")
        vm = await asyncio.to_thread(protect_redis, cluster, primary, backup, REDIS_ARGV)
        say(
            f"protected `{' '.join(a or repr(a) for a in REDIS_ARGV)}`: primary on A, backup on B; "
            f"service {vm.service}, after failover {vm.backup_service}"
        )
        workload = RedisWorkload(vm.addresses, clients=clients, seed=int(time.time()))
        load = asyncio.create_task(workload.run())
        bench = BenchRun.start(vm.service)
        say(f"load: redis-benchmark ({BENCH_CONNECTIONS} connections, SET) and {clients} checking clients")
        await asyncio.sleep(before_s)
        status = cluster.vm_status(primary, vm.name)
        if status is not None:
            say(
                f"before the fault: position {status.position}, backup acknowledged {status.acked_position}, "
                f"log {status.log_bytes_per_s / 1024:.1f} KiB/s, {len(workload.history)} checked operations"
            )
        say(f"SIGKILL node A (pid {primary.pid}), the primary")
        fault_at = time.monotonic()
        await asyncio.to_thread(cluster.kill_node, primary)
        promoted = await asyncio.to_thread(cluster.wait_for, backup, vm.name, "serving", 10.0)
        detected_in = time.monotonic() - fault_at
        rate, error = await asyncio.to_thread(bench.finish)
        say(f"redis-benchmark on A: {_rate(rate)} until the kill, then: {error or 'no error'}")
        bench = BenchRun.start(vm.backup_service)
        await asyncio.sleep(after_s)
        rate_after, error_after = await asyncio.to_thread(bench.finish)
        workload.stop()
        await load
        verdict = await workload.verify()
        gaps = workload.recovery_after(fault_at, time.monotonic() - fault_at)
        say(f"node B is primary in generation {promoted.generation} ({promoted.message})")
        say(f"failover seen by the controller within {detected_in * 1000:.0f} ms of the kill")
        if gaps:
            say(
                f"recovery time seen by {len(gaps)} clients (last reply before the fault to first after): "
                f"median {median(gaps) * 1000:.1f} ms, max {max(gaps) * 1000:.1f} ms"
            )
        say(f"redis-benchmark on B: {_rate(rate_after)}" + (f" ({error_after})" if error_after else ""))
        say(f"history checked: {verdict.summary()}")
        for violation in verdict.violations[:10]:
            say(f"VIOLATION {violation}")
        return 0 if verdict.ok and gaps and rate_after else 1


def _rate(rate: float | None) -> str:
    return f"{rate:,.0f} SET/s" if rate is not None else "no rate printed"
