"""Running a program under the Linux personality and natively, for the tests/test_linux_*.py files."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monitor.journal import Journal
from monitor.linux.personality import DEFAULT_ENV, LinuxConfig, LinuxPersonality, build_linux
from monitor.machine import MachineResult, StopReason

RUN_TIMEOUT_S = 120


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    status: int
    result: MachineResult | None = None
    fatal: str = ""
    digest: bytes = b""


def run_guest(
    argv: list[str],
    layer: Path | None = None,
    journal: Callable[[LinuxPersonality], Journal] | None = None,
    root: str | None = None,
    cwd: str = "/",
    mem_mib: int = 512,
) -> Outcome:
    """Run `argv` in a Linux VM (in this process) and collect its streams and status."""
    layer = layer or Path(tempfile.mkdtemp(prefix="vmft-linux-test-"))
    config = LinuxConfig(program=argv[0], argv=argv, layer=layer, root=root, cwd=cwd, mem_mib=mem_mib)
    personality = LinuxPersonality(config)
    machine = build_linux(personality, journal(personality) if journal else None)
    streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    personality.on_stream = lambda number, data: streams[number].extend(data)
    try:
        result = machine.run_blocking(RUN_TIMEOUT_S)
        digest = machine.state_digest()  # memory, registers and every component (the personality too)
    finally:
        machine.close()
        personality.close()
    status = result.exit_code if result.reason is StopReason.EXITED and result.exit_code is not None else -1
    fatal = personality.fatal.message if personality.fatal else ""
    return Outcome(bytes(streams[1]), bytes(streams[2]), status, result, fatal, digest)


def run_native(argv: list[str], cwd: str = "/", layer: Path | None = None) -> Outcome:
    """The same program on the host, with the guest's environment."""
    env = dict(item.split("=", 1) for item in DEFAULT_ENV)
    if layer is not None:
        env["HOME"] = str(layer / "home" / "guest")
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL
    )
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return Outcome(proc.stdout, proc.stderr, status)


def have(path: str) -> bool:
    return os.access(path, os.X_OK)
