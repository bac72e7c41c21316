"""System calls about threads: clone (threads only), futex, exit, sched_yield, gettid, and sleeping while
other threads run (monitor/linux/threads.py switches them)."""

from __future__ import annotations

import errno
import struct
import time

from monitor.linux.calls_proc import ProcessExit
from monitor.linux.mm import LinuxError
from monitor.linux.process import ProcessState
from monitor.linux.threads import Wait

CLONE_VM, CLONE_THREAD, CLONE_SETTLS = 0x100, 0x10000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x100000, 0x200000, 0x01000000
FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE = 0, 1, 3, 4
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_CMD_MASK, FUTEX_CLOCK_REALTIME = 0x7F, 0x100
_U32 = struct.Struct("<I")


class ThreadCalls(ProcessState):
    def sys_clone(self, flags: int, stack: int, ptid: int, ctid: int, tls: int, *_: int) -> int:
        if not flags & CLONE_THREAD:
            child_pid = self.host.fork(bool(flags & CLONE_VM), stack)  # fork, vfork, posix_spawn
            if flags & CLONE_PARENT_SETTID:
                self.space.write(ptid, _U32.pack(child_pid))
            return child_pid
        if not flags & CLONE_VM:
            raise LinuxError(errno.EINVAL)
        child = self.sched.new_thread()
        self.host.spawn(child, stack, tls if flags & CLONE_SETTLS else self.fs_base)
        if flags & CLONE_PARENT_SETTID:
            self.space.write(ptid, _U32.pack(child.tid))
        if flags & CLONE_CHILD_SETTID:
            self.space.write(ctid, _U32.pack(child.tid))
        if flags & CLONE_CHILD_CLEARTID:
            child.clear_child_tid = ctid
        return child.tid

    def sys_clone3(self, *_: int) -> int:
        raise LinuxError(errno.ENOSYS)  # glibc falls back to clone, which is here

    def sys_gettid(self, *_: int) -> int:
        return self.sched.current

    def sys_set_tid_address(self, addr: int, *_: int) -> int:
        self.sched.running.clear_child_tid = addr
        return self.sched.current

    def sys_sched_yield(self, *_: int) -> int:
        self.sched.yield_now()
        return 0

    def sys_futex(self, uaddr: int, op: int, val: int, timeout: int, uaddr2: int, val3: int) -> int:
        cmd = op & FUTEX_CMD_MASK
        if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
            return self.sched.wake(uaddr, val, val3 if cmd == FUTEX_WAKE_BITSET else 0xFFFFFFFF)
        if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
            if _U32.unpack(self.space.read(uaddr, 4))[0] != val & 0xFFFFFFFF:
                raise LinuxError(errno.EAGAIN)
            wait = Wait(uaddr=uaddr, bitset=val3 if cmd == FUTEX_WAIT_BITSET else 0xFFFFFFFF)
            if timeout:
                sec, nsec = struct.unpack("<qq", self.space.read(timeout, 16))
                ns = sec * 1_000_000_000 + nsec
                if cmd == FUTEX_WAIT:  # relative, on CLOCK_MONOTONIC
                    wait.clock, wait.deadline_ns = 1, self.now_ns(time.CLOCK_MONOTONIC) + ns
                else:  # absolute
                    wait.clock = 0 if op & FUTEX_CLOCK_REALTIME else 1
                    wait.deadline_ns = ns
            self.sched.block(wait)
            return 0  # replaced by the wake's result when the thread resumes
        if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
            if cmd == FUTEX_CMP_REQUEUE and _U32.unpack(self.space.read(uaddr, 4))[0] != val3 & 0xFFFFFFFF:
                raise LinuxError(errno.EAGAIN)
            woken = self.sched.wake(uaddr, val)
            return woken + self.sched.requeue(uaddr, uaddr2, timeout & 0x7FFFFFFF)
        raise LinuxError(errno.ENOSYS)

    def sys_exit(self, status: int, *_: int) -> int:
        sched = self.sched
        if not any(t.pid == self.pid and tid != sched.current for tid, t in sched.threads.items()):
            raise ProcessExit(status & 0xFF)  # the process's last thread: the process exits
        thread = self.sched.exit_running()
        if thread.clear_child_tid:
            self.space.write(thread.clear_child_tid, _U32.pack(0))
            self.sched.wake(thread.clear_child_tid, 1)
        return 0
