"""Record and replay of the nondeterministic event log.

`RecordJournal` logs every input at its position (with the guest RIP) and a hash of every output, in
column batches (proto EventBatch) handed to a sink: a log file, or the replication stream. Each batch
carries a *horizon*: every event at a position <= horizon has been sent. `ReplayJournal` consumes
batches, answers the guest's questions from them and checks it asks them at the same place; it may run
up to the horizon and then waits for more (a backup behind a live primary).

Log file: magic, a length-prefixed LogHeader, then frames (u32 length, u32 crc32, zstd-compressed
EventBatch). A truncated or corrupted file, or one recorded for another image, memory size or CPUID,
is refused with a message naming what is wrong.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import hashlib
import itertools
import logging
import queue
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import zstandard

from monitor import cpuid
from monitor.checkpoint.compat import Provenance, check_format, check_provenance
from monitor.errors import LogError
from monitor.guest_abi import ABI_VERSION, Vector
from monitor.journal import DivergenceError, EventKind, Journal, JournalMode, JournalStop, OutputKind
from monitor.loader import GuestImage
from proto import vmft_pb2

log = logging.getLogger(__name__)

LOG_MAGIC = b"VMFTLOG\x01"
# 2: state hashes cover every component's replicated state too (1: memory and registers only).
LOG_FORMAT_VERSION = 2
_FRAME = struct.Struct("<II")
_U32 = struct.Struct("<I")
MAX_FRAME = 64 << 20
DEFAULT_HASH_EVERY = 20000
OPTIONAL = 1  # the value of a Journal.data_if event (a data event has 0): what tells the two apart


def output_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def make_header(
    image: GuestImage, mem_size: int, start_position: int = 0, hash_every: int = 0
) -> vmft_pb2.LogHeader:
    return vmft_pb2.LogHeader(
        format_version=LOG_FORMAT_VERSION,
        abi_version=ABI_VERSION,
        image_sha256=image.sha256,
        mem_size=mem_size,
        cpuid_hash=cpuid.cpuid_hash(),
        start_position=start_position,
        hash_every=hash_every,
        started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def check_header(header: vmft_pb2.LogHeader, image: GuestImage, mem_size: int, what: str = "log") -> None:
    """Refuse a log recorded for another image, memory size, CPUID table, ABI or format (the checks
    checkpoints make too: monitor/checkpoint/compat.py)."""
    check_format(header.format_version, LOG_FORMAT_VERSION, what, "log", LogError)
    found = Provenance(header.abi_version, header.cpuid_hash, header.image_sha256, header.mem_size)
    check_provenance(found, image, mem_size, what, made=" was recorded", error=LogError)


# ----- sinks ------------------------------------------------------------------------------------


class BatchSink(Protocol):
    def write_batch(self, batch: vmft_pb2.EventBatch) -> None: ...

    def close(self) -> None: ...


class LogFileWriter:
    def __init__(self, path: str | Path, header: vmft_pb2.LogHeader, level: int = 3) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        raw = header.SerializeToString()
        self._file.write(LOG_MAGIC + _U32.pack(len(raw)) + raw)
        self._compressor = zstandard.ZstdCompressor(level=level)
        self.bytes_written = self._file.tell()
        self.frames = 0

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        frame = self._compressor.compress(batch.SerializeToString())
        self._file.write(_FRAME.pack(len(frame), zlib.crc32(frame)) + frame)
        self._file.flush()
        self.bytes_written += _FRAME.size + len(frame)
        self.frames += 1

    def close(self) -> None:
        self._file.close()


class LogFileReader:
    """Reads a log file; `header` is parsed at open, `batches()` verifies every frame."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._data = self.path.read_bytes()
        except OSError as err:
            raise LogError(f"{path}: cannot read log: {err.strerror}") from err
        data = self._data
        if data[: len(LOG_MAGIC)] != LOG_MAGIC:
            if not data:
                raise LogError(f"{path}: empty file, not a vmft event log")
            if LOG_MAGIC.startswith(data):
                raise LogError(f"{path}: truncated inside the magic number")
            raise LogError(f"{path}: not a vmft event log (bad magic)")
        offset = len(LOG_MAGIC)
        if len(data) < offset + 4:
            raise LogError(f"{path}: truncated inside the header")
        (length,) = _U32.unpack_from(data, offset)
        offset += 4
        if len(data) < offset + length:
            raise LogError(f"{path}: truncated inside the header")
        self.header = vmft_pb2.LogHeader()
        try:
            self.header.ParseFromString(data[offset : offset + length])
        except Exception as err:
            raise LogError(f"{path}: corrupted header: {err}") from err
        self._frames_at = offset + length

    def batches(self) -> Iterator[vmft_pb2.EventBatch]:
        data = self._data
        offset = self._frames_at
        decompressor = zstandard.ZstdDecompressor()
        index = 0
        while offset < len(data):
            if len(data) - offset < _FRAME.size:
                raise LogError(
                    f"{self.path}: truncated: frame {index} at byte {offset} has an incomplete header"
                )
            length, crc = _FRAME.unpack_from(data, offset)
            start = offset + _FRAME.size
            if length > MAX_FRAME or start + length > len(data):
                raise LogError(
                    f"{self.path}: truncated: frame {index} at byte {offset} needs {length} bytes, "
                    f"{len(data) - start} remain"
                )
            frame = data[start : start + length]
            if zlib.crc32(frame) != crc:
                raise LogError(f"{self.path}: corrupted: frame {index} at byte {offset} fails its checksum")
            self._check_declared_size(frame, index, offset)
            batch = vmft_pb2.EventBatch()
            try:
                batch.ParseFromString(decompressor.decompress(frame, max_output_size=MAX_FRAME))
            except Exception as err:
                raise LogError(f"{self.path}: corrupted: frame {index} at byte {offset}: {err}") from err
            yield batch
            offset = start + length
            index += 1

    def _check_declared_size(self, frame: bytes, index: int, offset: int) -> None:
        """zstandard honours `max_output_size` only for frames that do not declare their size: one that
        declares more is refused before anything is allocated (a few KB of log could otherwise take GBs)."""
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as err:
            raise LogError(f"{self.path}: corrupted: frame {index} at byte {offset}: {err}") from err
        if declared > MAX_FRAME:
            raise LogError(
                f"{self.path}: corrupted: frame {index} at byte {offset} declares {declared} bytes "
                f"decompressed, more than a frame may hold ({MAX_FRAME})"
            )


