"""The machine a Linux program runs on: low-memory kernel structures, the system-call page, entry.

The guest-physical (and, identity-mapped, guest-virtual) page 0 is never mapped, so a NULL pointer
faults. Pages 0x1000..0xFFFF hold what the CPU needs and the program must not touch (supervisor pages),
except the system-call page, which the program may execute but not write:

    0x1000 GDT   0x2000 IDT   0x3000 TSS + I/O bitmap   0x6000 ring-0 stubs (entry, exceptions)
    0x7000 system-call page (user, read-only): `out %al, $SYSCALL_PORT`   0x8000..0xA000 ring-0 stack

On kvm_pvm `syscall` stays at CPL 3 and jumps to LSTAR (docs/design.md), so LSTAR points at the system-call
page and each system call is one port-I/O exit; the monitor returns through the synced registers.
Exceptions go through the IDT to ring-0 stubs, which report the vector with one `out` to EXCEPTION_PORT
and return with `iretq` (the monitor may have rewritten the frame: an emulated RDTSC skips the
instruction). Linux programs never reach the platform's device ports: the TSS I/O bitmap allows ring 3
only SYSCALL_PORT.
"""

from __future__ import annotations

import ctypes
import struct

from monitor.boot import flat_segment
from monitor.kvm import VcpuFd
from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Regs, Segment, Sregs
from monitor.linux.native import load_code
from monitor.memory import GuestMemory

SYSCALL_PORT = 0xE0
EXCEPTION_PORT = 0xE1
START_PORT = 0xE2  # the first exit, before any program code runs: where the start's inputs are events

GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
TSS_ADDR = 0x3000
STUB_ADDR = 0x6000
SYSCALL_PAGE = 0x7000
SYSCALL_RETURN_RIP = SYSCALL_PAGE + 2  # rip after the `out`: proves the exit came from `syscall`
KERNEL_STACK_TOP = 0xA000
LOW_END = 0x10000  # the first page the address space allocates (page tables and program pages)

SEL_KERNEL_CODE = 0x10
SEL_KERNEL_DATA = 0x18
SEL_USER32_CODE = 0x23
SEL_USER_DATA = 0x2B
SEL_USER_CODE = 0x33
SEL_TSS = 0x40
GDT_SIZE = SEL_TSS + 16

TSS_SIZE = 104
IO_BITMAP_SIZE = 65536 // 8
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_TSD, CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 0x4, 0x20, 0x200, 0x400, 0x40000
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 0x1, 0x100, 0x400, 0x800
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE = 0xC0000100, 0xC0000101

USER_RFLAGS = 0x202
EXCEPTIONS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
EXCEPTION_VECTORS = 32
_STUB_SIZE = 16
ENTRY_TRAMPOLINE = STUB_ADDR  # the first entry into ring 3: one exit, then `iretq`
_EXC_FRAME = struct.Struct("<7Q")  # vector, error code, rip, cs, rflags, rsp, ss


def _descriptor(access: int, flags: int) -> int:
    limit = 0xFFFFF
    return (limit & 0xFFFF) | ((limit >> 16) << 48) | (access << 40) | (flags << 52)


def _gdt() -> bytes:
    gdt = bytearray(GDT_SIZE)
    for selector, access, flags in (
        (SEL_KERNEL_CODE, 0x9A, 0xA),
        (SEL_KERNEL_DATA, 0x92, 0xC),
        (SEL_USER32_CODE & ~3, 0xFA, 0xC),
        (SEL_USER_DATA & ~3, 0xF2, 0xC),
        (SEL_USER_CODE & ~3, 0xFA, 0xA),
    ):
        struct.pack_into("<Q", gdt, selector, _descriptor(access, flags))
    low = (
        (TSS_LIMIT & 0xFFFF)
        | ((TSS_ADDR & 0xFFFFFF) << 16)
        | (0x89 << 40)
        | (((TSS_LIMIT >> 16) & 0xF) << 48)
        | (((TSS_ADDR >> 24) & 0xFF) << 56)
    )
    struct.pack_into("<QQ", gdt, SEL_TSS, low, TSS_ADDR >> 32)
    return bytes(gdt)


