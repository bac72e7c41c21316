"""Fault campaigns: a client workload against a protected kv VM on a local cluster of real node processes,
a sequence of faults (chosen, or random with a seed), recovery and re-protection after each, the history
checker's verdict, and the recovery times as a client sees them.

Two topologies. By default the nodes are processes on loopback (a SQLite arbiter file). With `hosts=N`
each node runs as its own test host (replica/chaos_hosts.py: a network namespace on a bridge, its own
address and data directory), etcd's members on hosts of their own are the only shared thing, the clients
stay outside every host, and the catalogue gains partition faults (replica/faults.py: isolate the primary's
host, cut the pair from each other, isolate the backup's host, isolate one etcd member), each healed after
`partition_s`. Everything a campaign made is removed at the end, also after an error or Ctrl-C.

For each fault it measures: detection (fault injected -> the surviving primary suspected it), failover
(suspected -> serving again), recovery (the longest gap a client saw between two successful replies
around the fault), and re-protection (repair started -> a new backup replaying). It also watches that
never two nodes serve the VM as primary at the same moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import shutil
import tempfile
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from proto import vmft_pb2
from replica.cluster import ClusterError, LocalCluster, NodeProcess, ProtectedVm
from replica.faults import (
    PARTITIONS,
    Fault,
    FaultError,
    PartitionCut,
    apply_partition,
    find_roles,
    heal_partition,
    inject,
    plan_partition,
)
from replica.chaos_hosts import NamespaceCluster, host_topology
from replica.kv_client import KvUnavailable
from replica.roles import is_serving
from replica.workload import Verdict, Violation, Workload, percentile

# Faults a campaign on loopback draws from (HEAL is a repair, not a fault; partitions need hosts).
CAMPAIGN_FAULTS = [f for f in Fault if f is not Fault.HEAL and f not in PARTITIONS]
# Faults a campaign across hosts draws from: all of them, partitions included.
HOST_CAMPAIGN_FAULTS = [f for f in Fault if f is not Fault.HEAL]
# Faults after which the pair needs a new backup.
_BREAKS_PROTECTION = {
    Fault.KILL_PRIMARY,
    Fault.KILL_BACKUP,
    Fault.STOP_PRIMARY,
    Fault.STOP_BACKUP,
    Fault.CRASH,
    Fault.PANIC,
    Fault.HANG,
    Fault.SCRIBBLE,
    Fault.CUT_LINK,
}


@dataclass
class FaultOutcome:
    index: int
    fault: str
    injected_at: float  # seconds since the campaign started
    detection_ms: float | None = None
    failover_ms: float | None = None
    recovery_ms: float | None = None
    reprotect_ms: float | None = None
    max_primaries: int = 0
    detail: str = ""
    error: str = ""
    outage_p50_ms: float | None = None  # the median over clients of the gap each saw (recovery: the max)
    partition: str = ""  # what a partition fault cut, and for how long
    served_by: list[str] = field(default_factory=list)  # addresses that answered clients after the fault


@dataclass
class CampaignReport:
    seed: int
    faults: list[FaultOutcome]
    verdict: str
    violations: list[str]
    operations: int
    acknowledged_writes: int
    failed_operations: int
    seconds: float
    latency_samples: list[tuple[float, float]] = field(default_factory=list)  # (t since start, ms)
    hosts: int = 0  # node hosts (0: processes on loopback)
    etcd_members: int = 0
    shared_increments: int = 0  # acknowledged increments of the shared counter (the two-primaries check)

    @property
    def ok(self) -> bool:
        return not self.violations and not any(f.error for f in self.faults)

    def summary(self) -> str:
        where = (
            f"{self.hosts} hosts, etcd {self.etcd_members} members" if self.hosts else "loopback, SQLite"
        )
        return (
            f"chaos: {len(self.faults)} faults in {self.seconds:.0f} s ({where}), {self.operations} "
            f"operations, {self.acknowledged_writes} acknowledged writes checked, {self.shared_increments} "
            f"shared-counter increments checked for two primaries, {self.failed_operations} failed (not "
            f"acknowledged): verdict {self.verdict}"
        )

    def partition_table(self) -> str:
        """One line per partition fault: what was cut, the client-seen outage (max and median over the
        clients), and who served after it."""
        lines = []
        for f in self.faults:
            if Fault(f.fault) not in PARTITIONS:
                continue

            def ms(value: float | None) -> str:
                return f"{value:.0f}" if value is not None else "-"

            lines.append(
                f"#{f.index + 1:<4} {f.fault:16} outage max {ms(f.recovery_ms):>5} ms, median "
                f"{ms(f.outage_p50_ms):>5} ms  {f.partition}; served by {', '.join(f.served_by) or '-'}"
                + (f"  ERROR {f.error}" if f.error else "")
            )
        return "\n".join(lines)

    def table(self) -> str:
        """p50/p95/p99/max per fault kind for each measured time, in ms."""
        lines = [
            f"{'fault':16} {'n':>3}  {'recovery p50/p95/p99/max':>28}  {'detection p50/max':>18}  "
            f"{'failover p50/max':>17}  {'reprotect p50/max':>18}"
        ]
        kinds = sorted({f.fault for f in self.faults})
        for kind in kinds:
            rows = [f for f in self.faults if f.fault == kind]

            def stat(values: list[float | None], quantiles: tuple[float, ...]) -> str:
                present = [v for v in values if v is not None]
                if not present:
                    return "-"
                return "/".join(
                    f"{max(present) if q == 1.0 else percentile(present, q):.0f}" for q in quantiles
                )

            lines.append(
                f"{kind:16} {len(rows):>3}  "
                f"{stat([r.recovery_ms for r in rows], (0.5, 0.95, 0.99, 1.0)):>28}  "
                f"{stat([r.detection_ms for r in rows], (0.5, 1.0)):>18}  "
                f"{stat([r.failover_ms for r in rows], (0.5, 1.0)):>17}  "
                f"{stat([r.reprotect_ms for r in rows], (0.5, 1.0)):>18}"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        """Every fault's outcome, the verdict, and per fault kind the recovery (client-seen outage)
        p50/p99/max, for scripts."""
        data = asdict(self)
        data.pop("latency_samples")
        data["ok"] = self.ok
        data["summary"] = self.summary()
        kinds: dict[str, dict[str, float | int | None]] = {}
        for kind in sorted({f.fault for f in self.faults}):
            values = [f.recovery_ms for f in self.faults if f.fault == kind and f.recovery_ms is not None]
            kinds[kind] = {
                "n": sum(f.fault == kind for f in self.faults),
                "recovery_p50_ms": percentile(values, 0.5) if values else None,
                "recovery_p99_ms": percentile(values, 0.99) if values else None,
                "recovery_max_ms": max(values) if values else None,
            }
        data["kinds"] = kinds
        return json.dumps(data, indent=2)

    def plot(self, path: str | Path) -> None:
        """A timeline of client latency with the faults marked (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(12, 4.5), dpi=100)
        if self.latency_samples:
            xs, ys = zip(*self.latency_samples, strict=True)
            ax.scatter(xs, ys, s=2, alpha=0.4, color="tab:blue", label="client request latency")
        ax.set_yscale("log")
        colours = matplotlib.colormaps["tab20"]
        kinds = sorted({f.fault for f in self.faults})
        for outcome in self.faults:
            colour = colours(kinds.index(outcome.fault) % 20)
            ax.axvline(outcome.injected_at, color=colour, alpha=0.7, linewidth=1)
        for i, kind in enumerate(kinds):
            ax.plot([], [], color=colours(i % 20), label=kind)
        ax.set_xlabel("seconds since the campaign started")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"vmft fault campaign: {len(self.faults)} faults, verdict {self.verdict}")
        ax.legend(loc="upper right", fontsize="small", ncol=2, markerscale=4)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


