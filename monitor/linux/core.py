"""What every part of the Linux personality shares: the vCPU's synced registers, the running process,
and the few host operations (TLB flush, FS base, XSAVE, ending the VM). The personality
(personality.py) is this plus its mixins: signal delivery (delivery.py), thread switching (switching.py)
and process control (control.py)."""

from __future__ import annotations

import ctypes
import logging
import struct
from typing import TYPE_CHECKING, NoReturn

from monitor.devices.power import GuestStop
from monitor.journal import OutputKind
from monitor.kvm import VcpuFd
from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Regs, Run, Xsave
from monitor.linux import boot
from monitor.linux.calls_proc import ProcessExit
from monitor.linux.fs import FileSystem
from monitor.linux.mm import AddressSpace
from monitor.linux.process import Host
from monitor.linux.processes import ProcessTable
from monitor.linux.signals import (
    FatalSignal,
)
from monitor.linux.syscalls import SyscallTable
from monitor.linux.threads import Thread
from monitor.dirty import bitmap_to_pages
from monitor.machine import MEMORY_SLOT, Machine
from monitor.memory import PAGE_SIZE

if TYPE_CHECKING:
    from monitor.linux.kernel import LinuxProcess
    from monitor.linux.sockets import NetStack
    from monitor.linux.vdso import VdsoClock

log = logging.getLogger("monitor.linux.personality")

REGS = struct.Struct("<18Q")  # kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
SYNC_REGS = Run.s.offset  # where kvm_run carries them (KVM_CAPSYNC_REGS)
REGS_SIZE = ctypes.sizeof(Regs)
RAX, RBX, RCX, RDX, RSP, RIP, RFLAGS, R11 = (
    getattr(Regs, n).offset for n in ("rax", "rbx", "rcx", "rdx", "rsp", "rip", "rflags", "r11")
)
U64 = struct.Struct("<Q")
MASK64 = (1 << 64) - 1


class PersonalityCore:
    """State and host operations the mixins use (set up by LinuxPersonality.attach)."""

    fs: FileSystem
    process: LinuxProcess
    processes: dict[int, LinuxProcess]
    tables: dict[int, SyscallTable]
    syscalls: SyscallTable
    table: ProcessTable
    fatal: FatalSignal | None
    ended: ProcessExit | None  # the program ended at the last exit (the VM stopped there)
    net: NetStack
    _machine: Machine | None
    _host: Host
    _vcpu: VcpuFd
    _run_buffer: memoryview
    _initial_xsave: bytes
    _cpu_fs_base: int
    vdso: VdsoClock | None  # --clock vdso: the time page (monitor/linux/vdso.py)

    @property
    def space(self) -> AddressSpace:
        """The running process's address space."""
        return self.process.space

    @property
    def machine(self) -> Machine:
        assert self._machine is not None
        return self._machine

    def flush_tlb(self) -> None:
        """kvm_pvm notices page-table changes only when the memory slot is re-created (docs/design.md)."""
        machine = self.machine
        memory = machine.memory
        # The slot's dirty log dies with it: move its bits into the monitor's own dirty bytes, which every
        # consumer (checkpoints, state hashes) collects. Not DirtyTracker.collect(): it may run at the same
        # time on a checkpointing thread, and two collects at once lose bits.
        log = machine.vm.get_dirty_log(MEMORY_SLOT, memory.size // PAGE_SIZE)
        for page in bitmap_to_pages(log):
            memory.mark_dirty(page * PAGE_SIZE, PAGE_SIZE)
        address = memory.host_address
        machine.vm.set_memory_region(MEMORY_SLOT, 0, 0, address, log_dirty=True)
        machine.vm.set_memory_region(MEMORY_SLOT, 0, memory.size, address, log_dirty=True)

    def _set_fs_base(self, value: int) -> None:
        self._vcpu.set_msrs([(boot.MSR_FS_BASE, value)])
        self._cpu_fs_base = value

    def _xsave(self) -> bytes:
        return self._vcpu._get_raw(Ioctl.GET_XSAVE, Xsave)  # the FPU/SSE/AVX state of the running thread

    def _end(self, end: ProcessExit) -> NoReturn:
        self.fatal = end.fatal
        self.ended = end  # a checkpoint taken here carries it (personality.py: save)
        self.machine._emit(OutputKind.EXIT, struct.pack("<i", end.status))
        raise GuestStop(end.status)

    def dirty_regs(self) -> None:
        """The synced registers were changed: KVM loads them at the next KVM_RUN."""
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS

    # Implemented by the mixins (declared here for the others).
    def _switch(self, result: int) -> None:
        raise NotImplementedError

    def _spawn(self, child: Thread, stack: int, fs_base: int) -> None:
        raise NotImplementedError

    def _deliver_pending(self) -> None:
        raise NotImplementedError

    def _wake_ready(self) -> None:
        raise NotImplementedError

    def _expire_deadlines(self) -> None:
        raise NotImplementedError

    def _wait_for_news(self) -> Thread:
        raise NotImplementedError
