"""One VM with one vCPU: build it, run it on its own thread, control it at synchronous exits.

The vCPU thread owns KVM_RUN and never hops to the event loop per exit (that would cost more than the
exit). Everything that changes guest-visible state happens at synchronous exits (port I/O, HLT,
shutdown), counted as the machine's *position*; asynchronous exits (a kick: EINTR) change nothing.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from monitor import boot
from monitor import guest_abi as g
from monitor.component import Component, replicated_state, restore_all, save_all
from monitor.devices.base import AsyncSource, Device, DeviceContext
from monitor.devices.block import Block, DiskImage
from monitor.devices.clock import Clock, Timer, VirtualClock
from monitor.devices.console import Console
from monitor.devices.entropy import Entropy
from monitor.devices.net import Net, NetBackend, deliver_tx
from monitor.devices.power import GuestStop, Power
from monitor.dirty import DirtyTracker
from monitor.guest_abi import Vector
from monitor.interrupts import InterruptState
from monitor.journal import (
    DivergenceError,
    EventKind,
    Journal,
    JournalMode,
    JournalStop,
    OutputKind,
)
from monitor.config import MachineConfig
from monitor.kvm import Kvm, VcpuFd, VmFd, is_eintr
from monitor.kvm_abi import (
    KVM_EXIT_IO_OUT,
    RUN_EXIT_REASON_OFFSET,
    RUN_IO_OFFSET,
    RUN_SYNC_RIP_OFFSET,
    ExitReason,
    IoExit,
)
from monitor.loader import GuestImage
from monitor.memory import GuestMemory, GuestMemoryError
from monitor.statehash import StateHasher
from monitor.kvm import VcpuState
from proto import vmft_pb2

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
MEMORY_SLOT = 0
_IO = struct.Struct("<BBHIQ")
assert _IO.size == 16 and RUN_IO_OFFSET == IoExit.direction.offset + 32
# One unpack per exit: exit_reason, then (skipping the fields in between) the io exit's fields. For other
# exits the io fields are meaningless and unused.
_EXIT = struct.Struct(f"<I{RUN_IO_OFFSET - RUN_EXIT_REASON_OFFSET - 4}xBBHIQ")
assert _EXIT.size == RUN_IO_OFFSET - RUN_EXIT_REASON_OFFSET + _IO.size
_REPLAY = JournalMode.REPLAY
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Longest a WAIT holds input back for `input_hold` (replica/input_hold.py keeps well under it).
_INPUT_HOLD_MAX_S = 0.005
_MAX_BLOCK_S = 0.25  # longest a blocked WAIT sleeps before it rechecks control requests


class StopReason(enum.Enum):
    EXITED = "exited"  # the guest reported an exit code
    PANICKED = "panicked"  # the guest reported a panic (or an unhandled exception)
    CRASHED = "crashed"  # triple fault, internal error, halted with interrupts off
    HUNG = "hung"  # no exit for longer than the hang timeout
    STOPPED = "stopped"  # stopped on request
    DIVERGED = "diverged"  # replay found a mismatch
    ERROR = "error"  # a monitor error


@dataclass
class MachineResult:
    reason: StopReason
    position: int
    exit_code: int | None = None
    message: str = ""
    registers: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"{self.reason.value} at position {self.position}"
        if self.exit_code is not None:
            text += f" with exit code {self.exit_code}"
        if self.message:
            text += f": {self.message}"
        if self.registers:
            text += " [" + " ".join(f"{k}={v:#x}" for k, v in self.registers.items()) + "]"
        return text


@dataclass
class MachineParts:
    """The resources of one machine, acquired by monitor/builder.py (the only maker of machines), which
    closes them if building fails; afterwards Machine.close() does."""

    config: MachineConfig
    image: GuestImage
    kvm: Kvm
    own_kvm: bool  # close it with the machine (not a shared handle)
    memory: GuestMemory
    vm: VmFd
    vcpu: VcpuFd
    disk: DiskImage | None


OutputHandler = Callable[[OutputKind, bytes, int], None]


def install_kick_handler() -> None:
    """The vCPU is kicked out of KVM_RUN with a signal; it needs a handler (main thread only)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class Machine:
    """One VM. Obtained only from monitor/builder.py (`build`, `restore`)."""

    def __init__(self, parts: MachineParts, journal: Journal) -> None:
        self.config = parts.config
        self.journal: Journal = journal
        self.image = parts.image
        self._own_kvm = parts.own_kvm
        self.kvm = parts.kvm
        self.memory = parts.memory
        self.vm = parts.vm
        self.vcpu: VcpuFd = parts.vcpu
        self.dirty = DirtyTracker(self.vm, MEMORY_SLOT, self.memory)
        self.hasher: StateHasher | None = StateHasher(self.memory, self.dirty)  # memory is all zero here

        self.position = 0
        self.irq = InterruptState()
        self.clock = VirtualClock()
        self.guest_faults: list[str] = []
        self.console_output = bytearray()
        self.on_console: Callable[[bytes], None] | None = None
        self.output_handler: OutputHandler | None = None  # replication holds outputs through this
        self.net_backend = NetBackend()
        self.net_backend.wake = self.wake
        self.result: MachineResult | None = None

        ctx = DeviceContext(self.memory, self.journal, self, self._emit, self.guest_faults)
        self._ctx = ctx
        self.journal.bind(self.current_rip, self._stop_here)
        self.console = Console(ctx, self.wake)
        self.clock_device = Clock(ctx, self.clock)
        self.timer = Timer(ctx, self.clock)
        self.net = Net(ctx, self.net_backend)
        self.block = Block(ctx, parts.disk)
        self.devices: list[Device] = [
            self.console,
            self.clock_device,
            self.timer,
            self.net,
            self.block,
            Entropy(ctx),
            Power(ctx),
        ]
        self._out: dict[int, Callable[[int], None]] = {}
        self._in: dict[int, Callable[[], int]] = {g.Port.EVENTS: self._events, g.Port.WAIT: self._wait}
        for device in self.devices:
            self._out.update({int(p): h for p, h in device.out_ports().items()})
            self._in.update({int(p): h for p, h in device.in_ports().items()})
        self._out[g.Port.NOP] = lambda value: None
        # What persists itself in checkpoints and is covered by the state hash (monitor/component.py).
        self.components: list[Component] = [self.irq, self.clock_device, self.timer, self.console, self.net]
        self._sources: list[AsyncSource] = [self.timer, self.net, self.console]
        # (event bit as a plain int, source, its has_news) for the per-exit poll: IntFlag arithmetic costs
        # over a microsecond per operation, a plain int `&` some nanoseconds.
        self._source_checks = [(int(s.event_bit), s, s.has_news) for s in self._sources]

        self._thread: threading.Thread | None = None
        self._control: str | None = None
        self._control_lock = threading.Lock()
        self._wake_cond = threading.Condition()
        self._news = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[MachineResult]]] = []
        # Live: seconds the guest's WAIT should still let input gather before it sees it (None: never);
        # set by the replication layer (replica/input_hold.py). Replay takes input as the log says.
        self.input_hold: Callable[[], float] | None = None
        self._input_released = threading.Event()
        self._holding_input = False
        self._blocked = False  # in a WAIT: not making exits, but not hung either
        self._hung = False
        self.exits_async = 0
        self.started_at = 0.0
        # The vCPU stopped after re-entering KVM_RUN past its last synchronous exit (hung, or stopped while
        # paused): guest code ran on, so no replay can reach this state and the final hash is not logged.
        self.stopped_between_exits = False

    # ----- building -------------------------------------------------------------------------

    def load(self) -> None:
        """Fresh boot: boot structures, the image, entry registers."""
        boot.write_boot_structures(self.memory, self.config.arg)
        self.image.load_into(self.memory)
        boot.set_entry_registers(self.vcpu, self.image.entry)

    def set_journal(self, journal: Journal) -> None:
        """Switch record/replay mode at a synchronous exit (vCPU thread), e.g. a backup going live."""
        self.journal = journal
        self._ctx.journal = journal
        journal.bind(self.current_rip, self._stop_here)

    def _stop_here(self) -> None:
        """Stop after the exit being handled (vCPU thread; no kick needed)."""
        with self._control_lock:
            self._control = "stop"

    # ----- the Interrupts interface for devices -----------------------------------------------

    def raise_irq(self, vector: Vector) -> None:
        self.irq.raise_vector(vector)

    # ----- outputs ----------------------------------------------------------------------------

    def _emit(self, kind: OutputKind, data: bytes) -> None:
        if not self.journal.output(kind, data):
            return
        if self.output_handler is not None:
            self.output_handler(kind, data, self.position)
        else:
            self.deliver(kind, data)

    def deliver(self, kind: OutputKind, data: bytes) -> None:
        """Make an output visible to the world (any thread)."""
        if kind is OutputKind.CONSOLE:
            self.console_output += data
            del self.console_output[: -(1 << 20)]
            if self.on_console is not None:
                self.on_console(data)
        elif kind is OutputKind.NET:
            deliver_tx(self.net_backend, data)

    # ----- nondeterministic news ----------------------------------------------------------

    def wake(self) -> None:
        """Host-side news for the guest (any thread): wakes a blocked WAIT."""
        with self._wake_cond:
            self._news = True
            self._wake_cond.notify()
        self.recheck_input_hold()

    def _poll_async(self) -> None:
        """At a synchronous exit: make interrupts pending for news (live), or as the log says (replay)."""
        journal = self.journal
        if journal.mode is _REPLAY:
            for vector in journal.due_irqs():
                self._apply_irq(vector)
            return
        irq = self.irq
        for bit, source, has_news in self._source_checks:
            if not irq.latched & bit and has_news():
                self._apply_irq(source.vector)
                journal.irq(source.vector)

    def _apply_irq(self, vector: Vector) -> None:
        self.irq.raise_vector(vector)
        for source in self._sources:
            if source.vector == vector:
                source.on_raised()

    def _events(self) -> int:
        self._poll_async()
        value = self.journal.value(EventKind.EVENTS, lambda: self.irq.latched)
        self.irq.take_latched(value)
        return value

    def _wait(self) -> int:
        if self.journal.mode is not JournalMode.REPLAY:
            self._hold_input()
            self._poll_async()
            while not self.irq.latched and self._control is None:
                self._block_for_news()
                self._hold_input()
                self._poll_async()
        return self._events()

    def _hold_input(self) -> None:
        """Live: let input gather for as long as `input_hold` says (bounded) before the guest's WAIT looks
        at it. The hold ends early when whoever changes what it depends on calls `recheck_input_hold`."""
        hold = self.input_hold
        if hold is None:
            return
        until = time.monotonic() + _INPUT_HOLD_MAX_S
        while self._control is None:
            delay = min(hold(), until - time.monotonic())
            if delay <= 0:
                return
            self._input_released.clear()
            self._holding_input = True
            try:
                if hold() > 0:  # (looked again: a recheck between the first look and the clear is not lost)
                    self._input_released.wait(delay)
            finally:
                self._holding_input = False

    def recheck_input_hold(self) -> None:
        """Any thread: input arrived, or what the hold depends on changed: the hold ends if it is over."""
        if self._holding_input:
            hold = self.input_hold
            if self._control is not None or hold is None or hold() <= 0:
                self._input_released.set()

    def _halt(self) -> None:
        """HLT with interrupts on and none pending (live, recording): sleep until news makes one pending.
        Unlike WAIT, the guest reads no EVENTS here, so none is logged (nor latched bits taken): replay
        makes the logged interrupts pending at this exit and injects them by the same rule."""
        self._poll_async()
        while not self.irq.pending and self._control is None:
            self._block_for_news()
            self._poll_async()

    def _block_for_news(self) -> None:
        deadlines = [d for d in (s.deadline_ns() for s in self._sources) if d is not None]
        timeout = _MAX_BLOCK_S
        if deadlines:
            timeout = min(timeout, max(0.0, (min(deadlines) - self.clock.now_ns()) / 1e9))
        self.journal.idle()
        with self._wake_cond:
            if not self._news and timeout > 0:
                self._blocked = True
                self._wake_cond.wait(timeout)
                self._blocked = False
            self._news = False

    # ----- running ------------------------------------------------------------------------

    def current_rip(self) -> int:
        return int(_U64.unpack_from(self.vcpu.run_buffer, RUN_SYNC_RIP_OFFSET)[0])

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("machine already started")
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._thread_main, name="vcpu0", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watchdog, name="vcpu0-watchdog", daemon=True).start()

    @property
    def vcpu_thread_id(self) -> int | None:
        """The vCPU thread's kernel id (a node puts it in the VM's cpu cgroup); None before start."""
        thread = self._thread
        return thread.native_id if thread is not None else None

    def run_blocking(self, timeout: float | None = None) -> MachineResult:
        self.start()
        return self.wait_blocking(timeout)

    def wait_blocking(self, timeout: float | None = None) -> MachineResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"machine still running after {timeout} s (position {self.position})")
        assert self.result is not None
        return self.result

    async def wait(self) -> MachineResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[MachineResult] = loop.create_future()
        with self._control_lock:
            if self.result is not None:
                return self.result
            self._waiters.append((loop, future))
        return await future

    def _finish(self, result: MachineResult) -> None:
        with self._control_lock:
            self.result = result
            waiters, self._waiters = self._waiters, []
        self._done.set()
        self._paused.set()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future, result)

    def _thread_main(self) -> None:
        try:
            result = self._run_loop()
        except DivergenceError as err:
            log.error("%s", err)
            result = MachineResult(StopReason.DIVERGED, self.position, message=str(err))
        except JournalStop as err:
            result = MachineResult(StopReason.STOPPED, self.position, message=str(err))
        except Exception as err:  # the monitor survives its own bugs: report, do not hang
            log.exception("vCPU thread failed")
            result = MachineResult(StopReason.ERROR, self.position, message=f"{type(err).__name__}: {err}")
        if result.reason not in (StopReason.ERROR, StopReason.DIVERGED):  # report the first mismatch only
            try:
                digest = b"" if self.stopped_between_exits else self.state_digest()
                self.journal.finish(digest, result.reason.value)
            except DivergenceError as err:
                result = MachineResult(StopReason.DIVERGED, self.position, message=str(err))
            except Exception as err:
                log.exception("journal finish failed")
                result = MachineResult(StopReason.ERROR, self.position, message=f"journal: {err}")
        self._finish(result)

    def _run_loop(self) -> MachineResult:
        vcpu = self.vcpu
        run = vcpu.run
        buf = vcpu.run_buffer
        run_once = vcpu.run_once
        out_handlers_get = self._out.get
        in_handlers_get = self._in.get
        poll = self._poll_async
        irq = self.irq
        exit_unpack = _EXIT.unpack_from
        u32_unpack = _U32.unpack_from
        exit_io = int(ExitReason.IO)
        io_out = KVM_EXIT_IO_OUT
        while True:
            err = run_once()
            if err:
                if not is_eintr(err):
                    return MachineResult(
                        StopReason.ERROR, self.position, message=f"KVM_RUN failed: errno {err}"
                    )
                self.exits_async += 1
                run.immediate_exit = 0
                if self._hung:
                    self.stopped_between_exits = True
                    return MachineResult(
                        StopReason.HUNG,
                        self.position,
                        message=f"no exit for {self.config.hang_timeout_s} s",
                        registers=self.registers(),
                    )
                if self._control == "stop" and self.journal.mode is JournalMode.RECORD:
                    # A recording ends at a synchronous exit, where its replay stops in the same state:
                    # run on to the next one (a guest that never makes one is reported hung). So does a
                    # recording stopped while paused (_handle_control).
                    continue
                if self._control is not None and self._handle_control(completed_io=True):
                    return MachineResult(StopReason.STOPPED, self.position)
                continue
            reason, direction, size, port, _count, offset = exit_unpack(buf, RUN_EXIT_REASON_OFFSET)
            journal = self.journal
            position = self.position + 1
            journal.at_exit(position)  # may wait for log (replay) or stop the machine
            self.position = position
            try:
                if reason == exit_io:
                    if direction == io_out:
                        handler = out_handlers_get(port)
                        value = u32_unpack(buf, offset)[0] if size == 4 else buf[offset]
                        if handler is not None:
                            handler(value)
                        else:
                            self._unknown_port(port, "out")
                    else:
                        in_handler = in_handlers_get(port)
                        result = in_handler() if in_handler is not None else self._unknown_port(port, "in")
                        if size == 4:
                            _U32.pack_into(buf, offset, result & 0xFFFFFFFF)
                        else:
                            buf[offset : offset + size] = (result & 0xFFFFFFFF).to_bytes(4, "little")[:size]
                else:
                    stop = self._other_exit(reason)
                    if stop is not None:
                        return stop
            except GuestStop as stop_request:
                return self._guest_stopped(stop_request)
            except GuestMemoryError as mem_err:
                self.guest_faults.append(str(mem_err))
                log.warning("guest fault: %s", mem_err)
            poll()
            if journal.state_hash_due(position):
                journal.state_hash(self.state_digest())
            if irq.pending and run.ready_for_interrupt_injection and run.if_flag:
                vcpu.interrupt(irq.next_vector())
            if self._control is not None and self._handle_control(completed_io=False):
                return MachineResult(StopReason.STOPPED, self.position)
            journal.exit_done(position)

    def _unknown_port(self, port: int, direction: str) -> int:
        self.guest_faults.append(f"{direction} on unknown port 0x{port:x}")
        log.warning("guest fault: %s on unknown port 0x%x", direction, port)
        return 0xFFFFFFFF

    def _other_exit(self, reason: int) -> MachineResult | None:
        if reason == ExitReason.HLT:
            if self.irq.pending and self.vcpu.run.if_flag:
                return None
            if not self.vcpu.run.if_flag:
                return MachineResult(
                    StopReason.CRASHED,
                    self.position,
                    message="halted with interrupts off",
                    registers=self.registers(),
                )
            if self.journal.mode is not JournalMode.REPLAY:
                self._halt()
            return None
        if reason == ExitReason.SHUTDOWN:
            return MachineResult(
                StopReason.CRASHED,
                self.position,
                message="triple fault (KVM_EXIT_SHUTDOWN)",
                registers=self.registers(),
            )
        if reason == ExitReason.INTERNAL_ERROR:
            internal = self.vcpu.run.exit.internal
            return MachineResult(
                StopReason.CRASHED,
                self.position,
                message=f"KVM internal error, suberror {internal.suberror}",
                registers=self.registers(),
            )
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        return MachineResult(
            StopReason.CRASHED, self.position, message=f"unexpected exit {name}", registers=self.registers()
        )

    def _guest_stopped(self, stop: GuestStop) -> MachineResult:
        if stop.panic is not None:
            registers = self.registers()
            if stop.rip:
                registers["fault_rip"] = stop.rip
                registers["vector"] = stop.vector
            return MachineResult(StopReason.PANICKED, self.position, message=stop.panic, registers=registers)
        return MachineResult(StopReason.EXITED, self.position, exit_code=stop.exit_code)

    def registers(self) -> dict[str, int]:
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        out = {
            name: int(getattr(regs, name)) for name in ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx")
        }
        out.update(cs=int(sregs.cs.selector), cr2=int(sregs.cr2))
        return out

    def state_digest(self) -> bytes:
        """The state hash: guest memory, registers and every component's replicated state. The event log
        carries it every N positions and at the end; checkpoints carry it in their manifest."""
        assert self.hasher is not None
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        memory_and_vcpu = self.hasher.digest(bytes(regs) + bytes(sregs))
        return hashlib.blake2b(memory_and_vcpu + replicated_state(self.components), digest_size=16).digest()

    # ----- control --------------------------------------------------------------------------

    def kick(self) -> None:
        """Make KVM_RUN return promptly (an asynchronous exit)."""
        self.vcpu.run.immediate_exit = 1
        thread = self._thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
        self.wake()

    def _request(self, what: str) -> None:
        with self._control_lock:
            if self._control != "stop":
                self._control = what
        self.kick()

    def stop(self) -> None:
        """Stop at the next synchronous exit (or now, if the guest is in a blocked WAIT)."""
        self.journal.cancel_wait()
        if self._thread is None:
            self._finish(MachineResult(StopReason.STOPPED, self.position))
            return
        self._request("stop")

    def pause(self, timeout: float = 5.0) -> None:
        """Park the vCPU at a synchronous exit with its I/O completed; returns when parked."""
        self._paused.clear()
        self._resume.clear()
        self._request("pause")
        if not self._paused.wait(timeout):
            # Withdraw the request: a vCPU reaching its next exit only now must run on, not park there with
            # nobody left to resume it (and one that parked just now is let go).
            self.resume()
            raise TimeoutError(f"vCPU did not pause within {timeout} s")

    def resume(self) -> None:
        with self._control_lock:
            if self._control == "pause":
                self._control = None
        self._resume.set()

    def _handle_control(self, completed_io: bool) -> bool:
        """True if the machine must stop."""
        if self._control == "stop":
            self.stopped_between_exits = completed_io
            if not completed_io:
                # Complete it too: a checkpoint of the stopped machine must not lose what the exit's
                # handler left for the guest (a Linux system call's result and return rip, an `in` value).
                self._complete_io()
            return True
        if self._control == "pause":
            if not completed_io:
                self._complete_io()
            self._paused.set()
            while not self._resume.wait(0.1):
                if self._control == "stop":
                    break
            self._paused.clear()
            if self._control != "stop":
                return False
            if self.journal.mode is JournalMode.RECORD:
                return False  # the I/O was completed: a recording runs on to stop at the next exit
            self.stopped_between_exits = True
            return True
        return False

    def _complete_io(self) -> None:
        """An I/O exit completes only on the next KVM_RUN: enter once with immediate_exit (no guest code
        runs)."""
        self.vcpu.run.immediate_exit = 1
        self.vcpu.run_once()
        self.vcpu.run.immediate_exit = 0

    def _watchdog(self) -> None:
        timeout = self.config.hang_timeout_s
        last_position = -1
        last_progress = time.monotonic()
        while not self._done.wait(min(0.05, timeout / 4)):
            now = time.monotonic()
            if (
                self.position != last_position
                or self._blocked
                or self._paused.is_set()
                or self._waiting_for_log()
            ):
                last_position = self.position
                last_progress = now
            elif now - last_progress > timeout:
                log.warning("guest made no exit for %.1f s: hung", now - last_progress)
                self._hung = True
                self.kick()
                return

    def _waiting_for_log(self) -> bool:
        """A replay blocked at an exit for more log (a backup behind an idle primary, for as long as the
        primary idles) is not hung. A replay running guest code without exits is: it replays a hang (the
        primary's log ends where the guest stopped making exits)."""
        journal = self.journal
        return journal.mode is JournalMode.REPLAY and bool(getattr(journal, "waiting", False))

    def close(self) -> None:
        if self._thread is not None and not self._done.is_set():
            self.stop()
            self._done.wait(5)
        self.memory.stop_filling()  # a lazy restore's loader (monitor/checkpoint/lazy.py)
        self.block.close()
        self.vcpu.close()
        self.vm.close()
        if self._own_kvm:
            self.kvm.close()

    # ----- checkpoints ----------------------------------------------------------------------
    # monitor/checkpoint/ takes and restores checkpoints through these; they touch no file.

    def is_running(self) -> bool:
        """The vCPU thread is started and has not finished."""
        return self._thread is not None and not self._done.is_set()

    def capture_state(self) -> vmft_pb2.MachineState:
        """The vCPU and every component's state at the current position. Only with the vCPU parked
        (Machine.pause(), or before start / after the machine finished), with its I/O completed."""
        return vmft_pb2.MachineState(
            position=self.position,
            vcpu=self.vcpu.save_state().to_proto(),
            components=save_all(self.components),
        )

    def restore_state(self, state: vmft_pb2.MachineState, live: bool) -> None:
        """Put a freshly built machine (not loaded, not started; its memory already written) at a
        checkpoint's position. `live`: the machine will run on live (not replay a log); each component
        decides what that means for its host-side state (monitor/component.py)."""
        if self._thread is not None:
            raise RuntimeError("restore_state needs a machine that has not started")
        self.vcpu.restore_state(VcpuState.from_proto(state.vcpu))
        self.position = state.position
        restore_all(self.components, dict(state.components), live)

    def next_conn_id(self) -> int:
        """The first connection id a NIC server may give out without reusing one the guest has seen."""
        high = max(self.net.max_conn, *(m.conn for m in self.net_backend.queued()), 0)
        return high + 1


def _settle(future: asyncio.Future[MachineResult], result: MachineResult) -> None:
    if not future.done():
        future.set_result(result)
