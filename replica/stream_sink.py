"""The hand-off of log batches from the vCPU thread to the replication stream on the event loop.

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

from proto import vmft_pb2

log = logging.getLogger(__name__)


class StreamSink:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 4096) -> None:
        self._loop = loop
        self._pending: collections.deque[vmft_pb2.EventBatch] = collections.deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._signalled = False  # a wake-up of the loop is on its way (set and cleared under _cond)
        self._max_pending = max_pending
        self.discard = False
        self.throttled = 0  # times the vCPU had to wait for the stream
        # The log since the primary's latest checkpoint, kept to restart the guest from that checkpoint
        # (bounded: each checkpoint starts it afresh).
        self.retained: list[vmft_pb2.EventBatch] = []

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        """vCPU thread."""
        self.retained.append(batch)
        if self.discard:
            return
        with self._cond:
            self._pending.append(batch)
            if len(self._pending) > self._max_pending:
                self.throttled += 1
                log.warning("replication backlog of %d batches: throttling the vCPU", len(self._pending))
                while len(self._pending) > self._max_pending // 2 and not self.discard:
                    self._cond.wait(0.1)
            if self._signalled:
                return  # the loop has not taken the queue yet: it will find this batch with the others
            self._signalled = True
        self._loop.call_soon_threadsafe(self._ready.set)

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
        if not self._pending:
            timer = self._loop.call_later(wait_s, self._ready.set)
            try:
                await self._ready.wait()
            finally:
                timer.cancel()
        self._ready.clear()
        with self._cond:
            batches = list(self._pending)
            self._pending.clear()
            self._signalled = False
            self._cond.notify_all()
        return batches


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
