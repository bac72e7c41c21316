"""The checkpoint format without KVM: records written and parsed back, every kind of damage refused with a
message that names it, other format versions refused, compatibility and chain checks, range helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from monitor import cpuid
from monitor.checkpoint import compat, memops
from monitor.checkpoint.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_RECORD,
    RecordReader,
    RecordType,
    Region,
    chunk_record,
    digest_crcs,
    file_records,
    open_checkpoint,
    parse_checkpoint_bytes,
    read_header,
    record,
    write_records,
)
from monitor.errors import CheckpointError, LogError
from monitor.guest_abi import ABI_VERSION
from proto import vmft_pb2

SHA = "ab" * 32


def header(**changes: object) -> vmft_pb2.CheckpointHeader:
    h = vmft_pb2.CheckpointHeader(
        format_version=FORMAT_VERSION,
        abi_version=ABI_VERSION,
        cpuid_hash=cpuid.cpuid_hash(),
        checkpoint_id="c" * 32,
        config=vmft_pb2.CheckpointVmConfig(image_path="x.elf", image_sha256=SHA, mem_size=64 << 20),
        chunk_size=4096,
    )
    for name, value in changes.items():
        setattr(h, name, value)
    return h


PIECES = [(Region.MEMORY, 0, b"a" * 4096), (Region.MEMORY, 8192, b"b" * 100), (Region.DISK, 512, b"d" * 512)]


def make_records(
    h: vmft_pb2.CheckpointHeader | None = None, position: int = 7, machine_position: int | None = None
) -> list[bytes]:
    """A small, valid checkpoint's records: header, three chunks, manifest."""
    h = h or header()
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    out = [record(RecordType.HEADER, h.SerializeToString())]
    crcs = []
    for region, offset, data in PIECES:
        rec, crc = chunk_record(region, offset, len(data), cctx.compress(data))
        out.append(rec)
        crcs.append(crc)
    state = vmft_pb2.MachineState(
        position=position if machine_position is None else machine_position,
        vcpu=vmft_pb2.VcpuState(regs=b"r" * 8),
        components={"timer": vmft_pb2.TimerState(deadline_ns=5).SerializeToString()},
    )
    manifest = vmft_pb2.CheckpointManifest(
        header=h,
        position=position,
        machine=state,
        memory_chunks=2,
        disk_chunks=1,
        chunks_digest=digest_crcs(crcs),
    )
    out.append(record(RecordType.MANIFEST, manifest.SerializeToString()))
    return out


def as_file(records: list[bytes]) -> memoryview:
    return memoryview(MAGIC + b"".join(records))


def flip(rec: bytes, index: int) -> bytes:
    data = bytearray(rec)
    data[index] ^= 0xFF
    return bytes(data)


def test_round_trip_through_a_file_and_a_stream(tmp_path: Path) -> None:
    records = make_records()
    path = tmp_path / "c.vmck"
    assert write_records(records, path) == len(MAGIC) + sum(map(len, records))
    assert not list(tmp_path.glob("*.tmp"))
    assert list(file_records(path)) == records
    assert read_header(path) == header()
    parsed = open_checkpoint(path)
    try:
        assert parsed.header == header() and parsed.checkpoint_id == "c" * 32
        timer = parsed.manifest.machine.components["timer"]
        assert timer == vmft_pb2.TimerState(deadline_ns=5).SerializeToString()
        dctx = zstandard.ZstdDecompressor()
        got = []
        for chunk in parsed.chunks:
            chunk.verify(parsed.what)
            got.append((chunk.region, chunk.offset, dctx.decompress(chunk.frame)))
        assert got == PIECES
    finally:
        parsed.close()
    reader = RecordReader("stream")
    chunks = [c for c in (reader.feed_record(r) for r in records) if c is not None]
    assert [(c.region, c.offset) for c in chunks] == [(r, o) for r, o, _d in PIECES]
    assert reader.finish().position == 7


def _refused(data: memoryview | list[bytes], expected: str) -> None:
    view = data if isinstance(data, memoryview) else as_file(data)
    with pytest.raises(CheckpointError, match=expected):
        parse_checkpoint_bytes(view, "ckpt")
    if isinstance(data, list):  # the stream reader refuses the same damage
        with pytest.raises(CheckpointError, match=expected):
            reader = RecordReader("ckpt")
            for rec in data:
                reader.feed_record(rec)
            reader.finish()


@dataclass
class Damage:
    name: str
    records: list[bytes] | None  # None: `raw` is the whole file
    expected: str
    raw: bytes = b""


