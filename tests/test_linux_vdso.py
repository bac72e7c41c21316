"""`--clock vdso`: a Linux guest reads the clock from the vDSO's time page, without an exit; the page moves
only at system calls, each move an event, so recordings replay and checkpoints restore."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from monitor.checkpoint.take import Checkpointer
from monitor.journal import EventKind, Journal
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.linux.stack import AT_SYSINFO_EHDR
from monitor.linux.vdso import VDSO_BASE, ClockMode
from monitor.machine import MachineResult, StopReason
from monitor.record import LogFileReader, ReplayJournal, open_recording, open_replay

pytestmark = pytest.mark.kvm

MEM = 512 << 20
WAIT_S = 120
PYTHON = "/usr/bin/python3"

# Clock reads with system calls between them (getpid: an exit each); what the program saw, as one line.
ADVANCES = (
    "import os, time\n"
    "m, w = [], []\n"
    "for i in range(3000):\n"
    "    m.append(time.monotonic()); w.append(time.time()); os.getpid()\n"
    "t = [time.monotonic() for _ in range(2000)]\n"  # no system call between these reads
    "mono = all(b >= a for a, b in zip(m, m[1:])) and all(b >= a for a, b in zip(w, w[1:]))\n"
    "print(len(set(m)), m[-1] - m[0], mono, len(set(t)), w[-1] - w[0])\n"
)


def _config(argv: list[str], layer: Path, hang_timeout_s: float = 60.0) -> LinuxConfig:
    return LinuxConfig(
        program=argv[0], argv=argv, layer=layer, clock=ClockMode.VDSO, hang_timeout_s=hang_timeout_s
    )


def _run(
    argv: list[str],
    journal: Callable[[LinuxPersonality], Journal] | None = None,
    hang_timeout_s: float = 60.0,
) -> tuple[MachineResult, bytes, bytes, LinuxPersonality]:
    layer = Path(tempfile.mkdtemp(prefix="vmft-vdso-test-"))
    personality = LinuxPersonality(_config(argv, layer, hang_timeout_s))
    machine = build_linux(personality, journal(personality) if journal else None)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    try:
        result = machine.run_blocking(WAIT_S)
        digest = machine.state_digest()
    finally:
        machine.close()
        personality.close()
    return result, bytes(out), digest, personality


def _clock_syscalls(argv: list[str], clock: ClockMode) -> tuple[bytes, int]:
    """Run live; the output and how many system calls the program made."""
    layer = Path(tempfile.mkdtemp(prefix="vmft-vdso-test-"))
    personality = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=layer, clock=clock))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    try:
        result = machine.run_blocking(WAIT_S)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    return bytes(out), personality.syscall_count


def test_python_sees_time_advance_monotonically_without_clock_exits() -> None:
    out, vdso_calls = _clock_syscalls([PYTHON, "-c", ADVANCES], ClockMode.VDSO)
    distinct, spread, monotonic, spin_distinct, wall = out.split()
    assert monotonic == b"True"
    # Time moves between reads that have a system call between them (not at every one: a resolution) ...
    assert 30 <= int(distinct) < 3000 and float(spread) > 0.005 and float(wall) > 0.005
    # ... and never between reads without one: the page changes only at exits.
    assert int(spin_distinct) == 1
    # Every read was a system call before: 5000 more exits than with the vDSO (plus its getpid calls).
    _out, syscall_calls = _clock_syscalls([PYTHON, "-c", ADVANCES], ClockMode.SYSCALL)
    assert syscall_calls - vdso_calls >= 8000


def test_the_vdso_is_in_auxv_and_maps_and_answers_other_clocks_by_system_call() -> None:
    program = (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong\n"
        f"print(hex(libc.getauxval({AT_SYSINFO_EHDR})))\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('[vdso]' in maps, '[vvar]' in maps)\n"
        "cpu = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)\n"  # not on the page: a system call
        "print(cpu > 0, time.get_clock_info('monotonic').resolution)\n"
        "print(time.clock_getres(6), abs(time.time() - time.clock_gettime(5)) < 1)\n"  # the COARSE clocks
    )  # fmt: skip
    out, _calls = _clock_syscalls([PYTHON, "-c", program], ClockMode.VDSO)
    assert out.split(b"\n")[:4] == [hex(VDSO_BASE).encode(), b"True True", b"True 1e-09", b"0.004 True"]


# Threads that sleep: a switch at a system call's end reads the deadlines' clock (a page rewrite that must
# happen) after the exit's own optional rewrite; replay must tell the two apart.
THREADED = (
    "import threading, time\n"
    "out = []\n"
    "def work(n):\n"
    "    for i in range(60):\n"
    "        out.append((n, i, time.monotonic()))\n"
    "        time.sleep(0.0005 * (i % 3))\n"
    "ts = [threading.Thread(target=work, args=(n,)) for n in range(3)]\n"
    "[t.start() for t in ts]; [t.join() for t in ts]\n"
    "print(hash(tuple(out)), len(set(t for _n, _i, t in out)))\n"
)


def _record_and_replay(
    tmp_path: Path, name: str, cores: tuple[int, int] | None, program: str = ADVANCES
) -> bytes:
    argv = [PYTHON, "-c", program]
    log = tmp_path / f"{name}.log"
    original = os.sched_getaffinity(0)
    journals: list[ReplayJournal] = []
    try:
        if cores:
            os.sched_setaffinity(0, {cores[0]})  # the vCPU thread inherits this thread's affinity
        recorded, out, recorded_digest, _p = _run(argv, lambda p: open_recording(log, p.image, MEM, 300))
        assert recorded.reason is StopReason.EXITED and recorded.exit_code == 0, recorded.describe()

        def replaying(personality: LinuxPersonality) -> ReplayJournal:
            journals.append(open_replay(log, personality.image, MEM))
            return journals[0]

        if cores:
            os.sched_setaffinity(0, {cores[1]})
        replayed, replay_out, replayed_digest, _p = _run(argv, replaying)
    finally:
        os.sched_setaffinity(0, original)
    assert replayed.reason is StopReason.EXITED, replayed.describe()
    assert replayed.position == recorded.position == journals[0].end_position
    assert journals[0].stats.state_hashes >= 2  # periodic hashes and the final one, all verified
    assert replay_out == b""  # outputs are checked against the log, not shown again
    assert replayed_digest == recorded_digest
    kinds = [int(kind) for batch in LogFileReader(log).batches() for kind in batch.kinds]
    if program is ADVANCES:
        assert kinds.count(EventKind.VDSO_TIME) >= 30  # the page moved, each time one event
        assert kinds.count(EventKind.CLOCK) < 100  # and the clock reads were not system calls
    return out


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two cores to record on one, replay on another"
)
def test_a_recording_replays_to_the_same_state_on_another_core(tmp_path: Path) -> None:
    first, second = sorted(os.sched_getaffinity(0))[:2]
    one = _record_and_replay(tmp_path, "a", (first, second))
    two = _record_and_replay(tmp_path, "b", (second, first))
    assert one != two  # each recording saw its own times: the check has teeth


def test_threads_sleeping_on_the_vdso_clock_replay(tmp_path: Path) -> None:
    one = _record_and_replay(tmp_path, "t1", None, THREADED)
    two = _record_and_replay(tmp_path, "t2", None, THREADED)
    assert one != two and int(one.split()[1]) > 10


def test_replay_refuses_a_log_recorded_with_the_other_clock(tmp_path: Path) -> None:
    argv = [PYTHON, "-c", "import time; print(time.time())"]
    log = tmp_path / "vdso.log"
    recorded, _out, _digest, _p = _run(argv, lambda p: open_recording(log, p.image, MEM))
    assert recorded.reason is StopReason.EXITED
    other = LinuxPersonality(LinuxConfig(program=PYTHON, argv=argv, layer=tmp_path / "layer"))
    with pytest.raises(Exception, match="recorded with image"):
        open_replay(log, other.image, MEM)


CHECKPOINTED = (
    "import time, os\n"
    "last = time.monotonic()\n"
    "for i in range(30):\n"
    "    s = sum(j * j for j in range(1_000_000))\n"
    "    now = time.monotonic()\n"
    "    assert now >= last, (now, last)\n"
    "    last = now\n"
    "    print(i, s, now > 0, flush=True)\n"
    "print('done', time.time() > 1.7e9)\n"
)


def test_a_checkpoint_restores_the_vdso_and_its_time_page(tmp_path: Path) -> None:
    argv = [PYTHON, "-c", CHECKPOINTED]
    checkpoint = tmp_path / "running.ckpt"
    personality = LinuxPersonality(_config(argv, tmp_path / "layer"))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    at: list[int] = []
    try:
        machine.start()
        deadline = time.monotonic() + WAIT_S
        while out.count(b"\n") < 5 and time.monotonic() < deadline and machine.is_running():
            time.sleep(0.01)
        assert machine.is_running(), "the program finished before the checkpoint"
        Checkpointer(machine).save(checkpoint, on_paused=lambda position: at.append(len(out)))
        result = machine.wait_blocking(WAIT_S)
        saved_clock = personality.vdso.monotonic_ns if personality.vdso else 0
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert out.endswith(b"done True\n")

    again = LinuxPersonality(_config(argv, tmp_path / "restored-layer"))
    restored = restore_linux(again, checkpoint)
    assert again.vdso is not None and 0 < again.vdso.monotonic_ns <= saved_clock  # read back from the page
    rest = bytearray()
    again.on_stream = lambda number, data: rest.extend(data)
    try:
        result = restored.run_blocking(WAIT_S)
    finally:
        restored.close()
        again.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert bytes(out[: at[0]]) + bytes(rest) == bytes(out)


def test_the_state_hash_covers_the_time_page_and_the_vdso(tmp_path: Path) -> None:
    argv = [PYTHON, "-c", "import time, os; os.getpid(); print(time.time())"]
    personality = LinuxPersonality(_config(argv, tmp_path / "layer"))
    machine = build_linux(personality)
    try:
        result = machine.run_blocking(WAIT_S)
        assert result.reason is StopReason.EXITED and personality.vdso is not None
        before = machine.state_digest()
        personality.vdso.realtime_ns += 1_000  # one microsecond more on the page: another state
        personality.vdso._write_page()
        moved = machine.state_digest()
        personality.process.space.write(VDSO_BASE + 0x100, b"\xcc", force=True)  # a byte of the vDSO
        patched = machine.state_digest()
    finally:
        machine.close()
        personality.close()
    assert len({before, moved, patched}) == 3


def test_a_program_spinning_on_the_vdso_clock_is_reported_hung() -> None:
    """Without system calls the page never moves: a wait for the clock to pass a point never ends."""
    program = (
        "import time\nend = time.monotonic() + 0.05\nwhile time.monotonic() < end: pass\nprint('left')\n"
    )
    started = time.monotonic()
    result, out, _digest, _p = _run([PYTHON, "-c", program], hang_timeout_s=1.0)
    assert result.reason is StopReason.HUNG, result.describe()
    assert out == b"" and time.monotonic() - started < WAIT_S


def test_vmft_run_linux_takes_clock_vdso(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    log = tmp_path / "cli.log"
    program = ["--", PYTHON, "-c", "import time, os; os.getpid(); print(time.time() > 1.7e9)"]

    def vmft(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "replica.cli", *args],
            cwd=root,
            env=env,
            capture_output=True,
            timeout=WAIT_S,
        )

    recorded = vmft("run", "--linux", "--clock", "vdso", "--record", str(log), *program)
    assert recorded.returncode == 0 and recorded.stdout == b"True\n", recorded.stderr
    replayed = vmft("replay", "--linux", "--clock", "vdso", str(log), *program)
    assert replayed.returncode == 0 and b"verdict: IDENTICAL" in replayed.stdout, replayed.stderr
    wrong = vmft("run", "--linux", "--clock", "sundial", *program)
    assert wrong.returncode == 2 and b"--clock" in wrong.stderr


# A protected pair (real node processes) whose program reads the clock through the vDSO.
PAIR_COUNTER = """
import os, time
i, last = 0, 0.0
while True:
    for _ in range(300):
        os.getpid()
    now = time.monotonic()
    assert now >= last, (now, last)
    last = now
    print(i, int(now * 1e6), flush=True)
    i += 1
    time.sleep(0.02)
