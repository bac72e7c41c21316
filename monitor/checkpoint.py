"""Checkpoints: a VM's memory, disk, vCPU and device state, as zstd-compressed checksummed records.

A checkpoint is a sequence of framed records, the same on disk and on the wire:

    record   = type u8, 0 u8, 0 u16, body length u32, crc32(body) u32, body
    HEADER   : proto CheckpointHeader (format, ABI, CPUID hash, id, parent id, VM config)
    CHUNK    : region u8 (0 memory, 1 disk), 3 zero bytes, offset u64, raw length u32, one zstd frame
    MANIFEST : proto CheckpointManifest (the header again, position, vCPU and machine state, chunk counts,
               a digest of every chunk record's crc in order)

A file is MAGIC followed by the records; a stream (gRPC) carries one record per message. Chunks are
applied in order (a later chunk overwrites an earlier one), which is what makes pre-copy work:

1. pause the vCPU briefly to start tracking dirty pages and written disk ranges; resume;
2. compress all of memory (full; all-zero chunks left out) or the pages dirtied since the previous
   checkpoint (incremental) while the guest runs, with zstandard's multithreaded batch compression,
   reading guest memory in place (no second copy of it is ever held);
3. pause again, copy the pages and disk ranges written meanwhile plus the vCPU and device state;
   resume; compress and emit that delta, then the manifest.

Disk consistency (choice): the block device records which 4 KiB ranges the guest writes; a full
checkpoint carries every non-zero chunk of the disk, an incremental one the ranges written since its
parent, and a restore rewrites the disk file to the checkpoint's contents (a full one truncates it
first). Memory and disk are therefore from the same position.

Restoring (`restore_files`, `restore_stream`) refuses a damaged or mismatched checkpoint with a
CheckpointError that names the problem before anything is loaded: the structure, header, manifest,
chain links and disk chunk checksums are verified first; memory chunks are verified as they are
decompressed into the new machine, which is discarded unstarted on any error; the disk is written only
after everything else has passed.

Streaming API (for replication): `Checkpointer(machine).records()` yields the records of a live
checkpoint (taking it as the consumer pulls); `restore_stream(records)` builds a machine from them;
`file_records(path)` yields a saved checkpoint's records.
"""

from __future__ import annotations

import ctypes
import datetime
import enum
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import zstandard

from monitor import cpuid
from monitor.errors import CheckpointError
from monitor.guest_abi import ABI_VERSION
from monitor.journal import Journal, JournalMode, LiveJournal
from monitor.kvm import Kvm, VcpuState
from monitor.loader import GuestImage, load_image_file
from monitor.machine import Machine, MachineConfig
from monitor.memory import PAGE_SIZE
from proto import vmft_pb2

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"VMFTCKP\x01"
SUFFIX = ".vmck"
CHUNK_SIZE = 256 << 10
MAX_RECORD = 64 << 20
DEFAULT_LEVEL = 1
DEFAULT_THREADS = 2
_BATCH_CHUNKS = 16  # chunks compressed per multithreaded batch (4 MiB of input)
_CONSUMER = "checkpoint"

_FRAME = struct.Struct("<BBHII")
_CHUNK = struct.Struct("<B3xQI")


class RecordType(enum.IntEnum):
    HEADER = 1
    CHUNK = 2
    MANIFEST = 3


class Region(enum.IntEnum):
    MEMORY = 0
    DISK = 1


# ----- records ------------------------------------------------------------------------------------


def _record(rtype: RecordType, body: bytes) -> bytes:
    return _FRAME.pack(rtype, 0, 0, len(body), zlib.crc32(body)) + body


def _chunk_record(region: Region, offset: int, raw_len: int, frame: bytes) -> tuple[bytes, int]:
    """A CHUNK record and its crc."""
    out = bytearray(_FRAME.size + _CHUNK.size + len(frame))
    _CHUNK.pack_into(out, _FRAME.size, region, offset, raw_len)
    out[_FRAME.size + _CHUNK.size :] = frame
    crc = zlib.crc32(memoryview(out)[_FRAME.size :])
    _FRAME.pack_into(out, 0, RecordType.CHUNK, 0, 0, len(out) - _FRAME.size, crc)
    return bytes(out), crc


def _digest_crcs(crcs: list[int]) -> bytes:
    return hashlib.blake2b(struct.pack(f"<{len(crcs)}I", *crcs), digest_size=16).digest()


def vcpu_to_proto(state: VcpuState) -> vmft_pb2.VcpuState:
    return vmft_pb2.VcpuState(
        regs=state.regs,
        sregs=state.sregs,
        fpu=state.fpu,
        xsave=state.xsave,
        xcrs=state.xcrs,
        msrs=[vmft_pb2.Msr(index=i, value=v) for i, v in state.msrs],
        vcpu_events=state.vcpu_events,
        mp_state=state.mp_state,
        debugregs=state.debugregs,
    )


def vcpu_from_proto(msg: vmft_pb2.VcpuState) -> VcpuState:
    return VcpuState(
        regs=msg.regs,
        sregs=msg.sregs,
        fpu=msg.fpu,
        xsave=msg.xsave,
        xcrs=msg.xcrs,
        msrs=[(m.index, m.value) for m in msg.msrs],
        vcpu_events=msg.vcpu_events,
        mp_state=msg.mp_state,
        debugregs=msg.debugregs,
    )


