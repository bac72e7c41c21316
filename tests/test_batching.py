"""Log batching without KVM: the hand-off from the vCPU thread (replica/stream_sink.py), merging a drained
queue into one stream message, and the window of a retained batch a restart replays."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading

from monitor.journal import EventKind, OutputKind
from monitor.record import RecordJournal
from proto import vmft_pb2
from replica.stream_sink import StreamSink, merge_batches, window_batch


def _batch(positions: list[int], horizon: int = 0, ended: bool = False) -> vmft_pb2.EventBatch:
    batch = vmft_pb2.EventBatch(horizon=horizon or (positions[-1] if positions else 0))
    if positions:
        batch.first_position = positions[0]
        batch.position_deltas.extend([b - a for a, b in zip([positions[0], *positions], positions)])
        batch.rips.extend(p * 16 for p in positions)
        batch.kinds.extend(vmft_pb2.EVENT_KIND_CLOCK for _ in positions)
        batch.values.extend(p + 1000 for p in positions)
        batch.data.extend(str(p).encode() for p in positions)
    if ended:
        batch.ended = True
        batch.end_position = batch.horizon
        batch.end_reason = "exited"
    return batch


def _positions(batch: vmft_pb2.EventBatch) -> list[int]:
    return list(itertools.accumulate(batch.position_deltas, initial=batch.first_position))[1:]


def test_merging_keeps_every_event_in_order_with_the_highest_horizon_and_the_end() -> None:
    batches = [_batch([3, 5, 9]), _batch([], horizon=12), _batch([14, 14, 20]), _batch([25], 30, ended=True)]
    merged = merge_batches(batches)
    assert _positions(merged) == [3, 5, 9, 14, 14, 20, 25]
    assert list(merged.data) == [b"3", b"5", b"9", b"14", b"14", b"20", b"25"]
    assert list(merged.rips) == [p * 16 for p in _positions(merged)]
    assert list(merged.values) == [p + 1000 for p in _positions(merged)]
    assert merged.horizon == 30 and merged.ended and merged.end_position == 30
    assert merged.end_reason == "exited"


def test_merging_one_batch_is_that_batch_and_empty_batches_carry_only_the_horizon() -> None:
    one = _batch([1, 2])
    assert merge_batches([one]) is one
    merged = merge_batches([_batch([], horizon=4), _batch([], horizon=7)])
    assert not merged.position_deltas and merged.horizon == 7 and not merged.ended


def test_a_window_keeps_the_events_after_the_checkpoint_up_to_the_last_reply() -> None:
    batch = _batch([10, 12, 12, 15, 19, 25], horizon=26)
    window = window_batch(batch, after=12, last=19)
    assert _positions(window) == [15, 19]
    assert list(window.data) == [b"15", b"19"] and list(window.values) == [1015, 1019]
    assert window.horizon == 19 and not window.ended  # an open batch: replay continues live after it


def test_a_window_of_nothing_keeps_the_horizon_and_a_window_of_everything_keeps_all() -> None:
    batch = _batch([10, 12, 15], horizon=15)
    empty = window_batch(batch, after=15, last=40)
    assert not empty.position_deltas and empty.horizon == 15
    everything = window_batch(batch, after=0, last=15)
    assert _positions(everything) == [10, 12, 15] and list(everything.data) == list(batch.data)


def test_windows_of_a_merged_stream_equal_the_merged_windows() -> None:
    batches = [_batch([1, 4, 4]), _batch([6, 9]), _batch([11, 13, 18])]
    merged_then_cut = window_batch(merge_batches(batches), after=4, last=13)
    cut_then_merged = merge_batches([window_batch(b, after=4, last=13) for b in batches])
    assert _positions(merged_then_cut) == _positions(cut_then_merged) == [6, 9, 11, 13]


async def test_the_sink_hands_batches_from_the_vcpu_thread_to_the_loop_and_retains_them() -> None:
    sink = StreamSink(asyncio.get_running_loop())
    assert await sink.take(0.01) == []  # nothing: the bounded wait ends

    def vcpu() -> None:
        for position in range(1, 101):
            sink.write_batch(_batch([position]))

    writer = threading.Thread(target=vcpu)
    writer.start()
    received: list[int] = []
    while len(received) < 100:
        for batch in await sink.take(1.0):
            received.extend(_positions(batch))
    writer.join(5)
    assert received == list(range(1, 101))
    assert [_positions(b)[0] for b in sink.retained] == list(range(1, 101))  # kept for a restart


async def test_a_full_sink_throttles_the_vcpu_until_the_stream_drains() -> None:
    sink = StreamSink(asyncio.get_running_loop(), max_pending=8)
    done = threading.Event()

    def vcpu() -> None:
        for position in range(1, 21):
            sink.write_batch(_batch([position]))
        done.set()

    thread = threading.Thread(target=vcpu)
    thread.start()
    await asyncio.sleep(0.3)
    assert not done.is_set() and sink.throttled >= 1, "the vCPU waits instead of queueing without bound"
    taken: list[int] = []
    while not done.is_set() or len(taken) < 20:
        for batch in await sink.take(0.05):
            taken.extend(_positions(batch))
        if len(taken) >= 20:
            break
    thread.join(5)
    assert taken == list(range(1, 21))


async def test_an_unprotected_sink_drops_batches_and_lets_a_throttled_vcpu_go() -> None:
    sink = StreamSink(asyncio.get_running_loop(), max_pending=2)
    done = threading.Event()

    def vcpu() -> None:
        for position in range(1, 10):
            sink.write_batch(_batch([position]))
        done.set()

    thread = threading.Thread(target=vcpu)
    thread.start()
    await asyncio.sleep(0.2)
    assert not done.is_set()
    sink.drop_all()
    thread.join(5)
    assert done.is_set() and sink.discard
    assert await sink.take(0.01) == []
    assert len(sink.retained) == 9  # a restart still has the log


class _Collect:
    def __init__(self) -> None:
        self.batches: list[vmft_pb2.EventBatch] = []

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        pass


def test_a_batch_never_carries_events_beyond_its_horizon() -> None:
    """The guest blocks in exit 7 after an event there (`idle` flushes what is complete: up to 6): that
    event stays until exit 7 is done, or a backup would hold an event it never replays where it goes live."""
    sink = _Collect()
    journal = RecordJournal(sink, flush_on_output=True)
    for position in (5, 6, 7):
        journal.at_exit(position)
        journal.value(EventKind.CLOCK, functools.partial(int, position * 10))
    journal.output(OutputKind.NET, b"reply at 7")
    journal.idle()  # blocked in exit 7
    assert [(_positions(b), b.horizon) for b in sink.batches] == [([5, 6], 6)]
    journal.exit_done(7)  # exit 7 handled: its events (its output among them) go at once
    assert [(_positions(b), b.horizon) for b in sink.batches[1:]] == [([7, 7], 7)]
    journal.at_exit(8)
    journal.finish(b"digest", "exited")
    last = sink.batches[-1]
    assert last.ended and _positions(last) == [8] and last.end_position == 8
