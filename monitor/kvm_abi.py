"""Raw KVM ABI: ioctl numbers and C struct layouts (linux/kvm.h, x86-64). Nothing else in vmft
speaks ioctl numbers; `monitor.kvm` wraps these in typed objects.

Numbers are derived from the kernel's _IO/_IOR/_IOW/_IOWR definitions with each struct's size, including
the irregular ones (KVM_GET_DIRTY_LOG is _IOW; KVM_GET_VCPU_EVENTS shares nr 0x9f with KVM_GET_PIT2).
"""

from __future__ import annotations

import ctypes
import enum

KVMIO = 0xAE
KVM_API_VERSION = 12

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


class Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())
    ]


class Segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", DTable),
        ("idt", DTable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


CPUID_MAX_ENTRIES = 256


class Cpuid2(ctypes.Structure):
    _fields_ = [
        ("nent", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("entries", CpuidEntry2 * CPUID_MAX_ENTRIES),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class Interrupt(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32)]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


MSRS_MAX_ENTRIES = 32


class Msrs(ctypes.Structure):
    _fields_ = [
        ("nmsrs", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("entries", MsrEntry * MSRS_MAX_ENTRIES),
    ]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class VcpuEvents(ctypes.Structure):
    """Kept opaque: saved and restored whole."""

    _fields_ = [("raw", ctypes.c_uint8 * 64)]


class Fpu(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 416)]


class Xsave(ctypes.Structure):
    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class Xcrs(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 392)]


class DebugRegs(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


class IoExit(ctypes.Structure):
    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class MmioExit(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class InternalExit(ctypes.Structure):
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class FailEntryExit(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class ExitUnion(ctypes.Union):
    _fields_ = [
        ("io", IoExit),
        ("mmio", MmioExit),
        ("internal", InternalExit),
        ("fail_entry", FailEntryExit),
        ("padding", ctypes.c_uint8 * 256),
    ]


class SyncRegs(ctypes.Structure):
    _fields_ = [("regs", Regs), ("sregs", Sregs), ("events", VcpuEvents)]


class SyncUnion(ctypes.Union):
    _fields_ = [("regs", SyncRegs), ("padding", ctypes.c_uint8 * 2048)]


class Run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", ExitUnion),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", SyncUnion),
    ]


RUN_EXIT_REASON_OFFSET = Run.exit_reason.offset
RUN_IO_OFFSET = Run.exit.offset
RUN_SYNC_RIP_OFFSET = Run.s.offset + Regs.rip.offset

KVM_SYNC_X86_REGS = 1 << 0

_EXPECTED_SIZES = {
    Run: 2352,
    Regs: 144,
    Sregs: 312,
    Fpu: 416,
    Xsave: 4096,
    Xcrs: 392,
    VcpuEvents: 64,
    DebugRegs: 128,
    DirtyLog: 16,
    CpuidEntry2: 40,
    MsrEntry: 16,
    UserspaceMemoryRegion: 32,
}
for _struct, _size in _EXPECTED_SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct))


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_SYNC_REGS = 74
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168


class Ioctl(enum.IntEnum):
    GET_API_VERSION = _io(0x00)
    CREATE_VM = _io(0x01)
    CHECK_EXTENSION = _io(0x03)
    GET_VCPU_MMAP_SIZE = _io(0x04)
    GET_SUPPORTED_CPUID = _iowr(0x05, 8)
    CREATE_VCPU = _io(0x41)
    GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
    SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
    SET_TSS_ADDR = _io(0x47)
    RUN = _io(0x80)
    GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
    SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
    GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
    SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
    INTERRUPT = _iow(0x86, ctypes.sizeof(Interrupt))
    GET_MSRS = _iowr(0x88, 8)
    SET_MSRS = _iow(0x89, 8)
    GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
    SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
    SET_CPUID2 = _iow(0x90, 8)
    GET_MP_STATE = _ior(0x98, ctypes.sizeof(MpState))
    SET_MP_STATE = _iow(0x99, ctypes.sizeof(MpState))
    GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(VcpuEvents))
    SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(VcpuEvents))
    GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(DebugRegs))
    SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(DebugRegs))
    GET_XSAVE = _ior(0xA4, ctypes.sizeof(Xsave))
    SET_XSAVE = _iow(0xA5, ctypes.sizeof(Xsave))
    GET_XCRS = _ior(0xA6, ctypes.sizeof(Xcrs))
    SET_XCRS = _iow(0xA7, ctypes.sizeof(Xcrs))