# ----- memory helpers -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int
_ZEROS = ctypes.create_string_buffer(CHUNK_SIZE)
_ZEROS_ADDR = ctypes.addressof(_ZEROS)


_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in, writable, in one call
_populate_works = True


def _populate(address: int, length: int) -> None:
    """Pre-fault fresh guest memory about to be written (much cheaper than a fault per page here)."""
    global _populate_works
    if not _populate_works:
        return
    start = address - address % PAGE_SIZE
    if _madvise(start, length + (address - start), _MADV_POPULATE_WRITE) != 0:
        _populate_works = False  # an older kernel: plain faults


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], start + length - out[-1][0]))
        else:
            out.append((start, length))
    return out


def _is_zero(address: int, length: int) -> bool:
    """Whether host memory [address, address+length) is all zero (length <= CHUNK_SIZE)."""
    return bool(_memcmp(address, _ZEROS_ADDR, length) == 0)


def _page_runs(pages: list[int], max_pages: int) -> list[tuple[int, int]]:
    """Sorted page indices as (first page, count) runs of at most max_pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page and runs[-1][1] < max_pages:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _split_ranges(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        while length > 0:
            n = min(length, limit)
            out.append((offset, n))
            offset += n
            length -= n
    return out


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


# ----- taking checkpoints ---------------------------------------------------------------------------


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
                yield from self._take(full, on_paused, digest)
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
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                for record in self.records(full, on_paused, digest):
                    f.write(record)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        assert self.last_stats is not None
        self.last_stats.stored_bytes += len(MAGIC)
        self.last_stats.path = str(path)
        return self.last_stats

    def _take(
        self, full: bool | None, on_paused: Callable[[int], None] | None, digest: bool
    ) -> Iterator[bytes]:
        machine = self.machine
        memory = machine.memory
        block = machine.block
        incremental = bool(self.last_id) and not full
        stats = CheckpointStats(incremental=incremental, parent_id=self.last_id if incremental else "")
        stats.mem_size = memory.size
        stats.checkpoint_id = uuid.uuid4().hex
        started = time.perf_counter()
        page_chunk = self.chunk_size // PAGE_SIZE
        pre_pages: list[int] = []
        pre_disk: list[tuple[int, int]] = []

        # 1. Start tracking (full), or take what was written since the parent (incremental).
        def start_tracking() -> None:
            nonlocal pre_pages, pre_disk
            if incremental:
                pre_pages = machine.dirty.take(self.name)
                pre_disk = block.take_written(self.name) if block.path else []
            else:
                machine.dirty.register(self.name, all_dirty=False)
                if block.path:
                    block.track_writes(self.name)

        stats.pauses_s.append(self._paused(start_tracking))

        header = vmft_pb2.CheckpointHeader(
            format_version=FORMAT_VERSION,
            abi_version=ABI_VERSION,
            cpuid_hash=cpuid.cpuid_hash(),
            checkpoint_id=stats.checkpoint_id,
            parent_id=stats.parent_id,
            incremental=incremental,
            config=vmft_pb2.CheckpointVmConfig(
                image_path=str(machine.config.image),
                image_sha256=machine.image.sha256,
                mem_size=memory.size,
                disk_path=block.path or "",
                disk_size=block.size if block.path else 0,
                arg=machine.config.arg,
                hang_timeout_s=machine.config.hang_timeout_s,
            ),
            chunk_size=self.chunk_size,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        record = _record(RecordType.HEADER, header.SerializeToString())
        stats.stored_bytes += len(record)
        yield record

        stable = _Compressor(self.level, self.threads)
        live = _Compressor(self.level, self.threads, checksum=not machine.is_running())
        crcs: list[int] = []

        def emit(
            region: Region, pieces: list[tuple[int, memoryview | bytes]], compressor: _Compressor = stable
        ) -> Iterator[bytes]:
            for start in range(0, len(pieces), _BATCH_CHUNKS):
                batch = pieces[start : start + _BATCH_CHUNKS]
                frames = compressor.compress_many([data for _offset, data in batch])
                for (offset, data), frame in zip(batch, frames):
                    rec, crc = _chunk_record(region, offset, len(data), frame)
                    crcs.append(crc)
                    stats.raw_bytes += len(data)
                    stats.stored_bytes += len(rec)
                    if region is Region.MEMORY:
                        stats.memory_chunks += 1
                    else:
                        stats.disk_chunks += 1
                    yield rec

        # 2. Pre-copy while the guest runs.
        mem = memory.buffer()
        if incremental:
            runs = _page_runs(pre_pages, page_chunk)
            pieces: list[tuple[int, memoryview | bytes]] = [
                (p * PAGE_SIZE, mem[p * PAGE_SIZE : (p + n) * PAGE_SIZE]) for p, n in runs
            ]
            yield from emit(Region.MEMORY, pieces, live)
        else:
            base = memory.host_address
            batch_pieces: list[tuple[int, memoryview | bytes]] = []
            for offset in range(0, memory.size, self.chunk_size):
                if _is_zero(base + offset, self.chunk_size):
                    stats.zero_chunks += 1
                    continue
                batch_pieces.append((offset, mem[offset : offset + self.chunk_size]))
                if len(batch_pieces) == _BATCH_CHUNKS:
                    yield from emit(Region.MEMORY, batch_pieces, live)
                    batch_pieces = []
            yield from emit(Region.MEMORY, batch_pieces, live)
        disk_fd = os.open(block.path, os.O_RDONLY | os.O_CLOEXEC) if block.path else None
        try:
            if disk_fd is not None:
                if incremental:
                    for offset, length in _split_ranges(pre_disk, self.chunk_size):
                        yield from emit(Region.DISK, [(offset, os.pread(disk_fd, length, offset))])
                else:
                    yield from self._full_disk(disk_fd, block.size, emit)
            stats.precopy_s = time.perf_counter() - started

            # 3. Pause: what was written meanwhile, and the vCPU and device state.
            delta: list[tuple[int, memoryview | bytes]] = []
            delta_disk: list[tuple[int, memoryview | bytes]] = []
            captured: list[tuple[VcpuState, vmft_pb2.MachineState, bytes]] = []

            def final_pause() -> None:
                pages = machine.dirty.take(self.name)
                stats.delta_pages = len(pages)
                for p, n in _page_runs(pages, page_chunk):
                    delta.append((p * PAGE_SIZE, bytes(mem[p * PAGE_SIZE : (p + n) * PAGE_SIZE])))
                if disk_fd is not None:
                    for offset, length in _split_ranges(block.take_written(self.name), self.chunk_size):
                        delta_disk.append((offset, os.pread(disk_fd, length, offset)))
                vcpu, state = machine.capture_state()
                state_digest = machine.state_digest() if digest else b""
                captured.append((vcpu, state, state_digest))
                if on_paused is not None:
                    on_paused(state.position)

            pause = self._paused(final_pause)
        finally:
            if disk_fd is not None:
                os.close(disk_fd)
        stats.pauses_s.append(pause)
        stats.pause_s = sum(stats.pauses_s)
        vcpu, state, state_digest = captured[0]
        stats.position = state.position

        # 4. The delta, compressed after resuming, then the manifest.
        yield from emit(Region.MEMORY, delta)
        yield from emit(Region.DISK, delta_disk)
        manifest = vmft_pb2.CheckpointManifest(
            header=header,
            position=state.position,
            vcpu=vcpu_to_proto(vcpu),
            machine=state,
            memory_chunks=stats.memory_chunks,
            disk_chunks=stats.disk_chunks,
            raw_bytes=stats.raw_bytes,
            stored_bytes=stats.stored_bytes,
            chunks_digest=_digest_crcs(crcs),
            state_digest=state_digest,
            pause_s=stats.pause_s,
        )
        record = _record(RecordType.MANIFEST, manifest.SerializeToString())
        stats.stored_bytes += len(record)
        stats.total_s = time.perf_counter() - started
        self.last_id = stats.checkpoint_id
        self.last_stats = stats
        yield record

    def _full_disk(
        self,
        fd: int,
        size: int,
        emit: Callable[..., Iterator[bytes]],
    ) -> Iterator[bytes]:
        offset = 0
        while offset < size:
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)  # skip holes of a sparse disk image
            except OSError:
                break  # ENXIO: no data past offset
            offset = data_at - data_at % self.chunk_size
            if offset >= size:
                break
            data = os.pread(fd, min(self.chunk_size, size - offset), offset)
            if data.count(0) != len(data):
                yield from emit(Region.DISK, [(offset, data)])
            offset += self.chunk_size


# ----- reading ----------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    region: Region
    offset: int
    raw_len: int
    body: memoryview  # the whole record body (chunk header and zstd frame)
    crc: int
    index: int

    @property
    def frame(self) -> memoryview:
        return self.body[_CHUNK.size :]

    def describe(self) -> str:
        return f"chunk {self.index} ({self.region.name.lower()} at 0x{self.offset:x}, {self.raw_len} bytes)"


def _parse_frame(data: memoryview, offset: int, what: str) -> tuple[int, int, memoryview, int]:
    """(type, crc, body, next offset) of the record at `offset`."""
    if len(data) - offset < _FRAME.size:
        raise CheckpointError(f"{what}: truncated: record at byte {offset} has an incomplete header")
    rtype, _z1, _z2, length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    if length > MAX_RECORD:
        raise CheckpointError(f"{what}: corrupted: record at byte {offset} claims {length} bytes")
    if start + length > len(data):
        raise CheckpointError(
            f"{what}: truncated: record at byte {offset} needs {length} bytes, {len(data) - start} remain"
        )
    return rtype, crc, data[start : start + length], start + length


def _parse_proto(body: memoryview, crc: int, message: type, what: str, kind: str) -> object:
    if zlib.crc32(body) != crc:
        raise CheckpointError(f"{what}: {kind} corrupted: it fails its checksum")
    msg = message()
    try:
        msg.ParseFromString(bytes(body))
    except Exception as err:
        raise CheckpointError(f"{what}: {kind} corrupted: {err}") from err
    return msg


def _chunk_from(body: memoryview, crc: int, index: int, what: str) -> _Chunk:
    if len(body) < _CHUNK.size:
        raise CheckpointError(f"{what}: chunk {index} corrupted: {len(body)} bytes is too short")
    region, offset, raw_len = _CHUNK.unpack_from(body, 0)
    try:
        reg = Region(region)
    except ValueError:
        raise CheckpointError(f"{what}: chunk {index} corrupted: unknown region {region}") from None
    return _Chunk(reg, offset, raw_len, body, crc, index)


@dataclass
class ParsedCheckpoint:
    """A checkpoint whose structure, header and manifest have been verified (chunks not yet)."""

    what: str
    header: vmft_pb2.CheckpointHeader
    manifest: vmft_pb2.CheckpointManifest
    chunks: list[_Chunk]
    path: Path | None = None
    _mmap: mmap.mmap | None = None

    @property
    def checkpoint_id(self) -> str:
        return str(self.header.checkpoint_id)

    def close(self) -> None:
        self.chunks = []
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it


def _check_manifest(
    what: str, header: vmft_pb2.CheckpointHeader, manifest: vmft_pb2.CheckpointManifest, crcs: list[int]
) -> None:
    if manifest.header != header:
        raise CheckpointError(f"{what}: manifest corrupted: its header differs from the leading header")
    memory_chunks = manifest.memory_chunks
    disk_chunks = manifest.disk_chunks
    if memory_chunks + disk_chunks != len(crcs):
        raise CheckpointError(
            f"{what}: truncated or corrupted: the manifest lists {memory_chunks + disk_chunks} chunks, "
            f"{len(crcs)} are present"
        )
    if manifest.chunks_digest != _digest_crcs(crcs):
        raise CheckpointError(f"{what}: corrupted: the chunks differ from those the manifest lists")
    if manifest.position != manifest.machine.position:
        raise CheckpointError(f"{what}: manifest corrupted: inconsistent positions")


def parse_checkpoint_bytes(data: memoryview, what: str) -> ParsedCheckpoint:
    """Verify a checkpoint's structure (records, header, manifest, chunk list) without decompressing."""
    if bytes(data[: len(MAGIC)]) != MAGIC:
        if bytes(data[: len(MAGIC) - 1]) == MAGIC[:-1]:
            raise CheckpointError(
                f"{what}: checkpoint file format {data[len(MAGIC) - 1]}; this vmft reads {MAGIC[-1]}"
            )
        raise CheckpointError(f"{what}: not a vmft checkpoint (bad magic)")
    offset = len(MAGIC)
    if offset >= len(data):
        raise CheckpointError(f"{what}: truncated: no header")
    rtype, crc, body, offset = _parse_frame(data, offset, what)
    if rtype != RecordType.HEADER:
        raise CheckpointError(f"{what}: corrupted: first record is type {rtype}, not a header")
    header = _parse_proto(body, crc, vmft_pb2.CheckpointHeader, what, "header")
    assert isinstance(header, vmft_pb2.CheckpointHeader)
    check_format(header, what)
    chunks: list[_Chunk] = []
    manifest: vmft_pb2.CheckpointManifest | None = None
    while offset < len(data):
        rtype, crc, body, offset = _parse_frame(data, offset, what)
        if rtype == RecordType.CHUNK:
            chunks.append(_chunk_from(body, crc, len(chunks), what))
        elif rtype == RecordType.MANIFEST:
            parsed = _parse_proto(body, crc, vmft_pb2.CheckpointManifest, what, "manifest")
            assert isinstance(parsed, vmft_pb2.CheckpointManifest)
            manifest = parsed
            if offset != len(data):
                raise CheckpointError(f"{what}: corrupted: {len(data) - offset} bytes after the manifest")
        else:
            raise CheckpointError(f"{what}: corrupted: record of unknown type {rtype} at byte {offset}")
    if manifest is None:
        raise CheckpointError(f"{what}: truncated: it ends after {len(chunks)} chunks, before the manifest")
    _check_manifest(what, header, manifest, [c.crc for c in chunks])
    return ParsedCheckpoint(what, header, manifest, chunks)


