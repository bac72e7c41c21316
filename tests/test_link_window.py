"""The primary's sending side of the replication stream without KVM or gRPC (replica/replication.py
`_Outgoing`, writing to a stand-in for the C-core stream): control messages first, then the log sent by
the thread that logged it (merged into one message), heartbeats when idle, the window of unacknowledged
messages that makes the log gather under load but never stalls it, and the half-close after the last
batch. tests/test_native_stream.py and tests/test_replication.py run the real stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from proto import vmft_pb2
from replica.replication import _Outgoing
from replica.stream_sink import StreamSink


def _batch(position: int, ended: bool = False) -> vmft_pb2.EventBatch:
    batch = vmft_pb2.EventBatch(horizon=position, first_position=position)
    batch.position_deltas.append(0)
    batch.rips.append(0)
    batch.kinds.append(vmft_pb2.EVENT_KIND_CLOCK)
    batch.values.append(position)
    batch.data.append(b"")
    if ended:
        batch.ended, batch.end_position, batch.end_reason = True, position, "exited"
    return batch


def _positions(message: vmft_pb2.PrimaryMessage) -> list[int]:
    batch = message.batch
    out, position = [], batch.first_position
    for delta in batch.position_deltas:
        position += delta
        out.append(position)
    return out


class _Wire:
    """Stands in for the C-core stream: records what is written; a write can be held 'in flight'."""

    def __init__(self) -> None:
        self.sent: list[vmft_pb2.PrimaryMessage] = []
        self.hold_writes = False  # writes stay in flight (the transport is busy) until released
        self.in_flight = False
        self.half_closed = False
        self.changed = threading.Condition()

    def start_send(self, data: bytes) -> bool:
        assert not self.in_flight, "one write in flight at a time"
        with self.changed:
            self.sent.append(vmft_pb2.PrimaryMessage.FromString(data))
            self.in_flight = self.hold_writes
            self.changed.notify_all()
        return True

    def send_done(self, timeout: float = -1) -> int:
        return -1 if self.in_flight else 1

    def done_writing(self) -> bool:
        with self.changed:
            self.half_closed = True
            self.changed.notify_all()
        return True

    def wait(self, what: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(what, timeout)


def _sending(outgoing: _Outgoing, wire: _Wire) -> threading.Thread:
    thread = threading.Thread(target=outgoing.run, args=(wire,), daemon=True)
    thread.start()
    return thread


async def test_control_messages_go_first_then_the_log_merged_then_heartbeats() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.005), _Wire()
    outgoing.put(vmft_pb2.PrimaryMessage(hello=vmft_pb2.Hello(primary_node="a")))
    for position in (1, 2, 3):
        sink.write_batch(_batch(position))
    outgoing.attach(sink, lambda: 42)
    sender = _sending(outgoing, wire)
    assert wire.wait(lambda: len(wire.sent) >= 2)
    assert wire.sent[0].HasField("hello")
    assert _positions(wire.sent[1]) == [1, 2, 3] and wire.sent[1].batch.horizon == 3  # one message
    outgoing.acked(3)
    assert wire.wait(lambda: len(wire.sent) >= 3)  # nothing logged for a heartbeat interval
    assert wire.sent[2].HasField("heartbeat") and wire.sent[2].heartbeat.position == 42
    outgoing.close()
    sender.join(5)
    assert not sender.is_alive()


async def test_the_thread_that_logs_sends_at_once_and_a_full_window_gathers_the_log() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.5, window=1), _Wire()
    outgoing._window_wait = 5.0  # (long: this test is about the ack, not the time limit)
    outgoing._stream = wire  # no sending thread: every write here is made by the caller's thread
    outgoing.attach(sink, lambda: 0)
    sink.write_batch(_batch(1))
    assert [_positions(m) for m in wire.sent] == [[1]]  # an open window: out at once, by write_batch
    for position in (2, 3, 4):
        sink.write_batch(_batch(position))
    assert len(wire.sent) == 1, "one message in flight: the log waits"
    outgoing.acked(1)  # the ack frees the window: what gathered goes out, as one message
    assert [_positions(m) for m in wire.sent] == [[1], [2, 3, 4]]


async def test_a_write_still_in_flight_holds_the_next_until_the_sending_thread_looks() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.005, window=4), _Wire()
    outgoing.attach(sink, lambda: 0)
    wire.hold_writes = True
    sender = _sending(outgoing, wire)
    sink.write_batch(_batch(1))
    assert wire.wait(lambda: len(wire.sent) == 1)
    sink.write_batch(_batch(2))  # the transport is still busy with the first write
    await asyncio.sleep(0.05)
    assert len(wire.sent) == 1
    wire.hold_writes = wire.in_flight = False  # it completes: the sending thread's next look sends
    assert wire.wait(lambda: len(wire.sent) == 2)
    assert _positions(wire.sent[1]) == [2]
    outgoing.close()
    sender.join(5)


async def test_a_full_window_never_stalls_the_log_when_acks_are_late() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.005, window=1), _Wire()
    outgoing.attach(sink, lambda: 0)
    sender = _sending(outgoing, wire)
    sink.write_batch(_batch(1))
    assert wire.wait(lambda: len(wire.sent) == 1)
    sink.write_batch(_batch(2))  # no ack ever comes (a lossy link): it goes out after the window's limit
    assert wire.wait(lambda: len(wire.sent) >= 2)
    assert _positions(wire.sent[1]) == [2]
    # and the backup keeps hearing from this primary
    assert wire.wait(lambda: sum(m.HasField("heartbeat") for m in wire.sent) >= 3)
    outgoing.close()
    sender.join(5)


async def test_a_sending_thread_asleep_for_a_heartbeat_still_looks_within_the_window_wait() -> None:
    """With nothing waiting to be sent the sending thread sleeps a heartbeat interval (here 3 s), not the
    1 ms it looks every while messages are in flight; a pump that must leave the log waiting (a full
    window, or a write still going out) wakes it, so the log still goes out within about 1 ms."""
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=3.0, window=1), _Wire()
    outgoing.attach(sink, lambda: 0)
    sender = _sending(outgoing, wire)
    sink.write_batch(_batch(1))
    assert wire.wait(lambda: len(wire.sent) == 1)
    await asyncio.sleep(0.05)  # the sending thread is asleep for the heartbeat interval by now
    sink.write_batch(_batch(2))  # the window is full and no ack comes
    assert wire.wait(lambda: len(wire.sent) == 2, timeout=1.0), "the log waited for a heartbeat interval"
    outgoing.acked(2)
    wire.hold_writes = True
    sink.write_batch(_batch(3))
    assert wire.wait(lambda: len(wire.sent) == 3)
    outgoing.acked(3)
    await asyncio.sleep(0.05)
    sink.write_batch(_batch(4))  # the transport is still busy with the last write
    await asyncio.sleep(0.05)
    assert len(wire.sent) == 3
    wire.hold_writes = wire.in_flight = False
    assert wire.wait(lambda: len(wire.sent) == 4, timeout=1.0), "the log waited for a heartbeat interval"
    assert [_positions(m) for m in wire.sent] == [[1], [2], [3], [4]]
    outgoing.close()
    sender.join(5)


async def test_the_last_batch_half_closes_the_stream_and_close_ends_it() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.005), _Wire()
    outgoing.attach(sink, lambda: 0)
    sender = _sending(outgoing, wire)
    sink.write_batch(_batch(7, ended=True))
    assert wire.wait(lambda: wire.half_closed)
    assert wire.sent[-1].batch.ended
    sender.join(5)
    assert not sender.is_alive()
    sink.write_batch(_batch(8))  # nothing is sent after the end
    assert not any(_positions(m) == [8] for m in wire.sent if m.HasField("batch"))

    other, idle = _Outgoing(heartbeat_s=10.0), _Wire()
    other.attach(StreamSink(asyncio.get_running_loop()), lambda: 0)
    waiting = _sending(other, idle)
    other.close()  # a sending thread waiting for the log lets go at once
    waiting.join(5)
    assert not waiting.is_alive() and not idle.half_closed


class _SlowForOneThread:
    """The send lock, but the sending thread dawdles before it takes it: the window in which a control
    message popped from the queue is not yet written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.slow: threading.Thread | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if blocking and threading.current_thread() is self.slow:
            time.sleep(0.05)
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


async def test_no_log_passes_a_control_message_still_on_its_way() -> None:
    """A checkpoint's last records may still be queued when the log is attached (re-protection): the
    backup must get every record, manifest last, before any batch, however the threads interleave."""
    sink = StreamSink(asyncio.get_running_loop())
    outgoing, wire = _Outgoing(heartbeat_s=0.005, window=64), _Wire()
    lock = _SlowForOneThread()
    outgoing._send_lock = lock  # type: ignore[assignment]
    outgoing.put(vmft_pb2.PrimaryMessage(checkpoint_record=b"manifest"))
    sender = threading.Thread(target=outgoing.run, args=(wire,), daemon=True)
    lock.slow = sender
    sender.start()
    await asyncio.sleep(0.01)  # the sending thread is on its way to write the record
    outgoing.attach(sink, lambda: 0)
    sink.write_batch(_batch(1))  # the vCPU logs meanwhile and pumps from here
    assert wire.wait(lambda: len(wire.sent) >= 2)
    assert [m.WhichOneof("body") for m in wire.sent[:2]] == ["checkpoint_record", "batch"]
    outgoing.close()
    sender.join(5)