# ----- recording ---------------------------------------------------------------------------------


@dataclass
class RecordStats:
    events: int = 0
    batches: int = 0
    state_hashes: int = 0
    outputs: int = 0


class RecordJournal:
    mode = JournalMode.RECORD

    def __init__(
        self,
        sink: BatchSink,
        start_position: int = 0,
        hash_every: int = DEFAULT_HASH_EVERY,
        hash_interval_s: float = 0.0,
        batch_events: int = 1024,
        flush_interval_s: float = 0.05,
        flush_on_output: bool = False,
    ) -> None:
        self._sink = sink
        self.position = start_position
        self._first = start_position
        self.hash_every = hash_every
        self._next_hash = start_position + hash_every if hash_every else -1
        self._hash_interval = hash_interval_s
        self._next_hash_time = time.monotonic() + hash_interval_s if hash_interval_s else float("inf")
        self._batch_events = batch_events
        self._flush_interval = flush_interval_s
        self._flush_on_output = flush_on_output
        self._last_flush = time.monotonic()
        self._urgent = False
        self._lock = threading.Lock()  # flushes may come from the idle path and a control thread
        self._positions: list[int] = []
        self._rips: list[int] = []
        self._kinds: list[Any] = []
        self._values: list[int] = []
        self._data: list[bytes] = []
        self._rip: Callable[[], int] = lambda: 0
        self.stats = RecordStats()
        self.finished = False

    def bind(self, rip: Callable[[], int], request_stop: Callable[[], None]) -> None:
        self._rip = rip

    def _append(self, kind: EventKind, value: int, data: bytes) -> None:
        self._positions.append(self.position)
        self._rips.append(self._rip())
        self._kinds.append(kind)
        self._values.append(value)
        self._data.append(data)

    def value(self, kind: EventKind, live: Callable[[], int]) -> int:
        result = live()
        self._append(kind, result, b"")
        return result

    def data(self, kind: EventKind, live: Callable[[], bytes]) -> bytes:
        result = live()
        self._append(kind, 0, result)
        return result

    def data_if(self, kind: EventKind, live: Callable[[], bytes | None]) -> bytes | None:
        result = live()
        if result is not None:
            self._append(kind, OPTIONAL, result)
        return result

    def irq(self, vector: Vector) -> None:
        self._append(EventKind.IRQ, int(vector), b"")

    def due_irqs(self) -> list[Vector]:
        return []

    def output(self, kind: OutputKind, data: bytes) -> bool:
        self._append(EventKind.OUTPUT, int(kind), output_hash(data))
        self.stats.outputs += 1
        if self._flush_on_output:
            self._urgent = True
        return True

    def at_exit(self, position: int) -> None:
        self.position = position
        if self._urgent or len(self._positions) >= self._batch_events:
            self.flush(position - 1)
        elif self._flush_interval and time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush(position - 1)

    def exit_done(self, position: int) -> None:
        if self._urgent:
            self.flush(position)

    def switch_sink(self, sink: BatchSink, position: int) -> None:
        """At a synchronous exit with the vCPU parked at `position` (a checkpoint's pause): every event up
        to `position` goes to the old sink, every later one to `sink` (a new backup seeded from that
        checkpoint)."""
        self.flush(position)
        with self._lock:
            self._sink = sink

    def idle(self) -> None:
        """The guest is blocked: everything before the current position can go out."""
        self.flush(self.position - 1)

    def cancel_wait(self) -> None:
        pass

    def state_hash_due(self, position: int) -> bool:
        if position == self._next_hash:
            return True
        return self._hash_interval > 0 and time.monotonic() >= self._next_hash_time

    def state_hash(self, digest: bytes) -> None:
        self._append(EventKind.STATE_HASH, 0, digest)
        self.stats.state_hashes += 1
        if self.hash_every:
            self._next_hash = self.position + self.hash_every
        if self._hash_interval:
            self._next_hash_time = time.monotonic() + self._hash_interval

    def finish(self, digest: bytes, reason: str) -> None:
        if self.finished:
            return
        self._append(EventKind.STATE_HASH, 1, digest)
        self.stats.state_hashes += 1
        self.flush(self.position, ended=True, reason=reason)
        self.finished = True
        self._sink.close()

    def flush(self, horizon: int, ended: bool = False, reason: str = "") -> None:
        with self._lock:
            # Only events up to the horizon go: those of the exit still being handled (the guest blocked
            # in it, `idle`) stay until it is done. A backup that held them beyond its horizon would replay
            # to the horizon, then find events it never replayed where it should go live (DivergenceError).
            cut = len(self._positions) if ended else bisect.bisect_right(self._positions, horizon)
            positions = self._positions[:cut]
            if not positions and not ended and horizon <= self._first:
                return
            batch = vmft_pb2.EventBatch(horizon=max(horizon, 0))
            if positions:
                batch.first_position = positions[0]
                batch.position_deltas.extend([b - a for a, b in zip([positions[0], *positions], positions)])
                batch.rips.extend(self._rips[:cut])
                batch.kinds.extend(self._kinds[:cut])
                batch.values.extend(self._values[:cut])
                batch.data.extend(self._data[:cut])
            if ended:
                batch.ended = True
                batch.end_position = self.position
                batch.end_reason = reason
            self.stats.events += len(positions)
            self.stats.batches += 1
            if cut == len(self._positions):
                self._positions, self._rips, self._kinds, self._values, self._data = [], [], [], [], []
                self._urgent = False
            else:  # what stays may hold an output: still urgent at its exit's end
                del self._positions[:cut], self._rips[:cut], self._kinds[:cut], self._values[:cut]
                del self._data[:cut]
            self._last_flush = time.monotonic()
            self._first = horizon
            self._sink.write_batch(batch)


