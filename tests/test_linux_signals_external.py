"""Signals from outside a Linux guest (docs/linux.md, "Signals from outside"): the host's SIGTERM to
`vmft run --linux` and `vmft stop` of a protected Linux VM reach the program as an event of the log, at a
system call or as the end of a wait, and a replay delivers them from the log at the same position."""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux
from proto import vmft_pb2
from replica.cluster import LocalCluster
from test_linux_node import FAILURE_TIMEOUT_MS, console, protect_linux, vmft, wait_status

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0
REDIS = shutil.which("redis-server")

# Prints "ready", then sleeps in a loop; SIGTERM runs the handler, which prints and exits 3.
HANDLES = """
import signal, sys, time
def handler(sig, frame):
    print("handler got", sig, flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, handler)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

# One long sleep: SIGTERM must end it (EINTR), run the handler, and the exit follows at once.
SLEEPS = HANDLES.replace("time.sleep(0.05)", "time.sleep(3600)")

IGNORES = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


class Run:
    """`vmft run --linux ...` as a process: lines of its stdout as they come, its exit."""

    def __init__(self, options: list[str], argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "replica.cli", "run", "--linux", *options, "--", *argv]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.stdout = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout += line
            self.lines.put(line)

    def wait_for(self, text: bytes) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=0.5):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        self.kill()
        raise AssertionError(f"no {text!r} from the program: {bytes(self.stdout)!r}")

    def finish(self) -> tuple[int, bytes]:
        """Its exit status and stderr (bounded)."""
        assert self.proc.stderr is not None
        try:
            self.proc.wait(WAIT_S)  # its stderr is a few lines: the pipe never fills
            stderr = self.proc.stderr.read()
            self._reader.join(WAIT_S)  # stdout to its end
        finally:
            self.kill()
        return self.proc.returncode, stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _layer_with(tmp_path: Path, name: str, text: str) -> Path:
    layer = tmp_path / name
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "prog.py").write_text(text)
    return layer


def _replay(log: Path, layer: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    options = ["--linux", "--layer", str(layer), str(log)]
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", "replay", *options, "--", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )


def test_sigterm_runs_the_handler_and_its_recording_replays_it_from_the_log(tmp_path: Path) -> None:
    layer = _layer_with(tmp_path, "layer", HANDLES)
    shutil.copytree(layer, tmp_path / "replay-layer")  # as the recording began (mtimes too)
    log = tmp_path / "run.log"
    argv = ["/usr/bin/python3", "/tmp/prog.py"]
    run = Run(["--layer", str(layer), "--record", str(log)], argv)
    run.wait_for(b"ready")
    run.proc.send_signal(signal.SIGTERM)
    status, stderr = run.finish()
    assert status == 3, (bytes(run.stdout), stderr)
    assert bytes(run.stdout) == b"ready\nhandler got 15\n"
    # The replay has no host signal: the SIGTERM comes from the log, at the same position, and the run
    # ends in the same state (the final state hash) with the same output.
    replayed = _replay(log, tmp_path / "replay-layer", argv)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "verdict: IDENTICAL" in replayed.stdout and "exit code 3" in replayed.stdout, replayed.stdout


def test_sigterm_ends_a_long_sleep_and_the_replay_ends_it_at_the_same_place(tmp_path: Path) -> None:
    layer = _layer_with(tmp_path, "layer", SLEEPS)
    shutil.copytree(layer, tmp_path / "replay-layer")
    log = tmp_path / "run.log"
    argv = ["/usr/bin/python3", "/tmp/prog.py"]
    run = Run(["--layer", str(layer), "--record", str(log), "--stop-grace", "30"], argv)
    run.wait_for(b"ready")
    time.sleep(0.3)  # into the sleep (not timed: the outcome is the same either way)
    run.proc.send_signal(signal.SIGTERM)
    status, stderr = run.finish()
    assert status == 3, (bytes(run.stdout), stderr)  # not 137: the hour's sleep ended, the handler ran
    assert bytes(run.stdout) == b"ready\nhandler got 15\n"
    replayed = _replay(log, tmp_path / "replay-layer", argv)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "verdict: IDENTICAL" in replayed.stdout and "exit code 3" in replayed.stdout, replayed.stdout


def test_a_program_that_ignores_sigterm_is_stopped_after_the_grace_period(tmp_path: Path) -> None:
    layer = _layer_with(tmp_path, "layer", IGNORES)
    run = Run(["--layer", str(layer), "--stop-grace", "1"], ["/usr/bin/python3", "/tmp/prog.py"])
    run.wait_for(b"ready")
    run.proc.send_signal(signal.SIGTERM)
    status, stderr = run.finish()
    assert status == 128 + signal.SIGKILL, stderr
    assert b"did not exit within 1 s of SIGTERM: stopped" in stderr, stderr


def test_a_second_sigint_stops_the_vm(tmp_path: Path) -> None:
    layer = _layer_with(tmp_path, "layer", IGNORES)
    run = Run(["--layer", str(layer), "--stop-grace", "600"], ["/usr/bin/python3", "/tmp/prog.py"])
    run.wait_for(b"ready")
    run.proc.send_signal(signal.SIGINT)  # ignored by the program
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGINT)
    status, stderr = run.finish()
    assert status == 128 + signal.SIGKILL, stderr
    assert b"got a second SIGINT: stopped" in stderr, stderr


def test_sigterm_without_a_handler_kills_the_program_with_143(tmp_path: Path) -> None:
    """The default action, as on Linux: the program ends with 128+15 and says by what."""
    program = "import time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.02)\n"
    config = LinuxConfig(
        program="/usr/bin/python3", argv=["/usr/bin/python3", "-c", program], layer=tmp_path / "layer"
    )
    personality = LinuxPersonality(config)
    machine = build_linux(personality)
    ready = threading.Event()
    personality.on_stream = lambda _number, data: ready.set() if b"ready" in data else None
    try:
        machine.start()
        assert ready.wait(WAIT_S)
        personality.request_signal(signal.SIGTERM)  # from another thread, as vmft run and a node do
        result = machine.wait_blocking(WAIT_S)
    finally:
        machine.stop()
        machine.close()
        personality.close()
    assert result.exit_code == 128 + signal.SIGTERM, result
    assert personality.fatal is not None and "killed by SIGTERM" in personality.fatal.message


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (scripts/setup)")
def test_redis_stopped_by_sigterm_shuts_down_and_completes_its_aof(tmp_path: Path) -> None:
    assert REDIS is not None
    from test_linux_net import GuestService, redis_cli

    layer = tmp_path / "layer"
    argv = [REDIS, "--port", "6379", "--save", "", "--appendonly", "yes", "--dir", "/tmp"]
    service = GuestService(argv, layer)
    try:
        for i in range(20):
            assert redis_cli(service.address, "SET", f"k{i}", f"v{i}") == "OK"
        # Now redis waits in epoll_wait for clients: the signal ends that wait (EINTR) and its handler
        # schedules the shutdown, which its cron then runs.
        service.proc.send_signal(signal.SIGTERM)
        status, stdout = service.wait()
    finally:
        service.stop()
    assert status == 0, bytes(service.stderr)
    assert b"Received SIGTERM scheduling shutdown" in stdout, stdout[-2000:]
    assert b"ready to exit" in stdout, stdout[-2000:]
    aof = b"".join(p.read_bytes() for p in (layer / "tmp" / "appendonlydir").glob("*.incr.aof"))
    for i in range(20):
        assert f"k{i}\r\n$".encode() in aof and f"v{i}\r\n".encode() in aof, i
    manifest = next((layer / "tmp" / "appendonlydir").glob("*.manifest"))
    assert b"type i" in manifest.read_bytes()


def test_vmft_stop_of_a_linux_pair_runs_the_handler_and_the_backup_replays_it(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", HANDLES])
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        deadline = time.monotonic() + WAIT_S
        while b"ready" not in console(a):
            assert time.monotonic() < deadline, console(a)
            time.sleep(0.05)
        stopped = vmft(cluster, "stop", "vm1", "--node", a.name, "--grace", "20")
        assert stopped.returncode == 0, stopped.stderr
        assert "exit code 3" in stopped.stdout, stopped.stdout
        expected = b"ready\nhandler got 15\n"
        assert console(a) == expected
        ended = wait_status(cluster, b, "replayed to the end", lambda s: s.role == vmft_pb2.ROLE_STOPPED)
        assert "exit code 3" in ended.message, ended.message
        assert console(b) == expected  # the backup's replay ran the same handler


def test_vmft_stop_of_a_pair_whose_program_ignores_sigterm_stops_it_after_the_grace(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", IGNORES])
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        deadline = time.monotonic() + WAIT_S
        while b"ready" not in console(a):
            assert time.monotonic() < deadline, console(a)
            time.sleep(0.05)
        stopped = vmft(cluster, "stop", "vm1", "--node", a.name, "--grace", "1")
        assert stopped.returncode == 0, stopped.stderr
        assert "VM_STATE_STOPPED" in stopped.stdout and "exit code" not in stopped.stdout, stopped.stdout