def open_checkpoint(path: str | Path) -> ParsedCheckpoint:
    """Map a checkpoint file and verify its structure, header and manifest."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: truncated: empty file")
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint: {err.strerror}") from err
    parsed = parse_checkpoint_bytes(memoryview(mapped), str(path))
    parsed.path = path
    parsed._mmap = mapped
    return parsed


def read_header(path: str | Path) -> vmft_pb2.CheckpointHeader:
    """Only the header of a checkpoint file (cheap: for finding parents)."""
    with open(path, "rb") as f:
        data = f.read(len(MAGIC) + _FRAME.size)
        if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + _FRAME.size:
            raise CheckpointError(f"{path}: not a vmft checkpoint")
        rtype, _a, _b, length, crc = _FRAME.unpack_from(data, len(MAGIC))
        if rtype != RecordType.HEADER or length > MAX_RECORD:
            raise CheckpointError(f"{path}: header corrupted")
        body = memoryview(f.read(length))
    if len(body) != length:
        raise CheckpointError(f"{path}: truncated inside the header")
    header = _parse_proto(body, crc, vmft_pb2.CheckpointHeader, str(path), "header")
    assert isinstance(header, vmft_pb2.CheckpointHeader)
    return header


def file_records(path: str | Path) -> Iterator[bytes]:
    """The records of a saved checkpoint, as `Checkpointer.records()` yields them (to stream a file)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CheckpointError(f"{path}: not a vmft checkpoint (bad magic)")
        while True:
            head = f.read(_FRAME.size)
            if not head:
                return
            if len(head) < _FRAME.size:
                raise CheckpointError(f"{path}: truncated")
            length = _FRAME.unpack(head)[3]
            if length > MAX_RECORD:
                raise CheckpointError(f"{path}: corrupted: a record claims {length} bytes")
            yield head + f.read(length)


