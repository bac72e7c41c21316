"""The replication protocol, both halves side by side: one gRPC bidirectional stream per protected pair.

    primary                                   backup
    Hello (spec, generation, log header) ->
                                          <-  HelloReply (accepted, or why not)
    [checkpoint records, manifest last]  ->   (re-protection only: seeds the backup's VM)
                                          <-  Ack (the checkpoint's position)
    EventBatch | Heartbeat ...            ->
                                          <-  Ack (received, replayed) per group of messages read

The primary drives its end with threads and gRPC's synchronous API, not the event loop: gRPC's sending
thread takes what the vCPU logged straight from its hand-off (one merged batch per message: the stream's
cost is per message; at most two unacknowledged messages, so that the log gathers under load), or a
heartbeat when idle; an ack thread releases the outputs waiting in the output gate the moment an Ack
covers them. The backup acknowledges on receipt, before the batches reach its replay. Either side that
hears nothing for the failure timeout declares the other lost: the primary asks the arbiter to stay
primary alone, the backup asks it to take over (primary.py, backup.py). Each hop can be timed with
replica/hops.py (scripts/bench replication --hops).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from monitor.checkpoint import CheckpointError, RecordType
from monitor.errors import PeerError
from proto import vmft_pb2, vmft_pb2_grpc
from replica import hops, tls
from replica.stream_sink import StreamSink, merge_batches
from replica.vm_common import PROTOCOL_VERSION, Meter, NodeSettings, ReplicationRefused

if TYPE_CHECKING:
    from replica.backup import BackupVm

log = logging.getLogger(__name__)


class PeerSilent(PeerError):
    """The peer said nothing for longer than the failure timeout, or closed the stream."""


# ----- the primary's half -----------------------------------------------------------------------------


def _channel(settings: NodeSettings, target: str) -> grpc.Channel:
    """Mutual TLS with this node's own certificate (plaintext only for an --insecure loopback node). A
    synchronous channel: the stream is driven by threads, not by the event loop."""
    if settings.identity is not None:
        return grpc.secure_channel(target, tls.channel_credentials(settings.identity))
    tls.check_plaintext(target, settings.insecure)
    return grpc.insecure_channel(target)


class _Outgoing:
    """What the primary sends, as the request iterator gRPC's own sending thread pulls from (it asks for
    the next message once the previous one is written): first the control messages put here (Hello, a
    checkpoint's records), then, once `attach`ed, the log straight from the vCPU thread's hand-off (one
    merged batch for everything logged while the previous write was in flight), or a heartbeat when the
    log was idle for a heartbeat interval. No event loop on the way from the vCPU to the wire.

    At most `window` log messages are in flight (sent, not yet acknowledged): a lone output goes out at
    once, but under load the log gathers while the window is full, so that the stream carries a few large
    messages per round trip instead of one per output (its cost, and the acknowledgements', is per
    message: docs/design.md), and an output waits at most about one more round trip (or 1 ms, after which the
    window no longer holds the log back)."""

    def __init__(self, heartbeat_s: float, window: int = 2) -> None:
        self._heartbeat_s = heartbeat_s
        self._window = window
        self._in_flight: collections.deque[int] = collections.deque()  # horizons sent, not yet acked
        self._window_wait = min(heartbeat_s, 0.001)
        self._overdue = False  # the window stayed full for `_window_wait`: send anyway
        self._cond = threading.Condition()
        self._control: collections.deque[vmft_pb2.PrimaryMessage] = collections.deque()
        self._sink: StreamSink | None = None
        self._position: Callable[[], int] = lambda: 0
        self._closed = False
        self.sent_bytes = 0  # log bytes sent (the loop folds them into the Meter: it is not thread-safe)

    def put(self, message: vmft_pb2.PrimaryMessage) -> None:
        with self._cond:
            self._control.append(message)
            self._cond.notify_all()

    def backlog(self) -> int:
        return len(self._control)

    def attach(self, sink: StreamSink, position: Callable[[], int]) -> None:
        with self._cond:
            self._sink, self._position = sink, position
            self._cond.notify_all()

    def acked(self, received: int) -> None:
        """Ack thread: the backup holds the log up to `received` (frees the window)."""
        with self._cond:
            in_flight = self._in_flight
            if in_flight and in_flight[0] <= received:
                while in_flight and in_flight[0] <= received:
                    in_flight.popleft()
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sink = self._sink
            self._cond.notify_all()
        if sink is not None:
            sink.wake()

    def _heartbeat(self) -> vmft_pb2.PrimaryMessage:
        return vmft_pb2.PrimaryMessage(heartbeat=vmft_pb2.Heartbeat(position=self._position()))

    def __iter__(self) -> _Outgoing:
        return self

    def __next__(self) -> vmft_pb2.PrimaryMessage:
        while True:
            with self._cond:
                if self._control:
                    return self._control.popleft()
                if self._closed:
                    raise StopIteration
                sink = self._sink
                if sink is None:
                    self._cond.wait(self._heartbeat_s)
                    continue
                # A full window holds the log back for at most `_window_wait`: a slow or lossy link
                # (acknowledgements held up) must neither stall the log nor make the backup think this
                # primary silent; then whatever is pending goes out as if the window were open.
                if len(self._in_flight) >= self._window and not self._overdue:
                    if not self._cond.wait(self._window_wait) and len(self._in_flight) >= self._window:
                        self._overdue = True
                    continue
                self._overdue = False
            batches = sink.take_blocking(self._heartbeat_s)
            if self._closed:
                raise StopIteration
            if not batches:
                return self._heartbeat()
            batch = merge_batches(batches)
            hops.hop("take", batch.horizon)
            message = vmft_pb2.PrimaryMessage(batch=batch)
            self.sent_bytes += message.ByteSize()
            with self._cond:
                self._in_flight.append(max(batch.horizon, batch.end_position))
            if batch.ended:
                self.close()  # the guest stopped: the stream is half-closed after this message
            return message


class BackupLink:
    """The primary's end of one stream to a backup node (`target`: its address, or a relay in front).

    The stream runs on threads, with gRPC's synchronous API: gRPC's sending thread takes the log from the
    vCPU's hand-off (`_Outgoing`), and an ack thread reads the backup's acknowledgements and hands each to
    `on_ack` at once, on that thread (the output gate releases there: no trip through the event loop).
    The event loop only opens the link, watches for silence and learns how it ended."""

    def __init__(self, settings: NodeSettings, backup_node: str, target: str) -> None:
        self.settings = settings
        self.backup_node = backup_node
        self._channel = _channel(settings, target)
        self._outgoing = _Outgoing(settings.heartbeat_interval_s)
        self._call: Any = None  # the stream (a grpc response iterator and call), started by `open`
        self._lock = threading.Lock()  # an on_ack call and `close` exclude each other
        self._closed = False

    async def open(self, hello: vmft_pb2.Hello) -> None:
        """Send Hello and wait for the backup's answer; ReplicationRefused (link closed) unless accepted."""
        self._outgoing.put(vmft_pb2.PrimaryMessage(hello=hello))
        self._call = vmft_pb2_grpc.ReplicationStub(self._channel).Stream(self._outgoing)
        try:
            first = asyncio.to_thread(next, self._call, None)
            reply = await asyncio.wait_for(first, self.settings.connect_timeout_s)
        except (grpc.RpcError, TimeoutError) as err:
            await self.close()
            detail = err.details() if isinstance(err, grpc.Call) else "no answer"
            raise ReplicationRefused(f"backup node {self.backup_node} unreachable: {detail}") from err
        if reply is None or not reply.HasField("hello_reply"):
            await self.close()
            raise ReplicationRefused(f"backup node {self.backup_node} closed the stream")
        if not reply.hello_reply.accepted:
            await self.close()
            raise ReplicationRefused(
                f"backup node {self.backup_node} refused the pair: {reply.hello_reply.reason}"
            )

    async def send_checkpoint_record(self, record: bytes) -> None:
        """Queue one record; waits while more than a few are queued (the stream's pace); PeerSilent if
        the stream ended."""
        self._outgoing.put(vmft_pb2.PrimaryMessage(checkpoint_record=record))
        while self._outgoing.backlog() > 8:
            if self._closed or self._call is None or self._call.done():
                raise PeerSilent("the replication stream ended while a checkpoint was being sent")
            await asyncio.sleep(0.0005)

    async def close(self) -> None:
        """After this returns, `on_ack` is not called again (an old pairing's acks never reach a new
        gate)."""
        with self._lock:
            self._closed = True
        self._outgoing.close()
        if self._call is not None:
            self._call.cancel()
        self._channel.close()

    async def run(
        self,
        sink: StreamSink,
        position: Callable[[], int],
        meter: Meter,
        on_ack: Callable[[vmft_pb2.Ack], None],
    ) -> str:
        """Stream the log from `sink` (heartbeats at `position()` when idle), hand every Ack to `on_ack`
        on the ack thread (it must be thread-safe); return why the link ended (the backup closed it, went
        silent, or the connection broke)."""
        loop = asyncio.get_running_loop()
        call, settings, outgoing = self._call, self.settings, self._outgoing
        assert call is not None, "open the link first"
        last_heard = time.monotonic()
        ended: asyncio.Future[str] = loop.create_future()

        def finish(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        def receive() -> None:  # the ack thread
            nonlocal last_heard
            reason = "the backup closed the stream"
            try:
                for message in call:
                    last_heard = time.monotonic()
                    if message.HasField("ack"):
                        hops.hop("ackrecv", message.ack.received)
                        outgoing.acked(message.ack.received)
                        with self._lock:
                            if self._closed:
                                break
                            on_ack(message.ack)
            except grpc.RpcError as err:
                reason = f"stream broken: {err.code().name}" if isinstance(err, grpc.Call) else str(err)
            finally:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(finish, reason)

        outgoing.attach(sink, position)
        receiver = threading.Thread(target=receive, name=f"acks from {self.backup_node}", daemon=True)
        receiver.start()
        counted = 0
        try:
            while not ended.done():
                await asyncio.wait({ended}, timeout=settings.heartbeat_interval_s)
                sent = outgoing.sent_bytes
                if sent > counted:
                    meter.add(sent - counted)
                    counted = sent
                silent = time.monotonic() - last_heard
                if silent > settings.failure_timeout_s and not ended.done():
                    finish(f"no word from the backup for {silent * 1000:.0f} ms")
        finally:
            if not ended.done():  # cancelled: the caller closes the link
                ended.cancel()
        return ended.result()


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
    async for ack in _Acknowledger(vm, timeout).replies(requests, detach):
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


class _Acknowledger:
    """The backup's side of one stream: a reader task takes the primary's messages as they come; the
    generator (`replies`) sends one acknowledgement per group of messages read while the previous one was
    being written (under load, one per drained group; idle, one per message), then hands the group's
    batches to the replay. A loop timer, not a task per message, notices a silent primary."""

    def __init__(self, vm: BackupVm, silence_s: float) -> None:
        self.vm = vm
        self.silence_s = silence_s
        self.wake = asyncio.Event()
        self.last_heard = time.monotonic()
        self.ended = False  # the reader is done: `reason` says why ("" = the guest stopped on the primary)
        self.reason = "the primary closed the stream"
        self.silent = False  # the primary went silent (a partition, or a dead host), not a broken stream
        self.timer: asyncio.TimerHandle | None = None
        # Batches received and not yet handed to the replay: the acknowledgement goes out first (the
        # replay's vCPU thread would compete with its write for the interpreter), and they follow once it
        # is written.
        self.received: list[tuple[vmft_pb2.EventBatch, int]] = []

    def hand_over(self) -> None:
        for batch, size in self.received:
            self.vm.on_batch(batch, size)
        self.received.clear()

    def ack(self) -> vmft_pb2.BackupMessage:
        message = self.vm.ack()
        for batch, _ in self.received:
            message.ack.received = max(message.ack.received, batch.horizon, batch.end_position)
        return message

    async def read(self, requests: AsyncIterator[vmft_pb2.PrimaryMessage]) -> None:
        try:
            async for message in requests:
                self.last_heard = time.monotonic()
                if not self.vm.following():
                    break
                if message.HasField("batch"):
                    hops.hop("recv", message.batch.horizon)
                    self.received.append((message.batch, message.ByteSize()))
                    if message.batch.ended:
                        self.reason = ""  # the guest stopped on the primary; replay finishes by itself
                        break
                self.wake.set()
        except grpc.aio.AioRpcError as err:
            self.reason = f"stream broken: {err.code().name}"
        finally:
            self.ended = True
            self.wake.set()

    def check_silence(self) -> None:
        silent = time.monotonic() - self.last_heard
        if silent > self.silence_s:
            self.reason = f"no word from the primary for {silent * 1000:.0f} ms"
            self.silent = True
            self.ended = True
            self.wake.set()
        else:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.silence_s - silent + 0.001, self.check_silence)

    async def replies(
        self, requests: AsyncIterator[vmft_pb2.PrimaryMessage], detach: Detach
    ) -> AsyncIterator[vmft_pb2.BackupMessage]:
        loop = asyncio.get_running_loop()
        reading = loop.create_task(self.read(requests))
        self.timer = loop.call_later(self.silence_s, self.check_silence)
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.ended:
                    self.hand_over()
                    if not self.reason:
                        yield self.vm.ack()  # the last acknowledgement: the primary's final outputs go out
                    break
                message = self.ack()
                hops.hop("ack", message.ack.received)
                yield message
                self.hand_over()
        except asyncio.CancelledError:
            self.reason = self.reason or "the primary's connection dropped"
            raise
        finally:
            if self.timer is not None:
                self.timer.cancel()
            reading.cancel()  # no batch is taken after this: the failover replays exactly what was acked
            self.hand_over()  # (acknowledged or not: the replay has everything received)
            # Detached: gRPC cancels this handler when the primary's connection dies, and a failover
            # cancelled between the arbiter's claim and going live would leave the VM neither.
            if self.reason:
                detach(self.vm.primary_lost(self.reason, silent=self.silent))