class PairController:
    """Knows the protected VM on a LocalCluster of two or more nodes: who is primary, how to repair after a
    fault (restart a killed node, wait for a stopped one, heal a link) and how to re-protect the pair (onto
    the first node after the primary's, in the cluster's order, that holds no live copy of the VM)."""

    def __init__(self, cluster: LocalCluster, vm: ProtectedVm, nodes: list[NodeProcess]) -> None:
        self.cluster = cluster
        self.vm = vm
        self.nodes = nodes

    def statuses(self, timeout: float = 0.3) -> dict[str, vmft_pb2.VmStatus]:
        """The VM's status on each node that answers and holds a copy of it."""
        return self.poll(timeout)[1]

    def poll(self, timeout: float = 0.3) -> tuple[set[str], dict[str, vmft_pb2.VmStatus]]:
        """(the nodes that answered, the VM's status on those that hold a copy of it)."""
        answered: set[str] = set()
        out: dict[str, vmft_pb2.VmStatus] = {}
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                status = self.cluster.vm_status(node, self.vm.name, timeout=timeout)
            except Exception:  # a stopped (SIGSTOP), cut-off or dying node does not answer
                continue
            answered.add(node.name)
            if status is not None:
                out[node.name] = status
        return answered, out

    def serving_primaries(self) -> list[str]:
        """Primaries that could release output. A protected primary of an older generation than the
        newest serving one cannot (its backup took over and acknowledges nothing more): the nodes are
        read one after the other, so such a pair is the old primary seen before the takeover reached it,
        not two primaries serving. An unprotected primary releases on its own claim and always counts."""
        serving = {name: status for name, status in self.statuses().items() if is_serving(status)}
        newest = max((status.generation for status in serving.values()), default=0)
        return [
            name
            for name, status in serving.items()
            if status.generation == newest or not status.protected
        ]

    def node(self, name: str) -> NodeProcess:
        return next(n for n in self.nodes if n.name == name)

    def _next_backup(
        self, primary: NodeProcess, statuses: dict[str, vmft_pb2.VmStatus], refused: dict[str, str]
    ) -> NodeProcess | None:
        """The first node after `primary` (in the cluster's order, wrapping) that holds no live copy of the
        VM (none, or a stopped one) and has not refused a re-protection in this repair; else the first
        after it (on two nodes: the other node, as always)."""
        start = self.nodes.index(primary)
        others = [self.nodes[(start + step) % len(self.nodes)] for step in range(1, len(self.nodes))]
        for node in sorted(others, key=lambda n: n.name in refused):  # stable: order kept otherwise
            status = statuses.get(node.name)
            if status is None or status.role in (vmft_pb2.ROLE_STOPPED, vmft_pb2.ROLE_UNSPECIFIED):
                return node
        return others[0] if others else None

    def protected(self) -> bool:
        statuses = self.statuses()
        replaying = vmft_pb2.VM_STATE_REPLAYING
        return any(s.role == vmft_pb2.ROLE_PRIMARY and s.protected for s in statuses.values()) and any(
            s.role == vmft_pb2.ROLE_BACKUP and s.state == replaying for s in statuses.values()
        )

    def repair(self, timeout: float = 30.0) -> float:
        """Bring the pair back to protected; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        refused: dict[str, str] = {}  # node -> why it refused to become the backup (for the error)
        for node in self.nodes:
            if not node.alive():
                self.cluster.start_node(node)
        while time.monotonic() < deadline:
            if self.protected():
                return time.monotonic() - started
            primaries = self.serving_primaries()
            answered, statuses = self.poll()
            if len(primaries) == 1 and len(answered) == len(self.nodes):
                primary = self.node(primaries[0])
                status = statuses[primary.name]
                busy = any(
                    other.state in (vmft_pb2.VM_STATE_REPLAYING, vmft_pb2.VM_STATE_PROMOTING)
                    for name, other in statuses.items()
                    if name != primary.name
                )
                alone = status.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED
                backup = self._next_backup(primary, statuses, refused)
                if not status.protected and alone and not busy and backup is not None:
                    try:
                        self.cluster.reprotect(self.vm, primary, backup)
                        refused.pop(backup.name, None)
                    except ClusterError as err:
                        refused[backup.name] = str(err)  # the next attempt prefers another node
                        time.sleep(0.05)  # e.g. the old backup still winding down: try again
                    continue
            time.sleep(0.02)
        raise ClusterError(
            f"the pair was not protected again within {timeout} s (refused: {refused or 'none'}): "
            f"{self.statuses()}"
        )


@dataclass
class _Topology:
    """Where a campaign runs: the cluster and its nodes, and across hosts the network and etcd's hosts."""

    cluster: LocalCluster
    nodes: list[NodeProcess]
    host_cluster: NamespaceCluster | None = None
    etcd_hosts: list[str] = field(default_factory=list)


