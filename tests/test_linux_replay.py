"""Recording a Linux program that reads time and randomness, and replaying it to the same state."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linux_helpers import run_guest
from monitor.linux.fs import FileSystem
from monitor.linux.manifest import RootMismatch, check_root_files, recorded_root_files
from monitor.linux.personality import LinuxPersonality
from monitor.machine import StopReason
from monitor.record import ReplayJournal, open_recording, open_replay

pytestmark = pytest.mark.kvm

MEM = 512 << 20
PROGRAM = [
    "/usr/bin/python3",
    "-c",
    "import time, random, os, hashlib\n"
    "t0 = time.monotonic(); r = random.random(); b = os.urandom(16)\n"
    "d = {k: random.randrange(1000) for k in range(50)}\n"
    "time.sleep(0.01)\n"
    "print(time.time(), r, b.hex(), hashlib.sha256(repr(d).encode()).hexdigest(), time.monotonic() - t0)\n",
]


def record_and_replay(
    tmp_path: Path, name: str, cores: tuple[int, int] | None = None, program: list[str] = PROGRAM
) -> tuple[bytes, bytes]:
    log = tmp_path / f"{name}.log"
    original = os.sched_getaffinity(0)
    try:
        if cores:
            os.sched_setaffinity(0, {cores[0]})  # the vCPU thread inherits this thread's affinity
        recorded = run_guest(program, journal=lambda p: open_recording(log, p.image, MEM, 500))
        assert recorded.status == 0, recorded.stderr
        journals: list[ReplayJournal] = []

        def replaying(personality: LinuxPersonality) -> ReplayJournal:
            journals.append(open_replay(log, personality.image, MEM))
            return journals[0]

        if cores:
            os.sched_setaffinity(0, {cores[1]})
        replayed = run_guest(program, journal=replaying)
    finally:
        os.sched_setaffinity(0, original)
    assert replayed.result is not None and recorded.result is not None
    assert replayed.result.reason is StopReason.EXITED, replayed.result.describe()
    assert replayed.result.position == recorded.result.position == journals[0].end_position
    assert journals[0].stats.state_hashes >= 2  # periodic hashes and the final one, all verified
    assert replayed.stdout == b""  # outputs are checked against the log, not shown again
    assert replayed.digest == recorded.digest  # memory, registers and the personality's state
    return recorded.stdout, recorded.digest


def test_recordings_differ_and_each_replays(tmp_path: Path) -> None:
    outputs = set()
    digests = set()
    for i in range(3):
        out, digest = record_and_replay(tmp_path, f"run{i}", cores=(0, 0))
        outputs.add(out)
        digests.add(digest)
    assert len(outputs) == 3 and len(digests) == 3  # time and randomness really differ: the test has teeth


CROSS_CORE_RUNS = 30


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two cores to record on one, replay on another"
)
def test_thirty_recordings_replay_on_another_core(tmp_path: Path) -> None:
    """glibc stores the APIC ID CPUID gives (docs/design.md): without cpuid_trap these replays diverge."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    outputs = set()
    for i in range(CROSS_CORE_RUNS):
        cores = (first, second) if i % 2 == 0 else (second, first)
        out, _digest = record_and_replay(tmp_path, f"cross{i}", cores=cores)
        outputs.add(out)
    assert len(outputs) == CROSS_CORE_RUNS


def test_replay_refuses_another_program(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    run_guest(["/usr/bin/python3", "-c", "pass"], journal=lambda p: open_recording(log, p.image, MEM))
    with pytest.raises(Exception, match="recorded with image"):
        run_guest(["/usr/bin/python3", "-c", "print(1)"], journal=lambda p: open_replay(log, p.image, MEM))


def test_a_changed_root_file_is_refused_before_replay(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "data.txt").write_text("one\ntwo\n")
    argv = ["/bin/busybox", "wc", "-l", "/data.txt"]
    log = tmp_path / "wc.log"
    recorded = run_guest(argv, root=str(root), journal=lambda p: open_recording(log, p.image, MEM))
    assert recorded.stdout.split()[0] == b"2"
    assert recorded_root_files(log).keys() == {"/bin/busybox", "/data.txt"}
    fresh = tmp_path / "layer"
    assert check_root_files(log, FileSystem(fresh, str(root))) == 2
    (root / "data.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(RootMismatch, match="/data.txt: differs from the file the recording read"):
        check_root_files(log, FileSystem(fresh, str(root)))
    # Replayed anyway, the guest is stopped where it opens the file, with the file named.
    replayed = run_guest(argv, root=str(root), journal=lambda p: open_replay(log, p.image, MEM))
    assert replayed.result is not None and replayed.result.reason is not StopReason.EXITED
    assert "root file /data.txt" in replayed.result.message


def test_cli_records_and_replays(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    log = tmp_path / "cli.log"
    program = ["--", *PROGRAM]

    def vmft(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "replica.cli", *args], cwd=root, env=env, capture_output=True, timeout=120
        )

    recorded = vmft("run", "--linux", "--record", str(log), *program)
    assert recorded.returncode == 0, recorded.stderr
    assert len(recorded.stdout.split()) == 5
    replayed = vmft("replay", "--linux", str(log), *program)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert b"verdict: IDENTICAL" in replayed.stdout
    other = vmft("replay", "--linux", str(log), "--", "/usr/bin/python3", "-c", "pass")
    assert other.returncode == 2 and b"recorded with image" in other.stderr


THREADED = [
    "/usr/bin/python3",
    "-c",
    "import random, threading, time\n"
    "out = []\n"
    "def work(n):\n"
    "    for i in range(200):\n"
    "        out.append((n, i, random.random()))\n"
    "        if i % 50 == 0: time.sleep(0.001)\n"
    "ts = [threading.Thread(target=work, args=(n,)) for n in range(4)]\n"
    "[t.start() for t in ts]; [t.join() for t in ts]\n"
    "print(hash(tuple(out)), time.time())\n",
]


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two cores to record on one, replay on another"
)
def test_threads_replay_on_another_core(tmp_path: Path) -> None:
    """Threads are switched only at system calls: the interleaving replays, whatever the core."""
    first_core, second_core = sorted(os.sched_getaffinity(0))[:2]
    first = record_and_replay(tmp_path, "threads0", cores=(first_core, second_core), program=THREADED)
    second = record_and_replay(tmp_path, "threads1", cores=(second_core, first_core), program=THREADED)
    assert first[0] != second[0]


PROCESSES = [
    "/bin/busybox",
    "sh",
    "-c",
    'for i in 1 2 3; do /usr/bin/python3 -c "import random, time; print($i, random.random(), time.time())" '
    "| /bin/busybox tr 0-4 5-9; done; echo $(/bin/busybox date +%s%N)",
]


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two cores to record on one, replay on another"
)
def test_processes_replay_on_another_core(tmp_path: Path) -> None:
    """fork, exec, pipes and wait in a recording replay (and each run differs)."""
    first_core, second_core = sorted(os.sched_getaffinity(0))[:2]
    first = record_and_replay(tmp_path, "procs0", cores=(first_core, second_core), program=PROCESSES)
    second = record_and_replay(tmp_path, "procs1", cores=(second_core, first_core), program=PROCESSES)
    assert first[0] != second[0]
    assert first[0].count(b"\n") == 4
