"""The guest build (guests/Makefile): images, their layout, the shim's IDT, forbidden instructions,
warnings, and the native spin reference. No VM is run here."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
BUILD = GUESTS / "build"
PROGRAMS = ["hello", "spin", "exitloop", "kv", "ticker", "mixed", "badfault", "memtouch"]
IMAGE_BASE = 0x100000

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objdump") is None,
                                reason="needs gcc and objdump")


def make(*targets: str, **variables: str) -> subprocess.CompletedProcess[str]:
    args = ["make", "-C", str(GUESTS), f"PYTHON={sys.executable}", *targets]
    args += [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    result = make()
    assert result.returncode == 0, result.stdout + result.stderr


def read_elf(path: Path) -> tuple[dict[str, int], list[tuple[int, int, int, int, int, int]]]:
    """(header fields, program headers as (type, flags, offset, vaddr, filesz, memsz))."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path.name} is not an ELF file"
    ident_class, ident_data = data[4], data[5]
    e_type, e_machine, _version, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    phdrs = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize
        )
        phdrs.append((p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz))
    header = {"class": ident_class, "data": ident_data, "type": e_type, "machine": e_machine,
              "entry": e_entry}
    return header, phdrs


def symbols(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


@pytest.mark.parametrize("name", PROGRAMS)
def test_image_is_static_elf64_at_1mib(name: str) -> None:
    path = BUILD / f"{name}.elf"
    assert path.is_file(), f"{path} was not built"
    header, phdrs = read_elf(path)
    assert header["class"] == 2 and header["data"] == 1, "ELF64 little-endian"
    assert header["machine"] == 62, "x86-64"
    assert header["type"] == 2, "ET_EXEC (static, not PIE)"
    assert header["entry"] == IMAGE_BASE, "entry is the shim at 1 MiB"
    assert header["entry"] == symbols(path)["_start"]
    types = {p[0] for p in phdrs}
    assert 3 not in types and 2 not in types, "no PT_INTERP / PT_DYNAMIC: a static image"
    loads = [p for p in phdrs if p[0] == 1]
    assert loads
    for _type, _flags, _off, vaddr, filesz, memsz in loads:
        assert vaddr >= IMAGE_BASE and memsz >= filesz
        assert vaddr + memsz < 64 << 20, f"{name} needs more than 64 MiB of guest RAM"


def test_generated_header_is_ignored_by_git() -> None:
    header = BUILD / "include" / "vmft_abi.h"
    assert header.is_file()
    assert "#define VMFT_PORT_CONSOLE_WRITE" in header.read_text()
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(header)])
    assert ignored.returncode == 0, "guests/build/ must be git-ignored"


def test_idt_gates_point_at_the_shim_stubs() -> None:
    """The IDT is built by the linker (16-bit relocations): decode it from the image and check it."""
    path = BUILD / "hello.elf"
    data = path.read_bytes()
    _, phdrs = read_elf(path)
    syms = symbols(path)

    def read(vaddr: int, size: int) -> bytes:
        for _t, _f, off, va, filesz, _m in phdrs:
            if va <= vaddr and vaddr + size <= va + filesz:
                return data[off + vaddr - va : off + vaddr - va + size]
        raise AssertionError(f"0x{vaddr:x} is not in a loaded segment")

    limit, base = struct.unpack("<HQ", read(syms["idt_desc"], 10))
    assert base == syms["idt"] and limit == 0x81 * 16 - 1
    expected = {v: (f"exc_{v}", 0x8E) for v in range(32)}
    expected.update({0x20: ("irq_timer", 0x8E), 0x21: ("irq_net_rx", 0x8E), 0x22: ("irq_block", 0x8E),
                     0x23: ("irq_console_in", 0x8E), 0x80: ("sys_gate", 0xEE)})
    for vector in range(0x81):
        lo, sel, ist, typ, mid, hi, _ = struct.unpack("<HHBBHII", read(base + 16 * vector, 16))
        if vector not in expected:
            assert typ == 0, f"vector 0x{vector:x} should be absent"
            continue
        name, gate_type = expected[vector]
        assert lo | (mid << 16) | (hi << 32) == syms[name], f"vector 0x{vector:x} -> {name}"
        assert sel == 0x08 and ist == 0 and typ == gate_type


def test_check_insns_passes() -> None:
    result = make("check-insns")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check-insns: ok" in result.stdout


def test_check_insns_catches_rdtsc(tmp_path: Path) -> None:
    src = tmp_path / "bad.c"
    src.write_text('void _start(void) { unsigned a, d; __asm__ volatile("rdtsc" : "=a"(a), "=d"(d));'
                   " for (;;) {} }\n")
    bad = tmp_path / "bad.elf"
    subprocess.run(["gcc", "-ffreestanding", "-nostdlib", "-static", "-o", str(bad), str(src)], check=True)
    result = make("check-insns", ELFS=str(bad))
    assert result.returncode != 0
    assert "forbidden instruction" in result.stdout


def test_guest_sources_compile_without_warnings() -> None:
    flags = make("-s", "print-cflags").stdout.split()
    assert "-Wall" in flags and "-Wextra" in flags
    sources = sorted((GUESTS / "runtime").glob("*.c")) + sorted((GUESTS / "programs").glob("*.c"))
    for src in sources:
        if src.name == "spin_native.c":  # a host program
            continue
        result = subprocess.run(["gcc", *flags, "-fsyntax-only", str(src)], cwd=GUESTS, capture_output=True,
                                text=True)
        assert result.returncode == 0 and "warning" not in result.stderr, f"{src.name}:\n{result.stderr}"


def spin_reference(n: int) -> int:
    """programs/spin_loop.c in Python."""
    mask = (1 << 64) - 1
    x, acc = 0x9E3779B97F4A7C15, 0
    for i in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        acc = (acc + ((x ^ i) * 0x2545F4914F6CDD1D)) & mask
        acc = ((acc << 5) | (acc >> 59)) & mask
    return acc ^ x


def test_spin_native_checksum_is_deterministic_and_matches_the_loop() -> None:
    native = BUILD / "spin-native"
    runs = [subprocess.run([str(native), "20000"], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] == f"spin: iterations=20000 checksum={spin_reference(20000):x}\n"
    bad = subprocess.run([str(native), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