# ----- replay --------------------------------------------------------------------------------------


class BatchSource(Protocol):
    def next_batch(self, timeout: float) -> vmft_pb2.EventBatch | None:
        """The next batch, or None if none came within `timeout`. Raises JournalStop when there will be
        no more (the log ended, or the stream closed)."""
        ...


class IteratorSource:
    """Batches from an iterator (a log file): never waits."""

    def __init__(self, batches: Iterator[vmft_pb2.EventBatch], what: str = "log") -> None:
        self._batches = batches
        self._what = what

    def next_batch(self, timeout: float) -> vmft_pb2.EventBatch | None:
        try:
            return next(self._batches)
        except StopIteration:
            raise JournalStop(
                f"the {self._what} ends here without an end marker (the recording did not finish)"
            ) from None


class QueueSource:
    """Batches handed over by another thread (the replication stream). `close()` ends the log: once the
    queued batches are drained, `next_batch` raises JournalStop."""

    def __init__(self) -> None:
        self._queue: queue.Queue[vmft_pb2.EventBatch | None] = queue.Queue()
        self.closed = False

    def put(self, batch: vmft_pb2.EventBatch) -> None:
        self._queue.put(batch)

    def close(self) -> None:
        self.closed = True
        self._queue.put(None)

    def next_batch(self, timeout: float) -> vmft_pb2.EventBatch | None:
        try:
            batch = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if batch is None:
            self._queue.put(None)  # stay closed for later calls
            raise JournalStop("the log stream has ended")
        return batch


