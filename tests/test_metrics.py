"""The node's Prometheus endpoint (replica/metrics.py): scraped over HTTP from a real pair of `vmft node`
processes under a kv load, the figures move with the load, and a failover shows on the node that took
over (its failover counter and recovery-time histogram)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replica.cluster import LocalCluster, NodeProcess, free_port
from replica.kv_client import KvClientSync
from replica.metrics import MetricsServer, NodeMetrics, _Monotonic

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


def test_counts_survive_a_source_that_restarts() -> None:
    counter = _Monotonic()
    first, second = object(), object()
    assert counter.read("vm", first, 10) == 10
    assert counter.read("vm", first, 25) == 25
    assert counter.read("vm", second, 4) == 29  # a new journal after a failover counts from 0 again
    assert counter.read("vm", second, 4) == 29


async def test_the_endpoint_serves_metrics_and_nothing_else() -> None:
    metrics = NodeMetrics()
    metrics.recovered("vm1", "failover", 0.042)
    server = MetricsServer(metrics, f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        samples = await asyncio.to_thread(scrape, server.address)
        assert value(samples, "vmft_recovery_seconds_count", vm="vm1", kind="failover") == 1
        assert value(samples, "vmft_recovery_seconds_sum", vm="vm1", kind="failover") == pytest.approx(0.042)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            await asyncio.to_thread(urllib.request.urlopen, f"http://{server.address}/other", None, 5)
    finally:
        await server.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as c:
        yield c


def _node_with_metrics(cluster: LocalCluster) -> tuple[NodeProcess, str]:
    address = f"127.0.0.1:{free_port()}"
    return cluster.add_node(["--metrics", address]), address


def _load(addresses: list[str], seconds: float) -> int:
    done = 0
    with KvClientSync(addresses, "metrics-load", timeout=5.0) as kv:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            kv.set(f"k{done % 64}", "v" * 200)
            done += 1
    return done


@pytest.mark.kvm
def test_a_pair_exports_figures_that_move_with_load_and_a_failover(cluster: LocalCluster) -> None:
    a, metrics_a = _node_with_metrics(cluster)
    b, metrics_b = _node_with_metrics(cluster)
    vm = cluster.protect(KV, a, b)
    cluster.wait_for(b, vm.name, "backup", timeout=10)

    before_a, before_b = scrape(metrics_a), scrape(metrics_b)
    assert value(before_a, "vmft_vm_info", vm="vm1", role="primary", state="running") == 1
    assert value(before_b, "vmft_vm_info", vm="vm1", role="backup", state="replaying") == 1
    assert value(before_a, "vmft_vm_protected", vm="vm1") == 1
    assert value(before_a, "vmft_node_vms") == 1
    assert value(before_a, "vmft_node_memory_reserved_mib") == 64 + 32  # guest RAM + monitor overhead

    writes = _load(vm.addresses, 1.5)
    assert writes > 20
    after_a, after_b = scrape(metrics_a), scrape(metrics_b)
    grew = {
        name: (value(before_a, name, vm="vm1"), value(after_a, name, vm="vm1"))
        for name in ("vmft_vm_position", "vmft_vm_acked_position", "vmft_vm_log_bytes_total",
                     "vmft_vm_log_events_total")
    }  # fmt: skip
    for name, (old, new) in grew.items():
        assert new > old, f"{name} did not grow under load: {old} -> {new}"
    # Each write is at least one event with its 200-byte value in the log the primary streamed.
    assert value(after_a, "vmft_vm_log_events_total", vm="vm1") >= writes
    assert value(after_a, "vmft_vm_log_bytes_total", vm="vm1") >= writes * 200
    received = "vmft_vm_acked_position"  # on the backup: what it has received
    assert value(after_b, received, vm="vm1") > value(before_b, received, vm="vm1")
    assert value(after_b, "vmft_vm_log_bytes_total", vm="vm1") > 0
    # The primary checkpoints every second: sizes and durations are observed.
    assert value(after_a, "vmft_checkpoint_bytes_count", vm="vm1", kind="periodic") >= 1
    assert value(after_a, "vmft_checkpoint_bytes_sum", vm="vm1", kind="periodic") > 0
    assert value(after_a, "vmft_checkpoint_seconds_sum", vm="vm1", kind="periodic") > 0

    cluster.kill_node(a)
    cluster.wait_for(b, vm.name, "serving", timeout=10)
    taken = scrape(metrics_b)
    assert value(taken, "vmft_vm_info", vm="vm1", role="primary", state="running unprotected") == 1
    assert value(taken, "vmft_vm_failovers_total", vm="vm1") == 1
    assert value(taken, "vmft_recovery_seconds_count", vm="vm1", kind="failover") == 1
    recovery = value(taken, "vmft_recovery_seconds_sum", vm="vm1", kind="failover")
    assert 0 < recovery < 5.0
    assert _load(vm.addresses, 0.5) > 0  # the new primary serves
    events = value(scrape(metrics_b), "vmft_vm_log_events_total", vm="vm1")
    assert events > 0  # it records now (unprotected), counted from its own journal

    # The old primary's node comes back and the new primary re-protects onto it from a live checkpoint.
    cluster.start_node(a)
    cluster.reprotect(vm, b, a)
    cluster.wait_for(a, vm.name, "backup", timeout=20)
    again = scrape(metrics_b)
    assert value(again, "vmft_reprotections_total", vm="vm1") == 1
    assert value(again, "vmft_reprotect_seconds_count", vm="vm1") == 1
    assert value(again, "vmft_checkpoint_bytes_count", vm="vm1", kind="reprotect") == 1
    assert value(again, "vmft_vm_protected", vm="vm1") == 1
    deadline = time.monotonic() + 20  # the new backup restores the checkpoint, then replays
    while value(scrape(metrics_a), "vmft_vm_info", vm="vm1", role="backup", state="replaying") != 1:
        assert time.monotonic() < deadline, "the new backup is not replaying after 20 s"
        time.sleep(0.05)
