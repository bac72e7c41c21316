"""The primary's sending side of the replication stream without KVM or gRPC (replica/replication.py
`_Outgoing`, the iterator gRPC's sending thread pulls from): control messages first, then the log from
the vCPU's hand-off merged into one message, heartbeats when idle, and the window of unacknowledged
messages that makes the log gather under load but never stalls it."""

from __future__ import annotations

import asyncio
import threading
import time

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


async def test_control_messages_go_first_then_the_log_merged_then_heartbeats() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing = _Outgoing(heartbeat_s=0.005)
    outgoing.put(vmft_pb2.PrimaryMessage(hello=vmft_pb2.Hello(primary_node="a")))
    for position in (1, 2, 3):
        sink.write_batch(_batch(position))
    outgoing.attach(sink, lambda: 42)
    assert next(outgoing).HasField("hello")
    message = next(outgoing)
    assert _positions(message) == [1, 2, 3] and message.batch.horizon == 3  # one message for the queue
    outgoing.acked(3)
    idle = next(outgoing)  # nothing logged for a heartbeat interval
    assert idle.HasField("heartbeat") and idle.heartbeat.position == 42


async def test_a_full_window_gathers_the_log_until_an_ack_frees_it() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing = _Outgoing(heartbeat_s=0.5, window=1)
    outgoing._window_wait = 0.5  # (long: this test is about the ack, not the time limit)
    outgoing.attach(sink, lambda: 0)
    sink.write_batch(_batch(1))
    assert _positions(next(outgoing)) == [1]  # an open window: out at once
    for position in (2, 3, 4):
        sink.write_batch(_batch(position))
    got: list[vmft_pb2.PrimaryMessage] = []
    sender = threading.Thread(target=lambda: got.append(next(outgoing)))
    sender.start()
    sender.join(0.1)
    assert sender.is_alive() and not got, "one message in flight: the log waits"
    outgoing.acked(1)
    sender.join(5)
    assert [_positions(m) for m in got] == [[2, 3, 4]]  # what gathered meanwhile, as one message


async def test_a_full_window_never_stalls_the_log_when_acks_are_late() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing = _Outgoing(heartbeat_s=0.005, window=1)
    outgoing.attach(sink, lambda: 0)
    sink.write_batch(_batch(1))
    next(outgoing)
    sink.write_batch(_batch(2))
    began = time.monotonic()
    message = next(outgoing)  # no ack ever comes (a lossy link): it goes out after the window's limit
    assert _positions(message) == [2] and time.monotonic() - began < 5.0
    for _ in range(3):  # and the backup keeps hearing from this primary
        assert next(outgoing).HasField("heartbeat")


async def test_the_last_batch_half_closes_the_stream_and_close_ends_it() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    outgoing = _Outgoing(heartbeat_s=0.005)
    outgoing.attach(sink, lambda: 0)
    sink.write_batch(_batch(7, ended=True))
    assert next(outgoing).batch.ended
    assert next(outgoing, None) is None  # StopIteration: gRPC half-closes the stream

    other = _Outgoing(heartbeat_s=10.0)
    other.attach(StreamSink(asyncio.get_running_loop()), lambda: 0)
    waiting = threading.Thread(target=lambda: next(other, None))
    waiting.start()
    other.close()  # a sender waiting for the log lets go at once
    waiting.join(5)
    assert not waiting.is_alive()