def damages() -> list[Damage]:
    good = make_records()
    whole = bytes(as_file(good))
    swapped = [good[0], good[2], good[1], *good[3:]]
    bad_region = bytearray(good[1])
    bad_region[12] = 9  # region byte of the chunk header
    bad_region_rec = record(RecordType.CHUNK, bytes(bad_region[12:]))
    other_header = make_records(header(checkpoint_id="d" * 32))[0]
    huge = bytes([1, 0, 0, 0]) + (MAX_RECORD + 1).to_bytes(4, "little")
    return [
        Damage("truncated inside a record", None, "truncated: record at byte .* needs", whole[:-10]),
        Damage("truncated frame header", None, "incomplete header", whole + b"\x02\x00"),
        Damage("no manifest", good[:-1], "before the manifest"),
        Damage("only the magic", None, "truncated: no header", MAGIC),
        Damage("bad magic", None, r"not a vmft checkpoint \(bad magic\)", b"NOTACKPT" + whole[8:]),
        Damage("other file format", None, "file format 2; this vmft reads 1", MAGIC[:-1] + b"\x02"),
        Damage("header checksum", [flip(good[0], 14), *good[1:]], "header corrupted: it fails its checksum"),
        Damage("manifest checksum", [*good[:-1], flip(good[-1], 20)], "manifest corrupted"),
        Damage("missing chunk", [good[0], good[1], good[3], good[4]], "lists 3 chunks, 2 are present"),
        Damage("reordered chunks", swapped, "the chunks differ from those the manifest lists"),
        Damage("record after the manifest", [*good, good[1]], "records after the manifest"),
        Damage("unknown record type", [good[0], b"\x07" + good[1][1:], *good[2:]], "unknown type 7"),
        Damage("unknown region", [good[0], bad_region_rec, *good[2:]], "unknown region 9"),
        Damage("first record not a header", good[1:], "first record is type 2, not a header"),
        Damage("huge record", None, f"claims {MAX_RECORD + 1} bytes", MAGIC + huge + bytes(4)),
        Damage("inconsistent positions", make_records(machine_position=8), "inconsistent positions"),
        Damage("manifest of another header", [other_header, *good[1:]], "its header differs"),
    ]


@pytest.mark.parametrize("damage", damages(), ids=lambda d: d.name)
def test_every_kind_of_damage_is_refused(damage: Damage) -> None:
    if damage.records is None:
        _refused(memoryview(damage.raw), damage.expected)
    else:
        _refused(damage.records, damage.expected)


def test_a_damaged_chunk_fails_its_own_checksum() -> None:
    good = make_records()
    parsed = parse_checkpoint_bytes(as_file([good[0], flip(good[1], -3), *good[2:]]), "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: chunk 0 \(memory at 0x0, 4096 bytes\) fails its"):
        parsed.chunks[0].verify("ckpt")


@pytest.mark.parametrize("version", [1, FORMAT_VERSION + 1, 0])
def test_other_format_versions_are_refused(version: int, tmp_path: Path) -> None:
    records = make_records(header(format_version=version))
    expected = f"checkpoint format version {version}; this vmft reads {FORMAT_VERSION}"
    _refused(records, expected)
    path = tmp_path / "v.vmck"
    write_records(records, path)
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(path)


def test_a_stream_record_must_frame_exactly_itself() -> None:
    good = make_records()
    with pytest.raises(CheckpointError, match="a record of .* bytes frames"):
        RecordReader("s").feed_record(good[0] + b"xx")
    with pytest.raises(CheckpointError, match="truncated: no header"):
        RecordReader("s").finish()


def test_read_header_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.vmck"
    path.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a vmft checkpoint"):
        read_header(path)
    good = make_records()
    path.write_bytes(MAGIC + good[0][: len(good[0]) - 3])
    with pytest.raises(CheckpointError, match="truncated inside the header"):
        read_header(path)


# ----- compatibility (shared with the event log) --------------------------------------------------------


@dataclass
class Image:
    path: str
    sha256: str


def test_provenance_checks_name_what_differs() -> None:
    ok = compat.Provenance(ABI_VERSION, cpuid.cpuid_hash(), SHA, 64 << 20)
    compat.check_provenance(ok, Image("x.elf", SHA), 64 << 20, "c")
    compat.check_provenance(ok, None, None, "c")
    cases = {
        "guest ABI 999": compat.Provenance(999, cpuid.cpuid_hash(), SHA, 64 << 20),
        "CPUID table 00": compat.Provenance(ABI_VERSION, "00", SHA, 64 << 20),
        "another image": compat.Provenance(ABI_VERSION, cpuid.cpuid_hash(), "cd" * 32, 64 << 20),
        "128 MiB of guest RAM, not 64 MiB: memory size mismatch": compat.Provenance(
            ABI_VERSION, cpuid.cpuid_hash(), SHA, 128 << 20
        ),
    }
    for expected, found in cases.items():
        with pytest.raises(CheckpointError, match=f"c: made with .*{expected}"):
            compat.check_provenance(found, Image("x.elf", SHA), 64 << 20, "c")
        with pytest.raises(LogError, match=f"the log was recorded with .*{expected}"):
            image = Image("x.elf", SHA)
            compat.check_provenance(found, image, 64 << 20, "the log", " was recorded", LogError)
    with pytest.raises(LogError, match="log format version 3; this vmft reads 1"):
        compat.check_format(3, 1, "l", "log", LogError)


def test_chain_links() -> None:
    full = header()
    incr = header(incremental=True, parent_id=full.checkpoint_id, checkpoint_id="e" * 32)
    compat.check_link(full, "full", incr, "incr", same_vm=True)
    with pytest.raises(CheckpointError, match="a full checkpoint cannot follow full"):
        compat.check_link(full, "full", full, "again", same_vm=True)
    with pytest.raises(CheckpointError, match="a different parent"):
        compat.check_link(incr, "incr", header(incremental=True, parent_id="f" * 32), "other", same_vm=True)
    with pytest.raises(CheckpointError, match="made for another VM"):
        compat.check_link(full, "full", incr, "incr", same_vm=False)


# ----- range helpers ------------------------------------------------------------------------------------


def test_range_helpers() -> None:
    assert memops.coalesce([(10, 5), (0, 4), (4, 2), (15, 1), (30, 1)]) == [(0, 6), (10, 6), (30, 1)]
    assert memops.page_runs([1, 2, 3, 5, 6, 9], max_pages=2) == [(1, 2), (3, 1), (5, 2), (9, 1)]
    assert memops.split_ranges([(0, 10), (20, 3)], limit=4) == [(0, 4), (4, 4), (8, 2), (20, 3)]
