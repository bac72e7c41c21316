"""Process control: fork, vfork, execve, wait4, exit and kill between processes (processes.py keeps
the zombies), and signals from outside the guest (the host's SIGTERM, `vmft stop`).

A signal from outside is an event of the log, never a host action replay repeats: `request_signal` (any
thread) queues it, and the vCPU takes it at the program's next system call, or in a wait it ends (for the
network or a deadline, netwait.py: WOKE_SIGNAL): a SIGNAL event with its number
(Journal.data_if: an event only some exits have). Replay takes the number from the log at the same
position, never from the host. From there it is a kill(2) to the first process: ignored, pending for a
handler, or its default action (the VM ends with 128+N). A pending signal for a process whose threads all
wait ends one wait (EINTR, or the call runs again after the handler under SA_RESTART) so the handler runs.
"""

from __future__ import annotations

from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Xsave
from monitor.linux.kernel import LinuxProcess
from monitor.linux.core import (
    REGS,
    REGS_SIZE,
    RIP,
    RSP,
    SYNC_REGS,
    U64,
    PersonalityCore,
    log,
)

import errno
import os
import struct
from collections import deque

from monitor.linux import boot, elf
from monitor.linux import fdtable as fdt
from monitor.linux.calls_proc import PAUSE, Executed, ProcessExit
from monitor.linux.mm import PROT_EXEC, PROT_READ, AddressSpace, LinuxError
from monitor.linux.process import ProgramInfo
from monitor.linux.processes import Zombie, exit_status, signal_status
from monitor.journal import EventKind
from monitor.linux.signals import (
    IGNORED_BY_DEFAULT,
    SA_RESTART,
    Action,
    FatalSignal,
    Sig,
    signal_name,
)
from monitor.linux.stack import AuxInfo, build
from monitor.linux.syscalls import SyscallTable
from monitor.linux.threads import FIRST_TID, Thread, Wait


# Calls Linux never runs again after a handler, SA_RESTART or not (signal(7)): poll, ppoll, select,
# pselect6, epoll_wait, epoll_pwait, nanosleep, clock_nanosleep, pause, rt_sigsuspend. They return EINTR.
_NEVER_RESTARTED = frozenset({7, 271, 23, 270, 232, 281, 35, 230, 34, 130})


