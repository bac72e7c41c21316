"""Static ELF64 guest images: parse, validate against guest RAM, load."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import ImageError
from monitor.guest_abi import IMAGE_MIN_ADDR
from monitor.memory import GuestMemory

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1
_PF_X = 1
_ET_EXEC = 2
_EM_X86_64 = 62


@dataclass(frozen=True)
class Segment:
    file_offset: int
    addr: int
    file_size: int
    mem_size: int
    executable: bool


@dataclass(frozen=True)
class GuestImage:
    path: str
    data: bytes
    entry: int
    segments: tuple[Segment, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def end(self) -> int:
        return max(s.addr + s.mem_size for s in self.segments)

    def check_fits(self, mem_size: int) -> None:
        for seg in self.segments:
            if seg.addr < IMAGE_MIN_ADDR or seg.addr + seg.mem_size > mem_size:
                raise ImageError(
                    f"{self.path}: segment at 0x{seg.addr:x}..0x{seg.addr + seg.mem_size:x} lies outside "
                    f"guest RAM usable for images (0x{IMAGE_MIN_ADDR:x}..0x{mem_size:x})"
                )

    def load_into(self, memory: GuestMemory) -> None:
        self.check_fits(memory.size)
        for seg in self.segments:
            memory.write(seg.addr, self.data[seg.file_offset : seg.file_offset + seg.file_size])
            bss = seg.mem_size - seg.file_size
            if bss:
                memory.write(seg.addr + seg.file_size, bytes(bss))


def parse_image(data: bytes, path: str = "<image>") -> GuestImage:
    if len(data) < _EHDR.size:
        raise ImageError(f"{path}: truncated: {len(data)} bytes is shorter than an ELF header")
    (ident, e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest) = (
        _EHDR.unpack_from(data)
    )
    if ident[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not an ELF file (bad magic {ident[:4]!r})")
    if ident[4] != 2:
        raise ImageError(f"{path}: wrong ELF class {ident[4]} (vmft guests are ELF64)")
    if ident[5] != 1:
        raise ImageError(f"{path}: not little-endian")
    if e_machine != _EM_X86_64:
        raise ImageError(f"{path}: wrong machine {e_machine} (vmft guests are x86-64, machine 62)")
    if e_type != _ET_EXEC:
        raise ImageError(f"{path}: ELF type {e_type} is not a static executable (ET_EXEC)")
    if phnum == 0 or phentsize != _PHDR.size:
        raise ImageError(f"{path}: no usable program headers")
    if phoff + phnum * phentsize > len(data):
        raise ImageError(f"{path}: truncated: program headers end past the end of the file")
    segments: list[Segment] = []
    for i in range(phnum):
        p_type, p_flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise ImageError(f"{path}: segment {i} has more file bytes than memory bytes")
        if p_offset + p_filesz > len(data):
            raise ImageError(f"{path}: truncated: segment {i} ends past the end of the file")
        segments.append(Segment(p_offset, p_paddr, p_filesz, p_memsz, bool(p_flags & _PF_X)))
    if not segments:
        raise ImageError(f"{path}: no loadable segments")
    if not any(s.executable and s.addr <= entry < s.addr + s.mem_size for s in segments):
        raise ImageError(f"{path}: entry point 0x{entry:x} is not inside an executable segment")
    return GuestImage(path, data, entry, tuple(segments))


def load_image_file(path: str | Path) -> GuestImage:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: cannot read guest image: {err.strerror}") from err
    return parse_image(data, str(path))
