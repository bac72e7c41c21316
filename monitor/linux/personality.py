"""The Linux personality on a Machine: one process, its system calls and exceptions, its /proc.

`build_linux` makes the machine through the one door (monitor/builder.py, boot=False) and attaches a
LinuxPersonality to it: a component of the machine (monitor/component.py) that serves the program.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

from google.protobuf.message import Message

from monitor import builder
from monitor.config import MachineConfig
from monitor.devices.power import GuestStop
from monitor.component import parse_state
from monitor.journal import EventKind, Journal, OutputKind
from monitor.kvm import Kvm
from monitor.kvm_abi import KVM_SYNC_X86_REGS, Ioctl, Regs, Run, Xsave
from monitor.linux import boot, cpuid_trap, elf
from monitor.linux import state as linux_state
from monitor.linux import fdtable as fdt
from monitor.linux.calls_fs import FileCalls
from monitor.linux.calls_mm import MemoryCalls
from monitor.linux.calls_proc import CLOCKS, Executed, ProcessCalls, ProcessExit, SigReturn
from monitor.linux.calls_thread import ThreadCalls
from monitor.linux.calls_fs import poll_events
from monitor.linux.processes import ProcessTable, Zombie, exit_status, signal_status
from monitor.linux.threads import FIRST_TID, Thread, ThreadState, Wait
from monitor.linux.fs import HOME, FileSystem, Synthetic
from monitor.linux.mm import PROT_EXEC, PROT_READ, AddressSpace, LinuxError
from monitor.linux.process import PID, PPID, Host, ProgramInfo, output_tag
from monitor.linux.signals import (
    EXCEPTION_SIGNALS,
    IGNORED_BY_DEFAULT,
    SA_NODEFER,
    SA_RESETHAND,
    SEGV_ACCERR,
    SEGV_MAPERR,
    SI_TKILL,
    SI_USER,
    UCONTEXT_SIZE,
    Action,
    FatalSignal,
    Frame,
    Sig,
    build_frame,
    page_fault_text,
    parse_frame,
    signal_name,
)
from monitor.linux.stack import AuxInfo, build
from monitor.linux.syscalls import SyscallTable
from monitor.loader import GuestImage
from proto import vmft_pb2
from monitor.checkpoint.restore import JournalArg
from monitor.machine import MEMORY_SLOT, Machine, MachineParts

log = logging.getLogger(__name__)

_REGS = struct.Struct("<18Q")
_SYNC_REGS = Run.s.offset
_RAX, _RBX, _RCX, _RDX, _RSP, _RIP, _RFLAGS = (
    getattr(Regs, n).offset for n in ("rax", "rbx", "rcx", "rdx", "rsp", "rip", "rflags")
)
_U64 = struct.Struct("<Q")
Regs_SIZE = ctypes.sizeof(Regs)
_R11 = Regs.r11.offset
_MASK = (1 << 64) - 1
TSC_PER_NS = 3  # the virtual TSC runs at a nominal 3 GHz
DEFAULT_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"HOME={HOME}",
    "LANG=C.UTF-8",
)


@dataclass
class LinuxConfig:
    program: str  # guest path (or a name looked up in the guest's PATH)
    argv: list[str]
    layer: Path  # the VM's writable layer (a directory it owns)
    root: str | None = None  # None: the host's system directories, filtered
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    cwd: str = "/"
    mem_mib: int = 512
    hang_timeout_s: float = 60.0
    stdin_fd: int | None = None  # host descriptor the console reads from (None: end of input)


class LinuxProcess(ThreadCalls, FileCalls, MemoryCalls, ProcessCalls):
    """The process: its state (ProcessState) with every system call mixed in, and its /proc."""

    def proc_entry(self, parts: list[str]) -> Synthetic | None:
        pid = str(PID)
        if not parts:
            return Synthetic("dir", entries=lambda: ["meminfo", "self", pid])
        if parts == ["self"]:
            return Synthetic("link", target=pid)
        if parts == ["meminfo"]:
            return Synthetic("file", content=self._meminfo)
        if parts[0] != pid:
            return None
        rest = parts[1:]
        files: dict[str, Callable[[], bytes]] = {
            "cmdline": lambda: b"".join(a.encode() + b"\0" for a in self.program.argv),
            "maps": lambda: self.space.maps_text().encode(),
            "status": self._status,
            "comm": lambda: (self.comm or os.path.basename(self.program.path).encode()[:15]) + b"\n",
            "stat": lambda: (
                f"{PID} ({os.path.basename(self.program.path)[:15]}) R {PPID} {PID} {PID} 0 -1\n".encode()
            ),
        }
        if not rest:
            return Synthetic("dir", entries=lambda: sorted([*files, "cwd", "exe", "fd"]))
        name = rest[0]
        if len(rest) == 1 and name in files:
            return Synthetic("file", content=files[name])
        if rest == ["exe"]:
            return Synthetic("link", target=self.program.path)
        if rest == ["cwd"]:
            return Synthetic("link", target=self.cwd)
        if name == "fd":
            if len(rest) == 1:
                return Synthetic("dir", entries=lambda: [str(fd) for fd in sorted(self.fds.fds)])
            if len(rest) == 2 and rest[1].isdigit() and int(rest[1]) in self.fds.fds:
                return Synthetic("link", target=self.fds.fds[int(rest[1])].file.path)
        return None

    def _meminfo(self) -> bytes:
        total = self.space.memory.size >> 10
        free = total - (self.space.phys.used_bytes >> 10)
        return f"MemTotal: {total:>12} kB\nMemFree: {free:>13} kB\nMemAvailable: {free:>8} kB\n".encode()

    def _status(self) -> bytes:
        name = os.path.basename(self.program.path)[:15]
        return (
            f"Name:\t{name}\nState:\tR (running)\nTgid:\t{PID}\nPid:\t{PID}\nPPid:\t{PPID}\n"
            "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nThreads:\t1\n"
        ).encode()


def identity(program_data: bytes, config: LinuxConfig) -> bytes:
    """What a recording is tied to (LogHeader.image_sha256 hashes it): the program, how it is run, and
    the CPUID answers its code gets (a replica with another CPU model is refused before replay)."""
    h = hashlib.sha256(program_data).hexdigest()
    cpu = f"cpuid:{cpuid_trap.table_hash()}"
    spec = "\0".join(
        [h, config.program, *config.argv, "--", *config.env, config.cwd, config.root or "<host view>", cpu]
    )
    return b"vmft-linux\0" + spec.encode()


class LinuxPersonality:
    """The Linux kernel a Machine's guest sees: a component of the machine (monitor/component.py).

    It plugs into a machine built by monitor/builder.py (with boot=False) with a small surface: two
    port handlers (system calls, exceptions), its own loader, a TSC-trapping KVM_RUN, the guest RIP at
    a system call for the journal, and its state among the machine's components."""

    name = "linux"

    def __init__(self, config: LinuxConfig) -> None:
        self.config = config
        fs = FileSystem(config.layer, config.root)
        self.program_path = find_program(fs, config.program, config.env)
        node = fs.resolve(self.program_path)
        if not node.exists or node.host is None or fs.is_dir(node):
            raise elf.LinuxImageError(f"{config.program}: no such program in the guest's root")
        self.program_elf = elf.parse(_read(node.host, config.program), self.program_path, node.host)
        self.interp_elf: elf.ElfFile | None = None
        interp = self.program_elf.interpreter
        if interp is not None:
            try:
                inode = fs.resolve(interp)
            except LinuxError:
                inode = None
            if inode is None or not inode.exists or inode.host is None:
                raise elf.LinuxImageError(
                    f"{config.program}: its interpreter {interp} is not in the guest's root"
                )
            self.interp_elf = elf.parse(_read(inode.host, interp), interp, inode.host)
        self.image = GuestImage(self.program_path, identity(self.program_elf.data, config), 0, ())
        self.fs = fs
        self.fatal: FatalSignal | None = None
        self.on_stream: Callable[[int, bytes], None] | None = None
        self.syscall_count = 0
        self.cpuid_count = 0
        self._machine: Machine | None = None
        self._random_at = 0

    # ----- attaching to a machine ----------------------------------------------------------------------

    def attach(self, machine: Machine) -> None:
        self._machine = machine
        space = AddressSpace(machine.memory, self.flush_tlb)
        self._host = Host(
            journal=lambda: machine.journal,
            emit_console=self._console_out,
            read_console=self._console_in,
            set_fs_base=self._set_fs_base,
            spawn=self._spawn,
            fork=self._fork,
            execve=self._execve,
            wait_child=self._wait_child,
            signal_process=self._signal_process,
        )
        self.process = LinuxProcess(
            space, self.fs, self._host, ProgramInfo(self.program_path, self.config.argv, self.config.env)
        )
        self.process.cwd = self.config.cwd
        self.fs.proc = self.process
        self.syscalls = SyscallTable(self.process)
        self.processes: dict[int, LinuxProcess] = {self.process.pid: self.process}
        self.tables: dict[int, SyscallTable] = {self.process.pid: self.syscalls}
        self.table = ProcessTable()
        self._initial_xsave = b""
        self._cpu_fs_base = 0  # what the vCPU's FS base holds now
        self._run_buffer = machine.vcpu.run_buffer
        self._vcpu = machine.vcpu
        machine._out[boot.SYSCALL_PORT] = self._on_syscall
        machine._out[boot.EXCEPTION_PORT] = self._on_exception
        machine._out[boot.START_PORT] = self._on_start
        machine.components.append(self)
        setattr(machine.vcpu, "run_once", boot.TscTrappingRunner(machine.vcpu))  # noqa: B010
        setattr(machine, "current_rip", self.current_rip)  # noqa: B010
        machine.set_journal(machine.journal)  # rebinds the journal to current_rip above

    def factory(self, parts: MachineParts, journal: Journal) -> Machine:
        """builder's MachineFactory: a Machine with this personality attached (a fresh boot or a restore)."""
        machine = Machine(parts, journal)
        self.attach(machine)
        return machine

    @property
    def space(self) -> AddressSpace:
        """The running process's address space."""
        return self.process.space

    @property
    def machine(self) -> Machine:
        assert self._machine is not None
        return self._machine

    def load(self) -> None:
        """execve: the program, its interpreter, the stack, the console descriptors, the entry."""
        machine = self.machine
        boot.write_low_memory(machine.memory)
        self.space.map_identity_low(0x1000, boot.LOW_END, {boot.SYSCALL_PAGE: PROT_READ | PROT_EXEC})
        program, interp = elf.load_program(
            self.space, self.program_elf, self.interp_elf, self.process.filter_code
        )
        aux = AuxInfo(
            phdr=program.phdr,
            phnum=self.program_elf.phnum,
            entry=program.entry,
            interp_base=interp.base if interp else 0,
            execfn=self.program_path,
        )
        rsp, self._random_at = build(self.space, self.config.argv, self.config.env, aux)
        console = fdt.ConsoleIo(self.process.console_read, self.process.console_write)
        for number, name in enumerate(("stdin", "stdout", "stderr")):
            self.process.fds.install(
                fdt.ConsoleFile(f"/dev/{name}", 0 if number == 0 else 1, number, console)
            )
        entry = interp.entry if interp else program.entry
        boot.enter_user(machine.memory, machine.vcpu, self.space.root, entry, rsp)
        self._initial_xsave = self._xsave()

    # ----- the host side of the process -----------------------------------------------------------------

    def flush_tlb(self) -> None:
        """kvm_pvm notices page-table changes only when the memory slot is re-created (FACTS.md)."""
        machine = self.machine
        machine.dirty.collect()  # the slot's dirty log dies with it
        address = machine.memory.host_address
        machine.vm.set_memory_region(MEMORY_SLOT, 0, 0, address, log_dirty=True)
        machine.vm.set_memory_region(MEMORY_SLOT, 0, machine.memory.size, address, log_dirty=True)

    def _set_fs_base(self, value: int) -> None:
        self._vcpu.set_msrs([(boot.MSR_FS_BASE, value)])
        self._cpu_fs_base = value

    def _console_out(self, number: int, data: bytes) -> None:
        machine = self.machine
        if not machine.journal.output(OutputKind.CONSOLE, output_tag(number, data)):
            return
        if machine.output_handler is not None:
            machine.output_handler(OutputKind.CONSOLE, data, machine.position)
            return
        machine.console_output += data
        del machine.console_output[: -(1 << 20)]
        if self.on_stream is not None:
            self.on_stream(number, data)

    def _console_in(self, n: int) -> bytes:
        fd = self.config.stdin_fd
        if fd is None:
            return b""
        machine = self.machine
        machine._blocked = True  # waiting for input is not a hang
        try:
            return os.read(fd, min(n, 1 << 16))
        finally:
            machine._blocked = False

    # ----- exits --------------------------------------------------------------------------------------

    def current_rip(self) -> int:
        """Where the program is: at a system call, the instruction after its `syscall` (rcx)."""
        buf = self._run_buffer
        rip = _U64.unpack_from(buf, _SYNC_REGS + _RIP)[0]
        if rip == boot.SYSCALL_RETURN_RIP:
            return int(_U64.unpack_from(buf, _SYNC_REGS + _RCX)[0])
        return int(rip)

    def _on_start(self, _value: int) -> None:
        """The first exit, before the program runs: AT_RANDOM's bytes (the stack canary's seed)."""
        if self._random_at:
            self.space.write(self._random_at, self.process.entropy(16), force=True)
            self._random_at = 0
            for loaded in (self.program_elf, self.interp_elf):
                if loaded is not None and not loaded.host.startswith(str(self.config.layer)):
                    self.process.note_root_file(loaded.path, loaded.host)

    def _on_syscall(self, _value: int) -> None:
        buf = self._run_buffer
        rax, _rbx, rcx, rdx, rsi, rdi, _rsp, _rbp, r8, r9, r10, r11, *_hi, rip, _fl = _REGS.unpack_from(
            buf, _SYNC_REGS
        )
        if rip != boot.SYSCALL_RETURN_RIP:
            self._end(ProcessExit(128 + Sig.SIGSEGV, FatalSignal(Sig.SIGSEGV, f"port I/O at {rip - 2:#x}")))
        self.syscall_count += 1
        try:
            result = self.syscalls.call(rax, rdi, rsi, rdx, r10, r8, r9)
        except ProcessExit as end:
            self._process_exit(end)
            return
        except SigReturn:
            self._sigreturn()
            return
        except Executed:
            self.space.commit()
            return  # a new program: its registers are set
        except fdt.WouldBlock as blocked:
            result = self._block_and_restart(rax, blocked.what)
        self.space.commit()
        _U64.pack_into(buf, _SYNC_REGS + _RAX, result & _MASK)
        _U64.pack_into(buf, _SYNC_REGS + _RIP, rcx)
        _U64.pack_into(buf, _SYNC_REGS + _RFLAGS, r11)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        sched = self.process.sched
        if sched.switch_needed or (sched.multithreaded and sched.preempt_due()):
            self._switch(result)
        elif self.process.signals.pending & ~self.process.signals.mask:
            self._deliver_pending()
        sched.running.syscalls += 1

    # ----- signal handlers ------------------------------------------------------------------------------

    def _deliver_pending(self) -> None:
        """A signal with a handler is pending and not blocked: run the handler when the call returns."""
        signals = self.process.signals
        ready = signals.pending & ~signals.mask
        sig = (ready & -ready).bit_length()
        signals.pending &= ~(1 << (sig - 1))
        regs = _REGS.unpack_from(self._run_buffer, _SYNC_REGS)
        frame = self._frame_for(sig, regs, SI_TKILL, 0)
        self._run_buffer[_SYNC_REGS : _SYNC_REGS + Regs_SIZE] = _REGS.pack(*frame.regs)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS

    def _frame_for(self, sig: int, regs: tuple[int, ...], code: int, fault_address: int) -> Frame:
        """Write the signal frame for `sig` on the thread's stack; the process's mask and action change
        as Linux's do. A frame that cannot be written kills the process (SIGSEGV)."""
        signals = self.process.signals
        action = Action.parse(signals.actions.get(sig, bytes(32)))
        frame = build_frame(
            sig, action, regs, self._xsave(), signals.mask, signals.altstack, code, fault_address, PID
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
        rsp = _U64.unpack_from(self._run_buffer, _SYNC_REGS + _RSP)[0]
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
        self._run_buffer[_SYNC_REGS : _SYNC_REGS + Regs_SIZE] = _REGS.pack(*regs)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        if xsave:
            self._vcpu._set_raw(Ioctl.SET_XSAVE, Xsave, xsave)
        if self.process.signals.pending & ~self.process.signals.mask:
            self._deliver_pending()

    # ----- threads ------------------------------------------------------------------------------------

    def _xsave(self) -> bytes:
        return self._vcpu._get_raw(Ioctl.GET_XSAVE, Xsave)  # the FPU/SSE/AVX state of the running thread

    def _spawn(self, child: Thread, stack: int, fs_base: int) -> None:
        """clone: the child resumes where the parent does, with rax 0, its own stack and FS base."""
        regs = bytearray(self._run_buffer[_SYNC_REGS : _SYNC_REGS + Regs_SIZE])
        rcx = _U64.unpack_from(regs, _RCX)[0]
        r11 = _U64.unpack_from(regs, _R11)[0]
        _U64.pack_into(regs, _RIP, rcx)
        _U64.pack_into(regs, _RFLAGS, r11)
        if stack:
            _U64.pack_into(regs, _RSP, stack)
        child.regs = bytes(regs)
        child.xsave = self._xsave()
        child.fs_base = fs_base
        child.result = 0

    def _switch(self, result: int) -> None:
        """At a system call's return: park the running thread (unless it exited) and resume the next."""
        sched = self.process.sched
        sched.switch_needed = False
        current = sched.threads.get(sched.current)
        if current is not None:
            current.regs = bytes(self._run_buffer[_SYNC_REGS : _SYNC_REGS + Regs_SIZE])  # already the return
            current.xsave = self._xsave()
            current.fs_base = self.process.fs_base
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
            buf[_SYNC_REGS : _SYNC_REGS + Regs_SIZE] = following.regs
            self._vcpu._set_raw(Ioctl.SET_XSAVE, Xsave, following.xsave)
            if following.fs_base != self._cpu_fs_base:
                self._set_fs_base(following.fs_base)
            self.process.fs_base = following.fs_base
        _U64.pack_into(buf, _SYNC_REGS + _RAX, following.result & _MASK)
        if following.restart >= 0:  # it blocked in a call: run the call again (the `syscall` is 2 bytes)
            rip = _U64.unpack_from(buf, _SYNC_REGS + _RIP)[0]
            _U64.pack_into(buf, _SYNC_REGS + _RIP, rip - 2)
            _U64.pack_into(buf, _SYNC_REGS + _RAX, following.restart)
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
        for thread in sched._waiting():
            wait = thread.wait
            if wait is None or wait.kind in ("futex", "sleep", "vfork"):
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

    # ----- processes ----------------------------------------------------------------------------------

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
        aux = AuxInfo(loaded.phdr, data.phnum, loaded.entry, interp.base if interp else 0, program)
        rsp, random_at = build(space, argv, envp, aux)
        space.write(random_at, process.entropy(16), force=True)
        process.space = space
        process.program = ProgramInfo(program, argv, envp)
        if not any(p.space is old for p in self.processes.values() if p is not process):
            old.release()
            self.flush_tlb()  # its frames will be reused: no stale translation may survive
        process.fds.close_on_exec()
        signals = process.signals
        signals.actions = {sig: raw for sig, raw in signals.actions.items() if Action.parse(raw).handler == 1}
        signals.pending = 0
        signals.altstack = bytes(24)
        process.fs_base = 0
        self._set_fs_base(0)
        regs = [0] * 18
        regs[6], regs[16], regs[17] = rsp, interp.entry if interp else loaded.entry, boot.USER_RFLAGS
        self._run_buffer[_SYNC_REGS : _SYNC_REGS + Regs_SIZE] = _REGS.pack(*regs)
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

    def _now(self) -> dict[int, int]:
        """The clocks blocked threads wait on, read now (each reading an event)."""
        clocks = sorted({clock for clock, _deadline in self.process.sched.deadlines()})
        return {clock: self.process.now_ns(CLOCKS[clock]) for clock in clocks}

    def _expire_deadlines(self) -> None:
        if self.process.sched.deadlines():
            self.process.sched.expire(self._now())

    def _wait_for_deadline(self) -> Thread:
        """No thread can run: sleep until the earliest deadline (live), or end a deadlock."""
        sched = self.process.sched
        if not sched.deadlines():
            waiting = ", ".join(f"{t.tid}" for t in sched.threads.values())
            raise_exit = ProcessExit(
                128 + Sig.SIGKILL,
                FatalSignal(Sig.SIGKILL, f"killed: deadlock, every thread waits forever (threads {waiting})"),
            )
            self._end(raise_exit)
        now = self._now()
        remaining = min(deadline - now[clock] for clock, deadline in sched.deadlines())
        if remaining > 0 and not self.process.replaying:
            self.machine._blocked = True  # sleeping is not a hang
            try:
                time.sleep(remaining / 1e9)
            finally:
                self.machine._blocked = False
        sched.expire(self._now())
        picked = sched.pick()
        return picked if picked is not None else self._wait_for_deadline()

    def _on_exception(self, _value: int) -> None:
        buf = self._run_buffer
        rsp = _U64.unpack_from(buf, _SYNC_REGS + _RSP)[0]
        vector, error, rip, cs, _rflags, _usp, _ss = boot.read_exception_frame(self.machine.memory, rsp)
        if vector == 13 and cs & 3 == 3 and self._emulate_tsc(rsp, rip):
            return
        if vector == 6 and cs & 3 == 3 and self._emulate_cpuid(rsp, rip):
            return
        sig, what = EXCEPTION_SIGNALS.get(vector, (Sig.SIGSEGV, f"exception {vector}"))
        fault_address = int(self._vcpu.get_sregs().cr2) if vector == 14 else 0
        if cs & 3 == 3 and self._handle_fault(rsp, sig, fault_address, error):
            return
        if vector == 14:
            what = page_fault_text(error, fault_address)
        elif vector == 6:
            try:
                what += f" ({self.space.read(rip, 4).hex(' ')})"
            except LinuxError:
                pass
        message = f"killed by {signal_name(sig)}: {what} (rip {rip:#x})"
        if self.process.pid == FIRST_TID:
            self._end(ProcessExit(128 + sig, FatalSignal(sig, message)))
        self._exit_process(self.process, signal_status(sig), message)
        self._resume_from_exception(rsp)

    def _resume_from_exception(self, frame_at: int) -> None:
        """The faulting process is gone: the exception stub's `iretq` resumes the next thread instead.
        Ring 0 keeps its rip and stack; the next thread's rip, rflags and rsp go in the iret frame."""
        buf = self._run_buffer
        stub_rip = _U64.unpack_from(buf, _SYNC_REGS + _RIP)[0]
        self._switch(0)
        regs = _REGS.unpack_from(buf, _SYNC_REGS)
        frame = struct.pack("<5Q", regs[16], boot.SEL_USER_CODE, regs[17], regs[6], boot.SEL_USER_DATA)
        self.machine.memory.write(frame_at + 16, frame)
        _U64.pack_into(buf, _SYNC_REGS + _RSP, frame_at)
        _U64.pack_into(buf, _SYNC_REGS + _RIP, stub_rip)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS

    def _handle_fault(self, frame_at: int, sig: int, fault_address: int, error: int) -> bool:
        """A fault in the program with a handler for its signal (not blocked): run the handler."""
        signals = self.process.signals
        action = Action.parse(signals.actions.get(sig, bytes(32)))
        if not action.runs_handler or signals.mask & (1 << (sig - 1)):
            return False
        _vector, _error, rip, _cs, rflags, usp, _ss = boot.read_exception_frame(self.machine.memory, frame_at)
        regs = list(_REGS.unpack_from(self._run_buffer, _SYNC_REGS))
        regs[6], regs[16], regs[17] = usp, rip, rflags  # the program's, from the CPU's frame
        code = (SEGV_ACCERR if error & 1 else SEGV_MAPERR) if fault_address else SI_USER
        frame = self._frame_for(sig, tuple(regs), code, fault_address)
        buf = self._run_buffer
        for index in (0, 3, 4, 5):  # rax, rdx, rsi, rdi: the handler's arguments (ring 0 keeps its rsp)
            _U64.pack_into(buf, _SYNC_REGS + index * 8, frame.regs[index])
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        self.machine.memory.write(frame_at + 16, struct.pack("<Q", frame.regs[16]))  # rip
        self.machine.memory.write(
            frame_at + 32, struct.pack("<QQ", frame.regs[17], frame.regs[6])
        )  # rflags, rsp
        return True

    def _emulate_tsc(self, frame: int, rip: int) -> bool:
        """RDTSC/RDTSCP fault (CR4.TSD): answer from the virtual clock, skip the instruction."""
        try:
            code = self.space.read(rip, 3)
        except LinuxError:
            return False
        if code[:2] == b"\x0f\x31":
            length = 2
        elif code == b"\x0f\x01\xf9":
            length = 3
        else:
            return False
        tsc = self.machine.journal.value(EventKind.CLOCK, time.monotonic_ns) * TSC_PER_NS
        buf = self._run_buffer
        _U64.pack_into(buf, _SYNC_REGS + _RAX, tsc & 0xFFFFFFFF)
        _U64.pack_into(buf, _SYNC_REGS + _RDX, (tsc >> 32) & 0xFFFFFFFF)
        if length == 3:
            _U64.pack_into(buf, _SYNC_REGS + _RCX, 0)  # TSC_AUX: cpu 0
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        boot.write_exception_return(self.machine.memory, frame, rip + length)
        return True

    def _emulate_cpuid(self, frame: int, rip: int) -> bool:
        """A `cpuid` the loader rewrote into ud2 (cpuid_trap): answer without the core's identity."""
        vma = self.space.vma_at(rip)
        if vma is None or (vma.offset + rip - vma.start) not in self.process.cpuid_sites.get(vma.name, ()):
            return False
        buf = self._run_buffer
        leaf = _U64.unpack_from(buf, _SYNC_REGS + _RAX)[0] & 0xFFFFFFFF
        subleaf = _U64.unpack_from(buf, _SYNC_REGS + _RCX)[0] & 0xFFFFFFFF
        for offset, value in zip((_RAX, _RBX, _RCX, _RDX), cpuid_trap.core_independent(leaf, subleaf)):
            _U64.pack_into(buf, _SYNC_REGS + offset, value)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        boot.write_exception_return(self.machine.memory, frame, rip + 2)
        self.cpuid_count += 1
        return True

    def _end(self, end: ProcessExit) -> NoReturn:
        self.fatal = end.fatal
        self.machine._emit(OutputKind.EXIT, struct.pack("<i", end.status))
        raise GuestStop(end.status)

    # ----- the component protocol ----------------------------------------------------------------------

    def replicated(self) -> bytes:
        parts = [self.processes[pid].digest() for pid in sorted(self.processes)]
        return (
            b"".join(parts)
            + repr(
                (self.table.zombies, sorted((k, sorted(v)) for k, v in self.table.children.items()))
            ).encode()
        )

    def save(self) -> Message:
        return linux_state.save(self.process, self._random_at, self.syscall_count)

    def restore(self, data: bytes, live: bool) -> None:
        """Load the state save() produced, on a machine attached (not loaded) with its memory restored."""
        msg = parse_state(vmft_pb2.LinuxState, data, self.name)
        console = fdt.ConsoleIo(self.process.console_read, self.process.console_write)
        linux_state.restore(self.process, msg, console)
        self._random_at = msg.random_at
        self.syscall_count = msg.syscalls
        self._cpu_fs_base = msg.fs_base  # the vCPU's MSRs come back with the checkpoint

    def close(self) -> None:
        for process in self.processes.values():
            process.fds.close_all()


def find_program(fs: FileSystem, program: str, env: list[str]) -> str:
    """The guest path of `program`: as given if it has a slash, else the first hit in the guest's PATH."""
    if "/" in program:
        return program if program.startswith("/") else "/" + program
    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/bin:/bin")
    for directory in path.split(":"):
        candidate = f"{directory.rstrip('/')}/{program}"
        try:
            if fs.resolve(candidate).exists:
                return candidate
        except LinuxError:
            continue
    raise elf.LinuxImageError(f"{program}: not found in the guest's PATH ({path})")


def build_linux(
    personality: LinuxPersonality, journal: Journal | None = None, kvm: Kvm | None = None
) -> Machine:
    """A machine running the personality's program, loaded and not started, through the one door
    (monitor/builder.py) with the personality attached by the machine factory. Make the personality
    first: its `image` identifies the run (what a recording is tied to)."""
    machine = builder.build(
        machine_config(personality.config, personality.program_path),
        journal=journal,
        image=personality.image,
        kvm=kvm,
        boot=False,
        factory=personality.factory,
    )
    try:
        personality.load()
    except BaseException:
        machine.close()
        raise
    return machine


def restore_linux(
    personality: LinuxPersonality, checkpoint: str | Path, journal: JournalArg = None, kvm: Kvm | None = None
) -> Machine:
    """A machine at a checkpoint of the personality's program (same program, arguments, environment,
    root and CPU), not started. The writable layer must be as it was at the checkpoint."""
    machine, _stats = builder.restore(
        checkpoint,
        journal=journal,
        image=personality.image,
        mem_size=personality.config.mem_mib << 20,
        hang_timeout_s=personality.config.hang_timeout_s,
        kvm=kvm,
        factory=personality.factory,
    )
    return machine


def machine_config(config: LinuxConfig, program_path: str) -> MachineConfig:
    return MachineConfig(image=program_path, mem_mib=config.mem_mib, hang_timeout_s=config.hang_timeout_s)


def _read(host: str, guest: str) -> bytes:
    try:
        with open(host, "rb") as f:
            return f.read()
    except IsADirectoryError as err:
        raise elf.LinuxImageError(f"{guest}: is a directory") from err
    except OSError as err:
        raise elf.LinuxImageError(f"{guest}: cannot read: {os.strerror(err.errno or errno.EIO)}") from err
