"""Helpers for the record/replay tests: record a guest under load, replay a log, and rewrite a log
through the file format (for tampering)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.journal import EventKind
from monitor.loader import load_image_file
from monitor.builder import MachineConfig, build
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import NicServer
from monitor.record import (
    DEFAULT_HASH_EVERY,
    BatchSink,
    LogFileReader,
    LogFileWriter,
    QueueSource,
    RecordJournal,
    RecordStats,
    ReplayJournal,
    ReplayStats,
    make_header,
    open_replay,
)
from proto import vmft_pb2
from replica.kv_client import KvClient, KvError

MEM_MIB = 64
_LEN = struct.Struct(">I")


@dataclass
class Recording:
    log: Path
    result: MachineResult
    digest: bytes  # Machine.state_digest() of the recording machine once it stopped
    stats: RecordStats
    console: bytes
    arg: int = 0
    disk_before: Path | None = None  # a copy of the disk as it was before recording (replay starts from it)
    disk_after: bytes | None = None
    replies: list[str] = field(default_factory=list)  # what clients saw


@dataclass
class Replayed:
    result: MachineResult
    digest: bytes
    stats: ReplayStats
    end_position: int | None
    seconds: float


def disk_copy(disk: Path | None, dest: Path) -> Path | None:
    if disk is None:
        return None
    shutil.copyfile(disk, dest)
    return dest


def make_disk(path: Path, size: int, rng: random.Random | None = None) -> Path:
    with open(path, "wb") as f:
        if rng is None:
            f.truncate(size)
        else:
            f.write(rng.randbytes(size))
    return path


class Kicker:
    """Asynchronous exits at random times (signals into KVM_RUN), on the recording side only: they must
    change nothing the guest can observe."""

    def __init__(self, machine: Machine, rng: random.Random, mean_s: float = 0.002) -> None:
        self._machine = machine
        self._rng = rng
        self._mean = mean_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kicker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.expovariate(1 / self._mean)):
            if self._machine.result is not None:
                return
            self._machine.kick()

    def __enter__(self) -> Kicker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def new_machine(
    image: Path,
    journal: RecordJournal | ReplayJournal,
    arg: int = 0,
    disk: Path | None = None,
    hang_timeout: float = 3.0,
) -> Machine:
    return build(
        MachineConfig(str(image), MEM_MIB, str(disk) if disk else None, arg, hang_timeout),
        journal=journal,
        image=load_image_file(str(image)),
    )


def record_journal(
    image: Path,
    log: Path,
    hash_every: int = DEFAULT_HASH_EVERY,
    tee: Callable[[vmft_pb2.EventBatch | None], None] | None = None,
    **options: Any,
) -> RecordJournal:
    """A RecordJournal writing `log`; `tee(batch)` also sees every batch, and `tee(None)` the close;
    `options` go to RecordJournal (hash_interval_s, batch_events, flush_on_output, ...)."""
    header = make_header(load_image_file(str(image)), MEM_MIB << 20, hash_every=hash_every)
    writer = LogFileWriter(log, header)
    sink: BatchSink = writer if tee is None else _TeeSink(writer, tee)
    return RecordJournal(sink, hash_every=hash_every, **options)


def queue_tee(source: QueueSource) -> Callable[[vmft_pb2.EventBatch | None], None]:
    """A `tee` for record_journal that feeds a QueueSource (as the replication stream would)."""

    def tee(batch: vmft_pb2.EventBatch | None) -> None:
        if batch is None:
            source.close()
        else:
            source.put(batch)

    return tee


class _TeeSink:
    def __init__(self, writer: LogFileWriter, tee: Callable[[vmft_pb2.EventBatch | None], None]) -> None:
        self._writer = writer
        self._tee = tee

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        self._writer.write_batch(batch)
        copy = vmft_pb2.EventBatch()
        copy.CopyFrom(batch)
        self._tee(copy)

    def close(self) -> None:
        self._writer.close()
        self._tee(None)


def finish_recording(
    machine: Machine,
    journal: RecordJournal,
    log: Path,
    console: bytearray,
    arg: int,
    disk: Path | None,
    disk_before: Path | None,
) -> Recording:
    assert machine.result is not None
    digest = machine.state_digest()
    machine.close()
    return Recording(
        log,
        machine.result,
        digest,
        journal.stats,
        bytes(console),
        arg,
        disk_before,
        disk.read_bytes() if disk else None,
    )


def record_run(
    image: Path,
    log: Path,
    arg: int = 0,
    rng: random.Random | None = None,
    hash_every: int = DEFAULT_HASH_EVERY,
    timeout: float = 30.0,
) -> Recording:
    """A guest that runs to its end on its own (ticker), with random kicks when `rng` is given."""
    journal = record_journal(image, log, hash_every)
    machine = new_machine(image, journal, arg)
    console = bytearray()
    machine.on_console = console.extend
    with Kicker(machine, rng) if rng is not None else contextlib.nullcontext():
        machine.run_blocking(timeout)
    return finish_recording(machine, journal, log, console, arg, None, None)


def replay_run(
    image: Path, log: Path, arg: int = 0, disk: Path | None = None, timeout: float = 60.0
) -> Replayed:
    journal = open_replay(log, load_image_file(str(image)), MEM_MIB << 20)
    machine = new_machine(image, journal, arg, disk)
    started = time.monotonic()
    try:
        result = machine.run_blocking(timeout)
        seconds = time.monotonic() - started
        digest = machine.state_digest()
    finally:
        machine.close()
    return Replayed(result, digest, journal.stats, journal.end_position, seconds)


def assert_identical(recording: Recording, replayed: Replayed) -> None:
    """The replay reached the recording's end, verified every output and hash, and ended in its state."""
    result = replayed.result
    assert result.reason is not StopReason.DIVERGED, result.describe()
    assert replayed.end_position == recording.result.position, (replayed.end_position, recording.result)
    assert result.position == recording.result.position, (result.describe(), recording.result.describe())
    if recording.result.reason is StopReason.EXITED:
        assert result.reason is StopReason.EXITED and result.exit_code == recording.result.exit_code
    assert replayed.stats.outputs == recording.stats.outputs
    # every logged input and output was consumed (final hash included), none left over
    assert replayed.stats.events + 1 == recording.stats.events, (replayed.stats, recording.stats)
    assert replayed.stats.state_hashes == recording.stats.state_hashes
    assert replayed.digest == recording.digest, "final state differs"