class Campaign:
    def __init__(
        self,
        workdir: str | Path,
        image: str | Path,
        faults: list[Fault] | None = None,
        count: int = 10,
        seed: int = 0,
        clients: int = 4,
        settle_s: float = 0.3,
        fault_duration_s: float = 0.5,
        recovery_timeout_s: float = 20.0,
        failure_timeout_ms: float = 300.0,
        hang_timeout_s: float = 0.5,
        hosts: int = 0,
        etcd_members: int = 3,
        partition_s: float = 1.0,
        attempt_timeout_s: float | None = None,
    ) -> None:
        """`hosts`: 0 runs the nodes on loopback (two of them); N >= 2 runs N node hosts and
        `etcd_members` etcd hosts. `partition_s`: how long a partition lasts before it is healed (longer
        than the failure timeout, so that it bites)."""
        self.workdir = Path(workdir)
        self.image = Path(image)
        rng = random.Random(seed)
        catalogue = HOST_CAMPAIGN_FAULTS if hosts else CAMPAIGN_FAULTS
        self.plan = list(faults) if faults else [rng.choice(catalogue) for _ in range(count)]
        if not hosts and any(f in PARTITIONS for f in self.plan):
            raise FaultError("partition faults need test hosts (vmft chaos --hosts N)")
        self.seed = seed
        self.clients = clients
        self.settle_s = settle_s
        self.fault_duration_s = fault_duration_s
        self.recovery_timeout_s = recovery_timeout_s
        self.failure_timeout_ms = failure_timeout_ms
        self.hang_timeout_s = hang_timeout_s
        self.hosts = hosts
        self.etcd_members = etcd_members if hosts else 0
        self.partition_s = partition_s
        # A silent (cut-off) host holds a client's attempt until it times out: across hosts attempts are
        # short so that a client moves on about as fast as the cluster fails over (retries are safe: every
        # write carries its request id).
        self.attempt_timeout_s = attempt_timeout_s or (0.2 if hosts else 0.5)
        self._partition_rng = random.Random(seed + 1)  # which etcd member: repeatable per seed

    @contextlib.contextmanager
    def _topology(self) -> Iterator[_Topology]:
        """The nodes (with the relay, for the link faults) on loopback, or each on its own host with etcd
        on hosts of their own; stopped and removed on leaving, whatever the reason."""
        if not self.hosts:
            with LocalCluster(self.workdir, failure_timeout_ms=self.failure_timeout_ms) as cluster:
                yield _Topology(cluster, [cluster.add_node(["--link-relay"]) for _ in range(2)])
            return
        with host_topology(
            self.workdir / "hosts",
            self.hosts,
            self.etcd_members,
            ["--link-relay"],
            failure_timeout_ms=self.failure_timeout_ms,
        ) as topo:
            yield _Topology(topo.cluster, topo.nodes, topo.cluster, topo.etcd_hosts)

    async def run(self, progress: Callable[[str], None] = lambda line: None) -> CampaignReport:
        started = time.monotonic()
        # Built on this (the main) thread: the host network turns SIGTERM into a clean unwind only there.
        with self._topology() as topology:
            cluster, nodes = topology.cluster, topology.nodes
            disk = self.workdir / "kv.disk"
            # kv's write log never compacts: size the disk for the whole campaign (sparse, so it costs
            # nothing until written; a full disk would turn every later write into an ERR reply).
            await asyncio.to_thread(make_disk, disk, 512 << 20)
            vm = cluster.protect(
                self.image, nodes[0], nodes[1], disk=disk, hang_timeout_s=self.hang_timeout_s
            )
            controller = PairController(cluster, vm, nodes)
            cluster.wait_for(nodes[1], vm.name, "backup", timeout=15)
            for node in nodes:  # every node's address for the VM, before the clients start
                cluster.service_address(vm.name, node)
            workload = Workload(
                cluster.service_addresses(vm.name),
                clients=self.clients,
                seed=self.seed,
                attempt_timeout_s=self.attempt_timeout_s,
                shared_counter=True,
            )
            outcomes = await play_plan(
                self.plan,
                lambda index, fault: self._one(index, fault, controller, workload, started, topology),
                workload,
                self.settle_s,
                lambda outcome: progress(_describe(outcome, len(self.plan))),
            )
            try:
                verdict: Verdict = await workload.verify_final()  # while the cluster still serves
            except KvUnavailable as err:
                verdict = Verdict(len(workload.history), 0, 0, [Violation(-1, "unavailable", str(err))])
        violations = [f"client {v.client} {v.kind}: {v.detail}" for v in verdict.violations]
        violations += primaries_violations(outcomes)
        samples = latency_samples(workload.history, started)
        return CampaignReport(
            seed=self.seed,
            faults=outcomes,
            verdict="ok" if not violations else "VIOLATIONS",
            violations=violations,
            operations=verdict.ops,
            acknowledged_writes=verdict.acknowledged_writes,
            failed_operations=verdict.failed_ops,
            seconds=time.monotonic() - started,
            latency_samples=samples,
            hosts=self.hosts,
            etcd_members=self.etcd_members,
            shared_increments=workload.shared_acked,
        )

    async def _partition(
        self, fault: Fault, controller: PairController, topology: _Topology
    ) -> PartitionCut:
        """Take the links of a partition fault down (where the roles are now) and return the cut."""
        host_cluster = topology.host_cluster
        assert host_cluster is not None
        nodes = [n.name for n in controller.nodes]
        primary, backup = await asyncio.to_thread(find_roles, nodes, controller.vm.name)
        cut = plan_partition(
            fault,
            host_cluster.host_name(primary) if primary else None,
            host_cluster.host_name(backup) if backup else None,
            topology.etcd_hosts,
            self._partition_rng,
        )
        await asyncio.to_thread(apply_partition, host_cluster.net, cut)
        return cut

    async def _heal_after(self, cut: PartitionCut, topology: _Topology, delay_s: float) -> None:
        assert topology.host_cluster is not None
        try:
            await asyncio.sleep(delay_s)
        finally:  # also when cancelled: a campaign never leaves a link down behind it
            await asyncio.to_thread(heal_partition, topology.host_cluster.net, cut)

    async def _one(
        self,
        index: int,
        fault: Fault,
        controller: PairController,
        workload: Workload,
        started: float,
        topology: _Topology,
    ) -> FaultOutcome:
        nodes = [n.name for n in controller.nodes]
        injected_at = time.monotonic()
        injected_wall = time.time()
        outcome = FaultOutcome(index, fault.value, injected_at - started)
        heal: asyncio.Task[None] | None = None
        try:
            if fault in PARTITIONS:
                cut = await self._partition(fault, controller, topology)
                heal = asyncio.create_task(self._heal_after(cut, topology, self.partition_s))
                outcome.partition = f"{cut.describe()} for {self.partition_s:.1f} s"
                outcome.detail = outcome.partition
                duration = self.partition_s
            else:
                reply = await asyncio.to_thread(
                    inject, nodes, controller.vm.name, fault, self.fault_duration_s, 30.0, 0.2
                )
                outcome.detail = reply.detail
                duration = self.fault_duration_s
        except FaultError as err:
            outcome.error = str(err)
            return outcome
        try:
            await self._watch(
                outcome, controller, workload, injected_at, injected_wall, duration, fault not in PARTITIONS
            )
            outcome.served_by = [self._server_name(a, topology) for a in outcome.served_by]
        finally:
            if heal is not None:
                await heal  # healed before any repair: re-protection needs every link
        if not outcome.error:
            await self._repair(outcome, fault, controller)
        return outcome

    @staticmethod
    def _server_name(address: str, topology: _Topology) -> str:
        """A service address as the host that serves it (across hosts), else the address itself."""
        if topology.host_cluster is not None:
            for (_vm, node), served in topology.host_cluster.service_map().items():
                if served == address:
                    return topology.host_cluster.host_name(node) or address
        return address

    async def _watch(
        self,
        outcome: FaultOutcome,
        controller: PairController,
        workload: Workload,
        injected_at: float,
        injected_wall: float,
        duration: float,
        poll_nodes: bool,
    ) -> None:
        """Watch until a primary serves again and the clients got through (with `poll_nodes`, counting
        serving primaries among the nodes that answer), then measure what the clients and the nodes saw.

        During a partition the nodes are not polled: the clients' replies decide (the shared counter
        judges two primaries), and a node's Status asks the arbiter on its event loop, which with an etcd
        member cut off stalls that node, its clients included, for etcd's attempt timeout (0.5 s): the
        campaign would measure its own polling."""
        deadline = injected_at + self.recovery_timeout_s
        effect_window = duration + self.hang_timeout_s + self.failure_timeout_ms / 1000 + 0.3
        while time.monotonic() < deadline:
            primaries = await asyncio.to_thread(controller.serving_primaries) if poll_nodes else ["?"]
            outcome.max_primaries = max(outcome.max_primaries, len(primaries) if poll_nodes else 0)
            if time.monotonic() - injected_at > effect_window and primaries:
                recent = [op for op in workload.history[-50:] if op.ok and op.end > time.monotonic() - 0.2]
                if recent:
                    # Who answered the clients once they got through again (addresses; named by the caller).
                    outcome.served_by = sorted({op.server for op in recent if op.server})
                    break
            await asyncio.sleep(0.02)
        else:
            outcome.error = f"no recovery within {self.recovery_timeout_s} s"
            return
        window = time.monotonic() - injected_at
        gaps = workload.recovery_after(injected_at, window_s=window)
        outcome.recovery_ms = max(gaps) * 1000 if gaps else None
        outcome.outage_p50_ms = statistics.median(gaps) * 1000 if gaps else None
        if not poll_nodes:  # one look once the clients are through (the heal may still be pending)
            outcome.max_primaries = len(await asyncio.to_thread(controller.serving_primaries))
        statuses = await asyncio.to_thread(controller.statuses)
        for status in statuses.values():
            if status.role == vmft_pb2.ROLE_PRIMARY and status.suspected_at >= injected_wall:
                outcome.detection_ms = (status.suspected_at - injected_wall) * 1000
                if status.serving_at >= status.suspected_at:
                    outcome.failover_ms = (status.serving_at - status.suspected_at) * 1000

    async def _repair(self, outcome: FaultOutcome, fault: Fault, controller: PairController) -> None:
        if fault in _BREAKS_PROTECTION or not await asyncio.to_thread(controller.protected):
            try:
                seconds = await asyncio.to_thread(controller.repair)
                outcome.reprotect_ms = seconds * 1000
            except ClusterError as err:
                outcome.error = str(err)