def _stub(vector: int) -> bytes:
    code = b"" if vector in EXCEPTIONS_WITH_ERROR_CODE else b"\x6a\x00"  # push $0 (no error code)
    code += bytes((0x6A, vector))  # push $vector
    code += bytes((0xE6, EXCEPTION_PORT))  # out %al, $EXCEPTION_PORT
    code += b"\x48\x83\xc4\x10"  # add $16, %rsp
    code += b"\x48\xcf"  # iretq
    assert len(code) <= _STUB_SIZE
    return code


def _stubs() -> bytes:
    page = bytearray(b"\xcc" * 0x1000)
    page[0:4] = bytes((0xE6, START_PORT)) + b"\x48\xcf"  # ENTRY_TRAMPOLINE: out %al, $START_PORT; iretq
    for vector in range(EXCEPTION_VECTORS):
        at = _STUB_SIZE * (vector + 1)
        code = _stub(vector)
        page[at : at + len(code)] = code
    return bytes(page)


def _idt() -> bytes:
    idt = bytearray(0x1000)
    for vector in range(EXCEPTION_VECTORS):
        handler = STUB_ADDR + _STUB_SIZE * (vector + 1)
        struct.pack_into(
            "<HHBBHII",
            idt,
            vector * 16,
            handler & 0xFFFF,
            SEL_KERNEL_CODE,
            0,
            0x8E,  # present, DPL 0, 64-bit interrupt gate
            (handler >> 16) & 0xFFFF,
            handler >> 32,
            0,
        )
    return bytes(idt)


def _tss() -> bytes:
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)  # rsp0
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # I/O bitmap right after the TSS
    bitmap = bytearray(b"\xff" * IO_BITMAP_SIZE)
    bitmap[SYSCALL_PORT >> 3] &= ~(1 << (SYSCALL_PORT & 7))  # ring 3 may reach only the system-call port
    return bytes(tss) + bytes(bitmap) + b"\xff"


def write_low_memory(memory: GuestMemory) -> None:
    memory.write(GDT_ADDR, _gdt())
    memory.write(IDT_ADDR, _idt())
    memory.write(TSS_ADDR, _tss())
    memory.write(STUB_ADDR, _stubs())
    page = bytearray(0x1000)
    page[0:2] = bytes((0xE6, SYSCALL_PORT))  # out %al, $SYSCALL_PORT
    memory.write(SYSCALL_PAGE, bytes(page))


