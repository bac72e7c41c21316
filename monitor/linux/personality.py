"""The Linux personality on a Machine: the guest's processes and threads, their system calls and
exceptions.

`build_linux` makes the machine through the one door (monitor/builder.py, boot=False, with the
personality's machine factory) and loads the program; `restore_linux` restores one from a checkpoint. The
personality is a component of the machine (monitor/component.py). It reaches into the Machine at a few
points that have no public hook yet: it adds two port handlers (Machine._out), replaces the vCPU's
run_once (the TSC-trapping KVM_RUN) and the machine's current_rip (the program's RIP at a system call),
marks the vCPU blocked while it waits for console input or a deadline (Machine._blocked), emits the exit
output (Machine._emit), and reads and writes XSAVE state (VcpuFd._get_raw/_set_raw).
"""

from __future__ import annotations

from monitor.kvm_abi import KVM_SYNC_X86_REGS
from monitor.linux.core import (
    MASK64,
    RAX,
    RBX,
    RCX,
    RDX,
    REGS,
    RFLAGS,
    RIP,
    RSP,
    SYNC_REGS,
    U64,
    PersonalityCore,
)

import errno
import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from google.protobuf.message import Message

from monitor import builder
from monitor.config import MachineConfig
from monitor.devices.power import GuestStop
from monitor.errors import CheckpointError
from monitor.component import parse_state
from monitor.journal import EventKind, Journal, OutputKind
from monitor.kvm import Kvm
from monitor.linux import boot, cpuid_trap, elf
from monitor.linux import state as linux_state
from monitor.linux import fdtable as fdt
from monitor.linux.calls_proc import Executed, ProcessExit, SigReturn
from monitor.linux.processes import ProcessTable, signal_status
from monitor.linux.threads import FIRST_TID
from monitor.linux.fs import HOME, FileSystem
from monitor.linux.mm import PROT_EXEC, PROT_READ, AddressSpace, LinuxError
from monitor.linux.process import Host, ProgramInfo, file_sha256, output_tag
from monitor.linux.signals import (
    EXCEPTION_SIGNALS,
    FatalSignal,
    Sig,
    page_fault_text,
    signal_name,
)
from monitor.linux.stack import AuxInfo, build
from monitor.linux.syscalls import SyscallTable
from monitor.loader import GuestImage
from proto import vmft_pb2
from monitor.checkpoint.restore import JournalArg
from monitor.machine import Machine, MachineParts
from monitor.linux.control import ProcessControl
from monitor.linux.delivery import SignalDelivery
from monitor.linux.kernel import LinuxProcess
from monitor.linux.switching import ThreadSwitching
from monitor.linux.netwait import NetworkWaiting
from monitor.linux.sockets import NetStack
from monitor.linux.vdso import ClockMode, VdsoClock, identity_tag

log = logging.getLogger(__name__)

TSC_PER_NS = 3  # the virtual TSC runs at a nominal 3 GHz
_OUT_IMM8, _OUT_LENGTH = b"\xe6", 2  # `out %al, $PORT`: every exit the personality serves is one
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
    # What the identity says of the root instead of its host path: the name a node knows a prepared root
    # by (the pair's nodes keep it at different paths; replica/guest_kind.py). None: the path.
    root_name: str | None = None
    # How the program reads the clock (monitor/linux/vdso.py): every read a system call, or the vDSO.
    clock: ClockMode = ClockMode.SYSCALL


def identity(program_data: bytes, config: LinuxConfig) -> bytes:
    """What a recording is tied to (LogHeader.image_sha256 hashes it): the program, how it is run, and
    the CPUID answers its code gets (a replica with another CPU model is refused before replay)."""
    h = hashlib.sha256(program_data).hexdigest()
    cpu = f"cpuid:{cpuid_trap.table_hash()}"
    spec = "\0".join(
        [h, config.program, *config.argv, "--", *config.env, config.cwd, _root_label(config), cpu]
        + identity_tag(config.clock)
    )
    return b"vmft-linux\0" + spec.encode()


def _root_label(config: LinuxConfig) -> str:
    return config.root_name or config.root or "<host view>"