# ----- compatibility ----------------------------------------------------------------------------------


def check_format(header: vmft_pb2.CheckpointHeader, what: str) -> None:
    if header.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{what}: checkpoint format version {header.format_version}; this vmft reads {FORMAT_VERSION}"
        )


def check_compatible(
    header: vmft_pb2.CheckpointHeader, image: GuestImage | None, mem_size: int | None, what: str
) -> None:
    """Refuse a checkpoint made for another format, ABI, CPUID table, image or memory size."""
    check_format(header, what)
    if header.abi_version != ABI_VERSION:
        raise CheckpointError(
            f"{what}: made with guest ABI {header.abi_version}; this vmft has {ABI_VERSION}"
        )
    if header.cpuid_hash != cpuid.cpuid_hash():
        raise CheckpointError(
            f"{what}: made with CPUID table {header.cpuid_hash}; this node has {cpuid.cpuid_hash()}"
        )
    config = header.config
    if image is not None and config.image_sha256 != image.sha256:
        raise CheckpointError(
            f"{what}: made for another image (sha256 {config.image_sha256[:16]}...), "
            f"not {image.path} ({image.sha256[:16]}...)"
        )
    if mem_size is not None and config.mem_size != mem_size:
        raise CheckpointError(
            f"{what}: memory size mismatch: the checkpoint has {config.mem_size >> 20} MiB of guest RAM, "
            f"the VM {mem_size >> 20} MiB"
        )