def primaries_violations(outcomes: list[FaultOutcome]) -> list[str]:
    """A fault during which more than one node served the VM as primary."""
    return [
        f"fault {o.index} ({o.fault}): {o.max_primaries} primaries serving"
        for o in outcomes
        if o.max_primaries > 1
    ]


class _Timed(Protocol):
    start: float
    end: float
    ok: bool


def latency_samples(history: Sequence[_Timed], started: float) -> list[tuple[float, float]]:
    """(seconds into the campaign, latency in ms) of every successful operation, for the timeline."""
    return [(op.start - started, (op.end - op.start) * 1000) for op in history if op.ok]


class LoadedWorkload(Protocol):
    """A client workload a campaign runs beside its faults."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def play_plan(
    plan: Sequence[Fault],
    one: Callable[[int, Fault], Awaitable[FaultOutcome]],
    workload: LoadedWorkload,
    settle_s: float,
    report: Callable[[FaultOutcome], None],
) -> list[FaultOutcome]:
    """Run `workload` while each fault of `plan` is injected and recovered from by `one`, a settling pause
    before each and after the last; stop at the first fault that could not be carried out."""
    load = asyncio.create_task(workload.run())
    outcomes: list[FaultOutcome] = []
    try:
        for index, fault in enumerate(plan):
            await asyncio.sleep(settle_s)
            outcome = await one(index, fault)
            outcomes.append(outcome)
            report(outcome)
            if outcome.error:
                break
    finally:
        await asyncio.sleep(settle_s)
        workload.stop()
        await load
    return outcomes


@contextlib.contextmanager
def work_directory(keep: bool, say: Callable[[str], None]) -> Iterator[Path]:
    """A fresh /tmp/vmft-chaos.* directory for a campaign (node data, logs, a 512 MiB sparse disk), removed
    at the end, after an error too, unless `keep` (then `say` tells where it is). The campaign's cluster
    has stopped its node processes by then (LocalCluster closes before Campaign.run returns)."""
    path = Path(tempfile.mkdtemp(prefix="vmft-chaos."))
    try:
        yield path
    finally:
        if keep:
            say(f"chaos: kept the work directory {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def make_disk(path: Path, size: int) -> None:
    """An empty (sparse) disk image for the kv guest's write log."""
    with open(path, "wb") as f:
        f.truncate(size)


