"""The checkpoint format: framing, records, checksums and parsing. No KVM, no machine.

A checkpoint is a sequence of framed records, the same on disk and on the wire:

    record   = type u8, 0 u8, 0 u16, body length u32, crc32(body) u32, body
    HEADER   : proto CheckpointHeader (format, ABI, CPUID hash, id, parent id, VM config)
    CHUNK    : region u8 (0 memory, 1 disk), 3 zero bytes, offset u64, raw length u32, one zstd frame
    MANIFEST : proto CheckpointManifest (the header again, the machine state at the checkpoint's
               position, chunk counts, a digest of every chunk record's crc in order)

A file is MAGIC followed by the records; a stream (gRPC) carries one record per message. `RecordReader`
checks records one at a time in order, for a mapped file and a stream alike.
"""

from __future__ import annotations

import enum
import hashlib
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from google.protobuf.message import Message

from monitor.checkpoint.compat import check_format
from monitor.errors import CheckpointError
from proto import vmft_pb2

FORMAT_VERSION = 2  # 2: the machine state is the vCPU plus one message per component
MAGIC = b"VMFTCKP\x01"
SUFFIX = ".vmck"
CHUNK_SIZE = 256 << 10
MAX_RECORD = 64 << 20

FRAME = struct.Struct("<BBHII")
CHUNK_HEADER = struct.Struct("<B3xQI")

_M = TypeVar("_M", bound=Message)


class RecordType(enum.IntEnum):
    HEADER = 1
    CHUNK = 2
    MANIFEST = 3


class Region(enum.IntEnum):
    MEMORY = 0
    DISK = 1


# ----- writing ------------------------------------------------------------------------------------


def record(rtype: RecordType, body: bytes) -> bytes:
    return FRAME.pack(rtype, 0, 0, len(body), zlib.crc32(body)) + body


def chunk_record(region: Region, offset: int, raw_len: int, frame: bytes) -> tuple[bytes, int]:
    """A CHUNK record and its crc."""
    out = bytearray(FRAME.size + CHUNK_HEADER.size + len(frame))
    CHUNK_HEADER.pack_into(out, FRAME.size, region, offset, raw_len)
    out[FRAME.size + CHUNK_HEADER.size :] = frame
    crc = zlib.crc32(memoryview(out)[FRAME.size :])
    FRAME.pack_into(out, 0, RecordType.CHUNK, 0, 0, len(out) - FRAME.size, crc)
    return bytes(out), crc


def digest_crcs(crcs: list[int]) -> bytes:
    return hashlib.blake2b(struct.pack(f"<{len(crcs)}I", *crcs), digest_size=16).digest()


def write_records(records: Iterable[bytes], path: str | Path) -> int:
    """Store a checkpoint's records (from a stream or a Checkpointer) as a file, atomically (a temporary
    file renamed at the end); returns its size."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    size = len(MAGIC)
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for rec in records:
                f.write(rec)
                size += len(rec)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


# ----- reading ------------------------------------------------------------------------------------


@dataclass
class Chunk:
    region: Region
    offset: int
    raw_len: int
    body: memoryview  # the whole record body (chunk header and zstd frame)
    crc: int
    index: int

    @property
    def frame(self) -> memoryview:
        return self.body[CHUNK_HEADER.size :]

    def verify(self, what: str) -> None:
        if zlib.crc32(self.body) != self.crc:
            raise CheckpointError(f"{what}: {self.describe()} fails its checksum")

    def describe(self) -> str:
        return f"chunk {self.index} ({self.region.name.lower()} at 0x{self.offset:x}, {self.raw_len} bytes)"


def parse_frame(data: memoryview, offset: int, what: str) -> tuple[int, int, memoryview, int]:
    """(type, crc, body, next offset) of the record at `offset`."""
    if len(data) - offset < FRAME.size:
        raise CheckpointError(f"{what}: truncated: record at byte {offset} has an incomplete header")
    rtype, _z1, _z2, length, crc = FRAME.unpack_from(data, offset)
    start = offset + FRAME.size
    if length > MAX_RECORD:
        raise CheckpointError(f"{what}: corrupted: record at byte {offset} claims {length} bytes")
    if start + length > len(data):
        raise CheckpointError(
            f"{what}: truncated: record at byte {offset} needs {length} bytes, {len(data) - start} remain"
        )
    return rtype, crc, data[start : start + length], start + length


def split_record(rec: bytes | memoryview, what: str) -> tuple[int, int, memoryview]:
    """(type, crc, body) of one whole record (a stream item)."""
    view = memoryview(rec)
    rtype, crc, body, end = parse_frame(view, 0, what)
    if end != len(view):
        raise CheckpointError(f"{what}: corrupted: a record of {len(view)} bytes frames {end}")
    return rtype, crc, body


def parse_proto(body: memoryview, crc: int, message: type[_M], what: str, kind: str) -> _M:
    if zlib.crc32(body) != crc:
        raise CheckpointError(f"{what}: {kind} corrupted: it fails its checksum")
    msg = message()
    try:
        msg.ParseFromString(bytes(body))
    except Exception as err:  # DecodeError, and whatever else a damaged message makes protobuf raise
        raise CheckpointError(f"{what}: {kind} corrupted: {err}") from err
    return msg


def _chunk_from(body: memoryview, crc: int, index: int, what: str) -> Chunk:
    if len(body) < CHUNK_HEADER.size:
        raise CheckpointError(f"{what}: chunk {index} corrupted: {len(body)} bytes is too short")
    region, offset, raw_len = CHUNK_HEADER.unpack_from(body, 0)
    try:
        reg = Region(region)
    except ValueError:
        raise CheckpointError(f"{what}: chunk {index} corrupted: unknown region {region}") from None
    return Chunk(reg, offset, raw_len, body, crc, index)


class RecordReader:
    """Checks a checkpoint's records one at a time, in order: the header first (format version checked
    at once), then chunks, the manifest last. `feed` returns the chunk a CHUNK record carries;
    `finish` checks that the manifest came and agrees with the header and every chunk seen."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.header: vmft_pb2.CheckpointHeader | None = None
        self.manifest: vmft_pb2.CheckpointManifest | None = None
        self.crcs: list[int] = []

    def feed(self, rtype: int, crc: int, body: memoryview) -> Chunk | None:
        what = self.what
        if self.header is None:
            if rtype != RecordType.HEADER:
                raise CheckpointError(f"{what}: corrupted: first record is type {rtype}, not a header")
            self.header = parse_proto(body, crc, vmft_pb2.CheckpointHeader, what, "header")
            check_format(self.header.format_version, FORMAT_VERSION, what, "checkpoint")
            return None
        if self.manifest is not None:
            raise CheckpointError(f"{what}: corrupted: records after the manifest")
        if rtype == RecordType.CHUNK:
            chunk = _chunk_from(body, crc, len(self.crcs), what)
            self.crcs.append(crc)
            return chunk
        if rtype == RecordType.MANIFEST:
            self.manifest = parse_proto(body, crc, vmft_pb2.CheckpointManifest, what, "manifest")
            return None
        raise CheckpointError(f"{what}: corrupted: record of unknown type {rtype}")

    def feed_record(self, rec: bytes | memoryview) -> Chunk | None:
        """One whole record (a stream item)."""
        return self.feed(*split_record(rec, self.what))

    def require_header(self) -> vmft_pb2.CheckpointHeader:
        if self.header is None:
            raise CheckpointError(f"{self.what}: truncated: no header")
        return self.header

    def finish(self) -> vmft_pb2.CheckpointManifest:
        header = self.require_header()
        manifest = self.manifest
        what = self.what
        if manifest is None:
            raise CheckpointError(
                f"{what}: truncated: it ends after {len(self.crcs)} chunks, before the manifest"
            )
        if manifest.header != header:
            raise CheckpointError(f"{what}: manifest corrupted: its header differs from the leading header")
        listed = manifest.memory_chunks + manifest.disk_chunks
        if listed != len(self.crcs):
            raise CheckpointError(
                f"{what}: truncated or corrupted: the manifest lists {listed} chunks, "
                f"{len(self.crcs)} are present"
            )
        if manifest.chunks_digest != digest_crcs(self.crcs):
            raise CheckpointError(f"{what}: corrupted: the chunks differ from those the manifest lists")
        if manifest.position != manifest.machine.position:
            raise CheckpointError(f"{what}: manifest corrupted: inconsistent positions")
        return manifest