# ----- network load ------------------------------------------------------------------------------------


async def kv_client_load(
    address: str, client_id: str, rng: random.Random, until: float, replies: list[str], min_requests: int = 30
) -> None:
    """Random SET/GET/INCR/DEL with random sleeps until `until` and until `replies` (shared by the clients)
    holds `min_requests` (a loaded machine may be slow to start); sometimes reconnects."""
    kv = KvClient([address], client_id, timeout=5.0)
    try:
        while time.monotonic() < until or len(replies) < min_requests:
            key = f"k{rng.randrange(24)}"
            op = rng.random()
            try:
                if op < 0.35:
                    value = rng.randbytes(rng.randrange(1, 200)).hex()[: rng.randrange(1, 300)]
                    await kv.set(key, value)
                    replies.append(f"SET {key}")
                elif op < 0.6:
                    replies.append(f"GET {key} {await kv.get(key)}")
                elif op < 0.85:
                    replies.append(f"INCR {await kv.incr(f'n{rng.randrange(6)}', rng.randrange(-9, 100))}")
                elif op < 0.97:
                    replies.append(f"DEL {key} {await kv.delete(key)}")
                else:
                    await kv.close()  # a connection closing and a new one opening: OPEN/CLOSE events
            except KvError as err:  # INCR of a non-integer value
                replies.append(str(err))
            if rng.random() < 0.7:
                await asyncio.sleep(rng.random() * 0.006)
    finally:
        await kv.close()


@contextlib.asynccontextmanager
async def served_recording(
    image: Path,
    log: Path,
    disk: Path | None = None,
    arg: int = 0,
    hash_every: int = DEFAULT_HASH_EVERY,
    rng: random.Random | None = None,
    tee: Callable[[vmft_pb2.EventBatch | None], None] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Machine, RecordJournal, str, bytearray]]:
    """A recording machine whose NIC is served on a loopback port (kicked at random when `rng` is given).
    On leaving, the machine is stopped (if it still runs) and closed."""
    journal = record_journal(image, log, hash_every, tee, **options)
    machine = new_machine(image, journal, arg, disk)
    console = bytearray()
    machine.on_console = console.extend
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    try:
        with Kicker(machine, rng) if rng is not None else contextlib.nullcontext():
            yield machine, journal, f"{host}:{port}", console
            if machine.result is None:
                machine.stop()
            await asyncio.wait_for(machine.wait(), 10)
    finally:
        if machine.result is None:
            machine.stop()
            await asyncio.wait_for(machine.wait(), 10)
        await server.close()


