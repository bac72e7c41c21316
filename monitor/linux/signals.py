"""Signals: what a guest exception means, what a signal's default action is, and the rt_sigframe a
handler runs on (delivery.py runs it). Default actions follow signal(7).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class Sig(enum.IntEnum):
    SIGHUP = 1
    SIGINT = 2
    SIGQUIT = 3
    SIGILL = 4
    SIGTRAP = 5
    SIGABRT = 6
    SIGBUS = 7
    SIGFPE = 8
    SIGKILL = 9
    SIGUSR1 = 10
    SIGSEGV = 11
    SIGUSR2 = 12
    SIGPIPE = 13
    SIGALRM = 14
    SIGTERM = 15
    SIGSTKFLT = 16
    SIGCHLD = 17
    SIGCONT = 18
    SIGSTOP = 19
    SIGTSTP = 20
    SIGTTIN = 21
    SIGTTOU = 22
    SIGURG = 23
    SIGXCPU = 24
    SIGXFSZ = 25
    SIGVTALRM = 26
    SIGPROF = 27
    SIGWINCH = 28
    SIGIO = 29
    SIGPWR = 30
    SIGSYS = 31


IGNORED_BY_DEFAULT = frozenset({Sig.SIGCHLD, Sig.SIGURG, Sig.SIGWINCH, Sig.SIGCONT})
SIG_DFL, SIG_IGN = 0, 1

# x86 exception vector -> (signal, what happened)
EXCEPTION_SIGNALS: dict[int, tuple[Sig, str]] = {
    0: (Sig.SIGFPE, "divide error"),
    1: (Sig.SIGTRAP, "debug trap"),
    3: (Sig.SIGTRAP, "breakpoint"),
    4: (Sig.SIGSEGV, "overflow"),
    5: (Sig.SIGSEGV, "bound range exceeded"),
    6: (Sig.SIGILL, "invalid opcode"),
    7: (Sig.SIGFPE, "device not available"),
    8: (Sig.SIGSEGV, "double fault"),
    10: (Sig.SIGSEGV, "invalid TSS"),
    11: (Sig.SIGBUS, "segment not present"),
    12: (Sig.SIGBUS, "stack segment fault"),
    13: (Sig.SIGSEGV, "general protection fault"),
    14: (Sig.SIGSEGV, "page fault"),
    16: (Sig.SIGFPE, "x87 floating-point error"),
    17: (Sig.SIGBUS, "alignment check"),
    18: (Sig.SIGBUS, "machine check"),
    19: (Sig.SIGFPE, "SIMD floating-point error"),
}


@dataclass(frozen=True)
class FatalSignal:
    signal: int
    message: str

    @property
    def exit_status(self) -> int:
        return 128 + self.signal


def signal_name(number: int) -> str:
    try:
        return Sig(number).name
    except ValueError:
        return f"signal {number}"


def page_fault_text(error_code: int, address: int) -> str:
    access = "writing" if error_code & 2 else ("executing" if error_code & 16 else "reading")
    why = "a protected page" if error_code & 1 else "an unmapped page"
    return f"page fault {access} {why} at {address:#x}"


# ----- handlers: the frame Linux builds on the user stack (x86-64 rt_sigframe) ----------------------------

SA_SIGINFO, SA_ONSTACK, SA_RESTORER = 0x4, 0x08000000, 0x04000000
SA_RESTART, SA_NODEFER, SA_RESETHAND = 0x10000000, 0x40000000, 0x80000000
SS_ONSTACK, SS_DISABLE = 1, 2
SI_USER, SI_TKILL, SEGV_MAPERR, SEGV_ACCERR = 0, -6, 1, 2
_ACTION = struct.Struct("<QQQQ")  # handler, flags, restorer, mask
_STACK = struct.Struct("<QiiQ")  # ss_sp, ss_flags, pad, ss_size
# sigcontext: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags, segments, err, trapno, oldmask,
# cr2, fpstate pointer, 8 reserved words.
_SIGCONTEXT = struct.Struct("<18Q HHHH QQQQ Q 64x")
UCONTEXT_SIZE = 8 + 8 + 24 + _SIGCONTEXT.size + 8
SIGINFO_SIZE = 128
# For each sigcontext register in order, its index in kvm_regs (rax rbx rcx rdx rsi rdi rsp rbp r8..r15
# rip rflags).
_KVM_FROM_SIGCONTEXT = (8, 9, 10, 11, 12, 13, 14, 15, 5, 4, 7, 1, 3, 0, 2, 6, 16, 17)


@dataclass(frozen=True)
class Action:
    handler: int
    flags: int
    restorer: int
    mask: int

    @staticmethod
    def parse(raw: bytes) -> Action:
        return Action(*_ACTION.unpack(raw[:32].ljust(32, b"\0")))

    @property
    def runs_handler(self) -> bool:
        return self.handler not in (SIG_DFL, SIG_IGN)


@dataclass(frozen=True)
class Frame:
    """Where a handler starts: its registers (kvm_regs order) and the frame's bytes at `address`."""

    address: int
    data: bytes
    regs: tuple[int, ...]


