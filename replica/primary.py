"""The primary side of a protected VM: run it recording, stream the log to the backup (replication.py),
hold every output until the backup has acknowledged the log up to it, handle losing the backup, seed a
new one from a live checkpoint, and restart the guest from a checkpoint after a fault."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from monitor.checkpoint import CheckpointError, Checkpointer, CheckpointStats, CheckpointStore, Loading
from monitor.errors import PeerError, VmftError
from monitor.loader import ImageError
from monitor.machine import Machine, MachineResult
from monitor.address import parse_address
from monitor.netserver import NicServer
from monitor.record import IteratorSource, ReplayJournal, make_header
from monitor.restart import NODE_POLICY, FaultRestarter
from proto import vmft_pb2
from replica.arbiter import Arbiter, claim_or_owner
from replica.backup import BackupVm
from replica.guest_kind import Guest, close_machine
from replica.relay import Relay
from replica.replication import BackupLink, replication_address
from replica.roles import Role, Standing, State
from replica.stream_sink import StreamSink, window_batch
from replica.vm_common import (
    cancel_other_tasks,
    spawn,
    PROTOCOL_VERSION,
    NodeSettings,
    ReplicationRefused,
)
from replica.vm_core import GoLive, NotLive, VmCore, record_journal

log = logging.getLogger(__name__)

# A backup that went live takes its first checkpoint this long after, not at once: a full checkpoint's
# pre-copy holds the interpreter for tens of milliseconds right when the old primary's clients reconnect
# (measured in migrations: the handover's reply and the first replies waited 6-45 ms for it, 2-3 ms without).
FIRST_CHECKPOINT_AFTER_S = 0.25


class _FaultedAgain(VmftError):
    """A restart's restored guest faulted before it went live."""

    def __init__(self, message: str, result: MachineResult) -> None:
        super().__init__(message)
        self.result = result