def _check_link(parent: ParsedCheckpoint, child: ParsedCheckpoint) -> None:
    if not child.header.incremental:
        raise CheckpointError(f"{child.what}: a full checkpoint cannot follow {parent.what} in a chain")
    if child.header.parent_id != parent.header.checkpoint_id:
        raise CheckpointError(
            f"{child.what}: incremental checkpoint of parent {child.header.parent_id[:12]}, "
            f"but it follows {parent.header.checkpoint_id[:12]} ({parent.what}): a different parent"
        )
    pc, cc = parent.header.config, child.header.config
    if (pc.image_sha256, pc.mem_size, pc.disk_size) != (cc.image_sha256, cc.mem_size, cc.disk_size):
        raise CheckpointError(f"{child.what}: made for another VM than its parent {parent.what}")


def find_chain(path: str | Path) -> list[Path]:
    """The files to restore `path`: its full ancestor first, then each incremental checkpoint, found by
    checkpoint id among the checkpoint files in the same directory."""
    path = Path(path)
    chain = [path]
    header = read_header(path)
    seen = {header.checkpoint_id}
    index: dict[str, Path] | None = None
    while header.incremental:
        if index is None:
            index = {}
            for candidate in path.parent.glob(f"*{SUFFIX}"):
                try:
                    index[read_header(candidate).checkpoint_id] = candidate
                except (CheckpointError, OSError):
                    continue
        parent = index.get(header.parent_id)
        if parent is None:
            raise CheckpointError(
                f"{chain[0]}: incremental checkpoint whose parent {header.parent_id[:12]} is missing "
                f"(not in {path.parent})"
            )
        header = read_header(parent)
        if header.checkpoint_id in seen:
            raise CheckpointError(f"{parent}: the checkpoint chain loops")
        seen.add(header.checkpoint_id)
        chain.insert(0, parent)
    return chain


def open_chain(
    paths: list[Path], image: GuestImage | None, mem_size: int | None
) -> list[ParsedCheckpoint]:
    """Open and verify a chain (full first): structure, compatibility, links."""
    parsed: list[ParsedCheckpoint] = []
    try:
        for p in paths:
            ckpt = open_checkpoint(p)
            parsed.append(ckpt)
            check_compatible(ckpt.header, image, mem_size, ckpt.what)
        if parsed[0].header.incremental:
            raise CheckpointError(
                f"{parsed[0].what}: incremental checkpoint whose parent {parsed[0].header.parent_id[:12]} "
                f"is missing"
            )
        for parent, child in zip(parsed, parsed[1:]):
            _check_link(parent, child)
    except BaseException:
        for ckpt in parsed:
            ckpt.close()
        raise
    return parsed


# ----- restoring --------------------------------------------------------------------------------------


@dataclass
class RestoreStats:
    checkpoint_id: str = ""
    position: int = 0
    chain_length: int = 0
    memory_chunks: int = 0
    disk_chunks: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0


JournalArg = Journal | Callable[[int], Journal] | None


def _journal_for(journal: JournalArg, position: int) -> Journal:
    if journal is None:
        return LiveJournal()
    if callable(journal):
        return journal(position)
    return journal


def _config_for(
    header: vmft_pb2.CheckpointHeader, image: GuestImage, disk: str | None, hang_timeout_s: float | None
) -> MachineConfig:
    config = header.config
    disk_path = disk if disk is not None else (config.disk_path or None)
    if config.disk_path and disk_path is None:
        raise CheckpointError("the checkpoint has a disk: a disk path is needed to restore it")
    return MachineConfig(
        image=image.path,
        mem_mib=config.mem_size >> 20,
        disk=disk_path if config.disk_path else None,
        arg=config.arg,
        hang_timeout_s=hang_timeout_s if hang_timeout_s is not None else config.hang_timeout_s or 2.0,
    )


