"""The replication protocol, both halves side by side: one gRPC bidirectional stream per protected pair.

    primary                                   backup
    Hello (spec, generation, log header) ->
                                          <-  HelloReply (accepted, or why not)
    [checkpoint records, manifest last]  ->   (re-protection only: seeds the backup's VM)
                                          <-  Ack (the checkpoint's position)
    EventBatch | Heartbeat ...            ->
                                          <-  Ack (received, replayed) per message read

Both ends run on gRPC's C core (replica/native_stream.py), not on the event loop and not on Python's gRPC.
The primary's: the vCPU thread that logged a batch writes it itself (one merged batch per message: the
stream's cost is per message; at most two unacknowledged messages, so that the log gathers under load); an
ack thread releases the outputs waiting in the output gate the moment an Ack covers them, and sends what
gathered meanwhile; a sending thread writes the control messages and the heartbeats when idle. The
backup's: a node takes streams on a port of its own (`ReplicationServer`; a primary learns it from the
node's status), one thread per stream, which acknowledges each message on receipt, before its batch goes to
the replay. Either side that hears nothing for the failure timeout declares the other lost: the primary asks
the arbiter to stay primary alone, the backup asks it to take over (primary.py, backup.py). Each hop can be
timed with replica/hops.py (scripts/bench replication --hops).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from monitor.address import Address, parse_address
from monitor.checkpoint import RecordType
from monitor.checkpoint.format import MAX_RECORD
from monitor.errors import PeerError
from proto import vmft_pb2, vmft_pb2_grpc
from replica import hops, tls
from replica.authz import Denied
from replica.native_stream import ClientStream, NativeStreamError, SendingStream, ServerStream, StreamServer
from replica.stream_sink import StreamSink, merge_batches
from replica.vm_common import PROTOCOL_VERSION, Meter, NodeSettings, ReplicationRefused

if TYPE_CHECKING:
    from replica.backup import BackupVm

log = logging.getLogger(__name__)
T = TypeVar("T")


class PeerSilent(PeerError):
    """The peer said nothing for longer than the failure timeout, or closed the stream."""


# ----- the primary's half -----------------------------------------------------------------------------


# The stream's method path, from the generated descriptor: "/vmft.v1.Replication/Stream".
_SERVICE = vmft_pb2.DESCRIPTOR.services_by_name["Replication"]
STREAM_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Stream'].name}"


async def replication_address(settings: NodeSettings, backup_node: str) -> str:
    """Where `backup_node` takes replication streams (NodeStatus.replication: a port of its own)."""
    try:
        async with tls.open_channel(backup_node, settings.identity, insecure=settings.insecure) as channel:
            status = await vmft_pb2_grpc.NodeStub(channel).Status(
                vmft_pb2.StatusRequest(node_only=True), timeout=settings.connect_timeout_s
            )
    except grpc.aio.AioRpcError as err:
        raise ReplicationRefused(f"backup node {backup_node} unreachable: {err.code().name}") from err
    if not status.replication:
        raise ReplicationRefused(f"backup node {backup_node} takes no replication streams")
    return str(status.replication)


class _Outgoing:
    """What the primary sends, and who sends it. First the control messages put here (Hello, a checkpoint's
    records), written by the link's sending thread; then, once `attach`ed, the log: the vCPU thread that
    logged a batch sends it itself (`pump`: merge what is queued, serialize, start the write; gRPC's C core
    writes in the caller's thread), and so does the ack thread when an acknowledgement opens the window;
    the sending thread only looks every `_window_wait` while log waits to be sent (a window that stayed
    full sends anyway; a pump that leaves log waiting wakes it) and sends a heartbeat when the log was
    idle for a heartbeat interval. No thread is woken to send what the vCPU logged.

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
        self._sleeping_long = False  # the sending thread sleeps a heartbeat interval (`_look_soon` wakes it)
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
            self._look_soon()  # the previous write is still going out: the sending thread looks again
            return
        if done == 0:
            self._break()
            return
        now = time.monotonic()
        # A full window holds the log back for at most `_window_wait`: a slow or lossy link
        # (acknowledgements held up) must neither stall the log nor make the backup think this primary
        # silent; then whatever is pending goes out as if the window were open.
        in_flight = self._in_flight
        if len(in_flight) >= self._window and now - in_flight[-1][1] < self._window_wait:
            self._look_soon()
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

    def _look_soon(self) -> None:
        """The log waits for the window or for the write before it: make sure the sending thread looks
        within `_window_wait` (it sleeps longer only while nothing waits to be sent)."""
        with self._cond:  # (under the lock: the sending thread decides how long to sleep under it too)
            if self._sleeping_long:
                self._sleeping_long = False
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
                if not self._control:  # (`put` and `_look_soon` notify)
                    # A look every `_window_wait` only while something waits to be sent: messages in
                    # flight alone need none (their acknowledgement pumps), and an idle log a heartbeat.
                    waiting = self._sink is not None and self._sink.pending
                    self._sleeping_long = not waiting
                    self._cond.wait(self._window_wait if waiting else self._heartbeat_s)
                    self._sleeping_long = False
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
                        with self._lock:  # the replies first, then what gathered meanwhile
                            if self._closed:
                                break
                            on_ack(message.ack)
                        outgoing.acked(message.ack.received)
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

# What the node answers a Hello with: the backup VM, a refusal told to the primary (the pair cannot work
# here), or a denial the call ends with (the caller is not the VM's primary).
Accept = Callable[[vmft_pb2.Hello, ServerStream], Coroutine[Any, Any, "BackupVm | str | Denied"]]
Detach = Callable[[Coroutine[Any, Any, None]], None]

# How long a stream may take to say Hello, and the gaps a checkpoint's records may leave.
_HELLO_WAIT_S = 10.0
_SEED_GAP_S = 30.0
_CLOSE_WAIT_S = 2.0
# The largest message a backup takes: a checkpoint record (a Linux guest's manifest may be large) and its
# framing; log batches are far smaller (stream_sink.MAX_MESSAGE_BYTES).
_MAX_MESSAGE = MAX_RECORD + (1 << 20)
# A silence longer than this is a lost primary whatever its Hello says (vmft node allows up to 600 s).
_MAX_SILENCE_S = 600.0


def refuse(reason: str) -> vmft_pb2.BackupMessage:
    return vmft_pb2.BackupMessage(
        hello_reply=vmft_pb2.HelloReply(accepted=False, reason=reason, protocol_version=PROTOCOL_VERSION)
    )


class ReplicationServer:
    """The backup's end of every replication stream into this node: a gRPC server of `Replication.Stream`
    through gRPC's C core (replica/native_stream.py) on a port of its own (the node's API stays on
    grpc.aio), one thread accepting and one per stream (`_BackupEnd`). Each stream's thread reads the
    primary's messages and acknowledges each at once from the same thread, then hands the batches to the
    replay: nothing between the wire and the replay waits for the event loop. The loop builds the backup
    VM (`accept`), restores a checkpoint and runs a failover (`detach`)."""

    def __init__(self, settings: NodeSettings, accept: Accept, detach: Detach) -> None:
        self.settings = settings
        self._accept = accept
        self._detach = detach
        self._server: StreamServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: set[threading.Thread] = set()
        self.address = ""

    def start(self) -> str:
        """Listen on the node's host at `settings.replication_port` (0: a free one); returns the address
        primaries are told (HOST:PORT, or `settings.replication_advertise`)."""
        self._loop = asyncio.get_running_loop()
        host = parse_address(self.settings.name).host
        where = str(Address(host, self.settings.replication_port))
        try:
            self._server = StreamServer(
                where,
                STREAM_METHOD,
                self.settings.identity,
                insecure=self.settings.insecure,
                max_message=_MAX_MESSAGE,
            )
        except NativeStreamError as err:
            raise ReplicationRefused(f"cannot take replication streams on {where}: {err}") from err
        self.address = self.settings.replication_advertise or str(Address(host, self._server.port))
        accepting = threading.Thread(target=self._accept_all, name="replication server", daemon=True)
        self._threads.add(accepting)
        accepting.start()
        return self.address

    def _accept_all(self) -> None:
        server = self._server
        assert server is not None
        try:
            while (stream := server.accept()) is not None:
                thread = threading.Thread(
                    target=self._serve, args=(stream,), name=f"log from {stream.peer()}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
        finally:
            self._threads.discard(threading.current_thread())

    def _serve(self, stream: ServerStream) -> None:
        try:
            assert self._loop is not None
            _BackupEnd(self.settings, stream, self._loop, self._accept, self._detach).run()
        except Exception:
            log.exception("a replication stream from %s failed", stream.peer())
        finally:
            stream.cancel()  # (a no-op once finished)
            self._threads.discard(threading.current_thread())

    async def close(self) -> None:
        """Stop taking streams and end those going on (their threads hand their VMs to `detach` as a
        broken stream would); waits for the threads, bounded."""
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while time.monotonic() < deadline:  # (also a stream accepted meanwhile)
            left = [thread for thread in list(self._threads) if thread.is_alive()]
            if not left:
                break
            await asyncio.to_thread(left[0].join, max(0.0, deadline - time.monotonic()))


class _StreamEnded(Exception):
    """The stream broke (or the primary went silent) while the backup wrote to it."""


class _BackupEnd:
    """The backup's side of one stream, on its own thread: Hello, an optional checkpoint, then the log.
    Every message read is acknowledged at once (one acknowledgement per message, written before the next
    read), then its batch is handed straight to the replay's queue; a read that waits longer than the
    failure timeout means a silent primary."""

    def __init__(
        self,
        settings: NodeSettings,
        stream: ServerStream,
        loop: asyncio.AbstractEventLoop,
        accept: Accept,
        detach: Detach,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.loop = loop
        self.accept = accept
        self.detach = detach

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _send(self, message: vmft_pb2.BackupMessage, timeout: float = -1) -> None:
        stream = self.stream
        if stream.send_done(timeout) != 1 or not stream.start_send(message.SerializeToString()):
            raise _StreamEnded("the stream broke while the backup wrote to it")

    def _finish(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        if self.stream.send_done(_CLOSE_WAIT_S) == 1:
            self.stream.finish(code, details, _CLOSE_WAIT_S)

    def run(self) -> None:
        try:
            vm, hello = self._handshake()
        except _StreamEnded:
            return  # before anything was built: the primary tries again
        if vm is None:
            return
        log.info("%s: backup of %s in generation %d", vm.name, hello.primary_node, hello.generation)
        reply = vmft_pb2.HelloReply(
            accepted=True, protocol_version=PROTOCOL_VERSION, backup_node=self.settings.name
        )
        try:
            self._send(vmft_pb2.BackupMessage(hello_reply=reply))
            if hello.checkpoint_follows:
                if not self._seed(vm):
                    return
                self._send(vm.ack())
        except _StreamEnded:
            # Before the log: this VM would never hear from its primary, and would refuse the next try.
            self._on_loop(vm.fail("the primary's stream ended before the log"))
            return
        # A primary depends on this backup once it has the HelloReply, and then always sends something
        # (the checkpoint, the log or a heartbeat): only then may a lost stream mean a failover. A primary
        # that gave up before the reply runs on without this backup, which must never go live.
        follow = _Follow(heard=hello.checkpoint_follows)
        try:
            silence_s = min(
                max(hello.failure_timeout_ms / 1000, self.settings.failure_timeout_s), _MAX_SILENCE_S
            )
            self._follow(vm, silence_s, follow)
            if not follow.reason:
                self._finish()
        except _StreamEnded as err:
            follow.reason = str(err)
        except Exception as err:  # (a replay or a check that failed: the stream ends as if broken)
            log.exception("%s: the stream from %s failed", vm.name, vm.primary_node)
            follow.reason = f"the backup's end of the stream failed: {err}"
        finally:
            if not follow.heard:
                self._on_loop(vm.fail(f"the primary's stream ended before the log ({follow.reason})"))
            elif follow.reason:
                # A stream that ends without the guest having stopped on the primary is a failover
                # (detached: nothing that ends this stream's thread may cut it short).
                self.loop.call_soon_threadsafe(self._lost, vm, follow.reason, follow.silent)

    def _handshake(self) -> tuple[BackupVm | None, vmft_pb2.Hello]:
        """Hello, and the backup VM it makes here (not yet answered); None if refused or denied."""
        stream = self.stream
        try:
            data = stream.recv(_HELLO_WAIT_S)
        except TimeoutError:
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello")
            return None, vmft_pb2.Hello()
        first = _parse(data) if data is not None else None
        if first is None or not first.HasField("hello"):
            if data is not None:
                self._send(refuse("the first message of a stream must be Hello"))
                self._finish()
            return None, vmft_pb2.Hello()
        hello = first.hello
        try:
            accepted = self._on_loop(self.accept(hello, stream))
        except Exception as err:  # (the arbiter unreachable, ...): the primary hears why
            log.warning("could not take %s from %s: %s", hello.spec.name, stream.peer(), err)
            self._finish(grpc.StatusCode.UNAVAILABLE, f"the backup node could not take the pair: {err}")
            return None, hello
        if isinstance(accepted, Denied):
            log.warning("refused replication from %s: %s", stream.peer(), accepted.why)
            self._finish(accepted.code, accepted.why)
            return None, hello
        if isinstance(accepted, str):
            log.warning(
                "refusing replication of %s from %s: %s", hello.spec.name, hello.primary_node, accepted
            )
            self._send(refuse(accepted))
            self._finish()
            return None, hello
        return accepted, hello

    def _lost(self, vm: BackupVm, reason: str, silent: bool) -> None:
        self.detach(vm.primary_lost(reason, silent=silent))

    def _seed(self, vm: BackupVm) -> bool:
        """Receive the primary's live checkpoint (manifest last) and restore the backup's VM from it."""
        try:
            while True:
                try:
                    data = self.stream.recv(_SEED_GAP_S)
                except TimeoutError:
                    raise ReplicationRefused(f"no checkpoint record for {_SEED_GAP_S:.0f} s") from None
                if data is None:
                    raise ReplicationRefused("the primary dropped the stream")
                message = _parse(data)
                if message is None or not message.HasField("checkpoint_record"):
                    raise ReplicationRefused("the checkpoint stream was interrupted by another message")
                record = message.checkpoint_record
                vm.checkpoint_records.append(record)  # (the loop reads them only once the manifest is in)
                if record[:1] == bytes([RecordType.MANIFEST]):
                    break
            stats = self._on_loop(vm.start_from_checkpoint())
        except Exception as err:  # (CheckpointError, ReplicationRefused, OSError, a KVM or disk error...)
            log.error("%s: seeding from a checkpoint failed: %s", vm.name, err)
            self._on_loop(vm.fail(f"seeding failed: {err}"))
            self._finish(grpc.StatusCode.ABORTED, f"seeding failed: {err}")
            return False
        log.warning(
            "%s: seeded from %s's checkpoint at position %d (%d MiB restored in %.0f ms)",
            vm.name, vm.primary_node, vm.standing.received, stats.raw_bytes >> 20, stats.seconds * 1000,
        )  # fmt: skip
        return True

    def _follow(self, vm: BackupVm, silence_s: float, follow: _Follow) -> None:
        """Read, acknowledge and hand over the log until it ends; `follow` says why ("" when the guest
        stopped on the primary), whether the primary went silent and whether it was ever heard."""
        stream = self.stream
        received = vm.standing.received
        last_heard = time.monotonic()
        while True:
            try:
                data = stream.recv(max(0.0, silence_s - (time.monotonic() - last_heard)))
            except TimeoutError:
                silent_ms = (time.monotonic() - last_heard) * 1000
                follow.reason, follow.silent = f"no word from the primary for {silent_ms:.0f} ms", True
                return
            if data is None:
                dropped = stream.cancelled()
                follow.reason = (
                    "the primary's connection dropped" if dropped else "the primary closed the stream"
                )
                return
            follow.heard = True
            last_heard = time.monotonic()
            if not vm.following():
                follow.reason = "the backup stopped following"
                return
            message = _parse(data)
            if message is None:
                follow.reason = "the primary sent a message that does not parse"
                return
            batch = message.batch if message.HasField("batch") else None
            if batch is not None:
                hops.hop("recv", batch.horizon)
                received = max(received, batch.horizon, batch.end_position)
            ack = vm.ack()
            ack.ack.received = max(ack.ack.received, received)
            hops.hop("ack", ack.ack.received)
            # The write before is long done (the primary reads every acknowledgement); a primary that
            # stopped reading is as good as silent.
            self._send(ack, silence_s)
            if batch is not None:
                # Straight to the replay (its vCPU thread waits on the queue): no trip through the loop.
                if not vm.on_batch(batch, len(data)):
                    follow.reason = "the backup refused the log"
                    return
                if batch.ended:
                    follow.reason = ""  # the guest stopped on the primary; replay finishes by itself
                    return


@dataclass
class _Follow:
    """How one stream's log ended (`_BackupEnd._follow`)."""

    heard: bool  # a message came after the HelloReply: the primary depends on this backup
    reason: str = "the primary's connection dropped"  # "" once the guest stopped on the primary
    silent: bool = False  # the primary went silent (a partition, or a dead host), not a broken stream


def _parse(data: bytes) -> vmft_pb2.PrimaryMessage | None:
    try:
        return vmft_pb2.PrimaryMessage.FromString(data)
    except DecodeError:
        return None
