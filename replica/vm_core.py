"""What a replicated VM is whatever its role, and the one way it goes live.

`VmCore` is shared by the backup and, once the backup takes over, by the primary it becomes (nothing is
copied: the primary adopts the backup's core). `GoLive` is the single path from replaying a log to running
live, used by a backup taking over from its primary and by a primary restarting its guest from a
checkpoint: at the first position the log does not cover the vCPU switches to recording, the VM's
clients are served again, and it runs unprotected until re-protected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from monitor.errors import VmftError
from monitor.journal import Journal
from monitor.machine import Machine, MachineResult
from monitor.address import parse_address
from monitor.netserver import NicServer
from monitor.record import RecordJournal
from proto import vmft_pb2
from replica.arbiter import Arbiter, ArbiterUnavailable, current_within
from replica.guest_kind import Guest
from replica.input_hold import moderate_input
from replica.output_gate import OutputGate
from replica.roles import SERVING, TERMINAL, Role, Standing, State
from replica.stream_sink import StreamSink
from replica.vm_common import FailoverTimes, Meter, NodeSettings, stop_machine

log = logging.getLogger(__name__)

# How long a status waits for the arbiter before it answers without it (off the event loop either way).
# Long enough for a node just resumed from SIGSTOP (0.25 s was not, on a loaded machine: a superseded
# primary then still said RUNNING), short of a client's patience.
STATUS_ARBITER_WAIT_S = 2.0


def record_journal(sink: StreamSink, settings: NodeSettings, start_position: int = 0) -> RecordJournal:
    """The primary's journal: small batches, flushed at every output (an output waits for its log)."""
    return RecordJournal(
        sink,
        start_position=start_position,
        hash_every=settings.hash_every,
        batch_events=256,
        flush_interval_s=0.002,
        flush_on_output=True,
    )


@dataclass(eq=False)
class VmCore:
    settings: NodeSettings
    arbiter: Arbiter
    spec: vmft_pb2.VmSpec
    service: str  # the address this node serves the VM's clients on
    disk: str | None  # this node's copy of the disk image
    standing: Standing
    machine: Machine | None = None
    journal: RecordJournal | None = None  # the recording one (primary, or a backup gone live)
    sink: StreamSink | None = None
    nic: NicServer | None = None
    result: MachineResult | None = None
    times: FailoverTimes = field(default_factory=FailoverTimes)
    meter: Meter = field(default_factory=Meter)
    failovers: int = 0
    faults_recovered: int = 0
    # How this node runs the VM's guest (replica/guest_kind.py: the one place a spec becomes a machine).
    guest: Guest | None = None
    superseded_by: int = 0  # the newest generation the arbiter named when a status asked it

    @property
    def name(self) -> str:
        return self.spec.name

    def gate_outputs(self, machine: Machine) -> OutputGate:
        """A new output gate for `machine` (start, restart, going live): its outputs wait in it, and its
        input is moderated behind it (replica/input_hold.py)."""
        gate = self.standing.new_gate(machine.deliver)
        gate.console_is_output = self.guest is not None and self.guest.console_is_output
        machine.output_handler = gate.hold
        moderate_input(machine, gate, self.settings.input_hold_ms)
        return gate

    def running(self) -> bool:
        """Neither stopped nor failed nor fenced (a backup still waiting for its checkpoint counts)."""
        return self.result is None and self.standing.state not in TERMINAL

    async def check_superseded(self, within_s: float = STATUS_ARBITER_WAIT_S) -> None:
        """Before a status: resumed after a SIGSTOP, a primary may answer before it has noticed (or asked
        the arbiter) that its backup took over; then it serves nothing (its outputs wait for acks that never
        come) and its status says SUPERSEDED. Asked off the event loop and bounded: with an etcd member cut
        off, a blocking read stalled this node's VMs for 0.5 s per status. Unanswered: the last answer."""
        if self.standing.state not in SERVING:
            return
        try:
            current = await current_within(self.arbiter, self.name, within_s)
        except ArbiterUnavailable as err:
            log.debug("status of %s: %s", self.name, err)
            return
        if current is not None:
            self.superseded_by = max(self.superseded_by, current.generation)

    def status(self, peer: str) -> vmft_pb2.VmStatus:
        """The status both roles report; the primary adds its own figures."""
        standing = self.standing
        position = self.machine.position if self.machine else 0
        state = standing.state.wire
        if standing.state in SERVING and self.superseded_by > standing.generation:
            state = vmft_pb2.VM_STATE_SUPERSEDED
        return vmft_pb2.VmStatus(
            name=self.name,
            role=standing.wire_role(),
            state=state,
            generation=standing.generation,
            position=position,
            acked_position=standing.acked,
            replayed_position=standing.replayed if standing.role is Role.PRIMARY else position,
            protected=standing.protected,
            peer=peer,
            service=self.service,
            log_bytes_per_s=self.meter.rate(),
            held_outputs=standing.gate.held if standing.gate else 0,
            message=standing.message,
            failovers=self.failovers,
            suspected_at=self.times.suspected_wall,
            serving_at=self.times.serving_wall,
            faults_recovered=self.faults_recovered,
        )

    async def stop(self) -> None:
        if self.nic is not None:  # first: clients learn at once to try the other address
            await self.nic.close()
            self.nic = None
        await stop_machine(self.machine, self.name)
        if self.guest is not None:
            self.guest.remove(close_console=True)  # a Linux guest's writable layer: this VM's, on this node

    def stopped(self, result: MachineResult) -> None:
        """The machine ended for good: say so (a fenced VM stays fenced)."""
        self.result = result
        if self.guest is not None:
            self.guest.remove(close_console=False)  # ended for good: nothing restarts from its layer
        standing = self.standing
        if standing.state not in (State.FENCED, State.STOPPED):
            detail = result.describe()
            standing.to(State.STOPPED, f"{standing.message}; {detail}" if standing.message else detail)


