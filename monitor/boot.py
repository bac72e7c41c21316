"""Long-mode entry without firmware: page tables, GDT, TSS, boot info, and the vCPU's first registers."""

from __future__ import annotations

import struct

from monitor import guest_abi as g
from monitor.kvm import VcpuFd
from monitor.kvm_abi import Regs, Segment, Sregs
from monitor.memory import GuestMemory

_PTE_PRESENT, _PTE_WRITE, _PTE_USER, _PTE_HUGE = 1, 2, 4, 0x80
_TWO_MIB = 2 << 20
_GIB = 1 << 30

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
TSS_SIZE = 104
# kvm_pvm ignores IOPL for ring-3 port I/O (its iretq clears IOPL; `out` then raises #GP), but it honours
# the TSS I/O permission bitmap: one that allows every port makes ring-3 port I/O work everywhere.
IO_BITMAP_SIZE = 65536 // 8
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE  # the bitmap is followed by one 0xff byte, as the SDM asks

# Flat descriptors: (access byte, flags nibble). Code64 has L set, data has D/B set; all 4 KiB granular.
_GDT_FLAT = {
    g.SEL_KERNEL_CODE: (0x9A, 0xA),
    g.SEL_KERNEL_DATA: (0x92, 0xC),
    g.SEL_USER_DATA & ~3: (0xF2, 0xC),
    g.SEL_USER_CODE & ~3: (0xFA, 0xA),
}


def _flat_descriptor(access: int, flags: int) -> int:
    limit = 0xFFFFF
    return (limit & 0xFFFF) | ((limit >> 16) << 48) | (access << 40) | (flags << 52)


def _tss_descriptor(base: int, limit: int) -> bytes:
    low = (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (0x89 << 40)  # present, 64-bit available TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56)
    )
    return struct.pack("<QQ", low, base >> 32)


def write_boot_structures(memory: GuestMemory, arg: int = 0) -> None:
    size = memory.size
    if size > g.MAX_MEM_MIB << 20:
        raise ValueError(f"guest RAM above {g.MAX_MEM_MIB} MiB is not supported")
    pml4 = g.PAGE_TABLE_ADDR
    pdpt = pml4 + 0x1000
    pd_base = pdpt + 0x1000
    memory.write(pml4, struct.pack("<Q", pdpt | _PTE_PRESENT | _PTE_WRITE | _PTE_USER))
    pd_count = (size + _GIB - 1) // _GIB
    memory.write(
        pdpt,
        b"".join(
            struct.pack("<Q", (pd_base + i * 0x1000) | _PTE_PRESENT | _PTE_WRITE | _PTE_USER)
            for i in range(pd_count)
        ),
    )
    pages = size // _TWO_MIB
    memory.write(
        pd_base,
        b"".join(
            struct.pack("<Q", (i * _TWO_MIB) | _PTE_PRESENT | _PTE_WRITE | _PTE_USER | _PTE_HUGE)
            for i in range(pages)
        ),
    )
    gdt = bytearray(0x30 + 16)
    for selector, (access, flags) in _GDT_FLAT.items():
        struct.pack_into("<Q", gdt, selector, _flat_descriptor(access, flags))
    gdt[g.SEL_TSS : g.SEL_TSS + 16] = _tss_descriptor(g.TSS_ADDR, TSS_LIMIT)
    memory.write(g.GDT_ADDR, bytes(gdt))
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # I/O bitmap right after the TSS
    memory.write(g.TSS_ADDR, bytes(tss) + bytes(IO_BITMAP_SIZE) + b"\xff")
    info = struct.pack(g.BOOT_INFO.fmt, g.BOOT_INFO_MAGIC, g.ABI_VERSION, 0, size, g.TSS_ADDR, 0, 0, arg)
    memory.write(g.BOOT_INFO_ADDR, info)


def flat_segment(selector: int, code: bool) -> Segment:
    """A flat 64-bit code or data segment register for `selector` (its DPL from the selector's RPL)."""
    return Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        dpl=selector & 3,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def set_entry_registers(vcpu: VcpuFd, entry: int) -> None:
    sregs: Sregs = vcpu.get_sregs()
    sregs.cs = flat_segment(g.SEL_KERNEL_CODE, code=True)
    data = flat_segment(g.SEL_KERNEL_DATA, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = Segment(base=g.TSS_ADDR, limit=TSS_LIMIT, selector=g.SEL_TSS, type=0xB, present=1, s=0, g=0)
    sregs.gdt.base = g.GDT_ADDR
    sregs.gdt.limit = 0x30 + 16 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = g.PAGE_TABLE_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = Regs()
    regs.rip = entry
    regs.rflags = 0x2
    regs.rdi = g.BOOT_INFO_ADDR
    vcpu.set_regs(regs)