@dataclass
class ParsedCheckpoint:
    """A checkpoint whose structure, header and manifest have been verified (chunks not yet)."""

    what: str
    header: vmft_pb2.CheckpointHeader
    manifest: vmft_pb2.CheckpointManifest
    chunks: list[Chunk]
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


def _check_magic(head: bytes, what: str) -> None:
    if head == MAGIC:
        return
    if head[: len(MAGIC) - 1] == MAGIC[:-1] and len(head) == len(MAGIC):
        raise CheckpointError(f"{what}: checkpoint file format {head[-1]}; this vmft reads {MAGIC[-1]}")
    raise CheckpointError(f"{what}: not a vmft checkpoint (bad magic)")


def parse_checkpoint_bytes(data: memoryview, what: str) -> ParsedCheckpoint:
    """Verify a checkpoint file's structure (records, header, manifest, chunk list) without
    decompressing anything."""
    _check_magic(bytes(data[: len(MAGIC)]), what)
    offset = len(MAGIC)
    reader = RecordReader(what)
    chunks: list[Chunk] = []
    while offset < len(data):
        rtype, crc, body, offset = parse_frame(data, offset, what)
        chunk = reader.feed(rtype, crc, body)
        if chunk is not None:
            chunks.append(chunk)
    manifest = reader.finish()
    return ParsedCheckpoint(what, reader.require_header(), manifest, chunks)


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
    try:
        parsed = parse_checkpoint_bytes(memoryview(mapped), str(path))
    except BaseException:
        try:
            mapped.close()
        except BufferError:
            pass
        raise
    parsed.path = path
    parsed._mmap = mapped
    return parsed


def read_header(path: str | Path) -> vmft_pb2.CheckpointHeader:
    """Only the header of a checkpoint file (cheap: for finding parents)."""
    with open(path, "rb") as f:
        data = f.read(len(MAGIC) + FRAME.size)
        if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + FRAME.size:
            raise CheckpointError(f"{path}: not a vmft checkpoint")
        rtype, _a, _b, length, crc = FRAME.unpack_from(data, len(MAGIC))
        if rtype != RecordType.HEADER or length > MAX_RECORD:
            raise CheckpointError(f"{path}: header corrupted")
        body = memoryview(f.read(length))
    if len(body) != length:
        raise CheckpointError(f"{path}: truncated inside the header")
    return parse_proto(body, crc, vmft_pb2.CheckpointHeader, str(path), "header")


def file_records(path: str | Path) -> Iterator[bytes]:
    """The records of a saved checkpoint, as `Checkpointer.records()` yields them (to stream a file)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CheckpointError(f"{path}: not a vmft checkpoint (bad magic)")
        while True:
            head = f.read(FRAME.size)
            if not head:
                return
            if len(head) < FRAME.size:
                raise CheckpointError(f"{path}: truncated")
            length = FRAME.unpack(head)[3]
            if length > MAX_RECORD:
                raise CheckpointError(f"{path}: corrupted: a record claims {length} bytes")
            yield head + f.read(length)