class LinuxPersonality(ProcessControl, NetworkWaiting, ThreadSwitching, SignalDelivery, PersonalityCore):
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
        self.ended: ProcessExit | None = None
        # `vmft fault crash` (replica/node.py): SIGSEGV at the next system call, set from another thread. A
        # fault of the host's making, not an event of the log: the primary restarts from a checkpoint.
        self.crash_requested = False
        self._host_signals: deque[int] = deque()  # signals from outside (control.py: request_signal)
        self.on_stream: Callable[[int, bytes], None] | None = None
        self.syscall_count = 0
        self.cpuid_count = 0
        self._machine: Machine | None = None
        self._random_at = 0
        self.net = NetStack()  # the guest's sockets, served at the VM's service address
        self.vdso: VdsoClock | None = None

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
            net=self.net,
        )
        if self.config.clock is ClockMode.VDSO:
            self.vdso = VdsoClock(lambda: machine.journal, lambda: [p.space for p in self.processes.values()])
            self._host.page_clock = self.vdso.now_ns
        self.net.attach(machine)
        self.net.sigpipe = lambda: self.process._signal_self(Sig.SIGPIPE)
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
            sysinfo_ehdr=self.vdso.install(self.space) if self.vdso is not None else 0,
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
        rip = U64.unpack_from(buf, SYNC_REGS + RIP)[0]
        if rip == boot.SYSCALL_RETURN_RIP:
            return int(U64.unpack_from(buf, SYNC_REGS + RCX)[0])
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
        rax, _rbx, rcx, rdx, rsi, rdi, _rsp, _rbp, r8, r9, r10, r11, *_hi, rip, _fl = REGS.unpack_from(
            buf, SYNC_REGS
        )
        if rip != boot.SYSCALL_RETURN_RIP:
            self._end(ProcessExit(128 + Sig.SIGSEGV, FatalSignal(Sig.SIGSEGV, f"port I/O at {rip - 2:#x}")))
        self.syscall_count += 1
        if self.crash_requested:
            self.crash_requested = False
            self._end(ProcessExit(128 + Sig.SIGSEGV, FatalSignal(Sig.SIGSEGV, "SIGSEGV from the host")))
        self._poll_host_news()  # signals from outside, connections, bytes and closes become the guest's here
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
        if self.vdso is not None:
            self.vdso.at_exit()  # the time page moves only here, at an exit (an event when it does)
        U64.pack_into(buf, SYNC_REGS + RAX, result & MASK64)
        U64.pack_into(buf, SYNC_REGS + RIP, rcx)
        U64.pack_into(buf, SYNC_REGS + RFLAGS, r11)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        sched = self.process.sched
        if sched.switch_needed or (sched.multithreaded and sched.preempt_due()):
            self._switch(result)
        if self.process.signals.pending & ~self.process.signals.mask:
            self._deliver_pending()  # also for the thread switched to (a signal may have ended its wait)
        sched.running.syscalls += 1

    # ----- signal handlers ------------------------------------------------------------------------------

    # ----- threads ------------------------------------------------------------------------------------

    # ----- processes ----------------------------------------------------------------------------------

    def _on_exception(self, _value: int) -> None:
        buf = self._run_buffer
        rsp = U64.unpack_from(buf, SYNC_REGS + RSP)[0]
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
        U64.pack_into(buf, SYNC_REGS + RAX, tsc & 0xFFFFFFFF)
        U64.pack_into(buf, SYNC_REGS + RDX, (tsc >> 32) & 0xFFFFFFFF)
        if length == 3:
            U64.pack_into(buf, SYNC_REGS + RCX, 0)  # TSC_AUX: cpu 0
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        boot.write_exception_return(self.machine.memory, frame, rip + length)
        return True

    def _cpuid_sites(self, guest: str) -> frozenset[int]:
        """The rewritten cpuid sites of a mapped file (found again after a restore: they are a function
        of the file)."""
        sites = self.process.cpuid_sites.get(guest)
        if sites is None and guest.startswith("/"):
            try:
                node = self.fs.resolve(guest)
            except LinuxError:
                return frozenset()
            if node.host is None or not os.path.isfile(node.host):
                return frozenset()
            host = node.host
            sites = cpuid_trap.cpuid_sites(host, lambda: Path(host).read_bytes(), file_sha256(host))
            self.process.cpuid_sites[guest] = sites
        return sites or frozenset()

    def _emulate_cpuid(self, frame: int, rip: int) -> bool:
        """A `cpuid` the loader rewrote into ud2 (cpuid_trap): answer without the core's identity."""
        vma = self.space.vma_at(rip)
        if vma is None or (vma.offset + rip - vma.start) not in self._cpuid_sites(vma.name):
            return False
        buf = self._run_buffer
        leaf = U64.unpack_from(buf, SYNC_REGS + RAX)[0] & 0xFFFFFFFF
        subleaf = U64.unpack_from(buf, SYNC_REGS + RCX)[0] & 0xFFFFFFFF
        for offset, value in zip((RAX, RBX, RCX, RDX), cpuid_trap.core_independent(leaf, subleaf)):
            U64.pack_into(buf, SYNC_REGS + offset, value)
        self._vcpu.run.kvm_dirty_regs = KVM_SYNC_X86_REGS
        boot.write_exception_return(self.machine.memory, frame, rip + 2)
        self.cpuid_count += 1
        return True

    # ----- the component protocol ----------------------------------------------------------------------

    def replicated(self) -> bytes:
        parts = [self.processes[pid].digest() for pid in sorted(self.processes)]
        return (
            b"".join(parts)
            + self.net.describe()
            + repr(
                (self.table.zombies, sorted((k, sorted(v)) for k, v in self.table.children.items()))
            ).encode()
        )

    def save(self) -> Message:
        msg = linux_state.save(self.process, self._random_at, self.syscall_count)
        if self.ended is not None:  # a checkpoint whose pause found the machine ended at this exit
            fatal = self.ended.fatal
            msg.ended.status = self.ended.status
            msg.ended.signal = fatal.signal if fatal else 0
            msg.ended.message = fatal.message if fatal else ""
        return msg

    def restore(self, data: bytes, live: bool) -> None:
        """Load the state save() produced, on a machine attached (not loaded) with its memory restored."""
        msg = parse_state(vmft_pb2.LinuxState, data, self.name)
        console = fdt.ConsoleIo(self.process.console_read, self.process.console_write)
        linux_state.restore(self.process, msg, console)
        self._random_at = msg.random_at
        self.syscall_count = msg.syscalls
        self._cpu_fs_base = msg.fs_base  # the vCPU's MSRs come back with the checkpoint
        if self.vdso is not None:
            self.vdso.restored(self.process.space)  # the clock is what the restored page says
        if msg.HasField("ended"):
            self._end_again_when_run(msg.ended)

    def _end_again_when_run(self, ended: vmft_pb2.LinuxEnded) -> None:
        """The checkpoint was taken at the exit that ended the program (its pause found the machine ended
        there: Machine.pause returns when the machine finishes). The vCPU is past that exit's `out`, which
        nothing completed: resumed there, it ran the zero bytes after the system-call page's `out` (`add
        %al,(%rax)`, rax = 231: SIGSEGV at 0xe7). When it runs, it steps back onto the `out` and one
        position back, so it takes the same exit again, at the same position, and ends there with the same
        status and registers, changing nothing else: the exit's effects (its exit output among them) are in
        the checkpoint already, and running its handler again could take news the first run did not. Until
        it runs, the machine is exactly the checkpoint's (its state hash too)."""
        fatal = FatalSignal(ended.signal, ended.message) if ended.signal else None
        self.ended = ProcessExit(ended.status, fatal)
        self.fatal = fatal
        machine = self.machine
        rip = int(self._vcpu.get_regs().rip)
        at = rip - _OUT_LENGTH
        code = machine.memory.read(at, 1) if at < boot.LOW_END else self.space.read(at, 1)
        if code != _OUT_IMM8:
            raise CheckpointError(f"a checkpoint at the program's end, but no `out` before rip {rip:#x}")
        for port in (boot.SYSCALL_PORT, boot.EXCEPTION_PORT):
            machine._out[port] = self._ended_again
        run_once = machine.vcpu.run_once
        stepped = False

        def step_back_then_run() -> int:  # the machine's only exit from here is that one, ending it
            nonlocal stepped
            if not stepped:
                stepped = True
                regs = self._vcpu.get_regs()
                regs.rip = at
                self._vcpu.set_regs(regs)
                machine.position -= 1
            return int(run_once())

        setattr(machine.vcpu, "run_once", step_back_then_run)  # noqa: B010

    def _ended_again(self, _value: int) -> None:
        """The exit a checkpoint at the program's end was taken at, taken again: the VM ends there."""
        assert self.ended is not None
        raise GuestStop(self.ended.status)

    def close(self) -> None:
        self.net.detached = True  # the VM is gone: closing its sockets is no output
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
