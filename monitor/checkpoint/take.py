"""Taking checkpoints of a running (or parked) machine: full or incremental, with pre-copy.

1. pause the vCPU briefly to start tracking dirty pages and written disk ranges (full), or to take
   what was written since the parent (incremental); resume;
2. compress all of memory (full; all-zero chunks left out) or the pages dirtied since the parent
   (incremental) while the guest runs, with zstandard's multithreaded batch compression, reading guest
   memory in place (no second copy of it is ever held); the disk likewise;
3. pause again, copy the pages and disk ranges written meanwhile plus the machine state (vCPU and
   components); resume; compress and emit that delta, then the manifest.

Disk consistency: the block device records which 4 KiB ranges the guest writes; a full checkpoint
carries every non-zero chunk of the disk, an incremental one the ranges written since its parent, so
memory and disk are from the same position.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import zstandard

from monitor import cpuid
from monitor.checkpoint import memops
from monitor.checkpoint.format import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    MAGIC,
    Region,
    RecordType,
    chunk_record,
    digest_crcs,
    record,
    write_records,
)
from monitor.guest_abi import ABI_VERSION
from monitor.machine import Machine
from monitor.memory import PAGE_SIZE
from proto import vmft_pb2

DEFAULT_LEVEL = 1
DEFAULT_THREADS = 2
_BATCH_CHUNKS = 16  # chunks compressed per multithreaded batch (4 MiB of input)
_CONSUMER = "checkpoint"

Piece = tuple[int, memoryview | bytes]  # (offset, raw data) of one chunk


class _Compressor:
    """zstd, many chunks at once on `threads` threads. `checksum`: zstd's content checksum in every frame;
    left out for guest memory compressed while the guest runs: zstd reads its input more than once, so a
    page the guest writes meanwhile would fail the checksum (such pages are dirty and sent again, and the
    record's crc32 still protects the frame itself)."""

    def __init__(self, level: int, threads: int, checksum: bool = True) -> None:
        self.threads = threads
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=True)

    def compress_many(self, views: list[memoryview | bytes]) -> list[bytes]:
        if not views:
            return []
        if self.threads and len(views) > 1:
            result = self._cctx.multi_compress_to_buffer(list(views), threads=self.threads)
            return [result[i].tobytes() for i in range(len(result))]
        return [self._cctx.compress(v) for v in views]


@dataclass
class CheckpointStats:
    checkpoint_id: str = ""
    parent_id: str = ""
    incremental: bool = False
    position: int = 0
    pause_s: float = 0.0  # total time the vCPU was paused (both pauses)
    pauses_s: list[float] = field(default_factory=list)
    precopy_s: float = 0.0  # compressing while the guest ran
    total_s: float = 0.0  # from start to the manifest
    mem_size: int = 0
    raw_bytes: int = 0  # memory and disk bytes carried (uncompressed)
    stored_bytes: int = 0  # bytes of all records
    memory_chunks: int = 0
    zero_chunks: int = 0  # all-zero memory chunks left out
    disk_chunks: int = 0
    delta_pages: int = 0  # pages dirtied during pre-copy, copied while paused
    path: str = ""

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0

    @property
    def throughput(self) -> float:
        """Guest RAM saved per second (bytes/s) for a full checkpoint; raw bytes per second otherwise."""
        amount = self.raw_bytes if self.incremental else self.mem_size
        return amount / self.total_s if self.total_s else 0.0

    def describe(self) -> str:
        kind = "incremental" if self.incremental else "full"
        return (
            f"{kind} checkpoint {self.checkpoint_id[:12]} at position {self.position}: "
            f"{self.raw_bytes / 2**20:.1f} MiB in {self.stored_bytes / 2**20:.2f} MiB "
            f"(ratio {self.ratio:.1f}), {self.memory_chunks} memory chunks "
            f"({self.zero_chunks} zero left out), "
            f"{self.disk_chunks} disk chunks, paused {self.pause_s * 1e3:.2f} ms, "
            f"total {self.total_s * 1e3:.1f} ms"
        )


