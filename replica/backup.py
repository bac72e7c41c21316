"""The backup side of a protected VM: replay the primary's log a few milliseconds behind it, acknowledge
what it holds, and when the primary dies, win the arbiter's next generation, finish the log and go live:
the same VM switches from replay to record and starts serving its clients."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from monitor import builder
from monitor.checkpoint import RecordStream, RestoreStats
from monitor.journal import Journal
from monitor.loader import GuestImage
from monitor.machine import Machine, MachineResult
from monitor.netserver import NicServer, parse_address
from monitor.record import QueueSource, RecordJournal, ReplayJournal, check_header
from proto import vmft_pb2
from replica.arbiter import Arbiter, claim_or_owner
from replica.output_gate import OutputGate
from replica.stream_sink import StreamSink
from replica.vm_common import (
    cancel_other_tasks,
    spawn,
    stop_machine,
    FailoverTimes,
    Meter,
    NodeSettings,
    load_spec_image,
    machine_config,
)

log = logging.getLogger(__name__)


class BackupVm:
    def __init__(
        self, settings: NodeSettings, arbiter: Arbiter, hello: vmft_pb2.Hello, disk: str | None
    ) -> None:
        self.settings = settings
        self.arbiter = arbiter
        self.hello = hello
        self.spec = hello.spec
        self.name = hello.spec.name
        self.generation = hello.generation
        self.primary_node = hello.primary_node
        self.service = hello.backup_service
        self.disk = disk
        self.state = "starting"
        self.message = ""
        self.received = 0
        self.meter = Meter()
        self.times = FailoverTimes()
        self.promoted = False
        self.failovers = 0
        self.source = QueueSource()
        self.machine: Machine | None = None
        self.nic: NicServer | None = None
        self.sink: StreamSink | None = None
        self.journal: RecordJournal | None = None  # after going live
        self.gate: OutputGate | None = None
        self.on_promoted: Callable[[BackupVm], None] | None = None
        self.checkpoint_records: list[bytes] = []
        self.live_from = 0
        self.result: MachineResult | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def check(self) -> GuestImage:
        """Raise if the pair cannot work here (other image, memory size, CPUID)."""
        self._loop = asyncio.get_running_loop()
        image = load_spec_image(self.spec)
        mem_size = machine_config(self.spec, self.disk).mem_size
        check_header(self.hello.header, image, mem_size, what="the primary's log")
        return image

    def start(self) -> None:
        """Boot the VM and start replaying the log from position 0."""
        image = self.check()
        journal = self._replay_journal(self.hello.header.start_position)
        machine = builder.build(machine_config(self.spec, self.disk), journal=journal, image=image)
        self._run(machine)

    async def start_from_checkpoint(self) -> RestoreStats:
        """Build the VM from the checkpoint records received so far (the last is the manifest), then
        replay the log from the checkpoint's position."""
        image = self.check()
        records = self.checkpoint_records
        self.checkpoint_records = []
        machine, stats = await asyncio.to_thread(
            builder.restore,
            RecordStream(records, what=f"checkpoint from {self.primary_node}"),
            journal=self._replay_journal,
            image=image,
            mem_size=machine_config(self.spec, self.disk).mem_size,
            disk=self.disk,
            hang_timeout_s=self.spec.hang_timeout_s or None,
        )
        self.received = machine.position
        self._run(machine)
        return stats

    def _replay_journal(self, position: int) -> ReplayJournal:
        journal = ReplayJournal(self.source, start_position=position)
        journal.promote = self._go_live_on_vcpu
        return journal

    def _run(self, machine: Machine) -> None:
        self.machine = machine
        machine.start()
        self.state = "replaying"
        spawn(self._tasks, self._watch_machine(), "_watch_machine")

    def on_batch(self, batch: vmft_pb2.EventBatch, size: int) -> None:
        self.source.put(batch)
        self.received = max(self.received, batch.horizon, batch.end_position)
        self.meter.add(size)

    def ack(self) -> vmft_pb2.BackupMessage:
        replayed = self.machine.position if self.machine else 0
        return vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(received=self.received, replayed=replayed))

    # ----- failover --------------------------------------------------------------------------------

    async def primary_lost(self, reason: str) -> None:
        if self.promoted or self.result is not None or self.state.startswith("promoting"):
            return
        self.times.suspect()
        self.state = "promoting"
        log.warning(
            "%s: primary %s lost (%s); claiming generation %d",
            self.name,
            self.primary_node,
            reason,
            self.generation + 1,
        )
        owner = await claim_or_owner(self.arbiter, self.name, self.generation + 1, self.settings.name)
        self.times.claimed_at = time.monotonic()
        if owner is not None:
            self.state = "stopped"
            self.message = f"lost the arbiter's generation {self.generation + 1} to {owner}"
            log.warning("%s: %s", self.name, self.message)
            await self.stop()
            return
        self.generation += 1
        self.source.close()  # replay drains what it has, then the journal calls _go_live_on_vcpu
        try:
            await asyncio.wait_for(self._live.wait(), 30)
        except TimeoutError:
            self.state = "failed"
            self.message = "replay did not reach the end of the log within 30 s"
            return
        assert self.machine is not None
        host, port = parse_address(self.service)
        self.nic = NicServer(
            self.machine.net_backend, host, port, first_conn_id=self.machine.net.max_conn + 1
        )
        await self.nic.start()
        self.times.serving()
        self.promoted = True
        self.failovers += 1
        self.state = "running unprotected"
        self.message = self.times.describe()
        log.warning("%s: primary in generation %d; %s", self.name, self.generation, self.message)
        if self.on_promoted is not None:
            self.on_promoted(self)

    def _go_live_on_vcpu(self, position: int) -> Journal:
        """vCPU thread, at the first position the log does not cover: continue live, recording."""
        assert self.machine is not None and self._loop is not None
        machine = self.machine
        machine.clock.resume_from(machine.clock_device.last_seen_ns)
        self.sink = StreamSink(self._loop)
        self.sink.drop_all()  # unprotected until re-protection attaches a new backup
        journal = RecordJournal(
            self.sink,
            start_position=position - 1,
            hash_every=self.settings.hash_every,
            batch_events=256,
            flush_interval_s=0.002,
            flush_on_output=True,
        )
        self.journal = journal
        self.live_from = position - 1  # the log this node keeps for restarts begins here
        # The arbiter made this node the only primary: outputs go out at once until re-protected.
        self.gate = OutputGate(machine.deliver)
        self.gate.release_unprotected()
        machine.output_handler = self.gate.hold
        machine.net.connections_lost()
        self.times.live_at = time.monotonic()
        self._loop.call_soon_threadsafe(self._live.set)
        return journal

    async def _watch_machine(self) -> None:
        assert self.machine is not None
        self.result = await self.machine.wait()
        if not self.state.startswith("stopped"):
            self.state = f"stopped: {self.result.describe()}"

    # ----- status and stop --------------------------------------------------------------------------

    def status(self) -> vmft_pb2.VmStatus:
        machine = self.machine
        position = machine.position if machine else 0
        if self.promoted:
            role = vmft_pb2.ROLE_PRIMARY
        elif self.result is not None or self.state.startswith("stopped"):
            role = vmft_pb2.ROLE_STOPPED
        else:
            role = vmft_pb2.ROLE_BACKUP
        return vmft_pb2.VmStatus(
            name=self.name,
            role=role,
            state=self.state,
            generation=self.generation,
            position=position,
            acked_position=self.received,
            replayed_position=position,
            protected=False if self.promoted else self.state == "replaying",
            peer=self.primary_node,
            service=self.service,
            log_bytes_per_s=self.meter.rate(),
            lag_ms=0.0,
            message=self.message,
            failovers=self.failovers,
            suspected_at=self.times.suspected_wall,
            serving_at=self.times.serving_wall,
        )

    async def stop(self) -> None:
        if self.nic is not None:  # first: clients learn at once to try the other address
            await self.nic.close()
            self.nic = None
        await stop_machine(self.machine, self.name)
        cancel_other_tasks(self._tasks)
