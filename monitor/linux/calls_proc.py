"""System calls about the process itself: identity, time, randomness, signals, limits, exit."""

from __future__ import annotations

import errno
import struct
import time

from monitor.linux import sockets as sk
from monitor.linux.mm import LinuxError
from monitor.linux.process import ProcessState
from monitor.linux.threads import Wait
from monitor.linux.signals import IGNORED_BY_DEFAULT, SIG_DFL, SIG_IGN, FatalSignal, Sig, signal_name

ARCH_SET_GS, ARCH_SET_FS, ARCH_GET_FS, ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
CLOCKS = {
    0: time.CLOCK_REALTIME,
    1: time.CLOCK_MONOTONIC,
    2: time.CLOCK_PROCESS_CPUTIME_ID,
    3: time.CLOCK_THREAD_CPUTIME_ID,
    4: time.CLOCK_MONOTONIC_RAW,
    5: time.CLOCK_REALTIME,
    6: time.CLOCK_MONOTONIC,
    7: time.CLOCK_BOOTTIME,
}
RLIM_INFINITY = (1 << 64) - 1
RLIMITS = {3: (8 << 20, RLIM_INFINITY), 7: (1024, 1024), 4: (0, RLIM_INFINITY)}  # STACK, NOFILE, CORE
PR_SET_NAME, PR_GET_NAME, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 15, 16, 3, 4
NR_RESTART_SYSCALL = 219
PAUSE = "pause"  # the Wait kind of pause and rt_sigsuspend: its uaddr is the mask the thread waits with
_UNBLOCKABLE = (1 << (Sig.SIGKILL - 1)) | (1 << (Sig.SIGSTOP - 1))


class ProcessExit(Exception):
    """The process ended: exit_group, or a fatal signal."""

    def __init__(self, status: int, fatal: FatalSignal | None = None) -> None:
        super().__init__(fatal.message if fatal else f"exit {status}")
        self.status = status
        self.fatal = fatal


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class Executed(Exception):
    """execve succeeded: the process runs a new program (its registers are set)."""


class SigReturn(Exception):
    """rt_sigreturn: the personality restores every register from the signal frame."""


