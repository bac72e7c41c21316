"""Signals: what a guest exception means, and what a signal's default action is.

Signal handlers are recorded (rt_sigaction) but not yet delivered: a signal whose action would run a
handler ends the process like an uncaught one, with a message saying so. Default actions follow
signal(7).
"""

from __future__ import annotations

import enum
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
