"""Switching threads (of any process) on the one vCPU at system calls: registers, XSAVE, FS base and
CR3; waits on deadlines, pipes, children and poll."""

from __future__ import annotations

from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Xsave
from monitor.linux.core import (
    MASK64,
    R11,
    RAX,
    RCX,
    REGS_SIZE,
    RFLAGS,
    RIP,
    RSP,
    SYNC_REGS,
    U64,
    PersonalityCore,
)

import errno
from typing import TYPE_CHECKING

from monitor.linux import fdtable as fdt
from monitor.linux.calls_fs import poll_events
from monitor.linux.calls_proc import CLOCKS
from monitor.linux.threads import Thread, ThreadState, Wait

if TYPE_CHECKING:
    pass


class ThreadSwitching(PersonalityCore):
    def _signal_wakes_waiter(self) -> Thread | None:  # control.py
        raise NotImplementedError

    def _sleep_for_deadline(self, seconds: float) -> None:  # control.py
        raise NotImplementedError

    def _host_signal_here(self) -> bool:  # control.py
        raise NotImplementedError

    def _spawn(self, child: Thread, stack: int, fs_base: int) -> None:
        """clone: the child resumes where the parent does, with rax 0, its own stack and FS base."""
        regs = bytearray(self._run_buffer[SYNC_REGS : SYNC_REGS + REGS_SIZE])
        rcx = U64.unpack_from(regs, RCX)[0]
        r11 = U64.unpack_from(regs, R11)[0]
        U64.pack_into(regs, RIP, rcx)
        U64.pack_into(regs, RFLAGS, r11)
        if stack:
            U64.pack_into(regs, RSP, stack)
        child.regs = bytes(regs)
        child.xsave = self._xsave()
        child.fs_base = fs_base
        child.result = 0
        child.sigmask = self.process.signals.mask  # a new thread or process starts with its creator's mask

    def _switch(self, result: int) -> None:
        """At a system call's return: park the running thread (unless it exited) and resume the next."""
        sched = self.process.sched
        sched.switch_needed = False
        current = sched.threads.get(sched.current)
        if current is not None:
            current.regs = bytes(self._run_buffer[SYNC_REGS : SYNC_REGS + REGS_SIZE])  # already the return
            current.xsave = self._xsave()
            current.fs_base = self.process.fs_base
            current.sigmask = self.process.signals.mask
            if current.state is ThreadState.RUNNING:
                current.state = ThreadState.RUNNABLE
                current.result = result
                sched.run_queue.append(current.tid)
        self._expire_deadlines()
        self._wake_ready()
        following = sched.pick()
        while following is None:
            following = self._wait_for_deadline()
        sched.switches += 1
        sched.current = following.tid
        following.state = ThreadState.RUNNING
        buf = self._run_buffer
        if following is not current:
            if following.pid != self.process.pid:
                self._enter_process(following.pid)
            buf[SYNC_REGS : SYNC_REGS + REGS_SIZE] = following.regs
            self._vcpu._set_raw(Ioctl.SET_XSAVE, Xsave, following.xsave)
            if following.fs_base != self._cpu_fs_base:
                self._set_fs_base(following.fs_base)
            self.process.fs_base = following.fs_base
        self.process.signals.mask = following.sigmask  # also the same thread's: its wake may change it
        U64.pack_into(buf, SYNC_REGS + RAX, following.result & MASK64)
        if following.restart >= 0:  # it blocked in a call: run the call again (the `syscall` is 2 bytes)
            rip = U64.unpack_from(buf, SYNC_REGS + RIP)[0]
            U64.pack_into(buf, SYNC_REGS + RIP, rip - 2)
            U64.pack_into(buf, SYNC_REGS + RAX, following.restart)
            following.restart = -1
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS

    def _block_and_restart(self, number: int, what: object) -> int:
        """A call that must wait (a pipe, a child, poll): the thread blocks and runs it again when ready."""
        kind, *rest = what if isinstance(what, tuple) else ("pipe-read", what)
        deadline = rest[1] if kind == "poll" else None
        self.process.sched.running.restart = number
        self.process.sched.block(Wait(kind=str(kind), target=what, deadline_ns=deadline, clock=1))
        return -errno.EINTR  # not seen: the call runs again

    def _wake_ready(self) -> None:
        """Threads waiting on a pipe, a child or poll whose condition now holds become runnable."""
        sched = self.process.sched
        for thread in sched.waiting():
            wait = thread.wait
            if wait is None or wait.kind in ("futex", "sleep", "vfork", "pause"):
                continue
            what = wait.target
            assert isinstance(what, tuple)
            ready = False
            if wait.kind == "pipe-read":
                ready = bool(what[1].buffer) or not what[1].writers
            elif wait.kind == "pipe-write":
                ready = len(what[1].buffer) < fdt.PIPE_CAPACITY or not what[1].readers
            elif wait.kind == "child":
                _kind, ppid, pid = what
                live = [
                    c for c in self.table.children.get(ppid, set()) if c in self.processes and pid in (-1, c)
                ]
                ready = self.table.has_zombie(ppid, pid) or not live
            elif wait.kind == "poll":
                ready = any(poll_events(file, events) for file, events in what[1])
            if ready:
                sched.make_runnable(thread, 0)

    def _enter_process(self, pid: int) -> None:
        """The next thread belongs to another process: its tables, its /proc, its page tables."""
        old_root = self.process.space.root
        self.process = self.processes[pid]
        self.syscalls = self.tables[pid]
        self.fs.proc = self.process
        if self.process.space.root != old_root:
            sregs = self._vcpu.get_sregs()
            sregs.cr3 = self.process.space.root
            self._vcpu.set_sregs(sregs)

    def _now(self) -> dict[int, int]:
        """The clocks blocked threads wait on, read now (each reading an event)."""
        clocks = sorted({clock for clock, _deadline in self.process.sched.deadlines()})
        return {clock: self.process.now_ns(CLOCKS[clock]) for clock in clocks}

    def _expire_deadlines(self) -> None:
        if self.process.sched.deadlines():
            self.process.sched.expire(self._now())

    def _wait_for_deadline(self) -> Thread:
        """No thread can run: sleep until the earliest deadline (live), or wait for a signal."""
        sched = self.process.sched
        # A listening guest: the network may wake a thread. No deadline at all (pause, sigsuspend, a futex
        # or a pipe nobody will write): only a signal from outside can, so the VM waits for one as Linux
        # would, however long (a service that waits for SIGTERM or SIGHUP is legitimate), and a pause,
        # checkpoint or stop of the machine is still served there (netwait.py). Not a hang.
        if self.net.active or not sched.deadlines():
            return self._wait_for_news()
        if self._signal_wakes_waiter() is not None:  # a pending signal ends a wait (EINTR or a restart)
            picked = sched.pick()
            assert picked is not None
            return picked
        now = self._now()
        remaining = min(deadline - now[clock] for clock, deadline in sched.deadlines())
        if remaining > 0 and not self.process.replaying:
            self._sleep_for_deadline(remaining / 1e9)  # a signal from outside ends it early
        if self._host_signal_here() and self._signal_wakes_waiter() is not None:
            picked = sched.pick()
            assert picked is not None
            return picked
        sched.expire(self._now())
        picked = sched.pick()
        return picked if picked is not None else self._wait_for_deadline()
