"""The hand-off of log batches from the vCPU thread to the replication stream.

The vCPU thread queues each batch and calls `on_write` (replica/replication.py: the stream's pump, which
sends from the calling thread when the window allows): no thread is woken and there is no trip through the
event loop between the guest's exit and the write. An async `take` remains for callers on the event loop
(it wakes the loop only while one is waiting).

Policy when the backup is slow: the buffer holds up to `max_pending` batches; beyond that the vCPU waits
(the guest is throttled, never silently) and a warning says so. Outputs are held by the output rule
anyway, so throttling loses nothing. When the pair is unprotected (`discard`, set by `drop_all` when the
VM's Standing runs alone: roles.py), batches are dropped.

Also here, the pure batch arithmetic: merging a drained queue into one stream message (`merge_batches`)
and cutting the window of a retained batch a restart replays (`window_batch`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from collections.abc import Callable

from proto import vmft_pb2
from replica import hops

log = logging.getLogger(__name__)


class StreamSink:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 4096) -> None:
        self._loop = loop
        self._pending: collections.deque[vmft_pb2.EventBatch] = collections.deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._signalled = False  # a wake-up of the loop is on its way (set and cleared under _cond)
        self._loop_waiting = False  # an async `take` waits for the loop to be woken (under _cond)
        self._max_pending = max_pending
        self.discard = False
        self.throttled = 0  # times the vCPU had to wait for the stream
        # The log since the primary's latest checkpoint, kept to restart the guest from that checkpoint
        # (bounded: each checkpoint starts it afresh).
        self.retained: list[vmft_pb2.EventBatch] = []
        # Called on the vCPU thread after each batch is queued (the attached stream sends from there).
        self.on_write: Callable[[], None] | None = None

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        """vCPU thread."""
        self.retained.append(batch)
        if self.discard:
            return
        hops.hop("flush", batch.horizon)
        with self._cond:
            self._pending.append(batch)
            if len(self._pending) > self._max_pending:
                self.throttled += 1
                log.warning("replication backlog of %d batches: throttling the vCPU", len(self._pending))
                while len(self._pending) > self._max_pending // 2 and not self.discard:
                    self._cond.wait(0.1)
            wake_loop = self._loop_waiting and not self._signalled
            self._signalled = self._signalled or wake_loop
        if wake_loop:  # an async `take` waits (else none does, or it has yet to take this batch too)
            self._loop.call_soon_threadsafe(self._ready.set)
        on_write = self.on_write
        if on_write is not None:
            on_write()

    def close(self) -> None:
        pass  # the stream outlives a finished recording until its last batch is sent

    def drop_all(self) -> None:
        """Unprotected from now on: forget what was queued and let a throttled vCPU go."""
        with self._cond:
            self.discard = True
            self._pending.clear()
            self._cond.notify_all()

    async def take(self, wait_s: float) -> list[vmft_pb2.EventBatch]:
        """Event loop: the queued batches, waiting up to `wait_s` for at least one (a loop timer bounds
        the wait: no task per call, as asyncio.wait_for would make)."""
        with self._cond:
            wait = not self._pending
            self._loop_waiting = wait
        if wait:
            timer = self._loop.call_later(wait_s, self._ready.set)
            try:
                await self._ready.wait()
            finally:
                timer.cancel()
        self._ready.clear()
        with self._cond:
            self._loop_waiting = False
            return self._drain()

    def take_nowait(self) -> list[vmft_pb2.EventBatch]:
        """Any thread: the queued batches, now (maybe none)."""
        with self._cond:
            return self._drain() if self._pending else []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _drain(self) -> list[vmft_pb2.EventBatch]:
        batches = take_bounded(self._pending, MAX_MESSAGE_BYTES)  # what is left goes in the next message
        self._signalled = False
        self._cond.notify_all()  # a throttled vCPU
        return batches


# One replication message carries at most this much log: far under gRPC's 4 MiB message limit (the audit
# saw a guest logging fast while its backup paused for 150 ms make one 37 MB message, which broke the
# stream and failed a healthy pair over), and small enough to keep the stream's latency even.
MAX_MESSAGE_BYTES = 1 << 20


def take_bounded(pending: collections.deque[vmft_pb2.EventBatch], limit: int) -> list[vmft_pb2.EventBatch]:
    """Take batches from the front of `pending` while together they stay under `limit` bytes (always
    at least one, unless `pending` is empty); a single batch over `limit` is cut by events, its tail
    put back in front. The rest stays queued for the next message."""
    out: list[vmft_pb2.EventBatch] = []
    total = 0
    while pending:
        size = pending[0].ByteSize()
        if out and total + size > limit:
            break
        batch = pending.popleft()
        if size > limit:
            pieces = split_batch(batch, limit)
            pending.extendleft(reversed(pieces[1:]))
            out.append(pieces[0])
            break
        out.append(batch)
        total += size
    return out


def split_batch(batch: vmft_pb2.EventBatch, limit: int) -> list[vmft_pb2.EventBatch]:
    """`batch` cut by events into consecutive batches of about `limit` bytes at most (an event larger
    than that goes alone). Each piece but the last is open: its horizon ends before the next piece's
    first event; the last keeps the horizon and the end marker."""
    positions = list(itertools.accumulate(batch.position_deltas, initial=batch.first_position))[1:]
    starts = [0]
    size = 0
    data = batch.data
    for i in range(len(positions)):
        cost = (len(data[i]) if i < len(data) else 0) + 32  # the event's columns, roughly
        if size and size + cost > limit:
            starts.append(i)
            size = 0
        size += cost
    if len(starts) == 1:
        return [batch]
    pieces = []
    for n, first in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(positions)
        piece = vmft_pb2.EventBatch(first_position=positions[first])
        piece.position_deltas.extend(
            [0, *(b - a for a, b in zip(positions[first : end - 1], positions[first + 1 : end]))]
        )
        piece.rips.extend(batch.rips[first:end])
        piece.kinds.extend(batch.kinds[first:end])
        piece.values.extend(batch.values[first:end])
        piece.data.extend(batch.data[first:end])
        if end < len(positions):
            piece.horizon = positions[end] - 1
        else:
            piece.horizon = batch.horizon
            piece.end_position, piece.ended, piece.end_reason = (
                batch.end_position, batch.ended, batch.end_reason,
            )  # fmt: skip
        pieces.append(piece)
    return pieces


def merge_batches(batches: list[vmft_pb2.EventBatch]) -> vmft_pb2.EventBatch:
    """One batch carrying the events of `batches` (consecutive, in order), the highest horizon and the
    end marker of the last: one stream message, and one acknowledgement, for a whole drained queue."""
    if len(batches) == 1:
        return batches[0]
    out = vmft_pb2.EventBatch()
    last = 0  # position of the last event in `out`
    started = False
    for batch in batches:
        deltas = batch.position_deltas
        if deltas:
            if not started:
                out.first_position = batch.first_position
                out.position_deltas.extend(deltas)
                started = True
            else:
                out.position_deltas.append(batch.first_position + deltas[0] - last)
                out.position_deltas.extend(deltas[1:])
            last = batch.first_position + sum(deltas)
            out.rips.extend(batch.rips)
            out.kinds.extend(batch.kinds)
            out.values.extend(batch.values)
            out.data.extend(batch.data)
        out.horizon = max(out.horizon, batch.horizon)
        if batch.ended:
            out.ended = True
            out.end_position = batch.end_position
            out.end_reason = batch.end_reason
    return out


def window_batch(batch: vmft_pb2.EventBatch, after: int, last: int) -> vmft_pb2.EventBatch:
    """The events of `batch` at positions in (after, last], as an open batch (no end marker): the part of
    a retained batch a restart replays onto a checkpoint at `after`, up to the last reply seen at `last`."""
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
