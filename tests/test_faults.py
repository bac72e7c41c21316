"""The fault catalogue (replica/faults.py) under a kv client load, on real `vmft node` processes on loopback:
every kind injected through the node's InjectFault API, its effect asserted where it is observable, the
history checker's verdict asserted, the service answering again and the pair re-protected after each.
Also: the checker catching a deliberately broken node (`--unsafe-release-outputs`), `vmft fault` and
`vmft chaos` as a user runs them, and a short random campaign.

Faults are grouped (several in one cluster, in sequence, like a small campaign) to keep the file short.
Every wait is bounded; every LocalCluster is closed (its node processes stopped by PID)."""

from __future__ import annotations

import asyncio
import re
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from proto import vmft_pb2
from replica.chaos import Campaign, PairController, make_disk
from replica.cluster import LocalCluster, NodeProcess
from replica.faults import Fault, inject
from replica.roles import is_serving
from replica.workload import Op, Verdict, Workload

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"
FAILURE_TIMEOUT_MS = 400.0  # a little above the default: the machine running the suite is busy
T = TypeVar("T")


def _need_kv() -> None:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)


async def _bounded(what: str, coro: Awaitable[T], limit_s: float = 30.0) -> T:
    try:
        return await asyncio.wait_for(coro, limit_s)
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {limit_s} s") from None


@contextmanager
def _pair(
    tmp_path: Path,
    node_args: list[str],
    disk: bool = False,
    hang_timeout_s: float = 0.5,
    failure_timeout_ms: float = FAILURE_TIMEOUT_MS,
) -> Iterator[PairController]:
    """A protected kv pair on two node processes; the cluster is always closed."""
    _need_kv()
    with LocalCluster(tmp_path / "cluster", failure_timeout_ms=failure_timeout_ms) as cluster:
        nodes = [cluster.add_node(list(node_args)) for _ in range(2)]
        disk_path = None
        if disk:
            disk_path = tmp_path / "kv.disk"
            make_disk(disk_path, 16 << 20)
        vm = cluster.protect(KV, nodes[0], nodes[1], disk=disk_path, hang_timeout_s=hang_timeout_s)
        cluster.wait_for(nodes[1], vm.name, "backup", timeout=15)
        yield PairController(cluster, vm, nodes)


