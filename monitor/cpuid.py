"""The one CPUID table every vmft node gives its guests, and its hash.

Both sides of a pair must show the guest the same CPU, so the table is fixed here rather than taken
from the host. It advertises a baseline x86-64 (SSE2, long mode) and nothing nondeterministic: no
RDRAND, no RDSEED, no TSC. A host that cannot provide a feature in the table is refused at start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from monitor.errors import HostError
from monitor.kvm_abi import CpuidEntry2


@dataclass(frozen=True)
class CpuidLeaf:
    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _vendor(text: str) -> tuple[int, int, int]:
    raw = text.encode()
    assert len(raw) == 12
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


_VENDOR_EBX, _VENDOR_EDX, _VENDOR_ECX = _vendor("vmftplatform")

# Leaf 1 EDX: FPU, PSE, MSR, PAE, CX8, PGE, CMOV, PAT, CLFLUSH, MMX, FXSR, SSE, SSE2.
_LEAF1_EDX = sum(1 << bit for bit in (0, 3, 5, 6, 8, 13, 15, 16, 19, 23, 24, 25, 26))
_LEAF1_ECX_HYPERVISOR = 1 << 31
# Leaf 0x80000001 EDX: SYSCALL, NX, LM. ECX: LAHF/SAHF in long mode.
_EXT1_EDX = (1 << 11) | (1 << 20) | (1 << 29)
_EXT1_ECX = 1 << 0

FIXED_TABLE: tuple[CpuidLeaf, ...] = (
    CpuidLeaf(0x0, 0, 0x1, _VENDOR_EBX, _VENDOR_ECX, _VENDOR_EDX),
    CpuidLeaf(0x1, 0, 0x000606A0, 0x00000800, _LEAF1_ECX_HYPERVISOR, _LEAF1_EDX),
    CpuidLeaf(0x80000000, 0, 0x80000008, _VENDOR_EBX, _VENDOR_ECX, _VENDOR_EDX),
    CpuidLeaf(0x80000001, 0, 0, 0, _EXT1_ECX, _EXT1_EDX),
    CpuidLeaf(0x80000008, 0, 0x00003027, 0, 0, 0),
)

# Feature words that must be a subset of what the host supports.
_FEATURE_WORDS = ((0x1, "edx"), (0x80000001, "edx"), (0x80000001, "ecx"))

CPUID_TABLE_VERSION = 1


class CpuidMismatch(HostError):
    """This host's KVM lacks CPUID features the vmft platform needs."""


def cpuid_hash() -> str:
    """Hash of the table: part of the replication handshake, logs and checkpoints."""
    digest = hashlib.sha256(f"v{CPUID_TABLE_VERSION}".encode())
    for leaf in FIXED_TABLE:
        digest.update(repr(leaf).encode())
    return digest.hexdigest()[:32]


def check_host_supports(supported: list[CpuidEntry2]) -> None:
    by_leaf = {(e.function, e.index): e for e in supported}
    for function, register in _FEATURE_WORDS:
        host = by_leaf.get((function, 0))
        wanted = next(getattr(leaf, register) for leaf in FIXED_TABLE if leaf.function == function)
        have = getattr(host, register) if host is not None else 0
        missing = wanted & ~have
        if missing:
            raise CpuidMismatch(
                f"this host's KVM lacks CPUID features the vmft platform needs: leaf 0x{function:x} "
                f"{register} bits 0x{missing:x}"
            )


def kvm_entries() -> list[CpuidEntry2]:
    return [
        CpuidEntry2(
            function=leaf.function,
            index=leaf.index,
            flags=0,
            eax=leaf.eax,
            ebx=leaf.ebx,
            ecx=leaf.ecx,
            edx=leaf.edx,
        )
        for leaf in FIXED_TABLE
    ]