class ProcessControl(PersonalityCore):
    _host_signals: deque[int]  # signals from outside not yet taken (appended by any thread)
    _saved_sigmask: tuple[int, int] | None  # delivery.py

    # ----- signals from outside ---------------------------------------------------------------------

    def request_signal(self, sig: int) -> None:
        """Any thread: `sig` for the program at its next system call, or now if it waits for the network."""
        self._host_signals.append(sig)
        self.machine.wake()

    def _poll_host_news(self) -> None:
        """At a system call: a signal from outside, then network news, live (recording) or from the log."""
        self._host_signal_here()
        if self.net.active:
            self.net.poll_news()

    def _host_signal_here(self) -> bool:
        """A signal from outside at this exit (live: one that is queued; replay: one the log has here): a
        SIGNAL event with its number, then the first process receives it as from kill(2). True if one came."""
        raw = self.machine.journal.data_if(EventKind.SIGNAL, self._next_host_signal)
        if raw is None:
            return False
        sig = int.from_bytes(raw, "little")
        log.info("%s from outside for %s", signal_name(sig), self.program_path_of(FIRST_TID))
        if FIRST_TID in self.processes:
            self._signal_process(FIRST_TID, sig)  # a default action that kills ends the VM here
            first = self.processes[FIRST_TID]
            if first.signals.pending & (1 << (sig - 1)):
                first.outside_pending |= 1 << (sig - 1)  # its siginfo: SI_USER, si_pid 0 (delivery.py)
                first.tkill_pending &= ~(1 << (sig - 1))
        return True

    def _next_host_signal(self) -> bytes | None:
        return bytes([self._host_signals.popleft()]) if self._host_signals else None  # only this thread pops

    def program_path_of(self, pid: int) -> str:
        process = self.processes.get(pid)
        return process.program.path if process is not None else f"process {pid}"

    def _signal_wakes_waiter(self) -> Thread | None:
        """No thread can run and a process has a signal to handle: one of its waiting threads ends its wait
        (made runnable), as on Linux, so the handler runs; None if no signal is waiting for that."""
        sched = self.process.sched
        for thread in sched.waiting():  # the running thread's mask was saved when it was parked
            process = self.processes[thread.pid]
            signals = process.signals
            wait = thread.wait
            suspended = wait is not None and wait.kind == PAUSE  # pause, rt_sigsuspend: their own mask
            ready = signals.pending & ~(wait.uaddr if wait is not None and suspended else thread.sigmask)
            if not ready:
                continue
            sig = (ready & -ready).bit_length()
            action = Action.parse(signals.actions.get(sig, bytes(32)))
            if wait is not None and process.interrupted(wait):  # calls_proc.py: a sleep's time left, ...
                sched.make_runnable(thread, 0)  # ... a MSG_WAITALL receive returns what it has, after it
            elif action.flags & SA_RESTART and thread.restart >= 0 and thread.restart not in _NEVER_RESTARTED:
                sched.make_runnable(thread, 0)  # the call runs again when the handler returns
            else:
                thread.restart = -1
                if wait is not None and suspended:
                    # The handler runs with the mask the call waited with; its frame holds the thread's
                    # own, which rt_sigreturn restores (delivery.py). It runs in this exit (picked next).
                    self._saved_sigmask = (thread.tid, thread.sigmask)
                    thread.sigmask = wait.uaddr
                sched.make_runnable(thread, -errno.EINTR)
            return thread
        return None

    def _fork(self, vfork: bool, stack: int) -> int:
        parent = self.process
        sched = parent.sched
        pid = sched.new_id()
        space = parent.space if vfork else parent.space.fork_copy()
        child = LinuxProcess(
            space,
            self.fs,
            self._host,
            ProgramInfo(parent.program.path, parent.program.argv, parent.program.envp),
        )
        child.pid, child.ppid = pid, parent.pid
        child.sched = sched
        child.fds.close_all()
        child.fds = parent.fds.copy()
        child.cwd, child.umask, child.fs_base = parent.cwd, parent.umask, parent.fs_base
        child.signals.actions = dict(parent.signals.actions)
        child.signals.mask = parent.signals.mask
        child.signals.altstack = parent.signals.altstack
        child.last_time_ns = parent.last_time_ns
        child.root_files = dict(parent.root_files)
        child.cpuid_sites = parent.cpuid_sites
        child.comm = parent.comm
        self.processes[pid] = child
        self.tables[pid] = SyscallTable(child)
        self.table.children.setdefault(parent.pid, set()).add(pid)
        thread = Thread(pid, pid=pid)
        sched.threads[pid] = thread
        self._spawn(thread, stack, parent.fs_base)
        sched.run_queue.appendleft(pid)  # the child runs first
        if vfork:
            sched.block(Wait(kind="vfork", target=pid))
        else:
            sched.yield_now()
        return pid

    def _release_vfork_parent(self, pid: int) -> None:
        sched = self.process.sched
        for thread in sched.blocked("vfork"):
            if thread.wait is not None and thread.wait.target == pid:
                sched.make_runnable(thread, pid)

    def _execve(self, path: str, argv: list[str], envp: list[str]) -> None:
        process = self.process
        program, data, interp_elf, argv = self._exec_image(path, argv)
        old = process.space
        space = AddressSpace(self.machine.memory, self.flush_tlb, old.phys)
        space.map_identity_low(0x1000, boot.LOW_END, {boot.SYSCALL_PAGE: PROT_READ | PROT_EXEC})
        loaded, interp = elf.load_program(space, data, interp_elf, process.filter_code)
        sysinfo = self.vdso.install(space) if self.vdso is not None else 0
        aux = AuxInfo(
            loaded.phdr, data.phnum, loaded.entry, interp.base if interp else 0, program, sysinfo_ehdr=sysinfo
        )
        rsp, random_at = build(space, argv, envp, aux)
        space.write(random_at, process.entropy(16), force=True)
        process.space = space
        process.program = ProgramInfo(program, argv, envp)
        if not any(p.space is old for p in self.processes.values() if p is not process):
            old.release()
            self.flush_tlb()  # its frames will be reused: no stale translation may survive
        process.fds.close_on_exec()
        sched = process.sched
        for tid in [tid for tid, t in sched.threads.items() if t.pid == process.pid and tid != sched.current]:
            del sched.threads[tid]  # execve ends the process's other threads
        sched.run_queue = type(sched.run_queue)(t for t in sched.run_queue if t in sched.threads)
        signals = process.signals
        signals.actions = {sig: raw for sig, raw in signals.actions.items() if Action.parse(raw).handler == 1}
        signals.pending = 0
        signals.altstack = bytes(24)
        process.fs_base = 0
        self._set_fs_base(0)
        regs = [0] * 18
        regs[6], regs[16], regs[17] = rsp, interp.entry if interp else loaded.entry, boot.USER_RFLAGS
        self._run_buffer[SYNC_REGS : SYNC_REGS + REGS_SIZE] = REGS.pack(*regs)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        self._vcpu._set_raw(Ioctl.SET_XSAVE, Xsave, self._initial_xsave)
        sregs = self._vcpu.get_sregs()
        sregs.cr3 = space.root
        self._vcpu.set_sregs(sregs)
        self._release_vfork_parent(process.pid)
        raise Executed()

    def _exec_image(
        self, path: str, argv: list[str], depth: int = 0
    ) -> tuple[str, elf.ElfFile, elf.ElfFile | None, list[str]]:
        """The program execve runs: its ELF (or, for `#!`, its interpreter's) and the interpreter."""
        process = self.process
        node = process.lookup(-100, path)
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        if node.host is None or self.fs.is_dir(node) or not os.path.isfile(node.host):
            raise LinuxError(errno.EACCES)
        if not node.writable:
            process.note_root_file(node.guest, node.host)
        with open(node.host, "rb") as f:
            raw = f.read()
        if raw[:2] == b"#!" and depth < 4:
            line = raw[2:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape").strip().split(None, 1)
            if not line:
                raise LinuxError(errno.ENOEXEC)
            return self._exec_image(line[0], [line[0], *line[1:], path, *argv[1:]], depth + 1)
        try:
            program = elf.parse(raw, node.guest, node.host)
            interp_elf = None
            if program.interpreter is not None:
                inode = process.lookup(-100, program.interpreter)
                if not inode.exists or inode.host is None:
                    raise LinuxError(errno.ENOENT)
                if not inode.writable:
                    process.note_root_file(inode.guest, inode.host)
                with open(inode.host, "rb") as f:
                    interp_elf = elf.parse(f.read(), program.interpreter, inode.host)
        except elf.LinuxImageError as err:
            raise LinuxError(errno.ENOEXEC, str(err)) from err
        return node.guest, program, interp_elf, argv

    def _wait_child(self, pid: int, options: int) -> tuple[int, int]:
        process = self.process
        zombie = self.table.reap(process.pid, pid)
        if zombie is not None:
            return zombie.pid, zombie.status
        live = [
            c for c in self.table.children.get(process.pid, set()) if c in self.processes and pid in (-1, c)
        ]
        if not live:
            raise LinuxError(errno.ECHILD)
        if options & 1:  # WNOHANG
            return 0, 0
        raise fdt.WouldBlock(("child", process.pid, pid))

    def _signal_process(self, pid: int, sig: int) -> None:
        target = self.processes.get(pid)
        if target is None:
            if any(z.pid == pid for z in self.table.zombies):
                return
            raise LinuxError(errno.ESRCH)
        if sig == 0:
            return
        action = Action.parse(target.signals.actions.get(sig, bytes(32)))
        if sig != Sig.SIGKILL and (action.handler == 1 or action.handler == 0 and sig in IGNORED_BY_DEFAULT):
            return
        if action.runs_handler and sig != Sig.SIGKILL:
            target.signals.pending |= 1 << (sig - 1)  # runs when its thread next returns from a call
            return
        self._exit_process(target, signal_status(sig), f"killed by {signal_name(sig)}")

    def _process_exit(self, end: ProcessExit) -> None:
        """exit_group (or a fatal signal) in the running process: the VM ends with the first process."""
        if self.process.pid == FIRST_TID:
            self._end(end)
        status = signal_status(end.fatal.signal) if end.fatal else exit_status(end.status)
        self._exit_process(self.process, status, end.fatal.message if end.fatal else "")
        self.space.commit()
        self._switch(0)

    def _exit_process(self, process: LinuxProcess, status: int, message: str) -> None:
        if process.pid == FIRST_TID:
            self._end(
                ProcessExit(
                    128 + status if status < 0x80 else status >> 8,
                    FatalSignal(status, message) if status < 0x80 else None,
                )
            )
        if message:
            log.info("process %d (%s) %s", process.pid, process.program.path, message)
        sched = process.sched
        for tid in [tid for tid, t in sched.threads.items() if t.pid == process.pid]:
            del sched.threads[tid]
        sched.run_queue = type(sched.run_queue)(t for t in sched.run_queue if t in sched.threads)
        if sched.current not in sched.threads:
            sched.switch_needed = True
        process.fds.close_all()
        if not any(p.space is process.space for p in self.processes.values() if p is not process):
            process.space.release()
            self.flush_tlb()
        del self.processes[process.pid]
        del self.tables[process.pid]
        if process.ppid in self.processes:
            self.table.zombies.append(Zombie(process.pid, process.ppid, status))
        for child in self.table.children.pop(process.pid, set()):
            if child in self.processes:
                self.processes[child].ppid = 1
        self.table.zombies = [z for z in self.table.zombies if z.ppid != process.pid]
        self._release_vfork_parent(process.pid)

    def _resume_from_exception(self, frame_at: int) -> None:
        """The faulting process is gone: the exception stub's `iretq` resumes the next thread instead.
        Ring 0 keeps its rip and stack; the next thread's rip, rflags and rsp go in the iret frame."""
        buf = self._run_buffer
        stub_rip = U64.unpack_from(buf, SYNC_REGS + RIP)[0]
        self._switch(0)
        regs = REGS.unpack_from(buf, SYNC_REGS)
        frame = struct.pack("<5Q", regs[16], boot.SEL_USER_CODE, regs[17], regs[6], boot.SEL_USER_DATA)
        self.machine.memory.write(frame_at + 16, frame)
        U64.pack_into(buf, SYNC_REGS + RSP, frame_at)
        U64.pack_into(buf, SYNC_REGS + RIP, stub_rip)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
