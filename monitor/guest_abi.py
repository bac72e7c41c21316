"""The vmft guest platform ABI: the one table of device ports, interrupt vectors, boot layout and
request-block layout. The C header the guests build against is generated from this module
(`python -m monitor.guest_abi > guests/build/include/vmft_abi.h`, done by the guests' Makefile), so
there is one definition of each.

Every device request is a doorbell: the guest writes a `Request` block (32 bytes, 8-aligned) into its
memory and executes `out PORT, eax` with the block's guest-physical address. The monitor reads the block,
checks every address and length against guest RAM, does the work during that exit, and writes `status`
and `result` back. One exit can therefore carry a whole batch (many network messages, many sectors).
Simple status reads are `in PORT` returning a 32-bit value.
"""

from __future__ import annotations

import enum
import struct
import sys
from dataclasses import dataclass

ABI_VERSION = 1


class Port(enum.IntEnum):
    """Every I/O port of the platform. `out` ports take a request-block address unless noted."""

    CONSOLE_WRITE = 0x600  # out: req{addr,len} bytes to the console
    CONSOLE_READ = 0x601  # out: req{addr,len=capacity} -> result = bytes read (input event)
    CLOCK = 0x610  # out: req -> arg64 = virtual time in ns since the VM started
    TIMER = 0x611  # out: req{arg64 = deadline ns, 0 disarms} one-shot; fires IRQ_TIMER
    EVENTS = 0x620  # in: bitmask of EventBit with news, never blocks
    WAIT = 0x621  # in: like EVENTS but blocks the vCPU until some bit is set
    NET_RX = 0x630  # out: req{addr,len=capacity} -> result = messages copied (NetMessage records)
    NET_TX = 0x631  # out: req{addr,len} NetMessage records to send
    BLOCK = 0x640  # out: req{addr,len=bytes, arg=BlockOp, arg64=first sector}; completion IRQ_BLOCK
    BLOCK_INFO = 0x641  # out: req -> arg64 = disk size in sectors (0 without a disk)
    ENTROPY = 0x650  # out: req{addr,len} filled with random bytes
    POWER_EXIT = 0x660  # out: value = exit code (not an address); the VM stops
    POWER_PANIC = 0x661  # out: req{addr,len = message, arg = vector or 0, arg64 = faulting rip}
    NOP = 0x6F0  # out: value ignored; the cheapest possible exit (benchmarks)


class EventBit(enum.IntFlag):
    """Bits returned by EVENTS / WAIT and set by the shim's interrupt stubs in BootInfo.irq_pending."""

    TIMER = 1 << 0
    NET_RX = 1 << 1
    BLOCK = 1 << 2
    CONSOLE_IN = 1 << 3


class Vector(enum.IntEnum):
    """Interrupt vectors the monitor injects (no APIC or PIC: userspace injection, no EOI)."""

    TIMER = 0x20
    NET_RX = 0x21
    BLOCK = 0x22
    CONSOLE_IN = 0x23
    SYSCALL = 0x80  # software interrupt from ring 3 into the shim (DPL 3 gate)


VECTOR_EVENT_BITS: dict[Vector, EventBit] = {
    Vector.TIMER: EventBit.TIMER,
    Vector.NET_RX: EventBit.NET_RX,
    Vector.BLOCK: EventBit.BLOCK,
    Vector.CONSOLE_IN: EventBit.CONSOLE_IN,
}


class Syscall(enum.IntEnum):
    """Functions of the shim's `int 0x80` gate (rax = function)."""

    CRASH = 1  # load an empty IDT and fault: a triple fault, KVM_EXIT_SHUTDOWN


class Status(enum.IntEnum):
    """Request-block status values written by the monitor."""

    OK = 0
    EFAULT = -1  # an address or length outside guest RAM
    EINVAL = -2  # a malformed request
    EIO = -3  # the host failed the I/O
    ENODEV = -4  # no such device configured (no disk)
    ENOTCONN = -5  # a network message for a connection that is gone