def _image_for(header: vmft_pb2.CheckpointHeader, image: GuestImage | None, what: str) -> GuestImage:
    if image is not None:
        return image
    try:
        loaded = load_image_file(header.config.image_path)
    except Exception as err:
        raise CheckpointError(f"{what}: cannot load its image {header.config.image_path}: {err}") from err
    if loaded.sha256 != header.config.image_sha256:
        raise CheckpointError(
            f"{what}: made for another image: {header.config.image_path} has changed since "
            f"(sha256 {loaded.sha256[:16]}..., the checkpoint has {header.config.image_sha256[:16]}...)"
        )
    return loaded


class _Loader:
    """Decompresses verified chunks into a machine's memory, collecting disk chunks for later."""

    def __init__(self, machine: Machine, what: str) -> None:
        self.machine = machine
        self.mem = machine.memory.buffer()
        self.size = machine.memory.size
        self.dctx = zstandard.ZstdDecompressor()
        self.disk: list[tuple[_Chunk, str]] = []
        self.stats = RestoreStats()
        self._stats_lock = threading.Lock()
        self.what = what

    def chunk(self, chunk: _Chunk, what: str) -> None:
        """One chunk, in stream order: a memory chunk is verified and decompressed into memory now, a disk
        chunk verified and kept for `write_disk`."""
        if chunk.region is Region.DISK:
            if zlib.crc32(chunk.body) != chunk.crc:
                raise CheckpointError(f"{what}: {chunk.describe()} fails its checksum")
            self.disk.append((chunk, what))
            return
        self._check_bounds(chunk, what)
        _populate(self.machine.memory.host_address + chunk.offset, chunk.raw_len)
        self._load(chunk, what, self.dctx)

    def chunks(self, items: list[tuple[_Chunk, str]], threads: int = DEFAULT_THREADS) -> None:
        """Many chunks (a whole file), on `threads` threads, each pre-faulting its part of memory in one
        call per run of chunks, then decompressing into it. Order is kept where it matters: the list is
        cut where a chunk overlaps one before it (pre-copy, then its delta; a chain's files), and each
        piece is loaded before the next."""
        memory: list[tuple[_Chunk, str]] = []
        for chunk, what in items:
            if chunk.region is Region.DISK:
                self.chunk(chunk, what)
            else:
                self._check_bounds(chunk, what)
                memory.append((chunk, what))
        base = self.machine.memory.host_address

        def populate(part: list[tuple[_Chunk, str]]) -> None:
            for start, length in _coalesce([(c.offset, c.raw_len) for c, _w in part]):
                _populate(base + start, length)

        pieces: list[list[tuple[_Chunk, str]]] = [[]]
        end = -1
        for chunk, what in memory:
            if chunk.offset < end:
                pieces.append([])
            pieces[-1].append((chunk, what))
            end = chunk.offset + chunk.raw_len
        if threads < 2 or len(memory) < 8:
            populate(memory)
            for chunk, what in memory:
                self._load(chunk, what, self.dctx)
            return

        def work(part: list[tuple[_Chunk, str]]) -> None:  # each thread faults in its own part too
            populate(part)
            dctx = zstandard.ZstdDecompressor()
            for chunk, what in part:
                self._load(chunk, what, dctx)

        with ThreadPoolExecutor(threads) as pool:
            for piece in pieces:
                step = (len(piece) + threads - 1) // threads
                parts = [piece[i : i + step] for i in range(0, len(piece), step)]
                for future in [pool.submit(work, part) for part in parts]:
                    future.result()

    def _check_bounds(self, chunk: _Chunk, what: str) -> None:
        if chunk.offset + chunk.raw_len > self.size:
            raise CheckpointError(f"{what}: {chunk.describe()} lies outside guest RAM ({self.size} bytes)")

    def _load(self, chunk: _Chunk, what: str, dctx: zstandard.ZstdDecompressor) -> None:
        """Verify one memory chunk and decompress it straight into guest memory."""
        if zlib.crc32(chunk.body) != chunk.crc:
            raise CheckpointError(f"{what}: {chunk.describe()} fails its checksum")
        frame = chunk.frame
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        if size != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} holds {size} bytes")
        view = self.mem[chunk.offset : chunk.offset + chunk.raw_len]
        self.machine.memory.mark_dirty(chunk.offset, chunk.raw_len)  # a monitor write: hashes and logs see it
        got = 0
        try:
            with dctx.stream_reader(frame) as reader:
                while got < chunk.raw_len:
                    n = reader.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        finally:
            view.release()
        if got != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} decompresses to {got} bytes")
        with self._stats_lock:
            self.stats.memory_chunks += 1
            self.stats.raw_bytes += chunk.raw_len

    def write_disk(self, disk_path: str | None, disk_size: int, full: bool) -> None:
        """Rewrite the disk to the checkpoint's contents (every disk chunk is already verified)."""
        if disk_path is None:
            return
        fd = os.open(disk_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if full:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, disk_size)
            for chunk, what in self.disk:
                if chunk.offset + chunk.raw_len > disk_size:
                    raise CheckpointError(f"{what}: {chunk.describe()} lies past the disk end")
                try:
                    data = self.dctx.decompress(chunk.frame, max_output_size=chunk.raw_len)
                except zstandard.ZstdError as err:
                    raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
                os.pwrite(fd, data, chunk.offset)
                self.stats.disk_chunks += 1
                self.stats.raw_bytes += len(data)
        finally:
            os.close(fd)
        self.machine.block.sectors = disk_size // 512

    def finish(
        self, manifest: vmft_pb2.CheckpointManifest, journal: Journal, verify_digest: bool
    ) -> None:
        machine = self.machine
        machine.restore_state(
            vcpu_from_proto(manifest.vcpu), manifest.machine, live=journal.mode is not JournalMode.REPLAY
        )
        if verify_digest and manifest.state_digest:
            found = machine.state_digest()
            if found != manifest.state_digest:
                raise CheckpointError(
                    f"{self.what}: the restored state hash {found.hex()} differs from the checkpoint's "
                    f"{manifest.state_digest.hex()}"
                )
        self.stats.checkpoint_id = manifest.header.checkpoint_id
        self.stats.position = manifest.position