class ProcessCalls(ProcessState):
    comm = b""
    # How the pending signals (bits sig-1) were sent, for their siginfo (delivery.py): by tgkill or tkill
    # (SI_TKILL), or from outside the VM (SI_USER with si_pid 0, control.py); the others by kill(2)
    # (SI_USER, si_pid the guest's pid). Cleared when the signal is delivered.
    tkill_pending = 0
    outside_pending = 0

    # ----- identity --------------------------------------------------------------------------------

    def sys_getpid(self, *_: int) -> int:
        return self.pid

    sys_getpgrp = sys_getpid
    sys_getpgid = sys_getpid
    sys_getsid = sys_getpid

    def sys_getppid(self, *_: int) -> int:
        return self.ppid

    def sys_getuid(self, *_: int) -> int:
        return 0

    sys_geteuid = sys_getuid
    sys_getgid = sys_getuid
    sys_getegid = sys_getuid

    def sys_getresuid(self, a: int, b: int, c: int, *_: int) -> int:
        for addr in (a, b, c):
            self.space.write(addr, struct.pack("<I", 0))
        return 0

    sys_getresgid = sys_getresuid

    def sys_getgroups(self, *_: int) -> int:
        return 0

    def sys_setuid(self, uid: int, *_: int) -> int:
        return 0 if uid == 0 else -errno.EPERM

    sys_setgid = sys_setuid

    def sys_setgroups(self, size: int, *_: int) -> int:
        return 0 if size == 0 else -errno.EPERM  # dropping every supplementary group (memcached -u root)

    def sys_setpgid(self, *_: int) -> int:
        return 0

    def sys_setsid(self, *_: int) -> int:
        raise LinuxError(errno.EPERM)

    def sys_uname(self, buf: int, *_: int) -> int:
        fields = (b"Linux", b"vmft", b"6.1.0-vmft", b"#1 SMP PREEMPT_DYNAMIC vmft", b"x86_64", b"(none)")
        self.space.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
        return 0

    def sys_personality(self, persona: int, *_: int) -> int:
        return 0

    def sys_prctl(self, option: int, arg2: int, *_: int) -> int:
        if option == PR_SET_NAME:
            self.comm = self.space.read_cstring(arg2, 16)[:15]
            return 0
        if option == PR_GET_NAME:
            self.space.write(arg2, self.comm.ljust(16, b"\0"))
            return 0
        if option == PR_GET_DUMPABLE:
            return 1
        if option == PR_SET_DUMPABLE:
            return 0
        raise LinuxError(errno.EINVAL)

    def sys_arch_prctl(self, code: int, addr: int, *_: int) -> int:
        if code == ARCH_SET_FS:
            self.fs_base = addr
            self.host.set_fs_base(addr)
            return 0
        if code == ARCH_GET_FS:
            self.space.write(addr, struct.pack("<Q", self.fs_base))
            return 0
        raise LinuxError(errno.EINVAL)

    def sys_set_robust_list(self, head: int, length: int, *_: int) -> int:
        self.robust_list = (head, length)
        return 0

    # ----- resources and scheduling -----------------------------------------------------------------

    def sys_prlimit64(self, pid: int, resource: int, new: int, old: int, *_: int) -> int:
        if old:
            self.space.write(old, struct.pack("<QQ", *RLIMITS.get(resource, (RLIM_INFINITY, RLIM_INFINITY))))
        return 0

    def sys_getrlimit(self, resource: int, old: int, *_: int) -> int:
        return self.sys_prlimit64(0, resource, 0, old)

    def sys_setrlimit(self, *_: int) -> int:
        return 0

    def sys_getrusage(self, who: int, buf: int, *_: int) -> int:
        self.space.write(buf, bytes(144))
        return 0

    def sys_sysinfo(self, buf: int, *_: int) -> int:
        mem = self.space.memory.size
        info = struct.pack(
            "<qQQQQQQQHxxxxxxQQI", 0, 0, 0, 0, mem, mem - self.space.phys.used_bytes, 0, 0, 1, 0, 0, 1
        )
        self.space.write(buf, info.ljust(112, b"\0"))
        return 0

    def sys_sched_getaffinity(self, pid: int, size: int, mask: int, *_: int) -> int:
        if size < 8:
            raise LinuxError(errno.EINVAL)
        self.space.write(mask, struct.pack("<Q", 1))  # one CPU
        return 8

    def sys_sched_setaffinity(self, *_: int) -> int:
        return 0

    def sys_getcpu(self, cpu: int, node: int, *_: int) -> int:
        for addr in (cpu, node):
            if addr:
                self.space.write(addr, struct.pack("<I", 0))
        return 0

    # ----- time: every reading is an event ---------------------------------------------------------

    def _clock(self, clock_id: int) -> int:
        clock = CLOCKS.get(clock_id)
        if clock is None:
            raise LinuxError(errno.EINVAL)
        return self.now_ns(clock)

    def sys_clock_gettime(self, clock_id: int, tp: int, *_: int) -> int:
        ns = self._clock(clock_id)
        self.space.write(tp, struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000))
        return 0

    def sys_clock_getres(self, clock_id: int, tp: int, *_: int) -> int:
        if clock_id not in CLOCKS:
            raise LinuxError(errno.EINVAL)
        if tp:
            self.space.write(tp, struct.pack("<qq", 0, 1))
        return 0

    def sys_gettimeofday(self, tv: int, tz: int, *_: int) -> int:
        if tv:
            ns = self.now_ns()
            self.space.write(tv, struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000 // 1000))
        if tz:
            self.space.write(tz, bytes(8))
        return 0

    def sys_time(self, tloc: int, *_: int) -> int:
        seconds = self.now_ns() // 1_000_000_000
        if tloc:
            self.space.write(tloc, struct.pack("<q", seconds))
        return seconds

    def sys_times(self, buf: int, *_: int) -> int:
        if buf:
            self.space.write(buf, bytes(32))
        return self.now_ns(time.CLOCK_MONOTONIC) // 10_000_000

    def _sleep(self, ns: int, rem: int = 0) -> None:
        # Blocked until the deadline (the others run meanwhile), also when alone: a signal from outside
        # ends the wait (EINTR), as on Linux (switching.py, control.py). The wait's uaddr is where the
        # time left goes if a signal ends it (`interrupted`): a relative sleep's `rem`, else 0.
        if ns > 0:
            deadline = self.now_ns(time.CLOCK_MONOTONIC) + ns
            self.sched.block(Wait(uaddr=rem, deadline_ns=deadline, clock=1, kind="sleep"))

    def interrupted(self, wait: Wait) -> bool:
        """A signal to handle ends this process's `wait` (control.py). A relative sleep writes the time
        it had left, as Linux does (nanosleep(2); the clock reading is an event). A MSG_WAITALL receive
        with bytes there runs again after the handler and returns them: True (else EINTR or a restart)."""
        if wait.kind == "sleep" and wait.uaddr and wait.deadline_ns is not None:
            left = max(0, wait.deadline_ns - self.now_ns(CLOCKS[wait.clock]))
            self.space.write(wait.uaddr, struct.pack("<qq", left // 1_000_000_000, left % 1_000_000_000))
        if wait.kind == "poll" and isinstance(wait.target, tuple):
            for file, events in wait.target[1]:
                if events & sk.POLL_WAITALL and isinstance(file, sk.TcpSocket):
                    return file.cut_waitall()
        return False

    def sys_restart_syscall(self, *_: int) -> int:
        """The way back into a wait a pause, checkpoint or stop of the machine interrupted (switching.py):
        the thread blocks again with the wait it kept, its deadline unchanged (a sleep of 5 s lasts 5 s
        however many checkpoints it sees), as Linux's restart block does. Without one, EINTR, as on
        Linux."""
        thread = self.sched.running
        wait = thread.wait
        if wait is None:
            return -errno.EINTR
        if wait.kind == PAUSE:
            self.signals.mask = thread.sigmask  # its own again: the wait keeps the mask it waits with
        self.sched.block(wait)
        return -errno.EINTR  # not seen: the wait's end sets the result (or the call runs again)

    def sys_nanosleep(self, req: int, rem: int, *_: int) -> int:
        sec, nsec = struct.unpack("<qq", self.space.read(req, 16))
        if sec < 0 or not 0 <= nsec < 1_000_000_000:
            raise LinuxError(errno.EINVAL)
        self._sleep(sec * 1_000_000_000 + nsec, rem)
        return 0

    def sys_clock_nanosleep(self, clock_id: int, flags: int, req: int, rem: int, *_: int) -> int:
        sec, nsec = struct.unpack("<qq", self.space.read(req, 16))
        if sec < 0 or not 0 <= nsec < 1_000_000_000:
            raise LinuxError(errno.EINVAL)
        ns = sec * 1_000_000_000 + nsec
        if flags & 1:  # TIMER_ABSTIME: no time left is written (the deadline does not move)
            self._sleep(ns - self._clock(clock_id))
        else:
            self._sleep(ns, rem)
        return 0

    def sys_alarm(self, *_: int) -> int:
        return 0

    def sys_setitimer(self, which: int, new: int, old: int, *_: int) -> int:
        if old:
            self.space.write(old, bytes(32))
        return 0

    # ----- randomness ----------------------------------------------------------------------------

    def sys_getrandom(self, buf: int, length: int, flags: int, *_: int) -> int:
        length = min(length, 1 << 20)
        self.space.write(buf, self.entropy(length))
        return length

    # ----- signals ---------------------------------------------------------------------------------

    def sys_rt_sigaction(self, sig: int, act: int, oldact: int, size: int, *_: int) -> int:
        if not 1 <= sig <= 64 or sig in (Sig.SIGKILL, Sig.SIGSTOP) and act:
            raise LinuxError(errno.EINVAL)
        if oldact:
            self.space.write(oldact, self.signals.actions.get(sig, bytes(32)))
        if act:
            self.signals.actions[sig] = self.space.read(act, 32)
        return 0

    def sys_rt_sigprocmask(self, how: int, new: int, old: int, size: int, *_: int) -> int:
        if old:
            self.space.write(old, struct.pack("<Q", self.signals.mask))
        if new:
            value = struct.unpack("<Q", self.space.read(new, 8))[0]
            if how == 0:
                self.signals.mask |= value
            elif how == 1:
                self.signals.mask &= ~value
            elif how == 2:
                self.signals.mask = value
            else:
                raise LinuxError(errno.EINVAL)
            self.signals.mask &= ~_UNBLOCKABLE
        return 0

    def sys_pause(self, *_: int) -> int:
        return self._suspend(self.signals.mask)

    def sys_rt_sigsuspend(self, mask: int, size: int, *_: int) -> int:
        if size != 8:
            raise LinuxError(errno.EINVAL)
        wanted = struct.unpack("<Q", self.space.read(mask, 8))[0]
        return self._suspend(wanted & ~_UNBLOCKABLE)

    def _suspend(self, mask: int) -> int:
        """pause, rt_sigsuspend: wait until a signal runs a handler, then EINTR. The thread keeps its own
        mask while it waits; the mask it waits with is the wait's uaddr (checkpointed with it). The signal
        that ends the wait finds the handler running with that mask, and its frame holds the thread's own,
        which rt_sigreturn restores (control.py, delivery.py: Linux's saved_sigmask). A pause, checkpoint
        or stop of the machine keeps the wait (sys_restart_syscall)."""
        self.sched.block(Wait(uaddr=mask, kind=PAUSE))
        return -errno.EINTR  # not seen: the wait ends with EINTR (control.py)

    def sys_rt_sigreturn(self, *_: int) -> int:
        raise SigReturn()

    def sys_sigaltstack(self, new: int, old: int, *_: int) -> int:
        if old:
            self.space.write(old, self.signals.altstack)
        if new:
            self.signals.altstack = self.space.read(new, 24)
        return 0

    def _signal_self(self, sig: int, tkill: bool = False) -> int:
        if sig == 0:
            return 0
        if not 1 <= sig <= 64:
            raise LinuxError(errno.EINVAL)
        handler = struct.unpack_from("<Q", self.signals.actions.get(sig, bytes(32)))[0]
        if sig != Sig.SIGKILL and (handler == SIG_IGN or handler == SIG_DFL and sig in IGNORED_BY_DEFAULT):
            return 0
        if handler not in (SIG_DFL, SIG_IGN) and sig != Sig.SIGKILL:
            self.signals.pending |= 1 << (sig - 1)  # delivered when this system call returns
            if tkill:
                self.tkill_pending |= 1 << (sig - 1)
            else:
                self.tkill_pending &= ~(1 << (sig - 1))
            self.outside_pending &= ~(1 << (sig - 1))
            return 0
        raise ProcessExit(
            128 + sig, FatalSignal(sig, f"killed by {signal_name(sig)} (sent by the program itself)")
        )

    def sys_kill(self, pid: int, sig: int, *_: int) -> int:
        pid = _s32(pid)  # pid_t is an int
        if pid in (self.pid, 0, -1, -self.pid):
            return self._signal_self(sig)
        if not 1 <= sig <= 64 and sig != 0:
            raise LinuxError(errno.EINVAL)
        self.host.signal_process(abs(pid), sig)
        return 0

    def sys_fork(self, *_: int) -> int:
        return self.host.fork(False, 0)

    def sys_vfork(self, *_: int) -> int:
        return self.host.fork(True, 0)

    def sys_execve(self, path: int, argv: int, envp: int, *_: int) -> int:
        self.host.execve(self.read_path(path), self._strings(argv), self._strings(envp))
        return 0

    def _strings(self, addr: int) -> list[str]:
        out: list[str] = []
        while addr:
            pointer = struct.unpack("<Q", self.space.read(addr, 8))[0]
            if not pointer:
                break
            out.append(self.space.read_cstring(pointer, 1 << 17).decode("utf-8", "surrogateescape"))
            addr += 8
            if len(out) > 4096:
                raise LinuxError(errno.E2BIG)
        return out

    def sys_wait4(self, pid: int, status: int, options: int, rusage: int, *_: int) -> int:
        pid = _s32(pid)  # pid_t is an int
        child, wait_status = self.host.wait_child(pid if pid > 0 else -1, options)
        if child and status:
            self.space.write(status, struct.pack("<i", wait_status))
        if child and rusage:
            self.space.write(rusage, bytes(144))
        return child

    def sys_tgkill(self, tgid: int, tid: int, sig: int, *_: int) -> int:
        if tid not in self.sched.threads:
            raise LinuxError(errno.ESRCH)
        return self._signal_self(sig, tkill=True)

    def sys_tkill(self, tid: int, sig: int, *_: int) -> int:
        return self.sys_tgkill(self.pid, tid, sig)

    def sys_rseq(self, *_: int) -> int:
        raise LinuxError(errno.ENOSYS)  # restartable sequences: glibc works without them (one thread)

    def sys_waitid(self, *_: int) -> int:
        raise LinuxError(errno.ECHILD)  # waitid: not yet (wait4 is)

    # ----- the end ---------------------------------------------------------------------------------

    def sys_exit_group(self, status: int, *_: int) -> int:
        raise ProcessExit(status & 0xFF)
