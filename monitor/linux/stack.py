"""The initial stack execve builds: argc, argv, envp, the auxiliary vector and the strings they point to."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from monitor.linux.mm import PROT_READ, PROT_WRITE, USER_TOP, AddressSpace

STACK_SIZE = 8 << 20
STACK_TOP = USER_TOP  # the highest user page is the top of the stack, as on Linux without ASLR

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO_EHDR, AT_MINSIGSTKSZ = 23, 25, 26, 31, 33, 51
# AT_HWCAP on x86-64 is CPUID.1:EDX; a fixed baseline (glibc reads CPUID itself for what it uses).
HWCAP = 0x178BFBFF
MINSIGSTKSZ = 3632  # what a host with AVX-512 state reports; sized for the XSAVE area


@dataclass(frozen=True)
class AuxInfo:
    phdr: int
    phnum: int
    entry: int
    interp_base: int
    execfn: str
    uid: int = 1000
    gid: int = 1000
    sysinfo_ehdr: int = 0  # the vDSO's address (monitor/linux/vdso.py), 0: none (no AT_SYSINFO_EHDR)


def build(space: AddressSpace, argv: list[str], envp: list[str], aux: AuxInfo) -> tuple[int, int]:
    """Map the stack and write the start state; returns the entry rsp (16-byte aligned, at argc) and the
    address of AT_RANDOM's 16 bytes (zero here: filled in at the first exit, where they are an event)."""
    bottom = STACK_TOP - STACK_SIZE
    space.map(bottom, STACK_SIZE, PROT_READ | PROT_WRITE, name="[stack]")
    strings = bytearray()
    top = STACK_TOP - 16

    def put(data: bytes) -> int:
        nonlocal strings
        strings = bytearray(data) + strings
        return len(strings)

    # Strings sit at the top; their addresses are known once all are placed: collect offsets from the top.
    execfn_off = put(aux.execfn.encode() + b"\0")
    env_offs = [put(e.encode() + b"\0") for e in reversed(envp)][::-1]
    arg_offs = [put(a.encode() + b"\0") for a in reversed(argv)][::-1]
    platform_off = put(b"x86_64\0")
    random_off = put(bytes(16))
    strings_at = top - len(strings)

    def addr(off: int) -> int:
        return top - off

    auxv = [
        (AT_PHDR, aux.phdr),
        (AT_PHENT, 56),
        (AT_PHNUM, aux.phnum),
        (AT_PAGESZ, 4096),
        (AT_BASE, aux.interp_base),
        (AT_FLAGS, 0),
        (AT_ENTRY, aux.entry),
        (AT_UID, aux.uid),
        (AT_EUID, aux.uid),
        (AT_GID, aux.gid),
        (AT_EGID, aux.gid),
        (AT_SECURE, 0),
        (AT_HWCAP, HWCAP),
        (AT_HWCAP2, 0),
        (AT_CLKTCK, 100),
        (AT_PLATFORM, addr(platform_off)),
        (AT_RANDOM, addr(random_off)),
        (AT_EXECFN, addr(execfn_off)),
        (AT_MINSIGSTKSZ, MINSIGSTKSZ),
    ]
    if aux.sysinfo_ehdr:
        auxv.append((AT_SYSINFO_EHDR, aux.sysinfo_ehdr))
    auxv.append((AT_NULL, 0))
    words = [len(argv)] + [addr(o) for o in arg_offs] + [0] + [addr(o) for o in env_offs] + [0]
    for key, value in auxv:
        words += [key, value]
    table = struct.pack(f"<{len(words)}Q", *words)
    rsp = (strings_at - len(table)) & ~0xF
    space.write(rsp, table, force=True)
    space.write(strings_at, bytes(strings), force=True)
    return rsp, addr(random_off)
