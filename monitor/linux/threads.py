"""Threads of the one process, switched by the monitor at system calls only (docs/design.md).

All threads share the one vCPU. The running thread keeps it until it blocks (a futex wait, a sleep),
yields, exits, or has made PREEMPT_SYSCALLS system calls while others are runnable; every switch happens
at a system call, so the interleaving is a function of the guest's own execution (replay recomputes it).
A blocked thread's deadline is checked against the clock (an event) only when some thread has one.
A thread computing without system calls is never preempted (the watchdog calls that a hang).

A thread that is not running keeps its registers (the raw kvm_regs as they will be on its return from
the system call), its FPU/SSE/AVX state (KVM_GET_XSAVE) and its FS base here.
"""

from __future__ import annotations

import enum
import errno
import hashlib
from collections import deque
from dataclasses import dataclass, field

PREEMPT_SYSCALLS = 500
FIRST_TID = 100  # the main thread's tid is the process's pid


class ThreadState(enum.Enum):
    RUNNING = "running"
    RUNNABLE = "runnable"
    BLOCKED = "blocked"


@dataclass
class Wait:
    """What a blocked thread waits for, by `kind`: "futex" (the word at uaddr, bitset), "sleep"
    (nanosleep, clock_nanosleep: its deadline; uaddr is where the time left goes if a signal ends it),
    "pause" (pause, rt_sigsuspend: uaddr is the signal mask it waits with), "pipe-read" and "pipe-write"
    (`target`: the pipe), "child" (wait4), "vfork" (the child's exec or exit), "poll" (poll, ppoll,
    select, pselect6, epoll_wait, a blocking accept or receive: `target` holds the files and events).
    A futex, sleep or poll wait may have a deadline; when it passes the thread resumes with 0 (a futex:
    ETIMEDOUT; select and pselect6 run again: RUN_AGAIN_AT_DEADLINE)."""

    uaddr: int = 0
    bitset: int = 0xFFFFFFFF
    deadline_ns: int | None = None  # on `clock`
    clock: int = 1  # CLOCK_MONOTONIC
    kind: str = "futex"  # futex, sleep, pause, pipe-read, pipe-write, child, vfork, poll
    target: object = None

    def __repr__(self) -> str:  # in the state digest: no object addresses
        return f"Wait({self.uaddr}, {self.bitset}, {self.deadline_ns}, {self.clock}, {self.kind})"


@dataclass
class Thread:
    tid: int
    state: ThreadState = ThreadState.RUNNABLE
    regs: bytes = b""  # raw kvm_regs to resume with (rip/rflags already the return point)
    xsave: bytes = b""
    fs_base: int = 0
    result: int = 0  # rax when it resumes
    clear_child_tid: int = 0
    # What it waits for while blocked. A thread a pause, checkpoint or stop of the machine made runnable
    # keeps it: it runs only to enter the same wait again (restart_syscall: Scheduler.interrupt).
    wait: Wait | None = None
    syscalls: int = 0
    pid: int = FIRST_TID  # the process it belongs to
    restart: int = -1  # a system call to run again when it resumes (it blocked), else -1
    # Its signal mask while it is not running (the running thread's is its process's signals.mask): each
    # thread has its own, as on Linux (redis's background threads block every signal, its main thread none).
    sigmask: int = 0


# select and pselect6 run again at their deadline: their timeout was zeroed when they blocked, so they
# return at once then with their sets cleared (calls_events.py). Known by the call a blocked thread runs
# again (Thread.restart, in every checkpoint), so nothing else has to carry it. Other polls return 0.
NR_SELECT, NR_PSELECT6 = 23, 270
RUN_AGAIN_AT_DEADLINE = frozenset({NR_SELECT, NR_PSELECT6})


