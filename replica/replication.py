"""The replication protocol, both halves side by side: one gRPC bidirectional stream per protected pair.

    primary                                   backup
    Hello (spec, generation, log header) ->
                                          <-  HelloReply (accepted, or why not)
    [checkpoint records, manifest last]  ->   (re-protection only: seeds the backup's VM)
                                          <-  Ack (the checkpoint's position)
    EventBatch | Heartbeat ...            ->
                                          <-  Ack (received, replayed) per group of messages read

The primary drives its end through gRPC's C core (replica/native_stream.py), not the event loop and not
Python's gRPC: the vCPU thread that logged a batch writes it itself (one merged batch per message: the
stream's cost is per message; at most two unacknowledged messages, so that the log gathers under load); an
ack thread releases the outputs waiting in the output gate the moment an Ack covers them, and sends what
gathered meanwhile; a sending thread writes the control messages and the heartbeats when idle. The backup
acknowledges on receipt, before the batches reach its replay. Either side that hears nothing for the failure
timeout declares the other lost: the primary asks the arbiter to stay primary alone, the backup asks it to
take over (primary.py, backup.py). Each hop can be timed with replica/hops.py (scripts/bench replication
--hops).
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
from proto import vmft_pb2
from replica import hops
from replica.native_stream import ClientStream, NativeStreamError, SendingStream
from replica.stream_sink import StreamSink, merge_batches
from replica.vm_common import PROTOCOL_VERSION, Meter, NodeSettings, ReplicationRefused

if TYPE_CHECKING:
    from replica.backup import BackupVm

log = logging.getLogger(__name__)


class PeerSilent(PeerError):
    """The peer said nothing for longer than the failure timeout, or closed the stream."""


# ----- the primary's half -----------------------------------------------------------------------------


# The stream's method path, from the generated descriptor: "/vmft.v1.Replication/Stream".
_SERVICE = vmft_pb2.DESCRIPTOR.services_by_name["Replication"]
STREAM_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Stream'].name}"


class _Outgoing:
    """What the primary sends, and who sends it. First the control messages put here (Hello, a checkpoint's
    records), written by the link's sending thread; then, once `attach`ed, the log: the vCPU thread that
    logged a batch sends it itself (`pump`: merge what is queued, serialize, start the write; gRPC's C core
    writes in the caller's thread), and so does the ack thread when an acknowledgement opens the window;
    the sending thread only looks every `_window_wait` while messages are in flight (a window that stayed
    full sends anyway) and sends a heartbeat when the log was idle for a heartbeat interval. No thread is
    woken to send what the vCPU logged.

    At most `window` log messages are in flight (sent, not yet acknowledged): a lone output goes out at
    once, but under load the log gathers while the window is full, so that the stream carries a few large
    messages per round trip instead of one per output (its cost, and the acknowledgements', is per
    message: docs/design.md), and an output waits at most about one more round trip (or 1 ms, after which the
    window no longer holds the log back)."""

    def __init__(self, heartbeat_s: float, window: int = 2) -> None:
        self._heartbeat_s = heartbeat_s
        self._window = window
        self._window_wait = min(heartbeat_s, 0.001)
        self._cond = threading.Condition()  # the sending thread waits here
        self._control: collections.deque[vmft_pb2.PrimaryMessage] = collections.deque()
        self._sink: StreamSink | None = None
        self._position: Callable[[], int] = lambda: 0
        self._stream: SendingStream | None = None
        self._closed = False
        self.ended = False  # the guest's last batch was sent: the stream is half-closed after it
        self.broken = False  # a write failed: the stream is broken (the ack thread learns why)
        # One writer at a time (a call has at most one write in flight); a pump that finds it taken leaves
        # `_again` set and the holder looks once more before it lets go.
        self._send_lock = threading.Lock()
        self._again = False
        # (horizon, sent at) of log messages not yet acknowledged. Only senders append and only the ack
        # thread pops: the deque's own atomicity suffices.
        self._in_flight: collections.deque[tuple[int, float]] = collections.deque()
        self._last_sent = time.monotonic()
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
        sink.on_write = self.pump
        self.pump()  # what was logged before

    def acked(self, received: int) -> None:
        """Ack thread: the backup holds the log up to `received` (frees the window, and sends what
        gathered meanwhile)."""
        in_flight = self._in_flight
        if in_flight and in_flight[0][0] <= received:
            while in_flight and in_flight[0][0] <= received:
                in_flight.popleft()
            self.pump()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sink = self._sink
            self._cond.notify_all()
        if sink is not None and sink.on_write == self.pump:
            sink.on_write = None

    def pump(self, timer: bool = False) -> None:
        """Send what is queued now if the window and the stream allow it; any thread, never waits for the
        network. `timer`: the sending thread's periodic look (a heartbeat if the log was idle)."""
        self._again = True
        while self._again:
            if not self._send_lock.acquire(blocking=False):
                return  # the holder sees `_again` and looks once more
            try:
                self._again = False
                self._pump_once(timer)
            finally:
                self._send_lock.release()

    def _pump_once(self, timer: bool) -> None:
        stream, sink = self._stream, self._sink
        if stream is None or sink is None or self._closed or self.ended or self.broken or self._control:
            return  # (control messages first: the sending thread writes them, then pumps)
        done = stream.send_done(0)
        if done < 0:
            return  # the previous write is still going out: the sending thread looks again
        if done == 0:
            self._break()
            return
        now = time.monotonic()
        # A full window holds the log back for at most `_window_wait`: a slow or lossy link
        # (acknowledgements held up) must neither stall the log nor make the backup think this primary
        # silent; then whatever is pending goes out as if the window were open.
        in_flight = self._in_flight
        if len(in_flight) >= self._window and now - in_flight[-1][1] < self._window_wait:
            return
        batches = sink.take_nowait()
        if not batches:
            if timer and now - self._last_sent >= self._heartbeat_s:
                heartbeat = vmft_pb2.Heartbeat(position=self._position())
                self._start(stream, vmft_pb2.PrimaryMessage(heartbeat=heartbeat).SerializeToString(), now)
            return
        batch = merge_batches(batches)
        hops.hop("take", batch.horizon)
        data = vmft_pb2.PrimaryMessage(batch=batch).SerializeToString()
        self.sent_bytes += len(data)
        in_flight.append((max(batch.horizon, batch.end_position), now))
        self._start(stream, data, now)
        if batch.ended:  # the guest stopped: the sending thread half-closes the stream after this
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def _start(self, stream: SendingStream, data: bytes, now: float) -> None:
        self._last_sent = now
        if not stream.start_send(data):
            self._break()

    def _break(self) -> None:
        with self._cond:
            self.broken = True
            self._cond.notify_all()

    def _send_control(self, stream: SendingStream) -> bool | None:
        """Write the next control message, if any (None: there was none). It is taken from the queue under
        the send lock, so that a pump never finds the queue empty while one is still on its way."""
        with self._send_lock:
            with self._cond:
                if not self._control:
                    return None
                message = self._control.popleft()
            ok = stream.send_done(-1) == 1 and stream.start_send(message.SerializeToString())
            ok = ok and stream.send_done(-1) == 1
            self._last_sent = time.monotonic()
        if not ok:
            self._break()
        return ok

    def run(self, stream: SendingStream) -> None:
        """The sending thread: control messages, then a look every `_window_wait` while the log is in
        flight (every heartbeat interval when idle); half-closes the stream after the guest's last batch."""
        self._stream = stream
        while True:
            sent = self._send_control(stream)
            if sent is False:
                return
            if sent:
                self.pump()  # the log that waited behind them (nothing while more control is queued)
                continue
            with self._cond:
                if self._closed or self.broken or self.ended:
                    break
                if not self._control:  # (`put` notifies)
                    busy = self._sink is not None and (self._in_flight or self._sink.pending)
                    self._cond.wait(self._window_wait if busy else self._heartbeat_s)
            self.pump(timer=True)  # (does nothing once closed, broken or ended, or with control queued)
        if self.ended and not self._closed and not self.broken:
            with self._send_lock:
                if stream.send_done(-1) == 1:
                    stream.done_writing()


class BackupLink:
    """The primary's end of one stream to a backup node (`target`: its address, or a relay in front).

    The stream runs through gRPC's C core (replica/native_stream.py) on the threads `_Outgoing` describes
    (the vCPU thread writes what it logs), and an ack thread reads the backup's acknowledgements and hands
    each to `on_ack` at once, on that thread (the output gate releases there: no trip through the event
    loop).
    The event loop only opens the link, watches for silence and learns how it ended."""

    def __init__(self, settings: NodeSettings, backup_node: str, target: str) -> None:
        self.settings = settings
        self.backup_node = backup_node
        self._target = target
        self._outgoing = _Outgoing(settings.heartbeat_interval_s)
        self._stream: ClientStream | None = None  # opened by `open`
        self._sending_ended = threading.Event()  # the sending thread is done (half-closed, or broken)
        self._lock = threading.Lock()  # an on_ack call and `close` exclude each other
        self._closed = False

    async def open(self, hello: vmft_pb2.Hello) -> None:
        """Send Hello and wait for the backup's answer; ReplicationRefused (link closed) unless accepted."""
        settings = self.settings
        self._outgoing.put(vmft_pb2.PrimaryMessage(hello=hello))
        try:
            self._stream = await asyncio.to_thread(
                ClientStream,
                self._target,
                STREAM_METHOD,
                settings.identity,
                insecure=settings.insecure,
                timeout=settings.connect_timeout_s,
            )
        except NativeStreamError as err:
            await self.close()
            raise ReplicationRefused(f"backup node {self.backup_node} unreachable: {err}") from err
        stream = self._stream
        threading.Thread(
            target=self._send_all, args=(stream,), name=f"log to {self.backup_node}", daemon=True
        ).start()
        try:
            first = await asyncio.to_thread(stream.recv, settings.connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ReplicationRefused(f"backup node {self.backup_node} unreachable: no answer") from None
        if first is None:
            await self.close()
            why = await asyncio.to_thread(stream.status)
            raise ReplicationRefused(f"backup node {self.backup_node} closed the stream ({why})")
        reply = vmft_pb2.BackupMessage.FromString(first)
        if not reply.HasField("hello_reply"):
            await self.close()
            raise ReplicationRefused(f"backup node {self.backup_node} closed the stream")
        if not reply.hello_reply.accepted:
            await self.close()
            raise ReplicationRefused(
                f"backup node {self.backup_node} refused the pair: {reply.hello_reply.reason}"
            )

    def _send_all(self, stream: ClientStream) -> None:
        """The sending thread (`_Outgoing.run`)."""
        try:
            self._outgoing.run(stream)
        finally:
            self._sending_ended.set()

    async def send_checkpoint_record(self, record: bytes) -> None:
        """Queue one record; waits while more than a few are queued (the stream's pace); PeerSilent if
        the stream ended."""
        self._outgoing.put(vmft_pb2.PrimaryMessage(checkpoint_record=record))
        while self._outgoing.backlog() > 8:
            if self._closed or self._stream is None or self._sending_ended.is_set():
                raise PeerSilent("the replication stream ended while a checkpoint was being sent")
            await asyncio.sleep(0.0005)

    async def close(self) -> None:
        """After this returns, `on_ack` is not called again (an old pairing's acks never reach a new
        gate)."""
        with self._lock:
            self._closed = True
        self._outgoing.close()
        if self._stream is not None:
            self._stream.cancel()

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
        stream, settings, outgoing = self._stream, self.settings, self._outgoing
        assert stream is not None, "open the link first"
        last_heard = time.monotonic()
        ended: asyncio.Future[str] = loop.create_future()

        def finish(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        def receive() -> None:  # the ack thread
            nonlocal last_heard
            reason = "the backup closed the stream"
            try:
                while (data := stream.recv()) is not None:
                    last_heard = time.monotonic()
                    message = vmft_pb2.BackupMessage.FromString(data)
                    if message.HasField("ack"):
                        hops.hop("ackrecv", message.ack.received)
                        outgoing.acked(message.ack.received)
                        with self._lock:
                            if self._closed:
                                break
                            on_ack(message.ack)
                else:
                    status = stream.status()
                    if status != "OK":
                        reason = f"stream broken: {status}"
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
