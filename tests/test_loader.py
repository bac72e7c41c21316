"""Guest images: every kind of malformed or misplaced ELF is refused with a message naming the problem,
through the library and through `vmft run`; the monitor's ABI header and boot layout agree."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.guest_abi import IMAGE_MIN_ADDR
from monitor.loader import ImageError, load_image_file, parse_image

ROOT = Path(__file__).resolve().parent.parent
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


def elf(
    *,
    ident: bytes = b"\x7fELF\x02\x01\x01" + bytes(9),
    e_type: int = 2,
    machine: int = 62,
    entry: int = IMAGE_MIN_ADDR,
    segments: list[tuple[int, int, bytes, int]] | None = None,  # (flags, addr, data, memsz)
) -> bytes:
    """A minimal static ELF64 image with the given program headers."""
    if segments is None:
        segments = [(5, IMAGE_MIN_ADDR, b"\xf4" * 16, 16)]
    phoff = EHDR.size
    data_at = phoff + PHDR.size * len(segments)
    headers = b""
    body = b""
    for flags, addr, data, memsz in segments:
        headers += PHDR.pack(1, flags, data_at + len(body), addr, addr, len(data), memsz, 0x1000)
        body += data
    ehdr = EHDR.pack(
        ident, e_type, machine, 1, entry, phoff, 0, 0, EHDR.size, PHDR.size, len(segments), 0, 0, 0
    )
    return ehdr + headers + body


def test_a_good_image_parses() -> None:
    image = parse_image(elf(), "good")
    assert image.entry == IMAGE_MIN_ADDR and len(image.segments) == 1
    image.check_fits(64 << 20)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (elf()[:40], "truncated"),
        (b"MZ" + elf()[2:], "not an ELF file"),
        (elf(ident=b"\x7fELF\x01\x01\x01" + bytes(9)), "wrong ELF class 1"),
        (elf(ident=b"\x7fELF\x02\x02\x01" + bytes(9)), "not little-endian"),
        (elf(machine=40), "wrong machine 40"),
        (elf(e_type=3), "not a static executable"),
        (elf(segments=[]), "no usable program headers"),
        (elf()[:-8], "truncated: segment 0 ends past the end of the file"),
        (elf(entry=0x200000), "entry point 0x200000 is not inside an executable segment"),
        (elf(segments=[(6, IMAGE_MIN_ADDR, b"\x00" * 16, 16)]), "not inside an executable segment"),
        (elf(segments=[(5, IMAGE_MIN_ADDR, b"\x00" * 32, 16)]), "more file bytes than memory bytes"),
    ],
)
def test_malformed_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_image(data, "bad.elf")


@pytest.mark.parametrize(
    ("addr", "memsz"),
    [(0x1000, 16), (IMAGE_MIN_ADDR - 16, 64), ((64 << 20) - 8, 16), (1 << 40, 16)],
)
def test_segments_outside_usable_ram_are_refused(addr: int, memsz: int) -> None:
    image = parse_image(elf(entry=addr, segments=[(5, addr, b"\xf4" * 8, memsz)]), "placed.elf")
    with pytest.raises(ImageError, match="lies outside guest RAM usable for images"):
        image.check_fits(64 << 20)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read guest image"):
        load_image_file(tmp_path / "nothing.elf")


@pytest.mark.kvm
def test_vmft_run_refuses_bad_images_clearly(tmp_path: Path) -> None:
    cases = {
        "truncated.elf": (elf()[:40], "truncated"),
        "arm.elf": (elf(machine=183), "wrong machine 183"),
        "low.elf": (elf(entry=0x2000, segments=[(5, 0x2000, b"\xf4" * 8, 8)]), "outside guest RAM"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        run = subprocess.run(
            [sys.executable, "-m", "replica.cli", "run", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert run.returncode == 2, (name, run.stderr)
        assert "vmft: error:" in run.stderr and message in run.stderr, (name, run.stderr)
        assert "Traceback" not in run.stderr