def _prepare_disk(header: vmft_pb2.CheckpointHeader, disk_path: str | None) -> None:
    """A checkpoint with a disk restored where that disk does not exist yet: create it (empty)."""
    if disk_path is not None and not os.path.exists(disk_path):
        with open(disk_path, "wb") as f:
            f.truncate(header.config.disk_size)


def restore_files(
    path: str | Path | list[Path] | list[str],
    *,
    journal: JournalArg = None,
    image: GuestImage | None = None,
    mem_size: int | None = None,
    disk: str | None = None,
    hang_timeout_s: float | None = None,
    kvm: Kvm | None = None,
    verify_digest: bool = False,
) -> tuple[Machine, RestoreStats]:
    """Build a machine from a checkpoint file (with its chain of parents, found in the same directory),
    or from an explicit chain (full first). The machine is not started; `machine.position` is the
    checkpoint's. `journal`: a journal, or a function of the position that makes one (for example a
    RecordJournal or ReplayJournal with that start position); default: live. `disk`: where the disk
    goes (default: the path recorded in the checkpoint); it is rewritten to the checkpoint's contents."""
    started = time.perf_counter()
    paths = find_chain(path) if isinstance(path, (str, Path)) else [Path(p) for p in path]
    chain = open_chain(paths, image, mem_size)
    try:
        last = chain[-1]
        image = _image_for(last.header, image, last.what)
        config = _config_for(last.header, image, disk, hang_timeout_s)
        for ckpt in chain:  # disk chunks are verified before anything is written
            for chunk in ckpt.chunks:
                if chunk.region is Region.DISK and zlib.crc32(chunk.body) != chunk.crc:
                    raise CheckpointError(f"{ckpt.what}: {chunk.describe()} fails its checksum")
        _prepare_disk(last.header, config.disk)
        machine = Machine(config, journal=_journal_for(journal, last.manifest.position), image=image, kvm=kvm)
        try:
            loader = _Loader(machine, last.what)
            loader.chunks([(chunk, ckpt.what) for ckpt in chain for chunk in ckpt.chunks])
            loader.write_disk(config.disk, last.header.config.disk_size, full=True)
            loader.finish(last.manifest, machine.journal, verify_digest)
        except BaseException:
            machine.close()
            raise
    finally:
        for ckpt in chain:
            ckpt.close()
    loader.stats.chain_length = len(chain)
    loader.stats.seconds = time.perf_counter() - started
    return machine, loader.stats


def restore_stream(
    records: Iterable[bytes],
    *,
    journal: JournalArg = None,
    image: GuestImage | None = None,
    mem_size: int | None = None,
    disk: str | None = None,
    hang_timeout_s: float | None = None,
    kvm: Kvm | None = None,
    verify_digest: bool = False,
    what: str = "checkpoint stream",
) -> tuple[Machine, RestoreStats]:
    """Build a machine from a full checkpoint's records as `Checkpointer.records()` yields them (each
    item one record), for example received over gRPC. The header is checked before the machine is
    built; memory chunks are decompressed into it as they arrive; the disk is written only after the
    manifest has verified every chunk. On any error the machine is discarded unstarted."""
    started = time.perf_counter()
    it = iter(records)
    first = next(it, None)
    if first is None:
        raise CheckpointError(f"{what}: truncated: empty")
    rtype, crc, body = _split_record(first, what)
    if rtype != RecordType.HEADER:
        raise CheckpointError(f"{what}: corrupted: first record is type {rtype}, not a header")
    header = _parse_proto(body, crc, vmft_pb2.CheckpointHeader, what, "header")
    assert isinstance(header, vmft_pb2.CheckpointHeader)
    check_compatible(header, image, mem_size, what)
    if header.incremental:
        raise CheckpointError(
            f"{what}: incremental checkpoint whose parent {header.parent_id[:12]} is missing "
            f"(a stream must carry a full checkpoint)"
        )
    image = _image_for(header, image, what)
    config = _config_for(header, image, disk, hang_timeout_s)
    _prepare_disk(header, config.disk)
    machine: Machine | None = None
    try:
        loader: _Loader | None = None
        crcs: list[int] = []
        manifest: vmft_pb2.CheckpointManifest | None = None
        for record in it:
            if manifest is not None:
                raise CheckpointError(f"{what}: corrupted: records after the manifest")
            rtype, crc, body = _split_record(record, what)
            if rtype == RecordType.CHUNK:
                chunk = _chunk_from(body, crc, len(crcs), what)
                crcs.append(crc)
                if loader is None:
                    machine = Machine(config, journal=LiveJournal(), image=image, kvm=kvm)
                    loader = _Loader(machine, what)
                loader.chunk(chunk, what)
            elif rtype == RecordType.MANIFEST:
                parsed = _parse_proto(body, crc, vmft_pb2.CheckpointManifest, what, "manifest")
                assert isinstance(parsed, vmft_pb2.CheckpointManifest)
                manifest = parsed
            else:
                raise CheckpointError(f"{what}: corrupted: record of unknown type {rtype}")
        if manifest is None:
            raise CheckpointError(f"{what}: truncated: it ends after {len(crcs)} chunks, before the manifest")
        _check_manifest(what, header, manifest, crcs)
        if loader is None:
            machine = Machine(config, journal=LiveJournal(), image=image, kvm=kvm)
            loader = _Loader(machine, what)
        assert machine is not None
        machine.set_journal(_journal_for(journal, manifest.position))
        loader.write_disk(config.disk, header.config.disk_size, full=True)
        loader.finish(manifest, machine.journal, verify_digest)
    except BaseException:
        if machine is not None:
            machine.close()
        raise
    loader.stats.chain_length = 1
    loader.stats.seconds = time.perf_counter() - started
    return machine, loader.stats


