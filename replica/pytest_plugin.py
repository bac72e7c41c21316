"""A pytest plugin for fault tests of your own service: bring up a protected pair from an image on two
real node processes (loopback, temporary directory), inject faults, and get the recovery measured.

    def test_my_service_survives_the_primary(vmft_pair):
        pair = vmft_pair("build/my_service.elf")
        client = MyClient(pair.addresses)              # every address the service may be served on
        client.put("k", "v")
        recovery = pair.inject("kill-primary")         # waits for recovery, then re-protects the pair
        assert client.get("k") == "v"
        assert recovery.recovery_s < 0.5

`pair.inject` measures recovery with a probe: a function that sends one request to the service and
raises on failure (default: a kv GET; pass `probe=` to `vmft_pair` for your own protocol).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replica.chaos import PairController
from replica.cluster import LocalCluster, ProtectedVm
from replica.faults import Fault, inject

Probe = Callable[[list[str]], None]


def kv_probe(addresses: list[str]) -> None:
    """One GET to a kv guest (raises when no address answers)."""
    from replica.kv_client import KvClientSync

    client = KvClientSync(addresses, client_id="probe", timeout=0.3, total_timeout=0.5)
    try:
        client.get("vmft-probe")
    finally:
        client.close()


@dataclass
class Recovery:
    fault: str
    recovery_s: float  # the longest gap between two successful probes around the fault
    reprotect_s: float | None  # repair started -> protected again (None if it stayed protected)
    detail: str


class ProtectedPair:
    def __init__(self, cluster: LocalCluster, vm: ProtectedVm, probe: Probe) -> None:
        self.cluster = cluster
        self.vm = vm
        self.probe = probe
        self.controller = PairController(cluster, vm, [vm.primary] + ([vm.backup] if vm.backup else []))

    @property
    def addresses(self) -> list[str]:
        return self.cluster.service_addresses(self.vm.name)

    def inject(
        self,
        fault: Fault | str,
        duration_s: float = 0.5,
        timeout_s: float = 20.0,
        reprotect: bool = True,
        delay_ms: float = 30.0,
        fraction: float = 0.2,
    ) -> Recovery:
        """Inject `fault`, wait until the service answers again, re-protect the pair, and measure."""
        fault = Fault(fault)
        successes: list[float] = []
        stop = threading.Event()

        def probing() -> None:
            while not stop.is_set():
                try:
                    self.probe(self.addresses)
                    successes.append(time.monotonic())
                except Exception:  # the probe's own failure is what is being measured
                    time.sleep(0.005)

        thread = threading.Thread(target=probing, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 5
            while not successes and time.monotonic() < deadline:
                time.sleep(0.01)
            injected = time.monotonic()
            nodes = [n.name for n in self.controller.nodes]
            reply = inject(nodes, self.vm.name, fault, duration_s, delay_ms, fraction)
            settle = injected + duration_s + 1.0
            deadline = injected + timeout_s
            while time.monotonic() < deadline:
                if time.monotonic() > settle and successes and successes[-1] > settle - 0.2:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"{fault.value}: the service did not answer within {timeout_s} s")
        finally:
            stop.set()
            thread.join(5)
        points = [t for t in successes if t <= injected][-1:] + [t for t in successes if t > injected]
        gap = max((b - a for a, b in zip(points, points[1:])), default=0.0)
        reprotect_s = None
        if reprotect and not self.controller.protected():
            reprotect_s = self.controller.repair(timeout=timeout_s)
        return Recovery(fault.value, gap, reprotect_s, reply.detail)


@pytest.fixture
def vmft_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A local cluster in a temporary directory; every node process is stopped at the end."""
    with LocalCluster(tmp_path / "vmft-cluster") as cluster:
        yield cluster


@pytest.fixture
def vmft_pair(vmft_cluster: LocalCluster) -> Callable[..., ProtectedPair]:
    """`vmft_pair(image, probe=kv_probe, mem_mib=64, disk=None, link_relay=True)`: a protected pair."""

    def make(
        image: str | Path,
        probe: Probe = kv_probe,
        mem_mib: int = 64,
        disk: str | Path | None = None,
        link_relay: bool = True,
        hang_timeout_s: float = 0.5,
    ) -> ProtectedPair:
        extra = ["--link-relay"] if link_relay else []
        primary = vmft_cluster.add_node(extra)
        backup = vmft_cluster.add_node(extra)
        vm = vmft_cluster.protect(
            image, primary, backup, mem_mib=mem_mib, disk=disk, hang_timeout_s=hang_timeout_s
        )
        vmft_cluster.wait_for(backup, vm.name, "backup")
        return ProtectedPair(vmft_cluster, vm, probe)

    return make