class Checkpointer:
    """Takes the checkpoints of one machine: the first is full, later ones incremental against the one
    before (unless `full=True`). Thread-safe; one checkpoint at a time. The machine may be running (it is
    paused twice, briefly) or not (started or not yet started)."""

    def __init__(
        self,
        machine: Machine,
        level: int = DEFAULT_LEVEL,
        threads: int = DEFAULT_THREADS,
        chunk_size: int = CHUNK_SIZE,
        name: str = _CONSUMER,
    ) -> None:
        if chunk_size % PAGE_SIZE or not 0 < chunk_size <= CHUNK_SIZE:
            raise ValueError(f"chunk size must be a multiple of {PAGE_SIZE} up to {CHUNK_SIZE}")
        self.machine = machine
        self.level = level
        self.threads = threads
        self.chunk_size = chunk_size
        self.name = name
        self.last_id = ""  # the checkpoint an incremental one would be a delta of ("" = next is full)
        self.last_stats: CheckpointStats | None = None
        self._lock = threading.Lock()

    def continue_from(self, checkpoint_id: str) -> None:
        """The machine was just restored from `checkpoint_id` (memory and disk equal it exactly): the next
        checkpoint may be an incremental one against it. Call before the machine starts."""
        machine = self.machine
        machine.dirty.register(self.name, all_dirty=False)
        machine.block.track_writes(self.name)
        self.last_id = checkpoint_id

    def records(
        self,
        full: bool | None = None,
        on_paused: Callable[[int], None] | None = None,
        digest: bool = False,
    ) -> Iterator[bytes]:
        """Take a checkpoint, yielding its records as the consumer pulls them (for a file or a gRPC
        stream). `on_paused(position)` runs during the final pause, with the vCPU parked at the
        checkpoint's position (switch the journal there, or note the log position). `digest`: also
        put Machine.state_digest() in the manifest (costs a hash of the pages written since the last one,
        all of memory the first time, inside the pause). `last_stats` is set when the manifest is out."""
        with self._lock:
            ok = False
            try:
                take = _Take(self, incremental=bool(self.last_id) and not full)
                yield from take.run(on_paused, digest)
                ok = True
            finally:
                if not ok:
                    self.last_id = ""  # the dirty set was consumed: the next one must be full

    def save(
        self,
        path: str | Path,
        full: bool | None = None,
        on_paused: Callable[[int], None] | None = None,
        digest: bool = False,
    ) -> CheckpointStats:
        """Write a checkpoint to `path` (atomically: a temporary file renamed at the end)."""
        write_records(self.records(full, on_paused, digest), path)
        assert self.last_stats is not None
        self.last_stats.stored_bytes += len(MAGIC)
        self.last_stats.path = str(path)
        return self.last_stats