def _split_record(record: bytes, what: str) -> tuple[int, int, memoryview]:
    view = memoryview(record)
    rtype, crc, body, end = _parse_frame(view, 0, what)
    if end != len(view):
        raise CheckpointError(f"{what}: corrupted: a record of {len(view)} bytes frames {end}")
    return rtype, crc, body


def write_records(records: Iterable[bytes], path: str | Path) -> int:
    """Store a checkpoint's records (from a stream) as a checkpoint file; returns its size."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    size = len(MAGIC)
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        for record in records:
            f.write(record)
            size += len(record)
    os.replace(tmp, path)
    return size


# ----- a directory of periodic checkpoints --------------------------------------------------------------


@dataclass
class SavedCheckpoint:
    path: Path
    checkpoint_id: str
    incremental: bool
    saved_at: float  # time.monotonic() when it was complete
    position: int


class CheckpointStore:
    """Periodic checkpoints of one VM in a directory: a full one, then incrementals against the one
    before, a new full one every `full_every`; older chains pruned (the last `keep_chains` kept)."""

    def __init__(self, directory: str | Path, full_every: int = 10, keep_chains: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.full_every = full_every
        self.keep_chains = keep_chains
        self._seq = max((self._seq_of(p) for p in self.directory.glob(f"*{SUFFIX}")), default=0)
        self._since_full = 0
        self.bad: set[str] = set()  # checkpoint ids a restart found faulty (restart.py)
        self.saved: list[SavedCheckpoint] = []  # oldest first

    @staticmethod
    def _seq_of(path: Path) -> int:
        head = path.name.split("-", 1)[0]
        return int(head) if head.isdigit() else 0

    def save(
        self, checkpointer: Checkpointer, on_paused: Callable[[int], None] | None = None
    ) -> CheckpointStats:
        full = not checkpointer.last_id or self._since_full + 1 >= self.full_every
        self._seq += 1
        kind = "full" if full else "incr"
        path = self.directory / f"{self._seq:06d}-{kind}{SUFFIX}"
        stats = checkpointer.save(path, full=full, on_paused=on_paused)
        self._since_full = 0 if not stats.incremental else self._since_full + 1
        self.saved.append(
            SavedCheckpoint(path, stats.checkpoint_id, stats.incremental, time.monotonic(), stats.position)
        )
        self._prune()
        return stats

    def _prune(self) -> None:
        fulls = [i for i, saved in enumerate(self.saved) if not saved.incremental]
        if len(fulls) <= self.keep_chains:
            return
        cut = fulls[-self.keep_chains]
        for saved in self.saved[:cut]:
            saved.path.unlink(missing_ok=True)
        self.saved = self.saved[cut:]

    def find(self, checkpoint_id: str) -> SavedCheckpoint | None:
        for saved in self.saved:
            if saved.checkpoint_id == checkpoint_id:
                return saved
        return None

    def latest(self) -> Path | None:
        """The newest checkpoint not marked bad."""
        entry = self.latest_entry()
        return entry.path if entry is not None else None

    def latest_entry(self, before: float | None = None) -> SavedCheckpoint | None:
        """The newest checkpoint not marked bad, complete by time.monotonic() `before` if given."""
        for saved in reversed(self.saved):
            if saved.checkpoint_id in self.bad or not saved.path.exists():
                continue
            if before is None or saved.saved_at <= before:
                return saved
        return None

    def mark_bad(self, checkpoint_id: str) -> None:
        self.bad.add(checkpoint_id)

    def rewind_to(self, checkpoint_id: str) -> None:
        """The VM was restored from `checkpoint_id`: later checkpoints belong to a timeline that no
        longer exists; forget them (and remove their files)."""
        for index, saved in enumerate(self.saved):
            if saved.checkpoint_id == checkpoint_id:
                for dead in self.saved[index + 1 :]:
                    dead.path.unlink(missing_ok=True)
                del self.saved[index + 1 :]
                return
