"""A checkpoint of a running Linux program restores and finishes with the same output."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from monitor.checkpoint.take import Checkpointer
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.machine import StopReason

pytestmark = pytest.mark.kvm

PROGRAM = (
    "import os, random\n"
    "random.seed(7)\n"
    "os.makedirs('/tmp/work', exist_ok=True)\n"
    "log = open('/tmp/work/log.txt', 'w')\n"
    "for i in range(30):\n"
    "    s = sum(j * j for j in range(1_000_000)) + random.randrange(1000)\n"
    "    log.write(f'{i} {s}\\n'); log.flush()\n"
    "    print(i, s, flush=True)\n"
    "log.close()\n"
    "print('lines', len(open('/tmp/work/log.txt').read().splitlines()))\n"
)
WAIT_S = 60


def _run_with_checkpoint(
    argv: list[str], layer: Path, checkpoint: Path, lines: int, poll_s: float
) -> tuple[bytes, int]:
    """Run `argv` live, checkpoint it once it has printed `lines` lines, and run it to its end: its whole
    output, and how much of it came before the checkpoint."""
    personality = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=layer))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data)
    at_checkpoint: list[int] = []
    try:
        machine.start()
        deadline = time.monotonic() + WAIT_S
        while out.count(b"\n") < lines and time.monotonic() < deadline and machine.is_running():
            time.sleep(poll_s)
        assert machine.is_running(), "the program finished before the checkpoint"
        Checkpointer(machine).save(checkpoint, on_paused=lambda position: at_checkpoint.append(len(out)))
        result = machine.wait_blocking(WAIT_S)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    return bytes(out), at_checkpoint[0]


def _finish_restored(argv: list[str], layer: Path, checkpoint: Path) -> bytes:
    """Restore `checkpoint` into a fresh personality on `layer` and run it to its end: what it printed."""
    again = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=layer))
    restored = restore_linux(again, checkpoint)
    rest = bytearray()
    again.on_stream = lambda number, data: rest.extend(data)
    try:
        result = restored.run_blocking(WAIT_S)
    finally:
        restored.close()
        again.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    return bytes(rest)


def test_checkpoint_of_a_running_python_restores_and_finishes(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    argv = ["/usr/bin/python3", "-c", PROGRAM]
    checkpoint = tmp_path / "running.ckpt"
    restored_layer = tmp_path / "restored-layer"  # a fresh layer: the checkpoint carries the files
    full, at_checkpoint = _run_with_checkpoint(argv, layer, checkpoint, lines=5, poll_s=0.01)
    assert full.endswith(b"lines 30\n")
    before = full[:at_checkpoint]
    assert 5 <= before.count(b"\n") < 30
    assert before + _finish_restored(argv, restored_layer, checkpoint) == full
    assert (restored_layer / "tmp" / "work" / "log.txt").read_bytes() == (
        layer / "tmp" / "work" / "log.txt"
    ).read_bytes()


THREADED = (
    "import threading, queue, time\n"
    "q = queue.Queue()\n"
    "def producer(n):\n"
    "    for i in range(25):\n"
    "        sum(j * j for j in range(120_000))\n"
    "        q.put((n, i))\n"
    "        time.sleep(0.001)\n"
    "threads = [threading.Thread(target=producer, args=(n,)) for n in range(3)]\n"
    "[t.start() for t in threads]\n"
    "got = []\n"
    "while len(got) < 75:\n"
    "    got.append(q.get())\n"
    "    if len(got) % 5 == 0: print(len(got), flush=True)\n"
    "[t.join() for t in threads]\n"
    "print('done', sorted(got) == sorted((n, i) for n in range(3) for i in range(25)))\n"
)


def test_checkpoint_of_a_threaded_program_restores_and_finishes(tmp_path: Path) -> None:
    argv = ["/usr/bin/python3", "-c", THREADED]
    checkpoint = tmp_path / "threads.ckpt"
    full, at_checkpoint = _run_with_checkpoint(argv, tmp_path / "layer", checkpoint, lines=3, poll_s=0.005)
    assert full.endswith(b"done True\n")
    assert full[:at_checkpoint] + _finish_restored(argv, tmp_path / "layer2", checkpoint) == full