Event = tuple[int, int, int, int, bytes]  # position, rip, kind, value, data


@dataclass
class ReplayStats:
    events: int = 0
    state_hashes: int = 0
    outputs: int = 0
    end_reason: str = ""


class ReplayJournal:
    mode = JournalMode.REPLAY

    def __init__(self, source: BatchSource, start_position: int = 0) -> None:
        self._source = source
        self._events: collections.deque[Event] = collections.deque()
        self.horizon = start_position
        self.position = start_position
        self.end_position: int | None = None
        self._rip: Callable[[], int] = lambda: 0
        self._request_stop: Callable[[], None] = lambda: None
        self.stats = ReplayStats()
        self.stopping = False  # set by the owner to abandon a wait for more log
        self.waiting = False  # the vCPU thread is blocked in at_exit for more log
        # A backup going live: when the log has ended and is drained, `promote(position)` returns the
        # journal the machine continues with (recording), and this one delegates to it from then on.
        self.promote: Callable[[int], Journal] | None = None
        self.delegate: Journal | None = None

    def bind(self, rip: Callable[[], int], request_stop: Callable[[], None]) -> None:
        self._rip = rip
        self._request_stop = request_stop

    def _go_live(self, position: int) -> None:
        assert self.promote is not None
        if self._events:
            pos, _rip, kind, _value, _data = self._events[0]
            raise DivergenceError(
                pos, "an event the guest never asked for", EventKind(kind).name, "promotion"
            )
        self.delegate = self.promote(position)
        self.delegate.bind(self._rip, self._request_stop)
        self.mode = self.delegate.mode

    def _take_batch(self, batch: vmft_pb2.EventBatch) -> None:
        positions = itertools.accumulate(batch.position_deltas, initial=batch.first_position)
        next(positions)
        self._events.extend(zip(positions, batch.rips, batch.kinds, batch.values, batch.data))
        self.horizon = max(self.horizon, batch.horizon)
        if batch.ended:
            self.end_position = batch.end_position
            self.horizon = max(self.horizon, batch.end_position)
            self.stats.end_reason = batch.end_reason

    def exit_done(self, position: int) -> None:
        if self.delegate is not None:
            self.delegate.exit_done(position)

    def at_exit(self, position: int) -> None:
        if self.delegate is not None:
            self.delegate.at_exit(position)
            return
        self.position = position
        events = self._events
        if events and events[0][0] < position:
            pos, _rip, kind, _value, _data = events[0]
            raise DivergenceError(
                pos, "an event the guest never asked for", EventKind(kind).name, "the guest moved on"
            )
        try:
            while position > self.horizon and self.end_position is None:
                self.waiting = True  # blocked here for more log: the watchdog must not call it a hang
                if self.stopping:
                    raise JournalStop(f"replay stopped at position {position - 1}")
                try:
                    batch = self._source.next_batch(0.05)
                except JournalStop:
                    if self.promote is None:
                        raise
                    self._go_live(position)
                    assert self.delegate is not None
                    self.delegate.at_exit(position)
                    return
                if batch is not None:
                    self._take_batch(batch)
        finally:
            self.waiting = False
        if self.end_position is not None:
            if position > self.end_position:
                raise JournalStop(f"replay ran past the end of the log ({self.end_position})")
            if position == self.end_position:
                self._request_stop()

    def _next(self, kind: EventKind) -> Event:
        events = self._events
        position = self.position
        if not events or events[0][0] != position:
            found = f"none (next at {events[0][0]})" if events else "none"
            raise DivergenceError(
                position, f"the guest asked for {kind.name}", "an event of that kind here", found
            )
        event = events.popleft()
        if event[2] != kind:
            raise DivergenceError(position, "event kind", EventKind(event[2]).name, kind.name)
        rip = self._rip()
        if event[1] != rip:
            raise DivergenceError(position, f"guest RIP at {kind.name}", hex(event[1]), hex(rip))
        self.stats.events += 1
        return event

    def value(self, kind: EventKind, live: Callable[[], int]) -> int:
        if self.delegate is not None:
            return self.delegate.value(kind, live)
        return self._next(kind)[3]

    def data(self, kind: EventKind, live: Callable[[], bytes]) -> bytes:
        if self.delegate is not None:
            return self.delegate.data(kind, live)
        return self._next(kind)[4]

    def data_if(self, kind: EventKind, live: Callable[[], bytes | None]) -> bytes | None:
        if self.delegate is not None:
            return self.delegate.data_if(kind, live)
        events = self._events
        if events and events[0][0] == self.position and events[0][2] == kind and events[0][3] == OPTIONAL:
            return self._next(kind)[4]
        return None

    def irq(self, vector: Vector) -> None:
        if self.delegate is not None:
            return self.delegate.irq(vector)
        raise AssertionError("a replaying machine never raises interrupts from live news")

    def due_irqs(self) -> list[Vector]:
        if self.delegate is not None:
            return self.delegate.due_irqs()
        events = self._events
        position = self.position
        due: list[Vector] = []
        while events and events[0][0] == position and events[0][2] == EventKind.IRQ:
            due.append(Vector(self._next(EventKind.IRQ)[3]))
        return due

    def output(self, kind: OutputKind, data: bytes) -> bool:
        if self.delegate is not None:
            return self.delegate.output(kind, data)
        event = self._next(EventKind.OUTPUT)
        if event[3] != kind or event[4] != output_hash(data):
            raise DivergenceError(
                self.position,
                "output",
                f"{OutputKind(event[3]).name} {event[4].hex()}",
                f"{kind.name} {output_hash(data).hex()}",
            )
        self.stats.outputs += 1
        return False

    def idle(self) -> None:
        if self.delegate is not None:
            return self.delegate.idle()
        pass

    def cancel_wait(self) -> None:
        self.stopping = True

    def state_hash_due(self, position: int) -> bool:
        if self.delegate is not None:
            return self.delegate.state_hash_due(position)
        events = self._events
        return (
            bool(events)
            and events[0][0] == position
            and events[0][2] == EventKind.STATE_HASH
            and events[0][3] == 0
        )

    def state_hash(self, digest: bytes) -> None:
        if self.delegate is not None:
            return self.delegate.state_hash(digest)
        event = self._next(EventKind.STATE_HASH)
        if event[4] != digest:
            raise DivergenceError(self.position, "state hash", event[4].hex(), digest.hex())
        self.stats.state_hashes += 1

    def finish(self, digest: bytes, reason: str) -> None:
        if self.delegate is not None:
            return self.delegate.finish(digest, reason)
        events = self._events
        if self.end_position is None or self.position != self.end_position:
            return  # stopped early (a backup promoted, or replay interrupted): nothing final to check
        if not events or events[0][2] != EventKind.STATE_HASH:
            raise DivergenceError(self.position, "final state hash", "a final hash", "no such event")
        event = events.popleft()
        if event[4] and event[4] != digest:  # b"" recorded: the recording stopped between exits
            found = digest.hex() or "none (replay stopped between synchronous exits)"
            raise DivergenceError(self.position, "final state hash", event[4].hex(), found)
        self.stats.state_hashes += 1
        if events:
            raise DivergenceError(self.position, "end of log", "no more events", f"{len(events)} more")


# ----- whole-file use ------------------------------------------------------------------------------


def open_recording(
    path: str | Path, image: GuestImage, mem_size: int, hash_every: int = DEFAULT_HASH_EVERY
) -> RecordJournal:
    writer = LogFileWriter(path, make_header(image, mem_size, hash_every=hash_every))
    return RecordJournal(writer, hash_every=hash_every)


@dataclass
class ReplayReport:
    verdict: str  # "identical", "diverged", "incomplete"
    message: str
    positions: int
    events: int
    state_hashes: int
    outputs: int
    seconds: float


def open_replay(path: str | Path, image: GuestImage, mem_size: int) -> ReplayJournal:
    reader = LogFileReader(path)
    check_header(reader.header, image, mem_size, what=str(path))
    batches = list(reader.batches())  # verify every frame before replaying anything
    return ReplayJournal(
        IteratorSource(iter(batches), what=str(path)), start_position=reader.header.start_position
    )
