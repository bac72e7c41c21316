"""CPUID made independent of the host core: `cpuid` instructions rewritten into a trap the monitor answers.

On kvm_pvm CPUID runs natively in ring 3 and never exits, and there is no CPUID faulting (docs/design.md); the
answer includes the core's APIC ID, which glibc stores (`_dl_x86_cpu_features`), so a recording replayed
on another core would differ. So when the monitor maps executable code from a file, it finds the
file's `cpuid` instructions (a linear-sweep disassembly by binutils' objdump, cached by content hash)
and replaces each 2-byte `cpuid` (0f a2) with `ud2` (0f 0b). The #UD comes to the monitor, which checks
that the address is one of the rewritten sites and answers with the host's CPUID with every per-core
field zeroed (leaf 1 EBX[31:24], the x2APIC IDs of leaves 0xB/0x1F/0x80000026, AMD's 0x8000001E): the
same on every core of this machine and on any machine of the same CPU model. A run's identity includes
a hash of these answers, so replay on a different CPU model is refused before it starts.

Not covered: code the program generates itself (JIT) and files made executable later by mprotect run
`cpuid` natively; RDRAND, RDSEED and RDPID cannot be trapped on this KVM (docs/linux.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path

from monitor.linux.native import load_code
from typing import Callable

log = logging.getLogger(__name__)

CPUID = b"\x0f\xa2"
UD2 = b"\x0f\x0b"
_OBJDUMP_TIMEOUT_S = 120
_SITE = re.compile(rb"^\s*([0-9a-f]+):\s+cpuid\s*$", re.MULTILINE)
_PHDR = struct.Struct("<IIQQQQQQ")

# void cpuid(u32 leaf, u32 subleaf, u32 out[4]):
#   push rbx; mov r8, rdx; mov eax, edi; mov ecx, esi; cpuid
#   mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("534989d089f889f10fa241890041895804418948084189500c5bc3")
_CpuidFn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
_lock = threading.Lock()
_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_sites_cache: dict[str, frozenset[int]] = {}
_warned = False


def host_cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The host CPU's raw answer (on whatever core this thread runs)."""
    global _fn
    with _lock:
        if _fn is None:
            _fn = _CpuidFn(load_code(_CPUID_CODE))
    out = (ctypes.c_uint32 * 4)()
    _fn(leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


def core_independent(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """The host's answer with every field that names the core zeroed."""
    eax, ebx, ecx, edx = host_cpuid(leaf, subleaf)
    if leaf == 1:
        ebx &= 0x00FFFFFF  # initial APIC ID
    elif leaf in (0xB, 0x1F, 0x80000026):
        edx = 0  # x2APIC ID
    elif leaf == 0x8000001E:
        eax = 0  # extended APIC ID
        ebx &= ~0xFF  # compute unit / core ID
        ecx &= ~0xFF  # node ID
    return eax, ebx, ecx, edx


def table_hash() -> str:
    """A hash of the answers glibc and OpenSSL ask for: equal on machines that answer the same."""
    h = hashlib.sha256()
    for leaf, subleaf in (
        (0, 0),
        (1, 0),
        (7, 0),
        (7, 1),
        (0xD, 0),
        (0xD, 1),
        (0x80000000, 0),
        (0x80000001, 0),
    ):
        h.update(struct.pack("<8I", leaf, subleaf, 0, 0, *core_independent(leaf, subleaf))[8:])
    return h.hexdigest()[:32]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmft" / "cpuid-sites"


def _disassemble(host_path: str, data: bytes) -> frozenset[int]:
    """File offsets of the `cpuid` instructions in the executable segments of an ELF file."""
    global _warned
    objdump = shutil.which("objdump")
    if objdump is None:
        if not _warned:
            _warned = True
            log.warning("objdump (binutils) is missing: cpuid runs natively and replay depends on the core")
        return frozenset()
    try:
        out = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", host_path],
            capture_output=True,
            timeout=_OBJDUMP_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("cannot disassemble %s (%s): its cpuid instructions run natively", host_path, err)
        return frozenset()
    segments = _exec_segments(data)
    sites = set()
    for match in _SITE.finditer(out):
        vaddr = int(match.group(1), 16)
        for p_vaddr, p_offset, p_filesz in segments:
            if p_vaddr <= vaddr < p_vaddr + p_filesz:
                offset = vaddr - p_vaddr + p_offset
                if data[offset : offset + 2] == CPUID:
                    sites.add(offset)
    return frozenset(sites)


def _exec_segments(data: bytes) -> list[tuple[int, int, int]]:
    if data[:4] != b"\x7fELF" or len(data) < 64:
        return []
    phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
    segments = []
    for i in range(phnum):
        at = phoff + i * _PHDR.size
        if at + _PHDR.size > len(data):
            break
        p_type, flags, offset, vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack_from(data, at)
        if p_type == 1 and flags & 1:
            segments.append((vaddr, offset, filesz))
    return segments


def cpuid_sites(host_path: str, read: Callable[[], bytes], digest: str) -> frozenset[int]:
    """Where the file host_path (contents from `read`, sha256 `digest`) has cpuid instructions; cached
    by content hash (in memory, and on disk under ~/.cache/vmft/cpuid-sites)."""
    sites = _sites_cache.get(digest)
    if sites is not None:
        return sites
    data = read()
    segments = _exec_segments(data)
    if not any(CPUID in data[o : o + n] for _v, o, n in segments):
        sites = frozenset()
    else:
        cached = _cache_dir() / digest
        try:
            sites = frozenset(int(x) for x in cached.read_text().split())
        except (OSError, ValueError):
            sites = _disassemble(host_path, data)
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}")
                tmp.write_text(" ".join(str(s) for s in sorted(sites)))
                tmp.replace(cached)
            except OSError:
                pass
    _sites_cache[digest] = sites
    return sites


def patch(contents: bytes, file_offset: int, sites: frozenset[int]) -> tuple[bytes, list[int]]:
    """`contents` (the file from `file_offset`) with the cpuid sites inside it turned into ud2; also
    the offsets patched, relative to `contents`."""
    end = file_offset + len(contents)
    inside = [s - file_offset for s in sites if file_offset <= s and s + 2 <= end]
    if not inside:
        return contents, []
    out = bytearray(contents)
    for at in inside:
        out[at : at + 2] = UD2
    return bytes(out), inside