class BlockOp(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3


class NetKind(enum.IntEnum):
    """Kinds of NetMessage records in RX and TX buffers."""

    DATA = 1
    OPEN = 2  # RX only: a client connected
    CLOSE = 3  # RX: the client went away; TX: close the connection


SECTOR_SIZE = 512

# Guest-physical layout set up by the monitor before entry.
BOOT_INFO_ADDR = 0x1000
GDT_ADDR = 0x2000
TSS_ADDR = 0x3000
# TSS_ADDR holds the TSS and its I/O permission bitmap (0x3000..0x506a)
PAGE_TABLE_ADDR = 0x8000  # PML4; PDPT at +0x1000; page directories after that
PAGE_TABLE_END = 0x10000
IMAGE_MIN_ADDR = 0x100000  # ELF segments must lie at or above 1 MiB
MAX_MEM_MIB = 4096  # identity map with 2 MiB pages, four page directories

# GDT selectors.
SEL_KERNEL_CODE = 0x08
SEL_KERNEL_DATA = 0x10
SEL_USER_DATA = 0x18 | 3
SEL_USER_CODE = 0x20 | 3
SEL_TSS = 0x28

BOOT_INFO_MAGIC = 0x564D46544F4F42  # "BOOTFMV" little-endian-ish marker


@dataclass(frozen=True)
class StructField:
    name: str
    fmt: str  # struct format character
    ctype: str


@dataclass(frozen=True)
class StructLayout:
    """A little-endian C struct shared by monitor and guest."""

    c_name: str
    fields: tuple[StructField, ...]

    @property
    def fmt(self) -> str:
        return "<" + "".join(f.fmt for f in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def offset(self, name: str) -> int:
        off = 0
        for f in self.fields:
            if f.name == name:
                return off
            off += struct.calcsize("<" + f.fmt)
        raise KeyError(name)


U64, U32, I32 = "Q", "I", "i"

REQUEST = StructLayout(
    "vmft_req",
    (
        StructField("addr", U64, "uint64_t"),
        StructField("len", U32, "uint32_t"),
        StructField("arg", U32, "uint32_t"),
        StructField("arg64", U64, "uint64_t"),
        StructField("status", I32, "int32_t"),
        StructField("result", U32, "uint32_t"),
    ),
)

# One network message in an RX or TX buffer; `len` payload bytes follow, then padding to 8 bytes.
NET_MESSAGE = StructLayout(
    "vmft_net_msg",
    (
        StructField("conn", U32, "uint32_t"),
        StructField("kind", U32, "uint32_t"),
        StructField("len", U32, "uint32_t"),
        StructField("reserved", U32, "uint32_t"),
    ),
)

BOOT_INFO = StructLayout(
    "vmft_boot_info",
    (
        StructField("magic", U64, "uint64_t"),
        StructField("abi_version", U32, "uint32_t"),
        StructField("reserved", U32, "uint32_t"),
        StructField("mem_size", U64, "uint64_t"),
        StructField("tss_addr", U64, "uint64_t"),
        StructField("irq_pending", U32, "uint32_t"),  # set by the shim's stubs, taken by ring 3
        StructField("ticks", U32, "uint32_t"),  # timer interrupts delivered, counted by the shim
        StructField("arg", U64, "uint64_t"),  # the guest's argument (`vmft run --arg N`), 0 by default
    ),
)

TSS_RSP0_OFFSET = 4
REQUEST_STATUS_OFFSET = REQUEST.offset("status")


def net_message_padded_len(payload_len: int) -> int:
    return NET_MESSAGE.size + ((payload_len + 7) & ~7)


def render_c_header() -> str:
    lines = [
        "/* Generated by `python -m monitor.guest_abi`: do not edit. */",
        "#pragma once",
        "#include <stdint.h>",
        "",
        f"#define VMFT_ABI_VERSION {ABI_VERSION}",
        f"#define VMFT_SECTOR_SIZE {SECTOR_SIZE}",
        f"#define VMFT_BOOT_INFO_ADDR 0x{BOOT_INFO_ADDR:x}",
        f"#define VMFT_BOOT_INFO_MAGIC 0x{BOOT_INFO_MAGIC:x}ULL",
        f"#define VMFT_IMAGE_MIN_ADDR 0x{IMAGE_MIN_ADDR:x}",
        f"#define VMFT_TSS_RSP0_OFFSET {TSS_RSP0_OFFSET}",
        f"#define VMFT_SEL_KERNEL_CODE 0x{SEL_KERNEL_CODE:x}",
        f"#define VMFT_SEL_KERNEL_DATA 0x{SEL_KERNEL_DATA:x}",
        f"#define VMFT_SEL_USER_CODE 0x{SEL_USER_CODE:x}",
        f"#define VMFT_SEL_USER_DATA 0x{SEL_USER_DATA:x}",
        f"#define VMFT_BOOT_INFO_IRQ_PENDING_OFFSET {BOOT_INFO.offset('irq_pending')}",
        f"#define VMFT_BOOT_INFO_TICKS_OFFSET {BOOT_INFO.offset('ticks')}",
        f"#define VMFT_BOOT_INFO_TSS_ADDR_OFFSET {BOOT_INFO.offset('tss_addr')}",
        f"#define VMFT_REQ_STATUS_OFFSET {REQUEST_STATUS_OFFSET}",
        "",
    ]
    for enum_cls, prefix in (
        (Port, "VMFT_PORT_"),
        (EventBit, "VMFT_EV_"),
        (Vector, "VMFT_VEC_"),
        (Syscall, "VMFT_SYS_"),
        (Status, "VMFT_ST_"),
        (BlockOp, "VMFT_BLK_"),
        (NetKind, "VMFT_NET_"),
    ):
        for member in enum_cls:
            value = int(member)
            text = f"0x{value:x}" if value >= 0 else f"({value})"
            lines.append(f"#define {prefix}{member.name} {text}")
        lines.append("")
    lines.append("#ifndef __ASSEMBLER__")
    for layout in (REQUEST, NET_MESSAGE, BOOT_INFO):
        lines.append(f"struct {layout.c_name} {{")
        for f in layout.fields:
            lines.append(f"    {f.ctype} {f.name};")
        lines.append("};")
        lines.append(
            f'_Static_assert(sizeof(struct {layout.c_name}) == {layout.size}, "{layout.c_name} layout");'
        )
        lines.append("")
    lines.append("#endif")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_c_header())