class Loaded:
    """A kv Workload running in the background against the pair, and the steps of a small campaign:
    inject a fault, wait for the service, re-protect, with the history kept for the verdict."""

    def __init__(self, controller: PairController, seed: int, clients: int = 3) -> None:
        self.controller = controller
        self.cluster = controller.cluster
        self.vm = controller.vm
        self.workload = Workload(
            self.cluster.service_addresses(self.vm.name), clients=clients, seed=seed, op_timeout_s=15.0
        )
        self._task: asyncio.Task[None] | None = None
        self.primaries_seen: list[int] = []  # serving primaries, sampled while waiting
        self.in_place_at = 0.0  # when the last injected fault's node answered
        self.overlaps: list[str] = []

    async def __aenter__(self) -> Loaded:
        self._task = asyncio.create_task(self.workload.run())
        await self.until("the first replies", lambda: self.ok_since(0.0) >= 10, limit_s=15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.workload.stop()
        if self._task is not None:
            await _bounded("stopping the load", self._task, 30)

    async def verdict(self) -> Verdict:
        """Stop the load and check the complete history (call once, at the end)."""
        await self.__aexit__()
        self._task = None
        verdict = await _bounded("the final read-back", self.workload.verify_final(), 30)
        assert verdict.ok, verdict.summary() + "".join(f"\n  {v}" for v in verdict.violations[:10])
        assert verdict.acknowledged_writes > 0, verdict.summary()
        overlaps = self.overlaps[:3]
        assert max(self.primaries_seen, default=1) <= 1, f"two primaries served at once: {overlaps}"
        return verdict

    # ----- observation ---------------------------------------------------------------------------

    def ops(self, start: float, end: float = float("inf"), kinds: tuple[str, ...] = ()) -> list[Op]:
        return [
            op
            for op in list(self.workload.history)
            if start <= op.start and op.end <= end and (not kinds or op.kind in kinds)
        ]

    def ok_since(self, t: float) -> int:
        return sum(1 for op in self.ops(t) if op.ok)

    def statuses(self) -> dict[str, vmft_pb2.VmStatus]:
        return self.controller.statuses(timeout=1.0)

    def primary(self) -> tuple[NodeProcess, vmft_pb2.VmStatus]:
        for name, status in self.statuses().items():
            if is_serving(status):
                return self.controller.node(name), status
        raise AssertionError(f"no serving primary: {self.statuses()}")

    def other(self, node: NodeProcess) -> NodeProcess:
        return next(n for n in self.controller.nodes if n is not node)

    async def until(self, what: str, predicate: Callable[[], bool], limit_s: float = 15.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(predicate):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{what}: not within {limit_s} s; statuses {self.statuses()}")

    async def status_until(
        self, node: NodeProcess, what: str, predicate: Callable[[vmft_pb2.VmStatus], bool],
        limit_s: float = 15.0
    ) -> vmft_pb2.VmStatus:
        found: list[vmft_pb2.VmStatus] = []

        def check() -> bool:
            statuses = self.statuses()
            status = statuses.get(node.name)
            serving = [s for s in statuses.values()
                       if is_serving(s)]  # fmt: skip
            self.primaries_seen.append(len(serving))
            if len(serving) > 1:
                self.overlaps.append(f"{what}: {statuses}")
            if status is not None and predicate(status):
                found.append(status)
                return True
            return False

        await self.until(f"{node.name}: {what}", check, limit_s)
        return found[-1]

    # ----- steps --------------------------------------------------------------------------------

    async def inject(self, fault: Fault, duration_s: float = 1.0, delay_ms: float = 30.0,
                     fraction: float = 0.2) -> float:  # fmt: skip
        nodes = [n.name for n in self.controller.nodes]
        at = time.monotonic()
        reply = await _bounded(
            f"injecting {fault.value}",
            asyncio.to_thread(inject, nodes, self.vm.name, fault, duration_s, delay_ms, fraction),
            15,
        )
        assert reply.detail, f"{fault.value}: the node said nothing about what it did"
        self.in_place_at = time.monotonic()  # the node has answered: the fault is in effect
        return at

    async def replies(self, start: float, end: float = float("inf"), count: int = 10,
                      limit_s: float = 15.0) -> list[Op]:  # fmt: skip
        """Until `count` successful replies to requests sent in [start, end] are in (and `end` is past):
        those replies. On a loaded machine this takes as long as it takes, within `limit_s`."""

        def enough() -> bool:
            done = [op for op in self.ops(start, end) if op.ok]
            return len(done) >= count and (end == float("inf") or time.monotonic() > end)

        await self.until(f"{count} replies to requests sent in the window", enough, limit_s)
        return [op for op in self.ops(start, end) if op.ok]

    async def answering_after(self, t: float, limit_s: float = 20.0) -> None:
        """Every client got a successful reply to a request it sent after `t`."""

        def each_client_answered() -> bool:
            done = {op.client for op in self.ops(t) if op.ok}
            return len(done) == self.workload.clients

        await self.until("the service answering every client again", each_client_answered, limit_s)

    async def repair(self) -> None:
        await _bounded("re-protection", asyncio.to_thread(self.controller.repair, 40.0), 60)
        assert await asyncio.to_thread(self.controller.protected), self.statuses()
        primary, status = await asyncio.to_thread(self.primary)
        assert status.protected, status


def _refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return True
    return False


def _median_latency(ops: list[Op]) -> float:
    return statistics.median(op.end - op.start for op in ops if op.ok)


# ----- every fault kind under load --------------------------------------------------------------------


async def test_node_faults_under_load(tmp_path: Path) -> None:
    """kill-primary, kill-backup, stop-primary, stop-backup: failover or the primary going on alone, in a
    higher generation each time; a stopped primary that continues is fenced and serves nothing."""
    with _pair(tmp_path, ["--link-relay"]) as controller:
        async with Loaded(controller, seed=11) as run:
            # kill-primary: the other node becomes primary in a higher generation.
            old, before = run.primary()
            t = await run.inject(Fault.KILL_PRIMARY)
            new = run.other(old)
            after = await run.status_until(new, "primary in a higher generation", lambda s: (
                is_serving(s)
                and s.generation > before.generation))  # fmt: skip
            assert after.failovers >= 1, after
            await run.answering_after(t)
            await run.repair()

            # kill-backup: the primary goes on, unprotected, in a higher generation.
            primary, before = run.primary()
            t = await run.inject(Fault.KILL_BACKUP)
            alone = await run.status_until(primary, "alone in a higher generation", lambda s: (
                s.generation > before.generation and not s.protected))  # fmt: skip
            assert alone.role == vmft_pb2.ROLE_PRIMARY, alone
            assert alone.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED, alone
            await run.answering_after(t)
            await run.repair()

            # stop-primary: the backup takes over; the stopped node, once it continues, is fenced and
            # serves nothing.
            old, before = run.primary()
            t = await run.inject(Fault.STOP_PRIMARY, duration_s=1.5)
            new = run.other(old)
            await run.status_until(new, "primary in a higher generation", lambda s: (
                s.role == vmft_pb2.ROLE_PRIMARY and s.generation > before.generation))  # fmt: skip
            await run.answering_after(t)
            fenced = await run.status_until(old, "continued and stopped", lambda s: (
                s.role == vmft_pb2.ROLE_STOPPED))  # fmt: skip
            assert fenced.state == vmft_pb2.VM_STATE_FENCED or "generation" in fenced.message, fenced
            assert _refuses(controller.cluster.service_address(run.vm.name, old)), "a fenced node serves"
            await run.repair()

            # stop-backup: the primary stays primary (alone, then re-protected).
            primary, before = run.primary()
            t = await run.inject(Fault.STOP_BACKUP, duration_s=1.0)
            await run.status_until(primary, "alone in a higher generation", lambda s: (
                s.generation > before.generation and not s.protected))  # fmt: skip
            await run.answering_after(t)
            stopped = run.other(primary)
            await run.until("the backup's node continuing", lambda: stopped.name in run.statuses())
            assert run.primary()[0] is primary
            await run.repair()

            await run.verdict()


async def test_guest_faults_under_load(tmp_path: Path) -> None:
    """crash, panic, hang, scribble: the primary restarts its guest from a checkpoint (faults_recovered
    counts it, the message says so), nothing a client saw is lost, and the pair is re-protected."""
    with _pair(tmp_path, ["--link-relay"], hang_timeout_s=0.5) as controller:
        async with Loaded(controller, seed=12) as run:
            for fault in (Fault.CRASH, Fault.PANIC, Fault.HANG, Fault.SCRIBBLE):
                primary, before = run.primary()
                t = await run.inject(fault)
                after = await run.status_until(primary, f"recovered from {fault.value}", lambda s, b=before: (
                    s.faults_recovered > b.faults_recovered))  # fmt: skip
                assert after.faults_recovered == before.faults_recovered + 1, (fault, after)
                assert after.role == vmft_pb2.ROLE_PRIMARY, (fault, after)
                assert "restarted from checkpoint" in after.message, (fault, after.message)
                await run.answering_after(t)
                await run.repair()
                assert run.primary()[0] is primary, f"{fault.value}: the guest fault moved the primary"
            await run.verdict()


async def test_link_and_disk_faults_under_load(tmp_path: Path) -> None:
    """cut-link leaves exactly one primary; delay-link and drop-link slow the clients down (outputs wait
    for the backup's acknowledgement) without a failover; fail-disk makes kv's log writes fail (never
    acknowledged: kv fails stop and is restarted from a checkpoint); heal undoes a link fault."""
    # Losses chain (a segment lost while the stream already waits for one extends the wait): at 400 ms
    # one run in about six stalled past the failure timeout and lost its backup, so its replies went out
    # unprotected and fast. This test is about slowed clients without a failover. And a backup whose replay
    # makes no exit for the hang timeout reports a hang and drops the stream: under a loaded machine 0.5 s
    # was reached (a backup starved of CPU), failing the pair over in the middle of the link faults.
    with _pair(
        tmp_path, ["--link-relay"], disk=True, failure_timeout_ms=1500.0, hang_timeout_s=2.0
    ) as controller:
        async with Loaded(controller, seed=13) as run:
            # delay-link: no failover, higher latency.
            primary, before = run.primary()
            base = _median_latency(run.ops(time.monotonic() - 1.0))
            t = await run.inject(Fault.DELAY_LINK, duration_s=2.0, delay_ms=40)
            slowed = _median_latency(await run.replies(run.in_place_at + 0.05, t + 1.9))
            assert slowed > base + 0.05 and slowed >= 0.07, (base, slowed)
            await run.replies(t + 2.1, count=5)  # the delay is over
            _, after = run.primary()
            assert after.generation == before.generation and after.protected, after
            assert run.primary()[0] is primary

            # drop-link: no failover, some requests wait for "retransmissions".
            t = await run.inject(Fault.DROP_LINK, duration_s=2.0, fraction=0.2)
            during = [op.end - op.start for op in await run.replies(run.in_place_at + 0.05, t + 2.0)]
            assert during and max(during) > 0.15 and max(during) > 2 * base, (base, max(during))
            await run.replies(t + 2.1, count=5)  # the drops are over
            _, after = run.primary()
            assert after.generation == before.generation and after.protected, after

            # heal undoes a link fault: a long delay, then heal, and the latency is back.
            await run.inject(Fault.DELAY_LINK, duration_s=60.0, delay_ms=40)
            assert _median_latency(await run.replies(run.in_place_at + 0.05)) >= 0.07
            await run.inject(Fault.HEAL)
            healed = _median_latency(await run.replies(run.in_place_at + 0.05, count=20))
            assert healed < 0.07, healed

            # fail-disk: the guest's disk writes fail. kv persists each batch of writes before its replies
            # and fails stop when it cannot (guests/programs/kv.c: log_persist panics), so no write is
            # acknowledged that is not on disk: the primary restarts the guest from a checkpoint, and
            # writes succeed again afterwards.
            primary, before = run.primary()
            t = await run.inject(Fault.FAIL_DISK, duration_s=1.5)
            after = await run.status_until(primary, "recovered from the failed disk write", lambda s: (
                s.faults_recovered > before.faults_recovered))  # fmt: skip
            # kv's records write or its header write, whichever the fault hits first
            assert re.search(r"log (header )?write failed", after.message), after
            assert "restarted from checkpoint" in after.message, after
            await run.answering_after(t)
            await run.until("writes succeeding after fail-disk", lambda: any(
                op.ok for op in run.ops(t + 1.6, kinds=("set", "incr"))), limit_s=10)  # fmt: skip
            assert run.primary()[0] is primary
            await run.repair()

            # cut-link: exactly one primary afterwards.
            _, before = run.primary()
            t = await run.inject(Fault.CUT_LINK, duration_s=1.0)
            await run.until("one primary in a higher generation", lambda: (
                len(controller.serving_primaries()) == 1 and run.primary()[1].generation > before.generation
            ))  # fmt: skip
            await run.answering_after(t)
            for _ in range(10):  # and it stays so while the link heals
                run.primaries_seen.append(len(controller.serving_primaries()))
                await asyncio.sleep(0.1)
            assert len(controller.serving_primaries()) == 1
            await run.repair()

            await run.verdict()


# ----- the checker's teeth -----------------------------------------------------------------------------


async def _delayed_link_then_kill(tmp_path: Path, unsafe: bool) -> Verdict:
    args = ["--link-relay"] + (["--unsafe-release-outputs"] if unsafe else [])
    with _pair(tmp_path, args) as controller:
        run = Loaded(controller, seed=21 if unsafe else 22, clients=4)
        async with run:
            primary, before = run.primary()
            await run.inject(Fault.DELAY_LINK, duration_s=10.0, delay_ms=50)
            await asyncio.sleep(1.5)  # writes acknowledged to clients while their log is still in flight
            await _bounded("SIGKILL of the primary", asyncio.to_thread(controller.cluster.kill_node, primary))
            new = run.other(primary)
            await run.status_until(new, "serving", lambda s: (
                is_serving(s)))  # fmt: skip
            await run.answering_after(time.monotonic())
        verdict = await _bounded("the final read-back", run.workload.verify_final(), 30)
    return verdict


async def test_checker_catches_outputs_released_without_acknowledgement(tmp_path: Path) -> None:
    broken = await _delayed_link_then_kill(tmp_path / "unsafe", unsafe=True)
    assert not broken.ok, "the checker missed the writes the broken configuration lost: " + broken.summary()
    assert any(v.kind == "lost" for v in broken.violations), broken.violations[:5]
    safe = await _delayed_link_then_kill(tmp_path / "safe", unsafe=False)
    assert safe.ok and not safe.violations, safe.summary() + "".join(f"\n  {v}" for v in safe.violations[:5])
    assert safe.acknowledged_writes > 0


# ----- the command line ------------------------------------------------------------------------------------


def _vmft(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_vmft_fault_command(tmp_path: Path) -> None:
    with _pair(tmp_path, []) as controller:  # no --link-relay
        nodes = [arg for n in controller.nodes for arg in ("--node", n.name)]
        primary = controller.vm.primary
        admin = controller.cluster.client_env()
        result = _vmft("fault", "vm1", "crash", *nodes, env=admin)
        assert result.returncode == 0, result.stderr
        assert "CRASH" in result.stdout and "vm1" in result.stdout, result.stdout
        status = controller.cluster.wait_for(primary, "vm1", "serving", timeout=15)
        deadline = time.monotonic() + 15
        while status.faults_recovered < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            status = controller.cluster.vm_status(primary, "vm1") or status
        assert status.faults_recovered == 1, status

        unknown = _vmft("fault", "nosuchvm", "crash", *nodes, env=admin)
        assert unknown.returncode == 1
        assert "nosuchvm" in unknown.stderr and "vmft fault:" in unknown.stderr, unknown.stderr
        assert "Traceback" not in unknown.stderr

        controller.repair(30)
        link = _vmft("fault", "vm1", "cut-link", *nodes, env=admin)
        assert link.returncode == 1, link.stdout
        assert "--link-relay" in link.stderr and "Traceback" not in link.stderr, link.stderr


def test_vmft_chaos_command(tmp_path: Path) -> None:
    _need_kv()
    out = tmp_path / "report"
    result = _vmft("chaos", "--faults", "kill-primary,crash,cut-link", "--settle", "0.3",
                   "--clients", "3", "--image", str(KV), "--out", str(out), timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verdict ok" in result.stdout, result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["verdict"] == "ok", report
    assert [f["fault"] for f in report["faults"]] == ["kill-primary", "crash", "cut-link"]
    for fault in report["faults"]:
        assert fault["recovery_ms"] is not None and fault["recovery_ms"] > 0, fault
        assert not fault["error"], fault
    assert report["acknowledged_writes"] > 0
    table = (out / "report.txt").read_text()
    assert "kill-primary" in table and "recovery" in table, table
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, len(png)
    (workdir,) = re.findall(r"^chaos: work directory (\S+), report into", result.stdout, re.M)
    assert not Path(workdir).exists(), "vmft chaos left its work directory behind (no --keep)"


# ----- a short random campaign ------------------------------------------------------------------------------


async def test_short_random_campaign(tmp_path: Path) -> None:
    _need_kv()
    campaign = Campaign(tmp_path / "campaign", KV, count=8, seed=5, clients=3,
                        failure_timeout_ms=FAILURE_TIMEOUT_MS)  # fmt: skip
    lines: list[str] = []
    report = await _bounded("the campaign", campaign.run(lines.append), 180)
    assert len(report.faults) == 8, lines
    assert not [f for f in report.faults if f.error], "\n".join(lines)
    assert report.ok and report.verdict == "ok", report.violations[:10]
    assert report.acknowledged_writes > 0
    assert all(f.max_primaries <= 1 for f in report.faults)
    assert len(lines) == 8