class NotLive(VmftError):
    """A VM's machine stopped before the switch from replay to live."""


class GoLive:
    """One switch from replay to live. Make it on the event loop, hand `on_vcpu` to the replay journal
    (its `promote` hook), then `await serve(...)`."""

    def __init__(self, core: VmCore, retained: list[vmft_pb2.EventBatch] | None = None) -> None:
        self.core = core
        self._retained = retained or []  # the log kept for restarts (a restart keeps what it replays)
        self._loop = asyncio.get_running_loop()
        self._live = asyncio.Event()
        self.position = 0  # the last position the log covered

    def on_vcpu(self, position: int) -> Journal:
        """vCPU thread, at the first position the log does not cover: continue live, recording."""
        core = self.core
        machine = core.machine
        assert machine is not None
        machine.clock.resume_from(machine.clock_device.last_seen_ns)
        machine.net.connections_lost()  # the connections in the log died with the old primary (or guest)
        sink = StreamSink(self._loop)  # unprotected until re-protection attaches a new backup
        sink.retained = self._retained
        core.sink = sink
        core.journal = record_journal(sink, core.settings, start_position=position - 1)
        # The arbiter made this node the only primary: outputs go out at once until re-protected.
        core.gate_outputs(machine)
        core.standing.run_alone(sink)
        self.position = position - 1
        core.times.live_at = time.monotonic()
        log.info("%s: live at position %d", core.name, position - 1)
        self._loop.call_soon_threadsafe(self._live.set)
        return core.journal

    async def serve(self, within_s: float, first_conn_id: int | None = None) -> None:
        """Wait (up to `within_s`; TimeoutError) until the VM is live, then serve its clients. NotLive if
        its machine stopped first (a replay that diverged, a restored guest that faulted again)."""
        core = self.core
        machine = core.machine
        assert machine is not None
        live = asyncio.ensure_future(self._live.wait())
        ended = asyncio.ensure_future(machine.wait())
        try:
            await asyncio.wait({live, ended}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            live.cancel()
            ended.cancel()
        if not self._live.is_set():
            if machine.result is not None:
                raise NotLive(f"the guest stopped before it went live: {machine.result.describe()}")
            raise TimeoutError
        assert core.machine is not None
        if core.spec.moving_address and core.settings.addresses is not None:
            # The VM's service address moves here first (added, announced), so that it can be bound.
            try:
                await core.settings.addresses.take_over(core.name, core.spec.moving_address)
            except VmftError as err:
                log.error("%s: cannot take over the service address: %s", core.name, err)
        host, port = parse_address(core.service)
        first = first_conn_id if first_conn_id is not None else core.machine.net.max_conn + 1
        framed = core.guest is None or core.guest.framed_service
        core.nic = NicServer(core.machine.net_backend, host, port, first_conn_id=first, framed=framed)
        await core.nic.start()
        core.times.serving()
