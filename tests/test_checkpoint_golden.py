"""A golden checkpoint file (tests/data/ticker-format2.vmck: format 2, the ticker guest with 16 MiB of RAM
and a 64 KiB disk, taken 50 ms into a run of 300 ticks) read by this version exactly as it was written,
refused clearly once the format version moves on, and restored (or refused for its provenance, on a host
or build it was not made for).

tests/data/ticker-format2.json is what the format-2 reader found in it when the file was made (header,
manifest fields, each chunk with the sha256 of its decompressed bytes, the machine state's components).
A reader that changes how it reads old checkpoints fails here even if the writer changed with it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import guest_image_path
from google.protobuf.json_format import MessageToDict

from monitor import builder, cpuid
from monitor.checkpoint import CheckpointError, open_checkpoint
from monitor.checkpoint import format as ckformat
from monitor.loader import load_image_file
from monitor.machine import StopReason

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "ticker-format2.vmck"
CONTENTS = DATA / "ticker-format2.json"
DISK = bytes(range(256)) * 256  # the 64 KiB disk the checkpoint was taken with


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def field_digest(value: Any) -> str | int:
    """A vCPU state field: the sha256 of its bytes (of its messages' bytes, repeated), an int as is."""
    if isinstance(value, bytes):
        return sha(value)
    if isinstance(value, int):
        return value
    return sha(b"".join(item.SerializeToString(deterministic=True) for item in value))


def summary(path: Path) -> dict[str, Any]:
    parsed = open_checkpoint(path)
    try:
        m = parsed.manifest
        decompressor = zstandard.ZstdDecompressor()
        chunks = []
        for chunk in parsed.chunks:
            chunk.verify(str(path))
            raw = decompressor.decompress(bytes(chunk.frame), max_output_size=chunk.raw_len)
            assert len(raw) == chunk.raw_len, chunk.describe()
            chunks.append([chunk.region.name, chunk.offset, chunk.raw_len, sha(raw)])
        machine = m.machine
        return {
            "header": MessageToDict(parsed.header),
            "position": m.position, "memory_chunks": m.memory_chunks, "disk_chunks": m.disk_chunks,
            "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes,
            "chunks_digest": m.chunks_digest.hex(), "state_digest": m.state_digest.hex(),
            "machine_position": machine.position,
            "vcpu": {f.name: field_digest(value) for f, value in machine.vcpu.ListFields()},
            "components": {name: sha(value) for name, value in sorted(machine.components.items())},
            "chunks": chunks,
        }  # fmt: skip
    finally:
        parsed.close()


def test_golden_checkpoint_reads_as_it_was_written() -> None:
    expected = json.loads(CONTENTS.read_text())
    got = summary(GOLDEN)
    for key in expected:
        assert got[key] == expected[key], key
    assert got == expected
    assert got["header"]["formatVersion"] == 2
    # What it holds: the vCPU and the devices of a running ticker, memory and the whole disk.
    assert {"regs", "sregs"} <= set(got["vcpu"]) and got["components"], got["components"]
    assert ["DISK", 0, len(DISK), sha(DISK)] in got["chunks"]
    assert got["position"] == got["machine_position"] > 0


def test_golden_checkpoint_is_refused_once_the_format_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ckformat.FORMAT_VERSION == 2
    monkeypatch.setattr(ckformat, "FORMAT_VERSION", 3)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(GOLDEN)
    assert re.search(r"checkpoint format version 2\b.*reads 3\b", str(err.value)), err.value


@pytest.mark.kvm
def test_golden_checkpoint_restores_where_it_was_made_and_is_refused_elsewhere(tmp_path: Path) -> None:
    """On the machine and build it was made on, it restores (its state digest checked) and the guest
    finishes its ticks; anywhere else the restore is refused, naming the image or the CPUID table."""
    image = load_image_file(str(guest_image_path("ticker")))
    header = open_checkpoint(GOLDEN).header
    disk = tmp_path / "ticker.disk"
    disk.write_bytes(bytes(len(DISK)))
    if header.config.image_sha256 != image.sha256 or header.cpuid_hash != cpuid.cpuid_hash():
        with pytest.raises(CheckpointError, match="image|CPUID"):
            builder.restore(GOLDEN, image=image, disk=str(disk))
        assert disk.read_bytes() == bytes(len(DISK)), "a refused restore wrote the disk"
        return
    console = bytearray()
    machine, stats = builder.restore(
        GOLDEN, image=image, disk=str(disk), verify_digest=True, on_console=console.extend
    )
    try:
        assert stats.position == header_position(GOLDEN)
        assert disk.read_bytes() == DISK
        result = machine.run_blocking(30)
        assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    finally:
        machine.close()
    assert bytes(console).startswith(b"ticker: ticks=300 "), bytes(console)


def header_position(path: Path) -> int:
    parsed = open_checkpoint(path)
    try:
        return int(parsed.manifest.position)
    finally:
        parsed.close()
