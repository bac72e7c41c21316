"""`vmft chaos --linux`: a fault campaign against Debian's redis-server protected as a pair (a Linux program
under the personality, replica/guest_kind.py) on a LocalCluster of real node processes, with its own
history check in the redis protocol (replica/resp.py):

- clients SET unique keys: every acknowledged SET must read back with its value at the end;
- clients INCR a few shared counters: no acknowledged increment may be lost (the final value is at least
  the acknowledged increments and at most the attempted ones), and no two acknowledged INCRs of one
  counter may have returned the same value (an increment applied twice over a rolled-back one).

Faults: SIGKILL or SIGSTOP of the primary's or the backup's node, and a guest crash: redis-server gets
SIGSEGV at its next system call (`crash` through the node's InjectFault, as `vmft fault crash`), after which
the primary restarts it from a checkpoint plus the log up to the last reply a client saw (replica/faults.py
for all of them). With `--query-of-death` the crash comes from a request instead, `DEBUG SEGFAULT` (redis
writes into a read-only page; it runs with `--enable-debug-command local --crash-log-enabled no`), which
the log carries: a restart whose replay target is past the request's arrival crashes again (see
docs/linux.md). After each fault the pair is re-protected (replica/chaos.py's PairController) before the
next. Recovery times are measured as `vmft chaos` measures them and reported in its form
(chaos.CampaignReport: table, JSON, timeline).

    vmft chaos --linux [--count N] [--seed S] [--faults F,...] [--clients C] [--nodes N] [--json]
                       [--query-of-death] [--out DIR] [--keep] [-- redis-server ARGS...]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from monitor.errors import VmftError
from proto import vmft_pb2
from replica.chaos import (
    CampaignReport,
    FaultOutcome,
    PairController,
    latency_samples,
    play_plan,
    primaries_violations,
    work_directory,
    write_report,
)
from replica.cluster import ClusterError, LocalCluster
from replica.faults import Fault, FaultError, find_roles, inject
from replica.redis_service import (
    DEFAULT_ARGS,
    REDIS,
    RedisServiceError,
    RedisVerdict,
    RedisWorkload,
    crash_redis,
    protect_redis,
    redis_argv,
)
from replica.resp import RespError

PROG = "vmft chaos --linux"
LINUX_FAULTS = [Fault.KILL_PRIMARY, Fault.KILL_BACKUP, Fault.STOP_PRIMARY, Fault.STOP_BACKUP, Fault.CRASH]
_BREAKS_PROTECTION = set(LINUX_FAULTS)
WAIT_S = 60.0


# ----- the campaign --------------------------------------------------------------------------------------


@dataclass
class LinuxCampaignReport(CampaignReport):
    program: list[str] = field(default_factory=list)
    nodes: int = 2
    sets_acked: int = 0
    sets_lost: int = 0
    incr_acked: int = 0
    incr_attempted: int = 0
    counters: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        lost_incr = sum(max(0, acked - value) for value, acked, _a in self.counters.values())
        program = self.program[0] if self.program else "?"
        return (
            f"chaos --linux: {len(self.faults)} faults in {self.seconds:.0f} s ({program} "
            f"on {self.nodes} nodes, loopback), {self.operations} operations, {self.sets_acked} acknowledged "
            f"SETs checked (lost {self.sets_lost}), {self.incr_acked} acknowledged INCRs of "
            f"{self.incr_attempted} attempted (lost {lost_incr}), {self.failed_operations} failed (not "
            f"acknowledged): verdict {self.verdict}"
        )


class LinuxCampaign:
    def __init__(
        self,
        workdir: str | Path,
        argv: list[str],
        faults: list[Fault] | None = None,
        count: int = 10,
        seed: int = 0,
        clients: int = 4,
        nodes: int = 2,
        settle_s: float = 0.5,
        fault_duration_s: float = 0.8,
        recovery_timeout_s: float = 30.0,
        failure_timeout_ms: float = 500.0,
        hang_timeout_s: float = 1.0,
        query_of_death: bool = False,
    ) -> None:
        """`hang_timeout_s`: the guest's (a restart trusts only checkpoints older than it: with the Linux
        default of 60 s, two crashes within a minute restart from a checkpoint whose log is gone).
        `query_of_death`: crash by `DEBUG SEGFAULT` instead of a SIGSEGV from the host."""
        rng = random.Random(seed)
        self.plan = list(faults) if faults else [rng.choice(LINUX_FAULTS) for _ in range(count)]
        unsupported = [f.value for f in self.plan if f not in LINUX_FAULTS]
        if unsupported:
            raise FaultError(
                f"{', '.join(unsupported)}: not in the Linux campaign "
                f"({', '.join(f.value for f in LINUX_FAULTS)})"
            )
        if nodes < 2:
            raise ValueError("a pair needs two nodes")
        self.workdir = Path(workdir)
        self.argv = argv
        self.seed = seed
        self.clients = clients
        self.nodes = nodes
        self.settle_s = settle_s
        # Longer than the failure timeout, so that a stopped node is failed over (or, a backup, dropped).
        self.fault_duration_s = max(fault_duration_s, failure_timeout_ms / 1000 + 0.3)
        self.recovery_timeout_s = recovery_timeout_s
        self.failure_timeout_ms = failure_timeout_ms
        self.hang_timeout_s = hang_timeout_s
        self.query_of_death = query_of_death

    async def run(self, say: Callable[[str], None] = lambda line: None) -> LinuxCampaignReport:
        started = time.monotonic()
        with LocalCluster(self.workdir, failure_timeout_ms=self.failure_timeout_ms) as cluster:
            nodes = [await asyncio.to_thread(cluster.add_node) for _ in range(self.nodes)]
            vm = await asyncio.to_thread(
                protect_redis, cluster, nodes[0], nodes[1], self.argv, hang_timeout_s=self.hang_timeout_s
            )
            controller = PairController(cluster, vm, nodes)
            workload = RedisWorkload(
                cluster.service_addresses(vm.name), self.clients, self.seed, epoch=started
            )
            outcomes = await play_plan(
                self.plan,
                lambda index, fault: self._one(index, fault, cluster, controller, workload, started),
                workload,
                self.settle_s,
                lambda outcome: say(describe(outcome, len(self.plan))),
            )
            try:
                verdict = await workload.verify()
            except (RespError, RedisServiceError) as err:
                verdict = RedisVerdict(len(workload.history), 0, 0, 0, 0, 0, {}, [f"unavailable: {err}"])
        violations = list(verdict.violations) + primaries_violations(outcomes)
        samples = latency_samples(workload.history, started)
        return LinuxCampaignReport(
            seed=self.seed,
            faults=outcomes,
            verdict="ok" if not violations else "VIOLATIONS",
            violations=violations,
            operations=verdict.operations,
            acknowledged_writes=verdict.sets_acked + verdict.incr_acked,
            failed_operations=sum(not op.ok for op in workload.history),
            seconds=time.monotonic() - started,
            latency_samples=samples,
            program=self.argv,
            nodes=self.nodes,
            sets_acked=verdict.sets_acked,
            sets_lost=verdict.sets_lost,
            incr_acked=verdict.incr_acked,
            incr_attempted=verdict.incr_attempted,
            counters=verdict.counters,
        )

    async def _one(
        self,
        index: int,
        fault: Fault,
        cluster: LocalCluster,
        controller: PairController,
        workload: RedisWorkload,
        started: float,
    ) -> FaultOutcome:
        names = [n.name for n in controller.nodes]
        injected_at = time.monotonic()
        injected_wall = time.time()
        outcome = FaultOutcome(index, fault.value, injected_at - started)
        try:
            if fault is Fault.CRASH and self.query_of_death:
                primary, _backup = await asyncio.to_thread(find_roles, names, controller.vm.name)
                if primary is None:
                    raise FaultError(f"no node holds the primary of {controller.vm.name}")
                address = cluster.service_address(controller.vm.name, controller.node(primary))
                outcome.detail = await crash_redis(address)
            else:
                reply = await asyncio.to_thread(
                    inject, names, controller.vm.name, fault, self.fault_duration_s
                )
                outcome.detail = reply.detail
        except (FaultError, RespError) as err:
            outcome.error = str(err)
            return outcome
        await self._watch(outcome, controller, workload, injected_at, injected_wall)
        if not outcome.error:
            try:
                if fault in _BREAKS_PROTECTION or not await asyncio.to_thread(controller.protected):
                    outcome.reprotect_ms = await asyncio.to_thread(controller.repair, WAIT_S) * 1000
            except ClusterError as err:
                outcome.error = str(err)
        return outcome

    async def _watch(
        self,
        outcome: FaultOutcome,
        controller: PairController,
        workload: RedisWorkload,
        injected_at: float,
        injected_wall: float,
    ) -> None:
        """Until a primary serves and every client got a reply after the fault's effect (counting the
        serving primaries meanwhile), then the client-seen recovery and the nodes' detection/failover."""
        deadline = injected_at + self.recovery_timeout_s
        effect_s = self.fault_duration_s + self.failure_timeout_ms / 1000 + 0.3
        while time.monotonic() < deadline:
            primaries = await asyncio.to_thread(controller.serving_primaries)
            outcome.max_primaries = max(outcome.max_primaries, len(primaries))
            now = time.monotonic()
            if (
                now - injected_at > effect_s
                and primaries
                and workload.clients_through_since(max(injected_at, now - 0.3)) == workload.clients
            ):
                break
            await asyncio.sleep(0.02)
        else:
            outcome.error = f"no recovery within {self.recovery_timeout_s} s"
            return
        window = time.monotonic() - injected_at
        gaps = workload.recovery_after(injected_at, window)
        outcome.recovery_ms = max(gaps) * 1000 if gaps else None
        outcome.outage_p50_ms = statistics.median(gaps) * 1000 if gaps else None
        outcome.served_by = sorted(
            {op.server for op in workload.history[-50:] if op.ok and op.end > injected_at and op.server}
        )
        for status in (await asyncio.to_thread(controller.statuses)).values():
            if status.role == vmft_pb2.ROLE_PRIMARY and status.suspected_at >= injected_wall:
                outcome.detection_ms = (status.suspected_at - injected_wall) * 1000
                if status.serving_at >= status.suspected_at:
                    outcome.failover_ms = (status.serving_at - status.suspected_at) * 1000


