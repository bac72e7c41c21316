"""Prometheus metrics of one node: what its VMs are doing, read when scraped, and what happened to them
(failovers, restarts, checkpoints, re-protections), observed through small hooks.

Each node has its own `CollectorRegistry` (no global registry state: tests run several nodes in one
process). Gauges and counters that the node's state already holds (positions, lag, held outputs, log
bytes and events, failovers) are read by a custom collector at scrape time, so nothing on the vCPU's
path does extra work for metrics. Histograms of durations and sizes are fed by the hooks below, which
primary.py and node.py call at the moment a thing finishes.

The endpoint (`MetricsServer`) is a tiny HTTP server on the node's event loop (GET /metrics), so the
collector reads the VMs' state on the thread that changes it. It is off unless `vmft node --metrics
HOST:PORT` asks for it; it serves read-only figures in plaintext (Prometheus's usual scrape), never
control.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from monitor.address import parse_address

if TYPE_CHECKING:
    from monitor.checkpoint import CheckpointStats
    from replica.vm_core import VmCore

log = logging.getLogger(__name__)

# Recovery is what clients wait for: tens of milliseconds to seconds.
RECOVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = tuple(float(1 << shift) for shift in range(10, 34, 2))  # 1 KiB .. 8 GiB, x4


class NodeView(Protocol):
    """What the collector reads from a node (replica/node.py's Node)."""

    def metric_cores(self) -> list[VmCore]: ...

    def metric_memory(self) -> tuple[int, int, int]:
        """(budget MiB, MiB reserved by running VMs, VMs running)."""
        ...

    def metric_limits(self, core: VmCore) -> tuple[int, int]:
        """A VM's (memory reserved in MiB, cpu periods its vCPU was throttled in)."""
        ...


class NodeMetrics:
    """The node's registry, its histograms and counters, and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # the node process's memory and CPU (what the budget is about)
        self.recovery = Histogram(
            "vmft_recovery_seconds",
            "From suspecting a fault to serving clients again (failover: a backup went live; restart: "
            "the guest restarted from a checkpoint; backup_lost: a primary won the arbiter alone)",
            ["vm", "kind"], buckets=RECOVERY_BUCKETS, registry=r,
        )  # fmt: skip
        self.checkpoint_bytes = Histogram(
            "vmft_checkpoint_bytes", "Bytes of a checkpoint as stored or sent (compressed)",
            ["vm", "kind"], buckets=SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "vmft_checkpoint_seconds", "A checkpoint from start to manifest",
            ["vm", "kind"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.checkpoint_pause_seconds = Histogram(
            "vmft_checkpoint_pause_seconds", "How long a checkpoint paused the guest",
            ["vm", "kind"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.reprotections = Counter(
            "vmft_reprotections", "New backups seeded from a live checkpoint of this node's primary",
            ["vm"], registry=r,
        )  # fmt: skip
        self.reprotect_seconds = Histogram(
            "vmft_reprotect_seconds", "A re-protection from request to the new backup holding the log",
            ["vm"], buckets=RECOVERY_BUCKETS, registry=r,
        )  # fmt: skip
        self._attached = False

    def attach(self, node: NodeView) -> None:
        """Read `node`'s VMs at every scrape (once per registry)."""
        if not self._attached:
            self.registry.register(_NodeCollector(node))
            self._attached = True

    def text(self) -> bytes:
        """The exposition text of everything (what GET /metrics answers)."""
        return bytes(generate_latest(self.registry))

    # ----- hooks (event loop) ------------------------------------------------------------------------

    def recovered(self, vm: str, kind: str, seconds: float) -> None:
        if seconds > 0:
            self.recovery.labels(vm, kind).observe(seconds)

    def checkpoint_saved(self, vm: str, kind: str, stats: CheckpointStats | None) -> None:
        if stats is None:
            return
        self.checkpoint_bytes.labels(vm, kind).observe(stats.stored_bytes)
        self.checkpoint_seconds.labels(vm, kind).observe(stats.total_s)
        self.checkpoint_pause_seconds.labels(vm, kind).observe(stats.pause_s)

    def reprotected(self, vm: str, seconds: float) -> None:
        self.reprotections.labels(vm).inc()
        self.reprotect_seconds.labels(vm).observe(seconds)


class _Monotonic:
    """A counter built from per-object counts that restart at zero (a VM's journal is replaced at a
    failover or a restart): adds each source's increase, so what is exported never goes back."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}  # vm -> (id of the source, its last count)
        self._total: dict[str, int] = {}

    def read(self, vm: str, source: object, count: int) -> int:
        key = id(source)
        last_key, last = self._last.get(vm, (key, 0))
        increase = count - last if last_key == key and count >= last else count
        self._last[vm] = (key, count)
        self._total[vm] = self._total.get(vm, 0) + max(0, increase)
        return self._total[vm]

    def forget_except(self, names: set[str]) -> None:
        for vm in [vm for vm in self._total if vm not in names]:
            del self._total[vm]
            self._last.pop(vm, None)


class _NodeCollector(Collector):
    def __init__(self, node: NodeView) -> None:
        self.node = node
        self._events = _Monotonic()

    def collect(self) -> Iterator[Metric]:
        cores = self.node.metric_cores()
        budget, reserved, running = self.node.metric_memory()
        yield _gauge("vmft_node_memory_budget_mib", "Guest memory this node gives its VMs", budget)
        yield _gauge("vmft_node_memory_reserved_mib", "Memory reserved by the VMs running here", reserved)
        yield _gauge("vmft_node_vms", "VMs running on this node (primaries and backups)", running)

        def family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, text: str,
                   labels: tuple[str, ...] = ("vm",)) -> GaugeMetricFamily | CounterMetricFamily:
            return kind(name, text, labels=list(labels))  # fmt: skip

        info = family(GaugeMetricFamily, "vmft_vm_info", "1 per VM, with its role and state",
                      ("vm", "role", "state"))  # fmt: skip
        generation = family(GaugeMetricFamily, "vmft_vm_generation", "The arbiter generation this VM runs in")
        position = family(GaugeMetricFamily, "vmft_vm_position", "Synchronous exits the guest has made")
        acked = family(
            GaugeMetricFamily, "vmft_vm_acked_position",
            "Primary: the log position its backup holds; backup: the position it has received",
        )  # fmt: skip
        lag = family(
            GaugeMetricFamily, "vmft_vm_lag_positions",
            "Primary: its position minus what the backup holds; backup: received minus replayed",
        )  # fmt: skip
        protected = family(GaugeMetricFamily, "vmft_vm_protected", "1 while a backup holds the log")
        held = family(GaugeMetricFamily, "vmft_vm_held_outputs", "Outputs waiting for the backup's ack")
        held_bytes = family(GaugeMetricFamily, "vmft_vm_held_bytes", "Bytes of the outputs held")
        log_bytes = family(
            CounterMetricFamily, "vmft_vm_log_bytes",
            "Replication stream bytes (primary: sent; backup: received)",
        )  # fmt: skip
        log_events = family(CounterMetricFamily, "vmft_vm_log_events", "Events recorded into the log")
        failovers = family(CounterMetricFamily, "vmft_vm_failovers", "Times this VM went live here")
        restarts = family(CounterMetricFamily, "vmft_vm_guest_restarts", "Guest restarts from checkpoints")
        cpu_quota = family(GaugeMetricFamily, "vmft_vm_cpu_quota", "CPUs its vCPU may use (0: no limit)")
        reservation = family(GaugeMetricFamily, "vmft_vm_memory_reserved_mib", "Memory it reserves here")
        throttled = family(
            CounterMetricFamily, "vmft_vm_cpu_throttled_periods",
            "Scheduler periods in which its vCPU thread was held to its quota (replica/cgroups.py)",
        )  # fmt: skip
        names: set[str] = set()
        for core in cores:
            vm = core.name
            names.add(vm)
            standing, machine = core.standing, core.machine
            pos = machine.position if machine is not None else 0
            info.add_metric([vm, standing.role.value, standing.state.value], 1)
            generation.add_metric([vm], standing.generation)
            position.add_metric([vm], pos)
            acked.add_metric([vm], standing.acked)
            if standing.role.value == "primary":
                behind = max(0, pos - standing.acked) if standing.protected else 0
            else:
                behind = max(0, standing.received - pos)
            lag.add_metric([vm], behind)
            protected.add_metric([vm], 1 if standing.protected else 0)
            gate = standing.gate
            held.add_metric([vm], gate.held if gate is not None else 0)
            held_bytes.add_metric([vm], gate.held_bytes if gate is not None else 0)
            log_bytes.add_metric([vm], core.meter.bytes_total)
            journal = core.journal
            log_events.add_metric(
                [vm], self._events.read(vm, journal, journal.stats.events if journal is not None else 0)
            )
            failovers.add_metric([vm], core.failovers)
            restarts.add_metric([vm], core.faults_recovered)
            memory, periods = self.node.metric_limits(core)
            cpu_quota.add_metric([vm], core.spec.cpu_quota)
            reservation.add_metric([vm], memory)
            throttled.add_metric([vm], periods)
        self._events.forget_except(names)
        yield from (info, generation, position, acked, lag, protected, held, held_bytes, log_bytes,
                    log_events, failovers, restarts, cpu_quota, reservation, throttled)  # fmt: skip


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class MetricsServer:
    """GET /metrics over plain HTTP/1.0 on the node's event loop; anything else is a 404. Requests are
    small and bounded: a client that sends no request line within `read_timeout_s` is dropped."""

    def __init__(self, metrics: NodeMetrics, address: str, read_timeout_s: float = 5.0) -> None:
        self.metrics = metrics
        self.address = address
        self.read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = parse_address(self.address)
        self._server = await asyncio.start_server(self._serve, host, port, limit=8192)
        log.warning("metrics on http://%s/metrics", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.read_timeout_s):
                request = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del line  # headers: not needed
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body, status, kind = self.metrics.text(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, kind = b"not found: GET /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a slow, broken or oversized request: dropped
        finally:
            writer.close()