@dataclass
class Scheduler:
    threads: dict[int, Thread] = field(default_factory=dict)
    current: int = FIRST_TID
    next_tid: int = FIRST_TID + 1
    run_queue: deque[int] = field(default_factory=deque)
    switch_needed: bool = False
    switches: int = 0

    def __post_init__(self) -> None:
        if not self.threads:
            self.threads[FIRST_TID] = Thread(FIRST_TID, ThreadState.RUNNING)

    @property
    def running(self) -> Thread:
        return self.threads[self.current]

    @property
    def multithreaded(self) -> bool:
        return len(self.threads) > 1

    def new_id(self) -> int:
        """Thread and process ids come from one counter, as on Linux."""
        self.next_tid += 1
        return self.next_tid - 1

    def new_thread(self, pid: int | None = None) -> Thread:
        thread = Thread(self.new_id(), pid=self.running.pid if pid is None else pid)
        self.threads[thread.tid] = thread
        self.run_queue.append(thread.tid)
        return thread

    # ----- what system calls ask for ----------------------------------------------------------------

    def block(self, wait: Wait) -> None:
        thread = self.running
        thread.state = ThreadState.BLOCKED
        thread.wait = wait
        self.switch_needed = True

    def yield_now(self) -> None:
        if self.run_queue:
            self.switch_needed = True

    def exit_running(self) -> Thread:
        thread = self.threads.pop(self.current)
        self.switch_needed = True
        return thread

    def wake(self, uaddr: int, count: int, bitset: int = 0xFFFFFFFF) -> int:
        """Wake up to `count` threads waiting on the futex word at uaddr (in the order they blocked)."""
        woken = 0
        for thread in self._waiting():
            if woken >= count:
                break
            wait = thread.wait
            if wait is not None and wait.kind == "futex" and wait.uaddr == uaddr and wait.bitset & bitset:
                self._make_runnable(thread, 0)
                woken += 1
        return woken

    def requeue(self, uaddr: int, target: int, count: int) -> int:
        moved = 0
        for thread in self._waiting():
            if moved >= count:
                break
            if thread.wait is not None and thread.wait.kind == "futex" and thread.wait.uaddr == uaddr:
                thread.wait.uaddr = target
                moved += 1
        return moved

    def waiting(self) -> list[Thread]:
        """The blocked threads, in a deterministic order."""
        return self._waiting()

    def _waiting(self) -> list[Thread]:
        return sorted(
            (t for t in self.threads.values() if t.state is ThreadState.BLOCKED), key=lambda t: t.syscalls
        )

    def make_runnable(self, thread: Thread, result: int) -> None:
        self._make_runnable(thread, result)

    def interrupt(self, thread: Thread) -> None:
        """A pause, checkpoint or stop of the machine while every thread waits: the vCPU must finish its
        exit, so `thread` runs, but only to enter its wait again, deadline and all, as if nothing had
        happened (it keeps `wait` and `restart`; switching.py resumes it at restart_syscall, as Linux
        resumes a sleep it interrupted without a signal to handle)."""
        thread.state = ThreadState.RUNNABLE
        self.run_queue.append(thread.tid)

    def blocked(self, kind: str) -> list[Thread]:
        return [t for t in self._waiting() if t.wait is not None and t.wait.kind == kind]

    def _make_runnable(self, thread: Thread, result: int) -> None:
        thread.state = ThreadState.RUNNABLE
        thread.wait = None
        thread.result = result
        self.run_queue.append(thread.tid)

    # ----- choosing who runs ---------------------------------------------------------------------------

    def deadlines(self) -> list[tuple[int, int]]:
        """(clock, deadline) of every blocked thread that has one."""
        return [
            (t.wait.clock, t.wait.deadline_ns)
            for t in self.threads.values()
            if t.state is ThreadState.BLOCKED and t.wait is not None and t.wait.deadline_ns is not None
        ]

    def expire(self, now: dict[int, int]) -> None:
        """Wake the blocked threads whose deadline passed (`now`: clock -> its time)."""
        for thread in self._waiting():
            wait = thread.wait
            if wait is not None and wait.deadline_ns is not None and wait.clock in now:
                if now[wait.clock] >= wait.deadline_ns:
                    if wait.kind == "poll" and thread.restart not in RUN_AGAIN_AT_DEADLINE:
                        thread.restart = -1  # poll's timeout: it returns 0 instead of running again
                    self._make_runnable(thread, -errno.ETIMEDOUT if wait.kind == "futex" else 0)

    def preempt_due(self) -> bool:
        return bool(self.run_queue) and self.running.syscalls % PREEMPT_SYSCALLS == 0

    def pick(self) -> Thread | None:
        """The next thread to run, or None if none is runnable."""
        while self.run_queue:
            tid = self.run_queue.popleft()
            thread = self.threads.get(tid)
            if thread is not None and thread.state is ThreadState.RUNNABLE:
                return thread
        return None

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.current, self.next_tid, list(self.run_queue))).encode())
        for tid in sorted(self.threads):
            t = self.threads[tid]
            h.update(
                repr(
                    (tid, t.state.value, t.fs_base, t.result, t.clear_child_tid, t.wait, t.syscalls)
                    + (t.sigmask,)
                ).encode()
            )
            h.update(t.regs)
            h.update(t.xsave)
        return h.digest()