def build_frame(
    sig: int,
    action: Action,
    regs: tuple[int, ...],
    xsave: bytes,
    mask: int,
    altstack: bytes,
    code: int = SI_USER,
    fault_address: int = 0,
    pid: int = 0,
) -> Frame:
    """The rt_sigframe for delivering `sig` to a thread whose registers are `regs` (kvm_regs order,
    rip/rflags where it resumes), and the registers the handler starts with."""
    sp = regs[6]
    alt_sp, alt_flags, _pad, alt_size = _STACK.unpack(altstack[:24].ljust(24, b"\0"))
    if (
        action.flags & SA_ONSTACK
        and not alt_flags & SS_DISABLE
        and alt_size
        and not alt_sp <= sp < alt_sp + alt_size
    ):
        sp = alt_sp + alt_size
    else:
        sp -= 128  # the red zone
    fp_at = (sp - len(xsave)) & ~63
    # pretcode, ucontext, siginfo in a row (rt_sigreturn finds the ucontext at rsp after the handler's
    # `ret`); at the handler's first instruction (rsp + 8) is 16-byte aligned, as after a call.
    frame_at = ((fp_at - 8 - UCONTEXT_SIZE - SIGINFO_SIZE) & ~15) - 8
    uc_at = frame_at + 8
    info_at = uc_at + UCONTEXT_SIZE
    trapno = 14 if fault_address else 0
    segments = (0x33, 0, 0, 0x2B)  # cs, gs, fs, ss
    sigcontext = _SIGCONTEXT.pack(
        *(regs[i] for i in _KVM_FROM_SIGCONTEXT), *segments, 0, trapno, mask, fault_address, fp_at
    )
    ucontext = (
        struct.pack("<QQ", 0, 0) + altstack[:24].ljust(24, b"\0") + sigcontext + struct.pack("<Q", mask)
    )
    info = bytearray(SIGINFO_SIZE)
    struct.pack_into("<iii", info, 0, sig, 0, code)
    if fault_address:
        struct.pack_into("<Q", info, 16, fault_address)
    else:
        struct.pack_into("<ii", info, 16, pid, 0)
    data = bytearray(fp_at + len(xsave) - frame_at)
    struct.pack_into("<Q", data, 0, action.restorer)  # the handler's `ret` goes to the restorer
    data[uc_at - frame_at : uc_at - frame_at + len(ucontext)] = ucontext
    data[info_at - frame_at : info_at - frame_at + SIGINFO_SIZE] = info
    data[fp_at - frame_at :] = xsave
    handler_regs = list(regs)
    handler_regs[0] = 0  # rax
    handler_regs[5] = sig  # rdi
    handler_regs[4] = info_at  # rsi
    handler_regs[3] = uc_at  # rdx
    handler_regs[6] = frame_at  # rsp
    handler_regs[16] = action.handler  # rip
    handler_regs[17] = regs[17] & ~0x40500  # rflags without TF, DF, AC (as Linux clears them)
    return Frame(frame_at, bytes(data), tuple(handler_regs))


def parse_frame(uc: bytes) -> tuple[tuple[int, ...], int, int]:
    """From a ucontext at rt_sigreturn: the registers to resume with (kvm_regs order), the signal mask
    to restore, and the address of the saved FPU state."""
    values = _SIGCONTEXT.unpack_from(uc, 40)
    regs = [0] * 18
    for sigctx_index, kvm_index in enumerate(_KVM_FROM_SIGCONTEXT):
        regs[kvm_index] = values[sigctx_index]
    mask = struct.unpack_from("<Q", uc, 40 + _SIGCONTEXT.size)[0]
    fpstate = values[26]
    return tuple(regs), mask, fpstate
