"""Loading an x86-64 Linux executable as execve does: its PT_LOAD segments, and its interpreter.

Static (ET_EXEC), static-PIE and dynamic (ET_DYN with PT_INTERP) programs. Addresses are Linux's
without randomisation (a PIE at 0x555555554000, the interpreter below the mmap top), so a run is a
function of its inputs. Every problem is one LinuxImageError naming the file and what is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from monitor.errors import ImageError
from monitor.linux.mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, page_down, page_up

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_INTERP, PT_PHDR, PT_GNU_STACK = 1, 3, 6, 0x6474E551
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PIE_BASE = 0x5555_5555_4000
_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 8: "MIPS", 21: "PowerPC64", 22: "s390"}


class LinuxImageError(ImageError):
    """A program that cannot be run as a Linux guest."""

    hint = "give an x86-64 Linux executable (static, or dynamic with its libraries in the root)"


@dataclass(frozen=True)
class ProgramHeader:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfFile:
    path: str
    data: bytes
    type: int
    entry: int
    phoff: int
    phnum: int
    headers: tuple[ProgramHeader, ...]
    host: str = ""  # the host file it was read from (for the cpuid scan)

    @property
    def interpreter(self) -> str | None:
        for ph in self.headers:
            if ph.type == PT_INTERP:
                raw = self.data[ph.offset : ph.offset + ph.filesz]
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return None


def parse(data: bytes, path: str, host: str = "") -> ElfFile:
    if len(data) < 4 or data[:4] != b"\x7fELF":
        if data[:2] == b"#!":
            line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
            raise LinuxImageError(f"{path}: a script ({line}), not an executable: run its interpreter")
        raise LinuxImageError(f"{path}: not an ELF executable")
    if len(data) < _EHDR.size:
        raise LinuxImageError(f"{path}: truncated ELF header")
    ident, e_type, machine, _v, entry, phoff, _sh, _fl, _eh, phentsize, phnum, *_ = _EHDR.unpack_from(data)
    if ident[4] != 2 or machine != EM_X86_64:
        arch = _MACHINES.get(machine, f"machine {machine}")
        bits = "64-bit" if ident[4] == 2 else "32-bit"
        raise LinuxImageError(f"{path}: built for {arch} ({bits}), not x86-64")
    if ident[5] != 1:
        raise LinuxImageError(f"{path}: big-endian ELF")
    if e_type not in (ET_EXEC, ET_DYN):
        raise LinuxImageError(f"{path}: ELF type {e_type} is not an executable")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(data):
        raise LinuxImageError(f"{path}: bad or truncated program headers")
    headers = []
    for i in range(phnum):
        p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * _PHDR.size
        )
        if p_type in (PT_LOAD, PT_INTERP) and (
            offset + filesz > len(data) or filesz > memsz and p_type == PT_LOAD
        ):
            raise LinuxImageError(f"{path}: segment {i} lies outside the file")
        headers.append(ProgramHeader(p_type, flags, offset, vaddr, filesz, memsz))
    if not any(h.type == PT_LOAD for h in headers):
        raise LinuxImageError(f"{path}: no loadable segments")
    return ElfFile(path, data, e_type, entry, phoff, phnum, tuple(headers), host)


def _prot(flags: int) -> int:
    return (
        (PROT_READ if flags & 4 else 0) | (PROT_WRITE if flags & 2 else 0) | (PROT_EXEC if flags & 1 else 0)
    )


@dataclass(frozen=True)
class Loaded:
    base: int  # load bias
    entry: int  # entry with the bias applied
    phdr: int  # address of the program headers in guest memory
    end: int  # highest mapped address (the break starts above it)


# (guest path, host path, read the whole file, contents, file offset) -> contents
CodeFilter = Callable[[str, str, Callable[[], bytes], bytes, int], bytes]


def load(
    space: AddressSpace, elf: ElfFile, base: int | None = None, code: CodeFilter | None = None
) -> Loaded:
    loads = [h for h in elf.headers if h.type == PT_LOAD]
    low = page_down(min(h.vaddr for h in loads))
    high = page_up(max(h.vaddr + h.memsz for h in loads))
    if elf.type == ET_EXEC:
        bias = 0
    elif base is not None:
        bias = base - low
    else:
        bias = space.find_free(high - low) - low
    if not space.is_free(low + bias, high + bias):
        raise LinuxImageError(f"{elf.path}: segments at {low + bias:#x}..{high + bias:#x} cannot be placed")
    end = 0
    for ph in loads:
        start = page_down(ph.vaddr)
        file_start = ph.offset - (ph.vaddr - start)
        if file_start < 0:
            raise LinuxImageError(f"{elf.path}: segment offset and address disagree")
        contents = elf.data[file_start : ph.offset + ph.filesz]
        if code is not None and ph.flags & 1:
            contents = code(elf.path, elf.host, lambda: elf.data, contents, file_start)
        length = page_up(ph.vaddr + ph.memsz) - start
        space.map(start + bias, length, _prot(ph.flags), contents, name=elf.path, offset=file_start)
        end = max(end, ph.vaddr + ph.memsz + bias)
    phdr = 0
    for ph in elf.headers:
        if ph.type == PT_PHDR:
            phdr = ph.vaddr + bias
    if not phdr:
        for ph in loads:
            if ph.offset <= elf.phoff < ph.offset + ph.filesz:
                phdr = ph.vaddr + (elf.phoff - ph.offset) + bias
    return Loaded(bias, elf.entry + bias, phdr, end)


def load_program(
    space: AddressSpace, elf: ElfFile, interp: ElfFile | None, code: CodeFilter | None = None
) -> tuple[Loaded, Loaded | None]:
    program = load(space, elf, PIE_BASE if elf.type == ET_DYN else None, code)
    space.set_brk_start(program.end + (PAGE if interp else 0))
    loaded_interp = load(space, interp, None, code) if interp is not None else None
    return program, loaded_interp
