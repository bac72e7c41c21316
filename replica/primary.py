"""The primary side of a protected VM: run it recording, stream the log to the backup, hold every output
until the backup has acknowledged the log up to it, and handle losing the backup."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING

import grpc

from monitor import builder
from monitor.checkpoint import CheckpointError, Checkpointer, CheckpointStore
from monitor.loader import ImageError
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import NicServer, parse_address
from monitor.record import IteratorSource, RecordJournal, ReplayJournal, make_header
from proto import vmft_pb2, vmft_pb2_grpc
from replica.arbiter import Arbiter, claim_or_owner
from replica.output_gate import OutputGate
from replica.relay import Relay
from replica.stream_sink import StreamSink, merge_batches
from replica.vm_common import (
    cancel_other_tasks,
    stop_machine,
    spawn,
    PROTOCOL_VERSION,
    FailoverTimes,
    Meter,
    NodeSettings,
    ReplicationRefused,
    load_spec_image,
    machine_config,
)

if TYPE_CHECKING:
    from replica.backup import BackupVm

log = logging.getLogger(__name__)


_GUEST_FAULTS = (StopReason.CRASHED, StopReason.PANICKED, StopReason.HUNG)


def _window(batch: vmft_pb2.EventBatch, after: int, last: int) -> vmft_pb2.EventBatch:
    """The events of `batch` at positions in (after, last], as an open batch (no end marker)."""
    positions = list(itertools.accumulate(batch.position_deltas, initial=batch.first_position))[1:]
    keep = [i for i, position in enumerate(positions) if after < position <= last]
    out = vmft_pb2.EventBatch(horizon=min(batch.horizon, last))
    if keep:
        first, end = keep[0], keep[-1] + 1
        out.first_position = positions[first]
        out.position_deltas.extend(
            [0, *(b - a for a, b in zip(positions[first : end - 1], positions[first + 1 : end]))]
        )
        out.rips.extend(batch.rips[first:end])
        out.kinds.extend(batch.kinds[first:end])
        out.values.extend(batch.values[first:end])
        out.data.extend(batch.data[first:end])
    return out


class PeerSilent(Exception):
    pass


# How a broken replication link shows. InvalidStateError ("RPC already finished") is a write after the backup
# ended the RPC (e.g. it went live while this node was stopped): uncaught, it killed the replication task and
# left the primary protected in name, holding every output, never asking the arbiter.
_LINK_ERRORS = (PeerSilent, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class PrimaryVm:
    def __init__(
        self,
        settings: NodeSettings,
        arbiter: Arbiter,
        spec: vmft_pb2.VmSpec,
        generation: int,
        backup_node: str,
        service: str,
        backup_service: str,
        disk: str | None,
    ) -> None:
        self.settings = settings
        self.arbiter = arbiter
        self.spec = spec
        self.name = spec.name
        self.generation = generation
        self.backup_node = backup_node
        self.service = service
        self.backup_service = backup_service
        self.disk = disk
        self.state = "starting"
        self.message = ""
        self.protected = False
        self.acked = 0
        self.replayed = 0
        self.meter = Meter()
        self.failovers = 0
        self.machine: Machine | None = None
        self.gate: OutputGate | None = None
        self.sink: StreamSink | None = None
        self.nic: NicServer | None = None
        self.result: MachineResult | None = None
        self.journal: RecordJournal | None = None
        self.times = FailoverTimes()
        self.reprotect_progress = 0.0
        self.last_reprotect = (0.0, 0.0, 0)  # seconds, pause ms, bytes
        self._ack_seen = asyncio.Event()
        self._checkpointer: Checkpointer | None = None
        self._connecting = False
        self.relay: Relay | None = None
        self._periodic: Checkpointer | None = None
        self._store: CheckpointStore | None = None
        self._checkpoint_lock = asyncio.Lock()
        self.faults_recovered = 0
        self._last_restart: tuple[str, int] | None = (
            None  # (checkpoint id, replay target) of the last restart
        )
        self._refaults = 0  # restarts in a row that faulted again before any new reply
        self._retained_from = 0  # the sink's retained log covers every position after this one
        self._tasks: list[asyncio.Task[None]] = []
        self._call: grpc.aio.StreamStreamCall | None = None
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def adopt(cls, backup: BackupVm) -> PrimaryVm:
        """A backup that went live becomes an ordinary (unprotected) primary, ready to be re-protected."""
        assert backup.machine is not None and backup.journal is not None
        vm = cls(backup.settings, backup.arbiter, backup.spec, backup.generation, "", backup.service, "", "")
        vm.disk = backup.disk
        vm.state = backup.state
        vm.message = backup.message
        vm.machine = backup.machine
        vm.journal = backup.journal
        vm.sink = backup.sink
        vm.gate = backup.gate
        vm.nic = backup.nic
        vm.failovers = backup.failovers
        vm.times = backup.times
        vm.backup_node = backup.primary_node  # the old primary's node: re-protect onto it when it returns
        vm.backup_service = backup.hello.primary_service
        vm._retained_from = backup.live_from
        spawn(vm._tasks, vm._watch_machine(), "_watch_machine")
        spawn(vm._tasks, vm._checkpoint_loop(first_now=True), "_checkpoint_loop")
        spawn(vm._tasks, vm._auto_reprotect(), "_auto_reprotect")
        return vm

    # ----- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the VM, connect to the backup (which must accept the pair), then run and serve."""
        loop = asyncio.get_running_loop()
        image = load_spec_image(self.spec)
        self.spec.image_sha256 = image.sha256
        self.sink = StreamSink(loop)
        journal = RecordJournal(
            self.sink,
            hash_every=self.settings.hash_every,
            batch_events=256,
            flush_interval_s=0.002,
            flush_on_output=True,
        )
        machine = builder.build(machine_config(self.spec, self.disk), journal=journal, image=image)
        self.machine = machine
        self.journal = journal
        self.gate = OutputGate(machine.deliver)
        machine.output_handler = self.gate.hold
        if self.settings.unsafe_release_outputs:
            log.error("%s: UNSAFE: outputs are released without the backup's acknowledgement", self.name)
            self.gate.unprotected = True
        header = make_header(image, machine.memory.size, hash_every=self.settings.hash_every)
        if self.backup_node:
            await self._connect(header)
        else:
            self.gate.release_unprotected()
            self.sink.drop_all()
        host, port = parse_address(self.service)
        self.nic = NicServer(machine.net_backend, host, port)
        await self.nic.start()
        await self._checkpoint()  # the first one, before the guest runs: a restart always has one
        machine.start()
        self.state = "running"
        spawn(self._tasks, self._watch_machine(), "_watch_machine")
        spawn(self._tasks, self._checkpoint_loop(), "_checkpoint_loop")
        if self.backup_node:
            spawn(self._tasks, self._replicate(), "_replicate")
            spawn(self._tasks, self._auto_reprotect(), "_auto_reprotect")

    async def _connect(self, header: vmft_pb2.LogHeader, checkpoint_follows: bool = False) -> None:
        target = self.backup_node
        if self.settings.link_relay:
            # A real link in the path that fault injection can cut, slow or make lossy.
            if self.relay is not None:
                self.relay.close()
            self.relay = Relay(self.backup_node).start()
            target = self.relay.address
        self._channel = grpc.aio.insecure_channel(target)
        stub = vmft_pb2_grpc.ReplicationStub(self._channel)
        self._call = stub.Stream()
        hello = vmft_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            spec=self.spec,
            generation=self.generation,
            header=header,
            primary_node=self.settings.name,
            backup_service=self.backup_service,
            heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
            failure_timeout_ms=int(self.settings.failure_timeout_s * 1000),
            checkpoint_follows=checkpoint_follows,
            primary_service=self.service,
        )
        try:
            await self._call.write(vmft_pb2.PrimaryMessage(hello=hello))
            reply = await asyncio.wait_for(self._call.read(), self.settings.connect_timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            await self._close_channel()
            detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else "no answer"
            raise ReplicationRefused(f"backup node {self.backup_node} unreachable: {detail}") from err
        if reply is grpc.aio.EOF or not reply.HasField("hello_reply"):
            await self._close_channel()
            raise ReplicationRefused(f"backup node {self.backup_node} closed the stream")
        if not reply.hello_reply.accepted:
            await self._close_channel()
            raise ReplicationRefused(
                f"backup node {self.backup_node} refused the pair: {reply.hello_reply.reason}"
            )
        self.protected = True

    async def _close_channel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._call = None
        self._channel = None

    # ----- re-protection ----------------------------------------------------------------------------

    async def reprotect(self, backup_node: str, backup_service: str) -> None:
        """Seed a new backup from a live checkpoint of this primary, streamed over gRPC, then stream the
        log from the checkpoint's position. The guest keeps running; it is paused twice, briefly."""
        assert self.machine is not None and self.journal is not None and self.gate is not None
        if self.protected:
            raise ReplicationRefused(f"{self.name} is already protected by {self.backup_node}")
        if self.machine.result is not None or not self.state.startswith("running"):
            raise ReplicationRefused(f"{self.name} is not running ({self.state})")
        if self._connecting:
            raise ReplicationRefused(f"{self.name} is already being re-protected")
        machine, journal, gate = self.machine, self.journal, self.gate
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        self.backup_node = backup_node
        self.backup_service = backup_service
        self.reprotect_progress = 0.0
        header = make_header(machine.image, machine.memory.size, hash_every=self.settings.hash_every)
        self._connecting = True  # the state says "re-protecting" only once the new backup has accepted
        try:
            await self._connect(header, checkpoint_follows=True)
        finally:
            self._connecting = False
        if self.machine is not machine or machine.result is not None or not self.state.startswith("running"):
            await self._close_channel()  # the guest faulted meanwhile: a restart is under way
            raise ReplicationRefused(f"{self.name} stopped running while its new backup was reached")
        self.state = "re-protecting"
        self.protected = False  # not until the new backup holds the checkpoint
        assert self._call is not None
        call = self._call
        new_sink = StreamSink(loop)

        old_sink = self.sink
        assert old_sink is not None

        def on_paused(position: int) -> None:  # vCPU parked at the checkpoint's position
            journal.switch_sink(new_sink, position)
            new_sink.retained = old_sink.retained  # the log since the last periodic checkpoint
            gate.protect_again(position)

        if self._checkpointer is None:
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
        try:
            async with self._checkpoint_lock:
                producer = asyncio.create_task(asyncio.to_thread(produce))
                while (record := await records.get()) is not None:
                    await call.write(vmft_pb2.PrimaryMessage(checkpoint_record=record))
                    sent += len(record)
                    self.reprotect_progress = min(0.99, sent / max(1, machine.memory.size // 4))
                await producer
        except (grpc.aio.AioRpcError, CheckpointError, OSError) as err:
            producer.cancel()
            await self._close_channel()
            self.state = "running unprotected"
            gate.release_unprotected()
            raise ReplicationRefused(f"re-protection onto {backup_node} failed: {err}") from err
        stats = checkpointer.last_stats
        self.sink = new_sink
        self.protected = True
        self.reprotect_progress = 1.0
        self.state = "running"
        self.last_reprotect = (0.0, stats.pause_s * 1000 if stats else 0.0, sent)
        started_wait = time.monotonic()
        self.message = f"re-protected by {backup_node}" + (f" ({stats.describe()})" if stats else "")
        log.warning("%s: %s", self.name, self.message)
        spawn(self._tasks, self._replicate(), "_replicate")
        position = stats.position if stats else 0
        while self.acked < position and self.protected and time.monotonic() - started_wait < 30:
            self._ack_seen.clear()  # the new backup restores, then acknowledges the checkpoint
            try:
                await asyncio.wait_for(self._ack_seen.wait(), 0.1)
            except TimeoutError:
                pass
        self.last_reprotect = (time.monotonic() - began, self.last_reprotect[1], sent)

    async def _auto_reprotect(self) -> None:
        """The node brings up a new backup by itself: whenever this primary runs unprotected (its backup
        died, it took over from its primary, or it restarted its guest), try the pair's other node again
        and again until it accepts (a killed node must first be restarted by whoever runs it)."""
        interval = self.settings.auto_reprotect_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.result is not None or self.state == "fenced":
                return
            if self.protected or self.state != "running unprotected" or not self.backup_node:
                continue
            try:
                await self.reprotect(self.backup_node, self.backup_service)
            except ReplicationRefused as err:
                log.info(
                    "%s: automatic re-protection onto %s not yet possible: %s",
                    self.name,
                    self.backup_node,
                    err,
                )

    # ----- replication ---------------------------------------------------------------------------

    async def _replicate(self) -> None:
        assert self._call is not None
        call = self._call
        last_heard = time.monotonic()

        async def sender() -> None:
            assert self.sink is not None and self.machine is not None
            while True:
                batches = await self.sink.take(self.settings.heartbeat_interval_s)
                if batches:
                    # One message for everything queued while the previous write was in flight: the
                    # stream's cost is per message, and the backup acknowledges per message group.
                    batch = merge_batches(batches)
                    message = vmft_pb2.PrimaryMessage(batch=batch)
                    await call.write(message)
                    self.meter.add(message.ByteSize())
                    if batch.ended:
                        return
                else:
                    await call.write(
                        vmft_pb2.PrimaryMessage(heartbeat=vmft_pb2.Heartbeat(position=self.machine.position))
                    )

        async def receiver() -> None:
            nonlocal last_heard
            assert self.gate is not None
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise PeerSilent("the backup closed the stream")
                last_heard = time.monotonic()
                if message.HasField("ack"):
                    self.acked = max(self.acked, message.ack.received)
                    self.replayed = message.ack.replayed
                    self.gate.ack(message.ack.received)
                    self._ack_seen.set()

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(self.settings.heartbeat_interval_s)
                silent = time.monotonic() - last_heard
                if silent > self.settings.failure_timeout_s:
                    raise PeerSilent(f"no word from the backup for {silent * 1000:.0f} ms")

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(sender())
                group.create_task(receiver())
                group.create_task(watchdog())
        except* _LINK_ERRORS as group_error:
            reason = "; ".join(str(e).splitlines()[0] for e in group_error.exceptions)
            await self._backup_lost(reason)

    async def _backup_lost(self, reason: str) -> None:
        assert self.gate is not None and self.sink is not None
        if self.result is not None or self.state == "restarting" or (self.journal and self.journal.finished):
            # The guest stopped here first (its log ended the stream): nothing to decide.
            self.protected = False
            await self._close_channel()
            return
        self.protected = False
        self.times.suspect()
        log.warning("%s: lost the backup (%s); asking the arbiter to stay primary", self.name, reason)
        await self._close_channel()
        next_generation = self.generation + 1
        owner = await claim_or_owner(self.arbiter, self.name, next_generation, self.settings.name)
        if owner is None:
            self.generation = next_generation
            self.sink.drop_all()
            self.gate.release_unprotected()
            self.times.serving()
            self.state = "running unprotected"
            self.message = f"backup lost ({reason}); primary alone in generation {next_generation}"
            log.warning("%s: %s", self.name, self.message)
        else:
            self.state = "fenced"
            self.message = f"generation {next_generation} belongs to {owner}: stopping (outputs withheld)"
            log.warning("%s: %s", self.name, self.message)
            await self.stop()

    async def _watch_machine(self) -> None:
        assert self.machine is not None
        result = await self.machine.wait()
        if result.reason in _GUEST_FAULTS and self.state != "fenced" and self.spec.on_fault != "stop":
            try:
                await self._restart_from_checkpoint(result)
                return
            except (CheckpointError, ImageError, OSError, ValueError) as err:
                log.error("%s: restart from a checkpoint failed: %s", self.name, err)
                self.message = f"restart after {result.reason.value} failed: {err}"
        self.result = result
        if self.state != "fenced":
            self.state = f"stopped: {result.describe()}"

    # ----- checkpoints and restart after a guest fault -------------------------------------------

    async def _checkpoint_loop(self, first_now: bool = False) -> None:
        if first_now:
            await self._checkpoint()
        while True:
            await asyncio.sleep(self.settings.checkpoint_every_s)
            if self.machine is None or self.machine.result is not None:
                return
            try:
                await self._checkpoint()
            except (CheckpointError, OSError) as err:
                log.error("%s: periodic checkpoint failed: %s", self.name, err)

    async def _checkpoint(self) -> None:
        """A periodic checkpoint into the node's data directory. Once it is saved, the log kept for a
        restart drops what the checkpoint covers (so both stay bounded)."""
        assert self.machine is not None and self.journal is not None and self.sink is not None
        machine, journal, sink = self.machine, self.journal, self.sink
        if self._store is None:
            self._store = CheckpointStore(self.settings.data_dir / "checkpoints" / self.name)
            self._periodic = Checkpointer(machine, name="periodic")
        assert self._periodic is not None
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
            # Keep the log back to the checkpoint before this one: a restart may have to distrust the newest.
            saved = store.saved
            keep_from = saved[-2].position if len(saved) >= 2 else self._retained_from
            if keep_from > self._retained_from:
                sink.retained = [batch for batch in sink.retained if batch.horizon > keep_from]
                self._retained_from = keep_from

    async def _restart_from_checkpoint(self, fault: MachineResult) -> None:
        """The guest crashed, panicked or hung. Replaying into a deterministic fault is pointless, so:
        restore the latest checkpoint, replay the log only up to the last output a client has seen (so
        nothing a client saw is forgotten), and continue live from there. Inputs after that output are
        dropped; their clients saw no reply and retry."""
        assert (
            self.gate is not None
            and self.sink is not None
            and self._store is not None
            and self.nic is not None
        )
        loop = asyncio.get_running_loop()
        old_machine, old_nic = self.machine, self.nic
        assert old_machine is not None
        self.state = "restarting"
        self.times.suspect()
        started = time.monotonic()
        # Close the service now: clients waiting on the dead guest learn at once and retry (and reconnect
        # when the restarted guest serves on the same address).
        first_conn = old_nic.next_conn_id
        await old_nic.close()
        last_seen = self.gate.released_position
        if self._last_restart is not None and last_seen <= self._last_restart[1]:
            # It faulted again before any new reply: the checkpoint it restarted from (or the log replayed
            # onto it) leads to the fault. Never use that checkpoint again.
            self._store.mark_bad(self._last_restart[0])
            self._refaults += 1
        else:
            self._refaults = 0
        if self._refaults >= 3:
            raise CheckpointError(f"the guest faulted again right after {self._refaults} restarts")
        # A checkpoint taken shortly before the fault was detected may already hold it (a corruption not
        # yet noticed, a loop not yet long enough to count as hung): trust only older ones.
        trusted_before = time.monotonic() - machine_config(self.spec, self.disk).hang_timeout_s - 0.1
        async with self._checkpoint_lock:  # a checkpoint in flight finishes (or is marked bad) first
            entry = self._store.latest_entry(before=trusted_before) or self._store.latest_entry()
        if entry is None:
            raise CheckpointError("no checkpoint to restart from")
        path = entry.path
        self._store.rewind_to(entry.checkpoint_id)
        if entry.position < self._retained_from:
            log.error(
                "%s: the log kept for restarts starts at position %d, after checkpoint %s (position %d): "
                "restarting without replay, replies since that checkpoint may be lost",
                self.name,
                self._retained_from,
                entry.checkpoint_id[:12],
                entry.position,
            )
            last_seen = entry.position
        last_seen = max(last_seen, entry.position)
        log.info(
            "%s: restart from %s (position %d, saved %.1f s ago), log kept from %d, %d batches, replay to %d",
            self.name, entry.checkpoint_id[:12], entry.position, time.monotonic() - entry.saved_at,
            self._retained_from, len(self.sink.retained), last_seen,
        )  # fmt: skip
        self._last_restart = (entry.checkpoint_id, last_seen)
        self._retained_from = entry.position
        batches = [_window(batch, entry.position, last_seen) for batch in self.sink.retained]
        batches = [batch for batch in batches if batch.position_deltas or batch.horizon > entry.position]
        sink = StreamSink(loop)
        sink.drop_all()  # unprotected until re-protected
        sink.retained = list(batches)
        live = asyncio.Event()
        gate = OutputGate(lambda kind, data: machine.deliver(kind, data))
        gate.release_unprotected()
        settings = self.settings

        def go_live(position: int) -> RecordJournal:  # vCPU thread, at the first position not replayed
            log.info("%s: live again at position %d (replay target %d)", self.name, position - 1, last_seen)
            loop.call_soon_threadsafe(live.set)
            machine.clock.resume_from(machine.clock_device.last_seen_ns)
            machine.net.connections_lost()
            journal = RecordJournal(
                sink,
                start_position=position - 1,
                hash_every=settings.hash_every,
                batch_events=256,
                flush_interval_s=0.002,
                flush_on_output=True,
            )
            self.journal = journal
            return journal

        def make_journal(position: int) -> ReplayJournal:
            replay = ReplayJournal(
                IteratorSource(iter(batches), what="the retained log"), start_position=position
            )
            replay.promote = go_live
            return replay

        machine, stats = await asyncio.to_thread(
            builder.restore,
            path,
            journal=make_journal,
            image=old_machine.image,
            disk=self.disk,
            hang_timeout_s=self.spec.hang_timeout_s or None,
            output_handler=gate.hold,
        )
        old_machine.close()
        next_generation = self.generation + 1
        if await asyncio.to_thread(self.arbiter.claim, self.name, next_generation, self.settings.name):
            self.generation = next_generation  # fences the old pairing: its backup stopped at the fault
        # End the old pairing's stream too: a backup that has not replayed into the fault (its last batch
        # not yet sent) would otherwise take heartbeats forever, "replaying", and block re-protection.
        await self._close_channel()
        host, port = parse_address(self.service)
        self.nic = NicServer(machine.net_backend, host, port, first_conn_id=first_conn)
        self.machine, self.gate, self.sink = machine, gate, sink
        self._periodic = Checkpointer(machine, name="periodic")
        self._periodic.continue_from(stats.checkpoint_id)
        self._checkpointer = None
        spawn(self._tasks, self._watch_machine(), "_watch_machine")
        machine.start()
        # Serve (and allow re-protection) only once the replay has reached the last reply and the VM is
        # live: a checkpoint taken mid-replay would seed a backup with a log it can never receive.
        try:
            await asyncio.wait_for(live.wait(), 120)
        except TimeoutError:
            raise CheckpointError(
                "the restarted guest did not finish replaying its log within 120 s"
            ) from None
        await self.nic.start()
        self.times.serving()
        self.protected = False
        self.faults_recovered += 1
        self.state = "running unprotected"
        self.message = (
            f"restarted from checkpoint {stats.checkpoint_id[:12]} after {fault.reason.value} "
            f"({fault.message}); replayed to position {last_seen}, "
            f"live in {(time.monotonic() - started) * 1000:.0f} ms"
        )
        log.warning("%s: %s", self.name, self.message)

    # ----- status and stop ------------------------------------------------------------------------

    def status(self) -> vmft_pb2.VmStatus:
        machine = self.machine
        position = machine.position if machine else 0
        state = self.state
        if state.startswith("running"):
            # Resumed after a SIGSTOP, it may answer before it has noticed (or asked the arbiter) that the
            # backup took over: then it serves nothing (its outputs wait for acks that never come).
            current = self.arbiter.current(self.name)
            if current is not None and current.generation > self.generation:
                state = f"superseded by generation {current.generation} on {current.node} (outputs held)"
        return vmft_pb2.VmStatus(
            name=self.name,
            role=vmft_pb2.ROLE_STOPPED if self.state == "fenced" or self.result else vmft_pb2.ROLE_PRIMARY,
            state=state,
            generation=self.generation,
            position=position,
            acked_position=self.acked,
            replayed_position=self.replayed,
            protected=self.protected,
            peer=self.backup_node,
            service=self.service,
            log_bytes_per_s=self.meter.rate(),
            held_outputs=self.gate.held if self.gate else 0,
            message=self.message,
            failovers=self.failovers,
            suspected_at=self.times.suspected_wall,
            serving_at=self.times.serving_wall,
            reprotect_progress=self.reprotect_progress if not self.protected else 1.0,
            faults_recovered=self.faults_recovered,
            reprotect_s=self.last_reprotect[0],
            reprotect_pause_ms=self.last_reprotect[1],
            reprotect_bytes=self.last_reprotect[2],
        )

    async def stop(self) -> None:
        if self.nic is not None:  # first: clients learn at once to try the other address
            await self.nic.close()
            self.nic = None
        await stop_machine(self.machine, self.name)
        await self._close_channel()
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        cancel_other_tasks(self._tasks)
