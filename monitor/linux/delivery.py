"""Signal handlers: a pending signal or a fault runs the program's handler on an rt_sigframe; rt_sigreturn."""

from __future__ import annotations

from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Xsave
from monitor.linux.core import (
    REGS,
    REGS_SIZE,
    RSP,
    SYNC_REGS,
    U64,
    PersonalityCore,
)
from monitor.linux.process import PID

import ctypes
import struct
from typing import TYPE_CHECKING

from monitor.linux import boot
from monitor.linux.calls_proc import ProcessExit
from monitor.linux.mm import LinuxError
from monitor.linux.signals import (
    SA_NODEFER,
    SA_RESETHAND,
    SEGV_ACCERR,
    SEGV_MAPERR,
    SI_USER,
    SI_TKILL,
    UCONTEXT_SIZE,
    Action,
    FatalSignal,
    Frame,
    Sig,
    build_frame,
    parse_frame,
    signal_name,
)

if TYPE_CHECKING:
    pass


class SignalDelivery(PersonalityCore):
    # (tid, mask): the thread whose pause or rt_sigsuspend a signal just ended, and its own mask, which
    # the handler's frame holds (control.py sets it; the handler runs in the same exit).
    _saved_sigmask: tuple[int, int] | None = None

    def _deliver_pending(self) -> None:
        """A signal with a handler is pending and not blocked: run the handler when the call returns."""
        process = self.process
        signals = process.signals
        ready = signals.pending & ~signals.mask
        sig = (ready & -ready).bit_length()
        bit = 1 << (sig - 1)
        signals.pending &= ~bit
        # siginfo: tgkill/tkill say SI_TKILL, kill(2) and signals from outside SI_USER; si_pid is the
        # guest's pid, or 0 for a signal from outside (it has no sender in the guest).
        code = SI_TKILL if process.tkill_pending & bit else SI_USER
        pid = 0 if process.outside_pending & bit else PID
        process.tkill_pending &= ~bit
        process.outside_pending &= ~bit
        saved, self._saved_sigmask = self._saved_sigmask, None
        mask = saved[1] if saved is not None and saved[0] == process.sched.current else None
        regs = REGS.unpack_from(self._run_buffer, SYNC_REGS)
        frame = self._frame_for(sig, regs, code, 0, pid, mask)
        self._run_buffer[SYNC_REGS : SYNC_REGS + REGS_SIZE] = REGS.pack(*frame.regs)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS

    def _frame_for(
        self,
        sig: int,
        regs: tuple[int, ...],
        code: int,
        fault_address: int,
        pid: int = PID,
        saved_mask: int | None = None,
    ) -> Frame:
        """Write the signal frame for `sig` on the thread's stack; the process's mask and action change
        as Linux's do. The frame holds `saved_mask` (rt_sigsuspend's caller's own), else the mask now. A
        frame that cannot be written kills the process (SIGSEGV)."""
        signals = self.process.signals
        action = Action.parse(signals.actions.get(sig, bytes(32)))
        frame_mask = signals.mask if saved_mask is None else saved_mask
        frame = build_frame(
            sig, action, regs, self._xsave(), frame_mask, signals.altstack, code, fault_address, pid
        )
        try:
            self.space.write(frame.address, frame.data)
        except LinuxError:
            message = f"killed by SIGSEGV: no room for the {signal_name(sig)} frame at {frame.address:#x}"
            self._end(ProcessExit(128 + Sig.SIGSEGV, FatalSignal(Sig.SIGSEGV, message)))
        signals.mask |= action.mask | (0 if action.flags & SA_NODEFER else 1 << (sig - 1))
        if action.flags & SA_RESETHAND:
            signals.actions.pop(sig, None)
        return frame

    def _sigreturn(self) -> None:
        """rt_sigreturn: every register, the FPU state and the mask from the frame at rsp."""
        rsp = U64.unpack_from(self._run_buffer, SYNC_REGS + RSP)[0]
        try:
            regs, mask, fpstate = parse_frame(self.space.read(rsp, UCONTEXT_SIZE))
            xsave = self.space.read(fpstate, ctypes.sizeof(Xsave)) if fpstate else b""
        except LinuxError:
            self._end(
                ProcessExit(
                    128 + Sig.SIGSEGV,
                    FatalSignal(Sig.SIGSEGV, f"killed by SIGSEGV: bad signal frame at {rsp:#x}"),
                )
            )
        self.process.signals.mask = mask & ~((1 << (Sig.SIGKILL - 1)) | (1 << (Sig.SIGSTOP - 1)))
        self._run_buffer[SYNC_REGS : SYNC_REGS + REGS_SIZE] = REGS.pack(*regs)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        if xsave:
            self._vcpu._set_raw(Ioctl.SET_XSAVE, Xsave, xsave)
        if self.process.signals.pending & ~self.process.signals.mask:
            self._deliver_pending()

    def _handle_fault(self, frame_at: int, sig: int, fault_address: int, error: int) -> bool:
        """A fault in the program with a handler for its signal (not blocked): run the handler."""
        signals = self.process.signals
        action = Action.parse(signals.actions.get(sig, bytes(32)))
        if not action.runs_handler or signals.mask & (1 << (sig - 1)):
            return False
        _vector, _error, rip, _cs, rflags, usp, _ss = boot.read_exception_frame(self.machine.memory, frame_at)
        regs = list(REGS.unpack_from(self._run_buffer, SYNC_REGS))
        regs[6], regs[16], regs[17] = usp, rip, rflags  # the program's, from the CPU's frame
        code = (SEGV_ACCERR if error & 1 else SEGV_MAPERR) if fault_address else SI_USER
        frame = self._frame_for(sig, tuple(regs), code, fault_address)
        buf = self._run_buffer
        for index in (0, 3, 4, 5):  # rax, rdx, rsi, rdi: the handler's arguments (ring 0 keeps its rsp)
            U64.pack_into(buf, SYNC_REGS + index * 8, frame.regs[index])
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        self.machine.memory.write(frame_at + 16, struct.pack("<Q", frame.regs[16]))  # rip
        self.machine.memory.write(
            frame_at + 32, struct.pack("<QQ", frame.regs[17], frame.regs[6])
        )  # rflags, rsp
        return True
