"""The backup side of a protected VM: replay the primary's log a few milliseconds behind it, acknowledge
what it holds, and when the primary dies, win the arbiter's next generation, finish the log and go live:
the same VM switches from replay to record and starts serving its clients (vm_core.GoLive)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from monitor.checkpoint import Loading, RecordStream, RestoreStats
from monitor.linux.manifest import RootMismatch
from monitor.loader import GuestImage
from monitor.machine import Machine
from monitor.record import QueueSource, ReplayJournal, check_header
from proto import vmft_pb2
from replica.arbiter import Arbiter, claim_or_owner
from replica.guest_kind import Guest, close_machine
from replica.roles import TERMINAL, Role, Standing, State
from replica.vm_common import (
    cancel_other_tasks,
    spawn,
    NodeSettings,
    ReplicationRefused,
)
from replica.vm_core import GoLive, NotLive, VmCore

log = logging.getLogger(__name__)


class BackupVm:
    def __init__(
        self, settings: NodeSettings, arbiter: Arbiter, hello: vmft_pb2.Hello, disk: str | None
    ) -> None:
        standing = Standing(Role.BACKUP, hello.generation)
        self.guest = Guest(hello.spec, settings.data_dir, disk)  # ImageError, GuestSpecError, ...
        self.core = VmCore(
            settings, arbiter, hello.spec, hello.backup_service, disk, standing, guest=self.guest
        )
        self.standing = standing
        self.hello = hello
        self.spec = hello.spec
        self.name = hello.spec.name
        self.primary_node = hello.primary_node
        self.source = QueueSource()
        self.on_promoted: Callable[[BackupVm], None] | None = None
        self.checkpoint_records: list[bytes] = []
        self._go_live = GoLive(self.core)
        self._tasks: list[asyncio.Task[None]] = []
        self._loop = asyncio.get_running_loop()  # (built on the node's loop; the stream's thread calls back)

    @property
    def live_from(self) -> int:
        """The position this VM went live at (the log this node keeps for restarts begins there)."""
        return self._go_live.position

    def check(self) -> GuestImage:
        """Raise if the pair cannot work here (other image or Linux program, memory size, CPUID)."""
        image = self.guest.image
        check_header(self.hello.header, image, self.guest.mem_size, what="the primary's log")
        return image

    def start(self) -> None:
        """Boot the VM and start replaying the log from position 0."""
        self.check()
        journal = self._replay_journal(self.hello.header.start_position)
        self._run(self.guest.build_machine(journal))

    async def start_from_checkpoint(self) -> RestoreStats:
        """Build the VM from the checkpoint records received so far (the last is the manifest), then
        replay the log from the checkpoint's position."""
        self.check()
        records = self.checkpoint_records
        self.checkpoint_records = []
        machine, stats = await asyncio.to_thread(
            self.guest.restore_machine,
            RecordStream(records, what=f"checkpoint from {self.primary_node}"),
            journal=self._replay_journal,
            loading=Loading.LAZY,  # the new backup acknowledges and replays at once
        )
        try:
            self.guest.check_restored(machine)  # before any replay: the root files its program read
        except RootMismatch as err:
            close_machine(machine)
            raise ReplicationRefused(f"refused: {err}") from err
        self.standing.received = machine.position
        self._run(machine)
        return stats

    def _replay_journal(self, position: int) -> ReplayJournal:
        journal = self.guest.replay_journal(self.source, position, keep_console=True)
        journal.promote = self._go_live.on_vcpu
        return journal

    def _run(self, machine: Machine) -> None:
        self.core.machine = machine
        machine.start()
        self.standing.to(State.REPLAYING)
        spawn(self._tasks, self._watch_machine(), "_watch_machine")

    def following(self) -> bool:
        """Still taking the primary's log (not gone live, not stopped)."""
        return (
            self.standing.role is Role.BACKUP
            and self.core.result is None
            and self.standing.state not in TERMINAL
        )

    def on_batch(self, batch: vmft_pb2.EventBatch, size: int) -> bool:
        """The stream's thread: hand a received batch to the replay; False if refused (the stream ends)."""
        if not self.following():
            return False  # refused (below): nothing more is replayed
        try:
            self.guest.check_batch(batch)  # a Linux program's root files, before they are replayed
        except RootMismatch as err:
            self._loop.call_soon_threadsafe(self._refuse, str(err))
            return False
        self.source.put(batch)
        self.standing.received = max(self.standing.received, batch.horizon, batch.end_position)
        self.core.meter.add(size)
        return True

    def _refuse(self, why: str) -> None:
        if self.standing.state in TERMINAL:
            return
        self.standing.to(State.FAILED, f"refused: {why}")
        log.error("%s: %s", self.name, self.standing.message)
        spawn(self._tasks, self.stop(), "stop")  # the stream ends: the primary runs alone

    def ack(self) -> vmft_pb2.BackupMessage:
        machine = self.core.machine
        replayed = machine.position if machine else 0
        return vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(received=self.standing.received, replayed=replayed))

    # ----- failover --------------------------------------------------------------------------------

    async def primary_lost(self, reason: str, silent: bool = False) -> None:
        """The primary is gone: claim the next generation, finish the log and go live. After silence the
        claim waits `silent_claim_delay_s`, so that a primary that still reaches the arbiter wins it."""
        standing, core = self.standing, self.core
        if (
            standing.role is not Role.BACKUP
            or core.result is not None
            or standing.state is not State.REPLAYING
        ):
            return
        core.times.suspect()
        standing.to(State.PROMOTING)
        if silent:
            await asyncio.sleep(core.settings.silent_claim_delay_s)
            if core.result is not None or not standing.is_(State.PROMOTING):
                return  # stopped meanwhile
        generation = standing.generation + 1
        log.warning(
            "%s: primary %s lost (%s); claiming generation %d",
            self.name,
            self.primary_node,
            reason,
            generation,
        )
        owner = await claim_or_owner(core.arbiter, self.name, generation, core.settings.node_id)
        core.times.claimed_at = time.monotonic()
        if owner is not None:
            standing.to(State.STOPPED, f"lost the arbiter's generation {generation} to {owner}")
            log.warning("%s: %s", self.name, standing.message)
            await self.stop()
            return
        standing.generation = generation
        self.source.close()  # replay drains what it has, then the journal calls GoLive.on_vcpu
        try:
            await self._go_live.serve(30.0)
        except TimeoutError:
            standing.to(State.FAILED, "replay did not reach the end of the log within 30 s")
            return
        except NotLive as err:
            standing.to(State.FAILED, str(err))
            return
        core.failovers += 1
        standing.promote(generation, core.times.describe())
        log.warning("%s: primary in generation %d; %s", self.name, generation, standing.message)
        cancel_other_tasks(self._tasks)  # the primary it becomes watches the machine from now on
        if self.on_promoted is not None:
            self.on_promoted(self)

    async def _watch_machine(self) -> None:
        assert self.core.machine is not None
        self.core.stopped(await self.core.machine.wait())

    # ----- status and stop --------------------------------------------------------------------------

    def status(self) -> vmft_pb2.VmStatus:
        return self.core.status(peer=self.primary_node)

    async def fail(self, message: str) -> None:
        self.standing.to(State.FAILED, message)
        await self.stop()

    async def stop(self) -> None:
        await self.core.stop()
        cancel_other_tasks(self._tasks)
