"""A replicated VM's status is derived from its Standing (replica/vm_core.py), without KVM: the wire role
and state, protection, acknowledged positions, and a primary superseded by a newer generation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from monitor.journal import OutputKind
from monitor.machine import MachineResult, StopReason
from proto import vmft_pb2
from replica.arbiter import Claim
from replica.roles import Role, Standing, State
from replica.vm_common import NodeSettings
from replica.vm_core import VmCore


class FakeArbiter:
    def __init__(self) -> None:
        self.newest: Claim | None = None

    def claim(self, vm: str, generation: int, node: str) -> bool:
        raise AssertionError("status never claims")

    def current(self, vm: str) -> Claim | None:
        return self.newest


def _core(tmp_path: Path, role: Role, generation: int = 1) -> tuple[VmCore, FakeArbiter]:
    arbiter = FakeArbiter()
    settings = NodeSettings(name="127.0.0.1:1", data_dir=tmp_path)
    spec = vmft_pb2.VmSpec(name="vm1")
    return VmCore(settings, arbiter, spec, "127.0.0.1:2", None, Standing(role, generation)), arbiter


def test_a_protected_primary_reports_its_acknowledged_position_and_held_outputs(tmp_path: Path) -> None:
    core, _ = _core(tmp_path, Role.PRIMARY)
    gate = core.standing.new_gate(lambda kind, data: None)
    core.standing.to(State.RUNNING)
    gate.hold(OutputKind.NET, b"reply", 40)
    core.standing.ack(30, replayed=25)
    status = core.status(peer="127.0.0.1:3")
    assert (status.role, status.state, status.protected) == (
        vmft_pb2.ROLE_PRIMARY,
        vmft_pb2.VM_STATE_RUNNING,
        True,
    )
    assert (status.acked_position, status.replayed_position, status.held_outputs) == (30, 25, 1)
    assert status.peer == "127.0.0.1:3" and status.service == "127.0.0.1:2"


def test_a_primary_the_arbiter_has_superseded_says_so(tmp_path: Path) -> None:
    core, arbiter = _core(tmp_path, Role.PRIMARY, generation=2)
    core.standing.to(State.RUNNING_UNPROTECTED)
    asyncio.run(core.check_superseded())
    assert core.status("").state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED
    arbiter.newest = Claim("vm1", 3, "127.0.0.1:9", 0.0)
    asyncio.run(core.check_superseded())
    status = core.status("")
    assert status.state == vmft_pb2.VM_STATE_SUPERSEDED and status.role == vmft_pb2.ROLE_PRIMARY


class SlowArbiter(FakeArbiter):
    """An arbiter that takes `delay_s` to answer (etcd with the member it asks cut off)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def current(self, vm: str) -> Claim | None:
        time.sleep(self.delay_s)
        return self.newest


def test_a_status_check_neither_blocks_the_event_loop_nor_waits_for_a_slow_arbiter(tmp_path: Path) -> None:
    settings = NodeSettings(name="127.0.0.1:1", data_dir=tmp_path)
    arbiter = SlowArbiter(1.0)
    core = VmCore(settings, arbiter, vmft_pb2.VmSpec(name="vm1"), "", None, Standing(Role.PRIMARY, 2))
    core.standing.to(State.RUNNING_UNPROTECTED)

    async def check() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:  # what the node's other work sees: the loop keeps turning
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        began = time.monotonic()
        await core.check_superseded(within_s=0.2)
        took = time.monotonic() - began
        ticker.cancel()
        return took, ticks

    took, ticks = asyncio.run(check())
    assert took < 0.8, f"the status waited {took:.2f} s for the arbiter"
    assert ticks >= 5, f"the event loop turned {ticks} times in {took:.2f} s"
    assert core.status("").state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED


def test_a_backup_reports_what_it_received_and_a_stopped_vm_its_result(tmp_path: Path) -> None:
    core, _ = _core(tmp_path, Role.BACKUP)
    core.standing.to(State.REPLAYING)
    core.standing.received = 120
    status = core.status("127.0.0.1:4")
    assert (status.role, status.state, status.protected, status.acked_position) == (
        vmft_pb2.ROLE_BACKUP,
        vmft_pb2.VM_STATE_REPLAYING,
        True,
        120,
    )
    core.standing.to(State.STOPPED, "lost the arbiter's generation 2 to 127.0.0.1:1")
    status = core.status("127.0.0.1:4")
    assert (status.role, status.state, status.protected) == (
        vmft_pb2.ROLE_STOPPED,
        vmft_pb2.VM_STATE_STOPPED,
        False,
    )
    assert "generation 2" in status.message
    assert not core.running()


def test_the_machine_ending_stops_the_vm_but_a_fenced_one_stays_fenced(tmp_path: Path) -> None:
    exited = MachineResult(StopReason.EXITED, 9, exit_code=0)
    core, _ = _core(tmp_path, Role.PRIMARY)
    core.standing.to(State.RUNNING)
    core.stopped(exited)
    assert core.standing.state is State.STOPPED and exited.describe() in core.standing.message
    assert core.result is exited
    fenced, _ = _core(tmp_path, Role.PRIMARY)
    fenced.standing.to(State.RUNNING)
    fenced.standing.to(State.FENCED, "generation 2 belongs to 127.0.0.1:9")
    fenced.stopped(exited)
    assert fenced.standing.state is State.FENCED and fenced.standing.message.startswith("generation 2")
