"""The replication protocol, both halves side by side: one gRPC bidirectional stream per protected pair.

    primary                                   backup
    Hello (spec, generation, log header) ->
                                          <-  HelloReply (accepted, or why not)
    [checkpoint records, manifest last]  ->   (re-protection only: seeds the backup's VM)
                                          <-  Ack (the checkpoint's position)
    EventBatch | Heartbeat ...            ->
                                          <-  Ack (received, replayed) per group of messages read

The primary sends whatever the vCPU logged while the previous write was in flight as one merged batch
(the stream's cost is per message), or a heartbeat when idle; outputs wait in the output gate until an Ack
covers them. Either side that hears nothing for the failure timeout declares the other lost: the primary
asks the arbiter to stay primary alone, the backup asks it to take over (primary.py, backup.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from monitor.checkpoint import CheckpointError, RecordType
from monitor.errors import PeerError
from proto import vmft_pb2, vmft_pb2_grpc
from replica import tls
from replica.stream_sink import StreamSink, merge_batches
from replica.vm_common import PROTOCOL_VERSION, Meter, NodeSettings, ReplicationRefused

if TYPE_CHECKING:
    from replica.backup import BackupVm

log = logging.getLogger(__name__)


class PeerSilent(PeerError):
    """The peer said nothing for longer than the failure timeout, or closed the stream."""


# How a broken replication link shows. InvalidStateError ("RPC already finished") is a write after the backup
# ended the RPC (e.g. it went live while this node was stopped): uncaught, it killed the replication task and
# left the primary protected in name, holding every output, never asking the arbiter.
LINK_ERRORS = (PeerSilent, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


# ----- the primary's half -----------------------------------------------------------------------------


class BackupLink:
    """The primary's end of one stream to a backup node (`target`: its address, or a relay in front)."""

    def __init__(self, settings: NodeSettings, backup_node: str, target: str) -> None:
        self.settings = settings
        self.backup_node = backup_node
        # Mutual TLS with this node's own certificate (plaintext only for an --insecure loopback node).
        self._channel = tls.open_channel(target, settings.identity, insecure=settings.insecure)
        self._call: grpc.aio.StreamStreamCall = vmft_pb2_grpc.ReplicationStub(self._channel).Stream()

    async def open(self, hello: vmft_pb2.Hello) -> None:
        """Send Hello and wait for the backup's answer; ReplicationRefused (link closed) unless accepted."""
        try:
            await self._call.write(vmft_pb2.PrimaryMessage(hello=hello))
            reply = await asyncio.wait_for(self._call.read(), self.settings.connect_timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            await self.close()
            detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else "no answer"
            raise ReplicationRefused(f"backup node {self.backup_node} unreachable: {detail}") from err
        if reply is grpc.aio.EOF or not reply.HasField("hello_reply"):
            await self.close()
            raise ReplicationRefused(f"backup node {self.backup_node} closed the stream")
        if not reply.hello_reply.accepted:
            await self.close()
            raise ReplicationRefused(
                f"backup node {self.backup_node} refused the pair: {reply.hello_reply.reason}"
            )

    async def send_checkpoint_record(self, record: bytes) -> None:
        await self._call.write(vmft_pb2.PrimaryMessage(checkpoint_record=record))

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()

    async def run(
        self,
        sink: StreamSink,
        position: Callable[[], int],
        meter: Meter,
        on_ack: Callable[[vmft_pb2.Ack], None],
    ) -> str:
        """Stream the log from `sink` (heartbeats at `position()` when idle), hand every Ack to `on_ack`;
        return why the link ended (the backup closed it, went silent, or the connection broke)."""
        call, settings = self._call, self.settings
        last_heard = time.monotonic()

        async def sender() -> None:
            while True:
                batches = await sink.take(settings.heartbeat_interval_s)
                if batches:
                    # One message for everything queued while the previous write was in flight: the
                    # stream's cost is per message, and the backup acknowledges per message group.
                    batch = merge_batches(batches)
                    message = vmft_pb2.PrimaryMessage(batch=batch)
                    await call.write(message)
                    meter.add(message.ByteSize())
                    if batch.ended:
                        return
                else:
                    heartbeat = vmft_pb2.Heartbeat(position=position())
                    await call.write(vmft_pb2.PrimaryMessage(heartbeat=heartbeat))

        async def receiver() -> None:
            nonlocal last_heard
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise PeerSilent("the backup closed the stream")
                last_heard = time.monotonic()
                if message.HasField("ack"):
                    on_ack(message.ack)

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(settings.heartbeat_interval_s)
                silent = time.monotonic() - last_heard
                if silent > settings.failure_timeout_s:
                    raise PeerSilent(f"no word from the backup for {silent * 1000:.0f} ms")

        reason = "the link ended"
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(sender())
                group.create_task(receiver())
                group.create_task(watchdog())
        except* LINK_ERRORS as group_error:
            reason = "; ".join(str(e).splitlines()[0] for e in group_error.exceptions)
        return reason


# ----- the backup's half ------------------------------------------------------------------------------

Accept = Callable[[vmft_pb2.Hello], Awaitable["BackupVm | str"]]
Detach = Callable[[Coroutine[Any, Any, None]], None]


def refuse(reason: str) -> vmft_pb2.BackupMessage:
    return vmft_pb2.BackupMessage(
        hello_reply=vmft_pb2.HelloReply(accepted=False, reason=reason, protocol_version=PROTOCOL_VERSION)
    )


async def backup_stream(
    settings: NodeSettings,
    requests: AsyncIterator[vmft_pb2.PrimaryMessage],
    accept: Accept,
    detach: Detach,
) -> AsyncIterator[vmft_pb2.BackupMessage]:
    """The backup's side of one stream. `accept(hello)` builds the backup VM, or says why not; `detach`
    runs the failover when the stream ends without the primary's guest having stopped."""
    first = await anext(requests)
    if not first.HasField("hello"):
        yield refuse("the first message of a stream must be Hello")
        return
    hello = first.hello
    accepted = await accept(hello)
    if isinstance(accepted, str):
        log.warning("refusing replication of %s from %s: %s", hello.spec.name, hello.primary_node, accepted)
        yield refuse(accepted)
        return
    vm = accepted
    log.info("%s: backup of %s in generation %d", vm.name, hello.primary_node, hello.generation)
    yield vmft_pb2.BackupMessage(
        hello_reply=vmft_pb2.HelloReply(
            accepted=True, protocol_version=PROTOCOL_VERSION, backup_node=settings.name
        )
    )
    if hello.checkpoint_follows:
        if not await _seed(vm, requests):
            return
        yield vm.ack()
    timeout = max(hello.failure_timeout_ms / 1000, settings.failure_timeout_s)
    async for ack in _acknowledge(vm, requests, timeout, detach):
        yield ack


async def _seed(vm: BackupVm, requests: AsyncIterator[vmft_pb2.PrimaryMessage]) -> bool:
    """Receive the primary's live checkpoint (manifest last) and restore the backup's VM from it."""
    try:
        async for message in requests:
            if not message.HasField("checkpoint_record"):
                raise ReplicationRefused("the checkpoint stream was interrupted by another message")
            record = message.checkpoint_record
            vm.checkpoint_records.append(record)
            if record[:1] == bytes([RecordType.MANIFEST]):
                break
        else:
            raise ReplicationRefused("the primary ended the stream before the checkpoint's manifest")
        stats = await vm.start_from_checkpoint()
    except (CheckpointError, ReplicationRefused, OSError) as err:
        log.error("%s: seeding from a checkpoint failed: %s", vm.name, err)
        await vm.fail(f"seeding failed: {err}")
        return False
    except asyncio.CancelledError:
        # The primary dropped the stream mid-checkpoint (its attempt failed): a later one must be accepted.
        await vm.fail("seeding failed: the primary dropped the stream")
        raise
    log.warning(
        "%s: seeded from %s's checkpoint at position %d (%d MiB restored in %.0f ms)",
        vm.name, vm.primary_node, vm.standing.received, stats.raw_bytes >> 20, stats.seconds * 1000,
    )  # fmt: skip
    return True


async def _acknowledge(
    vm: BackupVm, requests: AsyncIterator[vmft_pb2.PrimaryMessage], silence_s: float, detach: Detach
) -> AsyncIterator[vmft_pb2.BackupMessage]:
    """A reader task takes the primary's messages as they come and hands their batches to the replay;
    this generator sends one acknowledgement per group of messages read while the previous one was being
    written (under load, one per drained group; idle, one per message). A loop timer, not a task per
    message, notices a silent primary."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    last_heard = time.monotonic()
    ended = False  # the reader is done: `reason` says why ("" = the guest stopped on the primary)
    reason = "the primary closed the stream"
    timer: asyncio.TimerHandle | None = None

    async def reader() -> None:
        nonlocal last_heard, reason, ended
        try:
            async for message in requests:
                last_heard = time.monotonic()
                if not vm.following():
                    break
                if message.HasField("batch"):
                    vm.on_batch(message.batch, message.ByteSize())
                    if message.batch.ended:
                        reason = ""  # the guest stopped on the primary; replay finishes by itself
                        break
                wake.set()
        except grpc.aio.AioRpcError as err:
            reason = f"stream broken: {err.code().name}"
        finally:
            ended = True
            wake.set()

    def check_silence() -> None:
        nonlocal reason, ended, timer
        silent = time.monotonic() - last_heard
        if silent > silence_s:
            reason = f"no word from the primary for {silent * 1000:.0f} ms"
            ended = True
            wake.set()
        else:
            timer = loop.call_later(silence_s - silent + 0.001, check_silence)

    reading = loop.create_task(reader())
    timer = loop.call_later(silence_s, check_silence)
    try:
        while True:
            await wake.wait()
            wake.clear()
            if ended:
                if not reason:
                    yield vm.ack()  # the last acknowledgement: the primary's final outputs go out
                break
            yield vm.ack()
    except asyncio.CancelledError:
        reason = reason or "the primary's connection dropped"
        raise
    finally:
        if timer is not None:
            timer.cancel()
        reading.cancel()  # no batch is taken after this: the failover replays exactly what was acked
        # Detached: gRPC cancels this handler when the primary's connection dies, and a failover
        # cancelled between the arbiter's claim and going live would leave the VM neither.
        if reason:
            detach(vm.primary_lost(reason))
