"""Switching threads (of any process) on the one vCPU at system calls: registers, XSAVE, FS base and
CR3; waits on deadlines, pipes, children and poll.

When no thread can run, the vCPU waits (netwait.py) for news, a deadline, a signal from outside, or a
pause, checkpoint or stop of the machine. For the last, one waiting thread runs only to enter its wait
again: it resumes at its `syscall` with restart_syscall's number, and that call (calls_proc.py) blocks it
with the very wait it had (Scheduler.interrupt), so a sleep, a timeout or a futex wait lasts until its
deadline however often the machine is checkpointed, as Linux's restart block makes a nanosleep outlast a
SIGSTOP. The wait stays with the thread meanwhile, so a checkpoint taken there carries it (state.py).
"""

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
from monitor.linux.calls_proc import CLOCKS, NR_RESTART_SYSCALL, PAUSE
from monitor.linux.threads import Thread, ThreadState, Wait

if TYPE_CHECKING:
    pass


class ThreadSwitching(PersonalityCore):
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
        if following is None:
            following = self._wait_for_news()  # netwait.py: news, a deadline, a signal, or the machine
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
        if following.wait is not None:  # interrupted by the machine, not woken: into the same wait again
            rip = U64.unpack_from(buf, SYNC_REGS + RIP)[0]
            U64.pack_into(buf, SYNC_REGS + RIP, rip - 2)
            U64.pack_into(buf, SYNC_REGS + RAX, NR_RESTART_SYSCALL)
            if following.wait.kind == PAUSE:
                # Still inside pause or rt_sigsuspend: the mask it waits with holds until the call ends,
                # so no signal it blocks is handled on the way back in (restart_syscall puts the
                # thread's own mask back before it blocks again).
                self.process.signals.mask = following.wait.uaddr
        elif following.restart >= 0:  # it blocked in a call: run the call again (the `syscall` is 2 bytes)
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
