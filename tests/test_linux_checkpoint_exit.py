"""A checkpoint that lands on the exit that ends a Linux program restores and ends exactly as the original
run did: same exit status, same fatal message, same output, same position and final state hash.

The race made deterministic: the test holds the vCPU inside the exit that ends the program (exit_group,
the exit of the last thread, a fatal page fault) until a checkpoint's first pause has been requested, so
the checkpoint's pauses find the machine finished at that exit (Machine.pause returns when it finishes).
Such a checkpoint once restored into a SIGSEGV ("page fault writing an unmapped page at 0xe7, rip
0x7002"): the vCPU resumed past the system call's `out`, on the zero bytes of the system-call page, with
rax still holding exit_group's number.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from monitor.checkpoint.take import Checkpointer
from monitor.linux import boot
from monitor.linux.core import RAX, RSP, SYNC_REGS, U64
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.linux.vdso import ClockMode
from monitor.machine import Machine, StopReason
from monitor.record import QueueSource, ReplayJournal
from proto import vmft_pb2

pytestmark = pytest.mark.kvm

PYTHON = "/usr/bin/python3"
WAIT_S = 60
EXIT, EXIT_GROUP = 60, 231
PAGE_FAULT = 14

EXITS_WITH_3 = "import sys\nprint('before', sum(range(1000)), flush=True)\nsys.exit(3)\n"
# exit(2) of the only thread (not exit_group): the process's last thread ends the process.
LAST_THREAD_EXIT = (
    "import ctypes\nprint('last thread', flush=True)\nctypes.CDLL(None).syscall(60, 5)\nprint('not here')\n"
)
SEGFAULT = "import ctypes\nprint('about to fault', flush=True)\nctypes.string_at(0)\nprint('not here')\n"


@dataclass
class Ending:
    code: int | None
    position: int
    digest: bytes
    fatal: str
    out: bytes
    restored_at: bytes = b""  # a restored machine's state hash before it ran


Predicate = Callable[[LinuxPersonality, Machine], bool]


def at_syscall(number: int) -> tuple[int, Predicate]:
    """The system-call exit whose number (rax) is `number`."""

    def hit(personality: LinuxPersonality, machine: Machine) -> bool:
        return int(U64.unpack_from(personality._run_buffer, SYNC_REGS + RAX)[0]) == number

    return boot.SYSCALL_PORT, hit


def at_exception(vector: int) -> tuple[int, Predicate]:
    """The exception exit for `vector` (the ring-0 stub's frame says which)."""

    def hit(personality: LinuxPersonality, machine: Machine) -> bool:
        rsp = U64.unpack_from(personality._run_buffer, SYNC_REGS + RSP)[0]
        return boot.read_exception_frame(machine.memory, rsp)[0] == vector

    return boot.EXCEPTION_PORT, hit


def hold_at(machine: Machine, personality: LinuxPersonality, where: tuple[int, Predicate]) -> threading.Event:
    """Wrap the port handler so that the first exit `where` names waits (bounded) until a pause has been
    requested, then runs as usual: whatever the pause captures is the state that exit leaves. Set: the
    exit was reached."""
    port, hit = where
    handler = machine._out[port]
    reached = threading.Event()

    def held(value: int) -> None:
        if not reached.is_set() and hit(personality, machine):
            reached.set()
            deadline = time.monotonic() + WAIT_S
            while machine._control != "pause" and time.monotonic() < deadline:
                time.sleep(0.001)
        handler(value)

    machine._out[port] = held
    return reached


def _config(argv: list[str], layer: Path, clock: ClockMode) -> LinuxConfig:
    return LinuxConfig(program=argv[0], argv=argv, layer=layer, clock=clock)


def checkpoint_at_end(
    program: str, where: tuple[int, Predicate], checkpoint: Path, layer: Path, clock: ClockMode
) -> Ending:
    personality = LinuxPersonality(_config([PYTHON, "-c", program], layer, clock))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    try:
        reached = hold_at(machine, personality, where)
        machine.start()
        assert reached.wait(WAIT_S), "the program never reached the exit"
        Checkpointer(machine).save(checkpoint)
        result = machine.wait_blocking(WAIT_S)
        digest = machine.state_digest()
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED, result.describe()
    fatal = personality.fatal.message if personality.fatal else ""
    return Ending(result.exit_code, result.position, digest, fatal, bytes(out))


def restore_and_finish(
    program: str, checkpoint: Path, layer: Path, clock: ClockMode, journal: ReplayJournal | None = None
) -> Ending:
    again = LinuxPersonality(_config([PYTHON, "-c", program], layer, clock))
    restored = restore_linux(again, checkpoint, journal=journal)
    restored_at = restored.state_digest()  # the checkpoint's state, until it runs
    rest = bytearray()
    again.on_stream = lambda number, data: rest.extend(data)
    try:
        result = restored.run_blocking(WAIT_S)
        digest = restored.state_digest()
    finally:
        restored.close()
        again.close()
    fatal = again.fatal.message if again.fatal else ""
    assert result.reason is StopReason.EXITED, result.describe()
    return Ending(result.exit_code, result.position, digest, fatal, bytes(rest), restored_at)


@pytest.mark.parametrize("clock", [ClockMode.SYSCALL, ClockMode.VDSO], ids=["syscall-clock", "vdso-clock"])
def test_a_checkpoint_at_exit_group_restores_and_ends_the_same(tmp_path: Path, clock: ClockMode) -> None:
    checkpoint = tmp_path / "end.ckpt"
    original = checkpoint_at_end(EXITS_WITH_3, at_syscall(EXIT_GROUP), checkpoint, tmp_path / "l1", clock)
    assert original.code == 3 and original.out == b"before 499500\n"
    again = restore_and_finish(EXITS_WITH_3, checkpoint, tmp_path / "l2", clock)
    assert again == Ending(original.code, original.position, original.digest, "", b"", original.digest)


def test_a_checkpoint_at_the_last_threads_exit_restores_and_ends_the_same(tmp_path: Path) -> None:
    checkpoint = tmp_path / "end.ckpt"
    clock = ClockMode.SYSCALL
    original = checkpoint_at_end(LAST_THREAD_EXIT, at_syscall(EXIT), checkpoint, tmp_path / "l1", clock)
    assert original.code == 5 and original.out == b"last thread\n"
    again = restore_and_finish(LAST_THREAD_EXIT, checkpoint, tmp_path / "l2", clock)
    assert again == Ending(original.code, original.position, original.digest, "", b"", original.digest)


def test_a_checkpoint_at_a_fatal_fault_restores_and_ends_the_same(tmp_path: Path) -> None:
    checkpoint = tmp_path / "end.ckpt"
    clock = ClockMode.SYSCALL
    original = checkpoint_at_end(SEGFAULT, at_exception(PAGE_FAULT), checkpoint, tmp_path / "l1", clock)
    assert original.code == 128 + 11 and "SIGSEGV" in original.fatal and original.out == b"about to fault\n"
    again = restore_and_finish(SEGFAULT, checkpoint, tmp_path / "l2", clock)
    assert again == Ending(
        original.code, original.position, original.digest, original.fatal, b"", original.digest
    )


def test_a_backup_seeded_at_the_final_exit_replays_to_the_recorded_final_hash(tmp_path: Path) -> None:
    """A backup seeded from that checkpoint (its log starts there and ends there, with the final state
    hash) ends at the same position with the same state: it no longer runs past the log's end."""
    checkpoint = tmp_path / "end.ckpt"
    clock = ClockMode.SYSCALL
    original = checkpoint_at_end(EXITS_WITH_3, at_syscall(EXIT_GROUP), checkpoint, tmp_path / "l1", clock)
    end = vmft_pb2.EventBatch(
        horizon=original.position,
        first_position=original.position,
        position_deltas=[0],
        rips=[0],
        kinds=[vmft_pb2.EVENT_KIND_STATE_HASH],
        values=[1],
        data=[original.digest],
        ended=True,
        end_position=original.position,
        end_reason=StopReason.EXITED.value,
    )
    source = QueueSource()
    source.put(end)
    journal = ReplayJournal(source, start_position=original.position)
    again = restore_and_finish(EXITS_WITH_3, checkpoint, tmp_path / "l2", clock, journal)
    # It ends at the log's end (the exit is not past it: the journal found no need for more log there).
    assert (again.code, again.position, again.digest) == (3, original.position, original.digest)


GETPIDS = "import os\nfor i in range(3):\n    print(i, os.getpid() > 0, flush=True)\n"


def test_a_checkpoint_of_a_machine_stopped_at_a_system_call_restores_and_runs_on(tmp_path: Path) -> None:
    """Stopped (vmft stop, a second SIGINT) at a system call, the machine used to keep the call's result
    and return rip only in kvm_run's synced registers, never applied: a checkpoint of it resumed on the
    system-call page's zero bytes (SIGSEGV at the call's number). The program now runs on to its end."""
    clock = ClockMode.SYSCALL
    personality = LinuxPersonality(_config([PYTHON, "-c", GETPIDS], tmp_path / "l1", clock))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    port, hit = at_syscall(39)  # getpid
    handler = machine._out[port]
    reached = threading.Event()

    def held(value: int) -> None:  # the stop is requested while the call is being served
        if not reached.is_set() and hit(personality, machine):
            reached.set()
            deadline = time.monotonic() + WAIT_S
            while machine._control != "stop" and time.monotonic() < deadline:
                time.sleep(0.001)
        handler(value)

    machine._out[port] = held
    checkpoint = tmp_path / "stopped.ckpt"
    try:
        machine.start()
        assert reached.wait(WAIT_S), "the program never called getpid"
        machine.stop()
        result = machine.wait_blocking(WAIT_S)
        Checkpointer(machine).save(checkpoint)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.STOPPED, result.describe()
    again = restore_and_finish(GETPIDS, checkpoint, tmp_path / "l2", clock)
    assert (again.code, again.fatal) == (0, "")
    assert bytes(out) + again.out == b"0 True\n1 True\n2 True\n"