def enter_user(memory: GuestMemory, vcpu: VcpuFd, page_table: int, entry: int, stack: int) -> None:
    """Registers for the first entry: ring 0 at an `iretq` whose frame drops into ring 3 at `entry`."""
    frame = struct.pack("<5Q", entry, SEL_USER_CODE, USER_RFLAGS, stack, SEL_USER_DATA)
    frame_at = KERNEL_STACK_TOP - len(frame)
    memory.write(frame_at, frame)
    sregs: Sregs = vcpu.get_sregs()
    sregs.cs = flat_segment(SEL_KERNEL_CODE, code=True)
    sregs.ss = flat_segment(SEL_KERNEL_DATA, code=False)
    user_data = flat_segment(SEL_USER_DATA, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = user_data
    sregs.tr = Segment(base=TSS_ADDR, limit=TSS_LIMIT, selector=SEL_TSS, type=0xB, present=1, s=0, g=0)
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = GDT_SIZE - 1
    sregs.idt.base = IDT_ADDR
    sregs.idt.limit = EXCEPTION_VECTORS * 16 - 1
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = page_table
    # TSD: RDTSC/RDTSCP from ring 3 fault (with the host's PR_TSC_SIGSEGV on the vCPU thread, see
    # TscTrappingRunner); OSXSAVE: the host's XCR0 shows through, so AVX code runs as natively.
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_TSD | CR4_OSXSAVE
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
    vcpu.set_sregs(sregs)
    vcpu.set_msrs(
        [
            (MSR_STAR, (SEL_KERNEL_CODE << 32) | ((SEL_USER32_CODE & ~3) << 48)),
            (MSR_LSTAR, SYSCALL_PAGE),
            (MSR_CSTAR, SYSCALL_PAGE),
            (MSR_SFMASK, 0),
            (MSR_FS_BASE, 0),
            (MSR_GS_BASE, 0),
        ]
    )
    regs = Regs()
    regs.rip = ENTRY_TRAMPOLINE
    regs.rsp = frame_at
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def read_exception_frame(memory: GuestMemory, rsp: int) -> tuple[int, int, int, int, int, int, int]:
    """At an EXCEPTION_PORT exit, rsp (ring 0) points at the stub's pushes and the CPU's frame."""
    values = _EXC_FRAME.unpack(memory.read(rsp, _EXC_FRAME.size))
    return values


def write_exception_return(memory: GuestMemory, rsp: int, rip: int, rflags: int | None = None) -> None:
    """Where the stub's iretq returns to (and with which flags)."""
    memory.write(rsp + 16, struct.pack("<Q", rip))
    if rflags is not None:
        memory.write(rsp + 32, struct.pack("<Q", rflags))


# ----- RDTSC trapping --------------------------------------------------------------------------------
# The guest's CR4.TSD is ignored on kvm_pvm unless the host thread running KVM_RUN has TSC access off
# (prctl PR_SET_TSC, PR_TSC_SIGSEGV). With it off, that thread itself must not read the TSC: the vDSO
# clocks (this host's clocksource is tsc) and CPython's timed GIL waits would die with SIGSEGV. So it is
# switched off only for the KVM_RUN call itself, with no Python code in between: a 70-byte function
# (its assembly below) does prctl(off), ioctl(KVM_RUN), prctl(on) and returns ioctl's result (-errno).
#   push rbx; push r12; push r13; mov ebx, edi; mov r12, rsi
#   mov eax, 157 (prctl); mov edi, 26 (PR_SET_TSC); mov esi, 2 (PR_TSC_SIGSEGV); syscall
#   mov eax, 16 (ioctl); mov edi, ebx; mov rsi, r12; xor edx, edx; syscall; mov r13, rax
#   mov eax, 157; mov edi, 26; mov esi, 1 (PR_TSC_ENABLE); syscall
#   mov rax, r13; pop r13; pop r12; pop rbx; ret
_RUN_CODE = bytes.fromhex(
    "534154415589fb4989f4b89d000000bf1a000000be020000000f05b81000000089df4c89e631d20f054989c5"
    "b89d000000bf1a000000be010000000f054c89e8415d415c5bc3"
)
_RunFn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_int, ctypes.c_ulong)
_run_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]


def _trapping_run() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _run_fn
    if _run_fn is None:
        _run_fn = _RunFn(load_code(_RUN_CODE))
    return _run_fn


class TscTrappingRunner:
    """A drop-in for VcpuFd.run_once (0 or an errno) that runs the guest with RDTSC trapped."""

    def __init__(self, vcpu: VcpuFd) -> None:
        self._vcpu = vcpu
        self._fd = vcpu.fd
        self._fn = _trapping_run()
        self._request = int(Ioctl.RUN)

    def __call__(self) -> int:
        result = int(self._fn(self._fd, self._request))
        if result < 0:
            self._apply_pending_regs()
            return -result
        return 0

    def _apply_pending_regs(self) -> None:
        """A KVM_RUN that returned at once (a kick, immediate_exit) may leave registers written into
        kvm_run's synced area unapplied (seen on kvm_pvm: a checkpoint taken there resumed at the
        system-call page). Apply them now, so that whatever reads the vCPU next (a checkpoint) sees them."""
        run = self._vcpu.run
        if run.kvm_dirty_regs & KVM_SYNC_X86_REGS:
            regs = Regs.from_buffer_copy(bytes(run.s.regs.regs))
            self._vcpu.set_regs(regs)
            run.kvm_dirty_regs &= ~KVM_SYNC_X86_REGS