class _Take:
    """One checkpoint being taken: its statistics, chunk checksums and the steps in order."""

    def __init__(self, owner: Checkpointer, incremental: bool) -> None:
        self.owner = owner
        self.machine = owner.machine
        self.incremental = incremental
        self.stats = CheckpointStats(
            incremental=incremental,
            parent_id=owner.last_id if incremental else "",
            checkpoint_id=uuid.uuid4().hex,
            mem_size=self.machine.memory.size,
        )
        self.crcs: list[int] = []
        self.page_chunk = owner.chunk_size // PAGE_SIZE
        self.stable = _Compressor(owner.level, owner.threads)
        # Memory read while the guest runs may change under zstd: no content checksum (see _Compressor).
        self.live = _Compressor(owner.level, owner.threads, checksum=not self.machine.is_running())
        self.mem = self.machine.memory.buffer()
        self.pre_pages: list[int] = []
        self.pre_disk: list[tuple[int, int]] = []

    def run(self, on_paused: Callable[[int], None] | None, digest: bool) -> Iterator[bytes]:
        started = time.perf_counter()
        stats = self.stats
        stats.pauses_s.append(self._paused(self._start_tracking))
        header = self._header()
        yield self._count(record(RecordType.HEADER, header.SerializeToString()))
        yield from self._precopy_memory()
        block = self.machine.block
        disk_fd = os.open(block.path, os.O_RDONLY | os.O_CLOEXEC) if block.path else None
        try:
            if disk_fd is not None:
                yield from self._precopy_disk(disk_fd)
            stats.precopy_s = time.perf_counter() - started
            delta, delta_disk, captured = self._final_pause(disk_fd, on_paused, digest)
        finally:
            if disk_fd is not None:
                os.close(disk_fd)
        stats.pause_s = sum(stats.pauses_s)
        state, state_digest = captured
        stats.position = state.position
        yield from self._emit(Region.MEMORY, delta)  # compressed after resuming
        yield from self._emit(Region.DISK, delta_disk)
        manifest = vmft_pb2.CheckpointManifest(
            header=header,
            position=state.position,
            machine=state,
            memory_chunks=stats.memory_chunks,
            disk_chunks=stats.disk_chunks,
            raw_bytes=stats.raw_bytes,
            stored_bytes=stats.stored_bytes,
            chunks_digest=digest_crcs(self.crcs),
            state_digest=state_digest,
            pause_s=stats.pause_s,
        )
        last = self._count(record(RecordType.MANIFEST, manifest.SerializeToString()))
        stats.total_s = time.perf_counter() - started
        self.owner.last_id = stats.checkpoint_id
        self.owner.last_stats = stats
        yield last

    # -- the pauses --

    def _paused(self, work: Callable[[], None]) -> float:
        machine = self.machine
        running = machine.is_running()
        started = time.perf_counter()
        if running:
            machine.pause()
        try:
            work()
        finally:
            if running:
                machine.resume()
        return time.perf_counter() - started

    def _start_tracking(self) -> None:
        """Start tracking (full), or take what was written since the parent (incremental)."""
        machine, name = self.machine, self.owner.name
        block = machine.block
        if self.incremental:
            self.pre_pages = machine.dirty.take(name)
            self.pre_disk = block.take_written(name) if block.path else []
        else:
            machine.dirty.register(name, all_dirty=False)
            if block.path:
                block.track_writes(name)

    def _final_pause(
        self, disk_fd: int | None, on_paused: Callable[[int], None] | None, digest: bool
    ) -> tuple[list[Piece], list[Piece], tuple[vmft_pb2.MachineState, bytes]]:
        """What was written during pre-copy, and the machine state, with the vCPU parked."""
        machine, name, mem = self.machine, self.owner.name, self.mem
        delta: list[Piece] = []
        delta_disk: list[Piece] = []
        captured: list[tuple[vmft_pb2.MachineState, bytes]] = []

        def work() -> None:
            pages = machine.dirty.take(name)
            self.stats.delta_pages = len(pages)
            for p, n in memops.page_runs(pages, self.page_chunk):
                delta.append((p * PAGE_SIZE, bytes(mem[p * PAGE_SIZE : (p + n) * PAGE_SIZE])))
            if disk_fd is not None:
                written = machine.block.take_written(name)
                for offset, length in memops.split_ranges(written, self.owner.chunk_size):
                    delta_disk.append((offset, os.pread(disk_fd, length, offset)))
            state = machine.capture_state()
            captured.append((state, machine.state_digest() if digest else b""))
            if on_paused is not None:
                on_paused(state.position)

        self.stats.pauses_s.append(self._paused(work))
        return delta, delta_disk, captured[0]

    # -- the records --

    def _header(self) -> vmft_pb2.CheckpointHeader:
        machine = self.machine
        block = machine.block
        return vmft_pb2.CheckpointHeader(
            format_version=FORMAT_VERSION,
            abi_version=ABI_VERSION,
            cpuid_hash=cpuid.cpuid_hash(),
            checkpoint_id=self.stats.checkpoint_id,
            parent_id=self.stats.parent_id,
            incremental=self.incremental,
            config=vmft_pb2.CheckpointVmConfig(
                image_path=str(machine.config.image),
                image_sha256=machine.image.sha256,
                mem_size=machine.memory.size,
                disk_path=block.path or "",
                disk_size=block.size if block.path else 0,
                arg=machine.config.arg,
                hang_timeout_s=machine.config.hang_timeout_s,
            ),
            chunk_size=self.owner.chunk_size,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    def _count(self, rec: bytes) -> bytes:
        self.stats.stored_bytes += len(rec)
        return rec

    def _emit(
        self, region: Region, pieces: list[Piece], compressor: _Compressor | None = None
    ) -> Iterator[bytes]:
        compressor = compressor or self.stable
        stats = self.stats
        for start in range(0, len(pieces), _BATCH_CHUNKS):
            batch = pieces[start : start + _BATCH_CHUNKS]
            frames = compressor.compress_many([data for _offset, data in batch])
            for (offset, data), frame in zip(batch, frames):
                rec, crc = chunk_record(region, offset, len(data), frame)
                self.crcs.append(crc)
                stats.raw_bytes += len(data)
                stats.stored_bytes += len(rec)
                if region is Region.MEMORY:
                    stats.memory_chunks += 1
                else:
                    stats.disk_chunks += 1
                yield rec

    # -- pre-copy, while the guest runs --

    def _precopy_memory(self) -> Iterator[bytes]:
        mem, size = self.mem, self.owner.chunk_size
        if self.incremental:
            runs = memops.page_runs(self.pre_pages, self.page_chunk)
            pieces: list[Piece] = [
                (p * PAGE_SIZE, bytes(mem[p * PAGE_SIZE : (p + n) * PAGE_SIZE])) for p, n in runs
            ]  # copies, not views: see below
            yield from self._emit(Region.MEMORY, pieces, self.live)
            return
        memory = self.machine.memory
        batch: list[Piece] = []
        for offset in range(0, memory.size, size):
            if memops.is_zero(memory.host_address + offset, size):
                self.stats.zero_chunks += 1
                continue
            # A copy, not a view: zstd reads its input more than once (a match points back into it), so
            # compressing memory the guest is writing can corrupt pages the guest did not touch (seen with
            # Linux guests: about 1 restore in 10 found a stale page that was in no delta).
            batch.append((offset, bytes(mem[offset : offset + size])))
            if len(batch) == _BATCH_CHUNKS:
                yield from self._emit(Region.MEMORY, batch, self.live)
                batch = []
        yield from self._emit(Region.MEMORY, batch, self.live)

    def _precopy_disk(self, fd: int) -> Iterator[bytes]:
        size = self.owner.chunk_size
        if self.incremental:
            for offset, length in memops.split_ranges(self.pre_disk, size):
                yield from self._emit(Region.DISK, [(offset, os.pread(fd, length, offset))])
            return
        disk_size = self.machine.block.size
        offset = 0
        while offset < disk_size:
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)  # skip holes of a sparse disk image
            except OSError:
                break  # ENXIO: no data past offset
            offset = data_at - data_at % size
            if offset >= disk_size:
                break
            data = os.pread(fd, min(size, disk_size - offset), offset)
            if data.count(0) != len(data):
                yield from self._emit(Region.DISK, [(offset, data)])
            offset += size