def _describe(outcome: FaultOutcome, total: int) -> str:
    def ms(value: float | None) -> str:
        return f"{value:.0f} ms" if value is not None else "-"

    text = (
        f"[{outcome.index + 1}/{total}] {outcome.fault:12} recovery {ms(outcome.recovery_ms)}, "
        f"detection {ms(outcome.detection_ms)}, failover {ms(outcome.failover_ms)}, "
        f"re-protection {ms(outcome.reprotect_ms)}"
    )
    if outcome.partition:
        text += f" ({outcome.partition}; served by {', '.join(outcome.served_by) or '-'})"
    if outcome.error:
        text += f" ERROR: {outcome.error}"
    return text


async def run_campaign(
    workdir: str | Path,
    image: str | Path,
    out_dir: str | Path,
    progress: Callable[[str], None],
    **options: object,
) -> CampaignReport:
    """Run a campaign and write report.json, report.txt and timeline.png into `out_dir`."""
    campaign = Campaign(workdir, image, **options)  # type: ignore[arg-type]
    report = await campaign.run(progress)
    await asyncio.to_thread(write_report, report, Path(out_dir))
    return report


def write_report(report: CampaignReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    partitions = report.partition_table()
    text = report.table() + "\n" + (f"partitions:\n{partitions}\n" if partitions else "") + report.summary()
    (out / "report.txt").write_text(text + "\n")
    report.plot(out / "timeline.png")