async def record_kv(image: Path, log: Path, seed: int, tmp: Path, use_disk: bool) -> Recording:
    rng = random.Random(seed)
    disk = make_disk(tmp / "kv.img", 2 << 20) if use_disk else None
    disk_before = disk_copy(disk, tmp / "kv-before.img")
    replies: list[str] = []
    async with served_recording(image, log, disk, rng=random.Random(rng.random())) as (
        machine,
        journal,
        address,
        console,
    ):
        until = time.monotonic() + rng.uniform(0.1, 0.3)
        clients = rng.randint(2, 5)
        await asyncio.gather(
            *(
                kv_client_load(address, f"s{seed}c{i}", random.Random(rng.random()), until, replies)
                for i in range(clients)
            )
        )
        await asyncio.sleep(rng.random() * 0.02)
    recording = finish_recording(machine, journal, log, console, 0, disk, disk_before)
    recording.replies = replies
    return recording


async def _framed_exchange(address: str, messages: list[bytes], rng: random.Random) -> list[str]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    replies = []
    try:
        for message in messages:
            writer.write(_LEN.pack(len(message)) + message)
            await writer.drain()
            (n,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(4), 5))
            replies.append((await asyncio.wait_for(reader.readexactly(n), 5)).decode())
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() * 0.004)
    finally:
        writer.close()
    return replies


async def record_mixed(image: Path, log: Path, seed: int, tmp: Path) -> Recording:
    """mixed: several connections send random messages (each answered after entropy and a disk write);
    then one sends QUIT and the guest exits."""
    rng = random.Random(seed)
    disk = make_disk(tmp / "mixed.img", rng.choice([64, 128, 256]) << 10, rng)
    disk_before = disk_copy(disk, tmp / "mixed-before.img")
    replies: list[str] = []
    async with served_recording(image, log, disk, rng=random.Random(rng.random())) as (
        machine,
        journal,
        address,
        console,
    ):
        batches = [
            [
                rng.randbytes(rng.randrange(1, 300)).replace(b"QUIT", b"quit")
                for _ in range(rng.randint(3, 15))
            ]
            for _ in range(rng.randint(1, 4))
        ]
        results = await asyncio.gather(
            *(_framed_exchange(address, b, random.Random(rng.random())) for b in batches)
        )
        replies = [r for rs in results for r in rs]
        replies += await _framed_exchange(address, [b"QUIT"], rng)
        result = await asyncio.wait_for(machine.wait(), 10)
        assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    recording = finish_recording(machine, journal, log, console, 0, disk, disk_before)
    recording.replies = replies
    return recording


# ----- rewriting logs ----------------------------------------------------------------------------------

Event = list  # [position, rip, kind, value, data]


@dataclass
class LogContents:
    header: vmft_pb2.LogHeader
    horizons: list[int]  # each original batch's horizon (events are re-split along them)
    events: list[Event]
    end: vmft_pb2.EventBatch  # ended, end_position, end_reason of the last batch


def read_log(path: Path) -> LogContents:
    reader = LogFileReader(path)
    horizons: list[int] = []
    events: list[Event] = []
    end = vmft_pb2.EventBatch()
    for batch in reader.batches():
        position = batch.first_position
        for i, delta in enumerate(batch.position_deltas):
            position += delta
            events.append([position, batch.rips[i], batch.kinds[i], batch.values[i], batch.data[i]])
        horizons.append(batch.horizon)
        if batch.ended:
            end = batch
    return LogContents(reader.header, horizons, events, end)


def write_log(path: Path, contents: LogContents) -> None:
    """Write `contents` back through LogFileWriter, in batches along the original horizons."""
    writer = LogFileWriter(path, contents.header)
    events = sorted(contents.events, key=lambda e: e[0])  # stable: order within a position is kept
    index = 0
    for number, horizon in enumerate(contents.horizons):
        last = number == len(contents.horizons) - 1
        batch = vmft_pb2.EventBatch(horizon=horizon)
        chunk = []
        while index < len(events) and (last or events[index][0] <= horizon):
            chunk.append(events[index])
            index += 1
        if chunk:
            batch.first_position = chunk[0][0]
            previous = chunk[0][0]
            for position, rip, kind, value, data in chunk:
                batch.position_deltas.append(position - previous)
                previous = position
                batch.rips.append(rip)
                batch.kinds.append(kind)
                batch.values.append(value)
                batch.data.append(data)
        if last and contents.end.ended:
            batch.ended = True
            batch.end_position = contents.end.end_position
            batch.end_reason = contents.end.end_reason
        writer.write_batch(batch)
    writer.close()


def events_of(contents: LogContents, kind: EventKind) -> list[int]:
    """Indices (into contents.events) of the events of `kind`."""
    return [i for i, e in enumerate(contents.events) if e[2] == kind]


def frame_offsets(path: Path) -> list[int]:
    """Byte offsets of the frames of a log file (the first is where the header ends)."""
    data = path.read_bytes()
    offset = 8
    (length,) = struct.unpack_from("<I", data, offset)
    offset += 4 + length
    offsets = []
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 8 + length
    return offsets