"""


def test_a_protected_pair_with_the_vdso_clock_replicates_and_fails_over(tmp_path: Path) -> None:
    from test_linux_node import (
        FAILURE_TIMEOUT_MS,
        HASH_EVERY,
        assert_counts_on,
        wait_lines,
        wait_status,
    )

    from proto import vmft_pb2, vmft_pb2_grpc
    from replica.cluster import LocalCluster

    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        spec = vmft_pb2.VmSpec(name="vm1", mem_mib=256, hang_timeout_s=10.0)
        spec.linux.argv.extend([PYTHON, "-c", PAIR_COUNTER])
        spec.linux.clock = "vdso"
        request = vmft_pb2.ProtectRequest(
            spec=spec,
            backup_node=b.name,
            service=cluster.service_address("vm1", a),
            backup_service=cluster.service_address("vm1", b),
        )
        with cluster.channel(a) as channel:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=60)
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        # The backup replays the page's moves past two state-hash positions: the hashes matched.
        backup = wait_status(
            cluster, b, "replayed past two state hashes", lambda s: s.position > 2 * HASH_EVERY + 1000
        )
        assert backup.role == vmft_pb2.ROLE_BACKUP and backup.state == vmft_pb2.VM_STATE_REPLAYING, backup
        seen = wait_lines(a, 15)
        cluster.kill_node(a)
        promoted = wait_status(cluster, b, "promoted", lambda s: s.role == vmft_pb2.ROLE_PRIMARY)
        assert promoted.generation == 2
        after = wait_lines(b, seen.count(b"\n") + 10)
        assert after.startswith(seen)
        assert_counts_on(after)
        times = [int(line.split()[1]) for line in after.splitlines()]
        assert times == sorted(times) and times[-1] > times[0]  # the clock ran on, monotonic, across it