def describe(outcome: FaultOutcome, total: int) -> str:
    def ms(value: float | None) -> str:
        return f"{value:.0f} ms" if value is not None else "-"

    text = (
        f"[{outcome.index + 1}/{total}] {outcome.fault:12} recovery {ms(outcome.recovery_ms)}, "
        f"detection {ms(outcome.detection_ms)}, failover {ms(outcome.failover_ms)}, "
        f"re-protection {ms(outcome.reprotect_ms)}"
    )
    if outcome.error:
        text += f" ERROR: {outcome.error}"
    return text


# ----- the command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmft chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux", action="store_true", required=True)
    parser.add_argument("--faults", help=f"comma-separated, in order (default: random among "
                        f"{', '.join(f.value for f in LINUX_FAULTS)})")  # fmt: skip
    parser.add_argument("--count", type=int, default=10, help="random faults to inject (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random faults and the load")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--nodes", type=int, default=2, help="node processes (default 2; 3: re-protection "
                        "onto another node)")  # fmt: skip
    parser.add_argument("--settle", type=float, default=0.5, metavar="S", help="load between faults")
    parser.add_argument("--failure-timeout-ms", type=float, default=500.0,
                        help="the nodes' failure timeout (default 500)")  # fmt: skip
    parser.add_argument("--query-of-death", action="store_true",
                        help="crash redis by a request (DEBUG SEGFAULT), not by the host")  # fmt: skip
    parser.add_argument("--out", default="chaos-report", metavar="DIR", help="where the report goes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (node data, logs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (progress on stderr)")
    default = " ".join(a or "''" for a in DEFAULT_ARGS)
    parser.add_argument("program", nargs=argparse.REMAINDER,
                        help=f"-- redis-server [ARGS...] (default: {REDIS} {default})")  # fmt: skip
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    started = time.monotonic()
    out = sys.stderr if args.json else sys.stdout  # with --json stdout carries only the report

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        faults = [Fault(name) for name in args.faults.split(",")] if args.faults else None
        program = redis_argv(list(args.program))
        with work_directory(args.keep, say) as workdir:
            say(f"chaos: work directory {workdir}, report into {args.out}; guest: {' '.join(program)}")
            campaign = LinuxCampaign(
                workdir, program, faults=faults, count=args.count, seed=args.seed, clients=args.clients,
                nodes=args.nodes, settle_s=args.settle, failure_timeout_ms=args.failure_timeout_ms,
                query_of_death=args.query_of_death,
            )  # fmt: skip
            report = asyncio.run(
                campaign.run(lambda line: say(f"chaos {time.monotonic() - started:6.1f}s {line}"))
            )
    except (ValueError, VmftError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    write_report(report, Path(args.out))
    if args.json:
        print(report.to_json())
        return 0 if report.ok else 1
    print(report.table())
    print(report.summary())
    for violation in report.violations[:20]:
        print(f"chaos: VIOLATION {violation}")
    print(f"chaos: wrote {args.out}/report.json, report.txt and timeline.png")
    return 0 if report.ok else 1