class PrimaryVm:
    def __init__(self, core: VmCore, backup_node: str, backup_service: str, retained_from: int = 0) -> None:
        self.core = core
        self.standing = core.standing
        self.name = core.name
        self.backup_node = backup_node  # the pair's other node ("" for a VM started unprotected)
        self.backup_service = backup_service
        self.link: BackupLink | None = None
        self.relay: Relay | None = None
        self.reprotect_progress = 0.0
        self.last_reprotect = (0.0, 0.0, 0)  # seconds, pause ms, bytes
        self._ack_seen = asyncio.Event()
        self._checkpointer: Checkpointer | None = None  # re-protection's live checkpoints
        self._periodic: Checkpointer | None = None
        self._store = CheckpointStore(core.settings.data_dir / "checkpoints" / core.name)
        assert core.guest is not None
        self._restarter = FaultRestarter(NODE_POLICY, self._store, core.guest.hang_timeout_s)
        # One checkpoint at a time (periodic, or re-protection's live one: both use the dirty-page log); a
        # restart waits for the one in flight. Readers (status, metrics, the log stream) take no lock: on
        # the one event loop they read between awaits, and they must answer while a restart or a
        # re-protection (seconds) is under way, which a read-write lock's read side would forbid.
        self._checkpoint_lock = asyncio.Lock()
        self._replay_target = 0  # the last restart replayed the log up to here
        self._retained_from = retained_from  # the sink's retained log covers every position after this one
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_live: Machine | None = None  # a restart's machine, replaying, not yet live
        self.handed_over = False  # a planned switch gave the guest to another node (replica/migration.py)
        # Where automatic re-protection goes (replica/placement.py; None: the pair's other node, always).
        self.choose_backup: Callable[[PrimaryVm], Awaitable[tuple[str, str] | None]] | None = None

    @classmethod
    def new(
        cls,
        settings: NodeSettings,
        arbiter: Arbiter,
        spec: vmft_pb2.VmSpec,
        generation: int,
        backup_node: str,
        service: str,
        backup_service: str,
        disk: str | None,
    ) -> PrimaryVm:
        guest = Guest(spec, settings.data_dir, disk)  # ImageError, GuestSpecError, ...
        core = VmCore(settings, arbiter, spec, service, disk, Standing(Role.PRIMARY, generation), guest=guest)
        return cls(core, backup_node, backup_service)

    @classmethod
    def adopt(cls, backup: BackupVm) -> PrimaryVm:
        """A backup that went live becomes an ordinary (unprotected) primary, ready to be re-protected:
        the same core, re-protected onto the old primary's node when it returns."""
        vm = cls(backup.core, backup.primary_node, backup.hello.primary_service, backup.live_from)
        spawn(vm._tasks, vm._watch_machine(), "_watch_machine")
        spawn(vm._tasks, vm._checkpoint_loop(first_after_s=FIRST_CHECKPOINT_AFTER_S), "_checkpoint_loop")
        spawn(vm._tasks, vm._auto_reprotect(), "_auto_reprotect")
        return vm

    # ----- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the VM, connect to the backup (which must accept the pair), then run and serve."""
        core = self.core
        assert core.guest is not None
        image = core.guest.image
        core.spec.image_sha256 = image.sha256
        core.sink = StreamSink(asyncio.get_running_loop())
        journal = record_journal(core.sink, core.settings)
        machine = core.guest.build_machine(journal)
        core.machine = machine
        core.journal = journal
        gate = core.gate_outputs(machine)
        if core.settings.unsafe_release_outputs:
            log.error("%s: UNSAFE: outputs are released without the backup's acknowledgement", self.name)
            gate.unprotected = True
        header = make_header(image, machine.memory.size, hash_every=core.settings.hash_every)
        if self.backup_node:
            await self._open_link(header)
        else:
            self.standing.run_alone(core.sink)
        host, port = parse_address(core.service)
        core.nic = NicServer(machine.net_backend, host, port, framed=core.guest.framed_service)
        await core.nic.start()
        await self._checkpoint()  # the first one, before the guest runs: a restart always has one
        machine.start()
        spawn(self._tasks, self._watch_machine(), "_watch_machine")
        spawn(self._tasks, self._checkpoint_loop(), "_checkpoint_loop")
        if self.backup_node:
            self.standing.to(State.RUNNING)
            spawn(self._tasks, self._replicate(), "_replicate")
            spawn(self._tasks, self._auto_reprotect(), "_auto_reprotect")
        else:
            self.standing.to(State.RUNNING_UNPROTECTED)

    async def _open_link(self, header: vmft_pb2.LogHeader, checkpoint_follows: bool = False) -> None:
        settings = self.core.settings
        target = await replication_address(settings, self.backup_node)  # ReplicationRefused
        if settings.link_relay:
            # A real link in the path that fault injection can cut, slow or make lossy.
            if self.relay is not None:
                self.relay.close()
            self.relay = Relay(target).start()
            target = self.relay.address
        hello = vmft_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            spec=self.core.spec,
            generation=self.standing.generation,
            header=header,
            primary_node=settings.name,
            backup_service=self.backup_service,
            heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
            failure_timeout_ms=int(settings.failure_timeout_s * 1000),
            checkpoint_follows=checkpoint_follows,
            primary_service=self.core.service,
        )
        link = BackupLink(settings, self.backup_node, target)
        await link.open(hello)  # ReplicationRefused: the link is closed
        self.link = link

    async def _close_link(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.close()

    # ----- re-protection ----------------------------------------------------------------------------

    async def reprotect(self, backup_node: str, backup_service: str) -> None:
        """Seed a new backup from a live checkpoint of this primary, streamed over gRPC, then stream the
        log from the checkpoint's position. The guest keeps running; it is paused twice, briefly."""
        standing, machine = self.standing, self.core.machine
        assert machine is not None
        if standing.protected:
            raise ReplicationRefused(f"{self.name} is already protected by {self.backup_node}")
        if standing.is_(State.CONNECTING, State.REPROTECTING):
            raise ReplicationRefused(f"{self.name} is already being re-protected")
        if machine.result is not None or not standing.is_(State.RUNNING_UNPROTECTED):
            raise ReplicationRefused(f"{self.name} is not running ({standing.state.value})")
        began = time.monotonic()
        self.backup_node, self.backup_service = backup_node, backup_service
        self.reprotect_progress = 0.0
        # The wire says "re-protecting" only once the new backup has accepted (State.CONNECTING).
        standing.to(State.CONNECTING)
        header = make_header(machine.image, machine.memory.size, hash_every=self.core.settings.hash_every)
        try:
            await self._open_link(header, checkpoint_follows=True)
        except ReplicationRefused:
            if standing.is_(State.CONNECTING):
                standing.to(State.RUNNING_UNPROTECTED)
            raise
        if (
            self.core.machine is not machine
            or machine.result is not None
            or not standing.is_(State.CONNECTING)
        ):
            await self._close_link()  # the guest faulted meanwhile: a restart is under way
            raise ReplicationRefused(f"{self.name} stopped running while its new backup was reached")
        standing.to(State.REPROTECTING)
        stats, sent = await self._seed_backup(backup_node)
        if not standing.is_(State.REPROTECTING):
            await self._close_link()  # the guest faulted while it was being seeded: a restart is under way
            raise ReplicationRefused(f"{self.name} stopped running while its new backup was seeded")
        self.reprotect_progress = 1.0
        standing.to(
            State.RUNNING, f"re-protected by {backup_node}" + (f" ({stats.describe()})" if stats else "")
        )
        self.last_reprotect = (0.0, stats.pause_s * 1000 if stats else 0.0, sent)
        log.warning("%s: %s", self.name, standing.message)
        spawn(self._tasks, self._replicate(), "_replicate")
        await self._backup_holds(stats.position if stats else 0)
        self.last_reprotect = (time.monotonic() - began, self.last_reprotect[1], sent)
        self.core.settings.metrics.checkpoint_saved(self.name, "reprotect", stats)
        self.core.settings.metrics.reprotected(self.name, self.last_reprotect[0])

    async def _seed_backup(self, backup_node: str) -> tuple[CheckpointStats | None, int]:
        """Stream a live checkpoint to the new backup; at its position the log switches to a new sink and
        outputs wait for the new backup again. Returns its stats and the bytes sent."""
        core, standing, link = self.core, self.standing, self.link
        machine, journal, old_sink = core.machine, core.journal, core.sink
        assert machine is not None and journal is not None and old_sink is not None and link is not None
        loop = asyncio.get_running_loop()
        new_sink = StreamSink(loop)

        switched = False

        def on_paused(position: int) -> None:  # vCPU parked at the checkpoint's position
            nonlocal switched
            journal.switch_sink(new_sink, position)
            switched = True
            new_sink.retained = old_sink.retained  # the log since the last periodic checkpoint
            standing.protect_again(position)

        if self._checkpointer is None or self._checkpointer.machine is not machine:
            self._checkpointer = Checkpointer(machine, name="reprotect")
        checkpointer = self._checkpointer
        records: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        def produce() -> None:  # a worker thread: taking the checkpoint pauses the vCPU twice
            try:
                for record in checkpointer.records(full=True, on_paused=on_paused):
                    asyncio.run_coroutine_threadsafe(records.put(record), loop).result()
            finally:
                asyncio.run_coroutine_threadsafe(records.put(None), loop).result()

        sent = 0
        producer: asyncio.Task[None] | None = None
        try:
            async with self._checkpoint_lock:  # never beside a periodic checkpoint (dirty-page tracking)
                producer = asyncio.create_task(asyncio.to_thread(produce))
                while (record := await records.get()) is not None:
                    await link.send_checkpoint_record(record)
                    sent += len(record)
                    self.reprotect_progress = min(0.99, sent / max(1, machine.memory.size // 4))
                await producer
        except (grpc.RpcError, PeerError, CheckpointError, OSError) as err:
            if producer is not None:
                producer.cancel()
            await self._close_link()
            if standing.is_(State.REPROTECTING):  # (not when a restart has taken over meanwhile)
                # The journal may already write to the new sink: nobody reads it, so it must drop too.
                core.sink = new_sink if switched else old_sink
                standing.run_alone(core.sink)
                standing.to(State.RUNNING_UNPROTECTED)
            raise ReplicationRefused(f"re-protection onto {backup_node} failed: {err}") from err
        core.sink = new_sink
        return checkpointer.last_stats, sent

    async def _backup_holds(self, position: int, within_s: float = 30.0) -> None:
        """Wait (bounded) until the new backup has restored the checkpoint and acknowledged `position`."""
        started = time.monotonic()
        while self.standing.acked < position and self.standing.protected:
            if time.monotonic() - started > within_s:
                return
            self._ack_seen.clear()
            try:
                await asyncio.wait_for(self._ack_seen.wait(), 0.1)
            except TimeoutError:
                pass

    async def _auto_reprotect(self) -> None:
        """The node brings up a new backup by itself: whenever this primary runs unprotected (its backup
        died, it took over from its primary, or it restarted its guest), try the pair's other node again
        and again until it accepts (a killed node must first be restarted by whoever runs it)."""
        interval = self.core.settings.auto_reprotect_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.core.result is not None or self.standing.is_(State.FENCED):
                return
            if not self.standing.is_(State.RUNNING_UNPROTECTED) or not self.backup_node:
                continue
            target = (self.backup_node, self.backup_service)
            if self.choose_backup is not None:  # on etcd: the pair's node if live, else another member
                chosen = await self.choose_backup(self)
                if chosen is None:
                    continue
                target = chosen
            try:
                await self.reprotect(*target)
            except ReplicationRefused as err:
                log.info(
                    "%s: automatic re-protection onto %s not yet possible: %s",
                    self.name,
                    target[0],
                    err,
                )

    # ----- a planned switch (replica/migration.py) ------------------------------------------------

    async def release_backup(self, why: str) -> bool:
        """Let the backup go on purpose: claim the next generation first (the backup, seeing its stream
        end, then loses its own claim and stops), then close the link and run alone. False if another
        node holds that generation (this primary is fenced and stops)."""
        core, standing, link = self.core, self.standing, self.link
        if not standing.is_(State.RUNNING) or link is None:
            raise ReplicationRefused(f"{self.name} has no backup to release ({standing.state.value})")
        self.link = None  # its acks no longer count, and its end is no loss (_backup_lost)
        generation = standing.generation + 1
        owner = await claim_or_owner(core.arbiter, self.name, generation, core.settings.node_id)
        await link.close()
        if owner is not None:
            if not standing.is_(State.FENCED, State.STOPPED):
                standing.to(State.FENCED, f"generation {generation} belongs to {owner}: stopping")
            await self.stop()
            return False
        standing.generation = generation
        if standing.is_(State.RUNNING):  # (a guest fault meanwhile: the restart goes on alone)
            assert core.sink is not None
            standing.run_alone(core.sink)
            message = f"backup released ({why}); alone in generation {generation}"
            standing.to(State.RUNNING_UNPROTECTED, message)
        return True

    @contextlib.asynccontextmanager
    async def parked(self) -> AsyncIterator[int]:
        """The vCPU parked at a synchronous exit (no checkpoint beside it) with the log up to there handed
        to the stream: yields that position. On leaving, the vCPU runs on unless `handed_over` was set
        meanwhile (the guest lives on another node from that position)."""
        machine, journal = self.core.machine, self.core.journal
        assert machine is not None and journal is not None
        async with self._checkpoint_lock:
            await asyncio.to_thread(machine.pause)
            try:
                position = machine.position
                journal.flush(position)
                yield position
            finally:
                if not self.handed_over:
                    machine.resume()

    # ----- replication ---------------------------------------------------------------------------

    async def _replicate(self) -> None:
        core, link = self.core, self.link
        assert link is not None and core.sink is not None and core.machine is not None
        machine = core.machine
        loop = asyncio.get_running_loop()

        def on_ack(ack: vmft_pb2.Ack) -> None:  # the link's ack thread: outputs are released right here
            if link is self.link:  # a restart ended this pairing: its acks are of another timeline
                self.standing.ack(ack.received, ack.replayed)
                if not self._ack_seen.is_set():  # someone waits for an ack (_backup_holds)
                    loop.call_soon_threadsafe(self._ack_seen.set)

        reason = await link.run(core.sink, lambda: machine.position, core.meter, on_ack)
        await self._backup_lost(link, reason)

    async def _backup_lost(self, link: BackupLink, reason: str) -> None:
        core, standing = self.core, self.standing
        if (
            link is not self.link
            or not standing.is_(State.RUNNING)
            or (core.journal and core.journal.finished)
        ):
            # An old pairing's link (a restart ends it), or the guest stopped here first (its log ended
            # the stream): nothing to decide.
            if link is self.link:
                self.link = None
            await link.close()
            return
        core.times.suspect()
        log.warning("%s: lost the backup (%s); asking the arbiter to stay primary", self.name, reason)
        await self._close_link()
        generation = self.standing.generation + 1
        owner = await claim_or_owner(core.arbiter, self.name, generation, core.settings.node_id)
        if owner is None:
            standing.generation = generation
            if not standing.is_(State.RUNNING):
                return  # the guest faulted meanwhile: the restart goes live alone in this generation
            assert core.sink is not None
            standing.run_alone(core.sink)
            core.times.serving()
            waited = core.times.serving_at - core.times.suspected_at
            core.settings.metrics.recovered(self.name, "backup_lost", waited)
            standing.to(
                State.RUNNING_UNPROTECTED, f"backup lost ({reason}); primary alone in generation {generation}"
            )
            log.warning("%s: %s", self.name, standing.message)
        elif standing.is_(State.FENCED, State.STOPPED):
            return  # a restart found the same (or the guest stopped): nothing more to stop
        else:
            standing.to(
                State.FENCED, f"generation {generation} belongs to {owner}: stopping (outputs withheld)"
            )
            log.warning("%s: %s", self.name, standing.message)
            await self.stop()

    async def _watch_machine(self) -> None:
        core = self.core
        machine = core.machine
        assert machine is not None and core.guest is not None
        result = core.guest.fault_view(machine, await machine.wait())  # a Linux SIGSEGV is a crash
        if machine is self._pending_live:
            return  # it stopped before going live: the restart in progress fails (GoLive.serve) and says so
        if (
            self._restarter.is_fault(result)
            and not self.standing.is_(State.FENCED)
            and core.spec.on_fault != "stop"
        ):
            try:
                await self._restart_from_checkpoint(result)
                if not self.standing.is_(State.FENCED):
                    return
            except (CheckpointError, ImageError, OSError, ValueError) as err:
                log.error("%s: restart from a checkpoint failed: %s", self.name, err)
                self.standing.message = f"restart after {result.reason.value} failed: {err}"
        core.stopped(result)

    # ----- checkpoints and restart after a guest fault -------------------------------------------

    async def _checkpoint_loop(self, first_after_s: float | None = None) -> None:
        if first_after_s is not None:
            await asyncio.sleep(first_after_s)
            await self._checkpoint()
        while self.core.result is None:  # a restarted guest is checkpointed too
            await asyncio.sleep(self.core.settings.checkpoint_every_s)
            try:
                await self._checkpoint()
            except (CheckpointError, OSError) as err:
                log.error("%s: periodic checkpoint failed: %s", self.name, err)

    async def _checkpoint(self) -> None:
        """A periodic checkpoint into the node's data directory. Once it is saved, the log kept for a
        restart drops what the checkpoint covers (so both stay bounded)."""
        core = self.core
        machine, journal, sink = core.machine, core.journal, core.sink
        assert machine is not None and journal is not None and sink is not None
        if machine.result is not None or self.standing.is_(State.RESTARTING):
            return  # faulted, stopped, or a restarted guest still replaying its log
        if self._periodic is None or self._periodic.machine is not machine:
            self._periodic = Checkpointer(machine, name="periodic")
        store, checkpointer = self._store, self._periodic

        async with self._checkpoint_lock:
            if machine.result is not None:
                return
            stats = await asyncio.to_thread(
                store.save, checkpointer, lambda position: journal.flush(position)
            )
            if machine.result is not None:
                # The guest faulted while this checkpoint was being taken: it may hold the faulted state.
                store.mark_bad(stats.checkpoint_id)
                return
            core.settings.metrics.checkpoint_saved(self.name, "periodic", stats)
            keep_from = self._restart_log_start()
            if keep_from > self._retained_from:
                sink.retained = [batch for batch in sink.retained if batch.horizon > keep_from]
                self._retained_from = keep_from

    def _restart_log_start(self) -> int:
        """Where the log a restart may need begins: at the checkpoint before the one a restart would
        trust now (it may have to distrust that one too). A restart trusts only checkpoints older than
        the hang timeout, so with a checkpoint a second and a 2 s hang timeout that is three back, not
        the second newest: a shorter log made the restart skip the replay and lose acknowledged writes."""
        store = self._store
        trusted = store.latest_entry(before=time.monotonic() - self._restarter.trust_after_s)
        if trusted is None:
            # None old enough to trust (the store keeps fewer seconds of checkpoints than the hang timeout:
            # 10 to 20 at 1 s against a Linux program's 60 s): a restart takes the newest, then older
            # ones, never one older than the oldest kept, so the log before that is of no use (kept, it
            # grew without bound).
            return store.saved[0].position if store.saved else self._retained_from
        older = [saved for saved in store.saved if saved.saved_at < trusted.saved_at]
        return older[-1].position if older else trusted.position

    async def _restart_from_checkpoint(self, fault: MachineResult) -> None:
        """The guest crashed, panicked or hung. Replaying into a deterministic fault is pointless, so:
        restore the latest checkpoint, replay the log only up to the last output a client has seen (so
        nothing a client saw is forgotten), and continue live from there. Inputs after that output are
        dropped; their clients saw no reply and retry."""
        core, standing = self.core, self.standing
        old_machine, old_nic, gate = core.machine, core.nic, standing.gate
        assert old_machine is not None and old_nic is not None and gate is not None and core.sink is not None
        standing.to(State.RESTARTING)
        core.times.suspect()
        started = time.monotonic()
        # Close the service now: clients waiting on the dead guest learn at once and retry (and reconnect
        # when the restarted guest serves on the same address).
        first_conn = old_nic.next_conn_id
        await old_nic.close()
        core.nic = None
        released = gate.released_position
        retained_from = self._retained_from
        # Progress since the last restart (if any): a reply newer than its replay target reached a client.
        progressed = released > self._replay_target
        while True:
            async with self._checkpoint_lock:  # a checkpoint in flight finishes (or is marked bad) first
                entry = self._restarter.decide(fault, progressed=progressed)
            if entry is None:
                raise CheckpointError(
                    "no checkpoint to restart from (or the guest faulted again right after restarts)"
                )
            self._store.rewind_to(entry.checkpoint_id)
            if entry.position < retained_from and released > entry.position:
                # The log from that checkpoint to the last reply a client saw is gone: a restart there
                # would forget acknowledged replies (a query of death read before the last reply crashes
                # every restart until the policy reaches such a checkpoint). Stop instead: the backup, if
                # any, still holds the whole log.
                raise CheckpointError(
                    f"the log kept for restarts starts at position {retained_from}, after checkpoint "
                    f"{entry.checkpoint_id[:12]} (position {entry.position}): restarting there would forget "
                    f"replies clients saw (up to position {released})"
                )
            last_seen = max(released, entry.position)
            log.info(
                "%s: restart from %s (position %d, saved %.1f s ago), log kept from %d, %d batches, "
                "replay to %d",
                self.name, entry.checkpoint_id[:12], entry.position, time.monotonic() - entry.saved_at,
                retained_from, len(core.sink.retained), last_seen,
            )  # fmt: skip
            self._replay_target = last_seen
            batches = _window(core.sink.retained, entry.position, last_seen)
            # The restarted guest keeps the log from where it was kept, not from this checkpoint: if it
            # faults again before a new reply (a client retrying the request that crashed it), the policy
            # distrusts this checkpoint and takes the one before, which needs that log (it is the same
            # history: this replay reproduces it).
            keep_from = min(retained_from, entry.position)
            self._retained_from = keep_from
            try:
                live = await self._restore_and_go_live(
                    entry.path, batches, first_conn, kept=_window(core.sink.retained, keep_from, last_seen)
                )
            except _FaultedAgain as again:
                # The restored guest faulted before it went live (the checkpoint may hold the fault, e.g.
                # one taken while it spun): the policy hears of a fault right after a restart from it.
                log.warning("%s: %s", self.name, again)
                self._restarter.restarted(entry.checkpoint_id, time.monotonic() - started)
                fault, progressed = again.result, False
                self._retained_from = retained_from
                continue
            break
        if not live or standing.is_(State.FENCED):
            return
        self._restarter.restarted(entry.checkpoint_id, time.monotonic() - started)
        core.faults_recovered += 1
        core.settings.metrics.recovered(self.name, "restart", time.monotonic() - started)
        standing.to(
            State.RUNNING_UNPROTECTED,
            f"restarted from checkpoint {entry.checkpoint_id[:12]} after {fault.reason.value} "
            f"({fault.message}); replayed to position {last_seen}, "
            f"live in {(time.monotonic() - started) * 1000:.0f} ms",
        )
        log.warning("%s: %s", self.name, standing.message)

    async def _restore_and_go_live(
        self,
        path: Path,
        batches: list[vmft_pb2.EventBatch],
        first_conn: int,
        kept: list[vmft_pb2.EventBatch],
    ) -> bool:
        """Restore the checkpoint at `path`, replay `batches` onto it, go live (vm_core.GoLive, keeping
        `kept` as the start of the log for restarts) and serve; False if another node holds the next
        generation (this one is fenced: it must not go live)."""
        core = self.core
        old_machine, guest = core.machine, core.guest
        assert old_machine is not None and guest is not None
        go_live = GoLive(core, retained=kept)

        def make_journal(position: int) -> ReplayJournal:
            # (Its console output is already in this node's console log: it replays only what went out.)
            source = IteratorSource(iter(batches), what="the retained log")
            replay = guest.replay_journal(source, position, keep_console=False)
            replay.promote = go_live.on_vcpu
            return replay

        close_machine(old_machine)  # first: a Linux guest's writable layer is made afresh from the checkpoint
        machine, stats = await asyncio.to_thread(
            guest.restore_machine,
            path,
            journal=make_journal,
            loading=Loading.LAZY,  # the replay to the last reply starts at once
        )
        standing = self.standing
        generation = standing.generation + 1
        owner = await claim_or_owner(core.arbiter, self.name, generation, core.settings.node_id)
        if owner is None:
            standing.generation = generation  # fences the old pairing: its backup stopped at the fault
        elif owner != core.settings.node_id and standing.is_(State.RESTARTING):
            standing.to(State.FENCED, f"generation {generation} belongs to {owner}: not restarting")
        if standing.is_(State.FENCED):
            log.warning("%s: %s", self.name, standing.message)
            close_machine(machine)
            return False
        # End the old pairing's stream too: a backup that has not replayed into the fault (its last batch
        # not yet sent) would otherwise take heartbeats forever, "replaying", and block re-protection.
        await self._close_link()
        core.machine = machine
        self._periodic = Checkpointer(machine, name="periodic")
        self._periodic.continue_from(stats.checkpoint_id)
        self._checkpointer = None
        self._pending_live = machine
        spawn(self._tasks, self._watch_machine(), "_watch_machine")
        machine.start()
        # Serve (and allow re-protection) only once the replay has reached the last reply and the VM is
        # live: a checkpoint taken mid-replay would seed a backup with a log it can never receive.
        try:
            await go_live.serve(120.0, first_conn_id=first_conn)
        except TimeoutError:
            raise CheckpointError(
                "the restarted guest did not finish replaying its log within 120 s"
            ) from None
        except NotLive as err:
            result = machine.result
            if result is not None and self._restarter.is_fault(guest.fault_view(machine, result)):
                raise _FaultedAgain(str(err), guest.fault_view(machine, result)) from None
            raise CheckpointError(str(err)) from None
        finally:
            self._pending_live = None
        if machine.result is not None:  # it stopped while its service started: its watcher returned
            raise CheckpointError(f"the restarted guest stopped as it went live: {machine.result.describe()}")
        return True

    # ----- status and stop ------------------------------------------------------------------------

    def status(self) -> vmft_pb2.VmStatus:
        status = self.core.status(peer=self.backup_node)
        status.reprotect_progress = self.reprotect_progress if not self.standing.protected else 1.0
        status.reprotect_s, status.reprotect_pause_ms, status.reprotect_bytes = self.last_reprotect
        return status

    async def stop(self) -> None:
        await self.core.stop()
        await self._close_link()
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        cancel_other_tasks(self._tasks)


def _window(retained: list[vmft_pb2.EventBatch], after: int, last: int) -> list[vmft_pb2.EventBatch]:
    """The retained log's events at positions in (after, last], batch by batch (empty ones dropped)."""
    batches = [window_batch(batch, after, last) for batch in retained]
    return [batch for batch in batches if batch.position_deltas or batch.horizon > after]
