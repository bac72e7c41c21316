"""`vmft run --linux` and `vmft replay --linux`: an unmodified Linux program as the guest.

    vmft run --linux [--root DIR] [--mem MiB] [--record LOG] [--service HOST:PORT] -- PROGRAM [ARGS...]
    vmft replay --linux [--root DIR] [--mem MiB] LOG -- PROGRAM [ARGS...]

The program's stdout and stderr are the console, stdin is the console's input, and the exit status is
the program's (128+N after a fatal signal N, with a message on stderr). The writable layer (the guest's
/tmp and /home) is a fresh temporary directory unless --layer names one. With --service, the first
port the program listens on is served at HOST:PORT; a second --service serves the second port it listens
on, and so on (docs/linux.md, "Network").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from monitor.address import parse_address
from monitor.errors import VmftError
from monitor.journal import Journal
from monitor.linux.manifest import check_root_files
from monitor.linux.personality import DEFAULT_ENV, LinuxConfig, LinuxPersonality, build_linux
from monitor.linux.vdso import ClockMode
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import ConnIds, NicServer, transmit_to_all
from monitor.record import DEFAULT_HASH_EVERY, ReplayJournal, open_recording, open_replay

log = logging.getLogger("vmft")

EXIT_GUEST_FAILED = 70
EXIT_DIVERGED = 71
EXIT_USAGE = 2


def wants(argv: list[str]) -> bool:
    """True for `run --linux ...` / `replay --linux ...` (options before `--`)."""
    if not argv or argv[0] not in ("run", "replay"):
        return False
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--linux" in options


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"vmft {command} --linux", description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux", action="store_true", required=True)
    parser.add_argument(
        "--root", metavar="DIR", help="the guest's root tree (default: the host's system directories)"
    )
    parser.add_argument("--mem", type=int, default=512, metavar="MiB", help="guest RAM (default 512)")
    parser.add_argument(
        "--layer", metavar="DIR", help="the writable layer (default: a fresh temporary directory)"
    )
    parser.add_argument("--cwd", default="/", help="the program's working directory (default /)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="add to the environment"
    )
    parser.add_argument(
        "--hang-timeout", type=float, default=60.0, metavar="S", help="hung after S s without a system call"
    )
    parser.add_argument(
        "--clock",
        choices=[m.value for m in ClockMode],
        default=ClockMode.SYSCALL.value,
        help="syscall: every clock read is a system call (default); vdso: reads answered without an exit "
        "from a time page that moves only at system calls (docs/linux.md). Replay with the same choice",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    if command == "run":
        parser.add_argument("--record", metavar="LOG", help="record the nondeterministic event log to LOG")
        parser.add_argument("--hash-every", type=int, default=DEFAULT_HASH_EVERY, metavar="N")
        parser.add_argument(
            "--stop-grace",
            type=float,
            default=10.0,
            metavar="S",
            help="the host's SIGTERM/SIGINT/SIGHUP go to the program; if it has not exited S s later "
            "(or at a second SIGINT) the VM is stopped (default 10)",
        )
        parser.add_argument(
            "--service",
            type=parse_address,
            action="append",
            default=[],
            metavar="HOST:PORT",
            help="serve the first port the program listens on at HOST:PORT (port 0: any free port); "
            "repeated, the next ports in the order the program listens on them",
        )
    else:
        parser.add_argument("log", help="event log written by `vmft run --linux --record`")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    return parser


def _config(args: argparse.Namespace, layer: Path) -> LinuxConfig:
    argv = [a for a in args.program]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("vmft: name the program to run after --")
    env = list(DEFAULT_ENV)
    for item in args.env:
        name = item.split("=", 1)[0]
        env = [e for e in env if not e.startswith(name + "=")] + [item]
    return LinuxConfig(
        program=argv[0],
        argv=argv,
        layer=layer,
        root=args.root,
        env=env,
        cwd=args.cwd,
        mem_mib=args.mem,
        hang_timeout_s=args.hang_timeout,
        clock=ClockMode.parse(args.clock),
        stdin_fd=sys.stdin.fileno() if args.command == "run" else None,
    )


def _write_stream(number: int, data: bytes) -> None:
    os.write(number, data)


def run(args: argparse.Namespace, layer: Path) -> int:
    personality = LinuxPersonality(_config(args, layer))
    journal: Journal | None = None
    if args.record:
        journal = open_recording(args.record, personality.image, args.mem << 20, args.hash_every)
    machine = build_linux(personality, journal)
    personality.on_stream = _write_stream
    forwarder = SignalForwarder(machine, personality, args.stop_grace)
    try:
        result = asyncio.run(_serve(machine, args.service, forwarder))
    finally:
        machine.close()
        personality.close()
    if personality.fatal is not None:
        print(f"vmft: {personality.program_path} {personality.fatal.message}", file=sys.stderr)
    if result.reason is StopReason.EXITED and result.exit_code is not None:
        return result.exit_code & 0xFF
    if result.reason is StopReason.STOPPED and forwarder.stopped_hard is not None:
        print(f"vmft: {personality.program_path} {forwarder.stopped_hard}: stopped", file=sys.stderr)
        return 128 + signal.SIGKILL
    if result.reason is StopReason.STOPPED:
        return 128 + signal.SIGINT
    print(f"vmft: guest {result.describe()}", file=sys.stderr)
    return EXIT_DIVERGED if result.reason is StopReason.DIVERGED else EXIT_GUEST_FAILED


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalForwarder:
    """The host's SIGTERM, SIGINT and SIGHUP to this process become the program's, through the log
    (monitor/linux/control.py: an event at its next system call, replayed from the log). The program
    then ends as it would on Linux (its handler, or the default action); a second SIGINT, or the grace
    period passing after the first signal, stops the machine from outside instead."""

    def __init__(self, machine: Machine, personality: LinuxPersonality, grace_s: float) -> None:
        self.machine = machine
        self.personality = personality
        self.grace_s = grace_s
        self.stopped_hard: str | None = None  # why the machine was stopped from outside
        self._interrupts = 0
        self._timer: asyncio.TimerHandle | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, loop, sig)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in FORWARDED:
            loop.remove_signal_handler(sig)
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self._stop_hard("got a second SIGINT")
                return
        log.info("forwarding %s to %s", sig.name, self.personality.program_path)
        self.personality.request_signal(int(sig))
        if self._timer is None:
            why = f"did not exit within {self.grace_s:g} s of {sig.name}"
            self._timer = loop.call_later(self.grace_s, self._stop_hard, why)

    def _stop_hard(self, why: str) -> None:
        if self.stopped_hard is None:
            self.stopped_hard = why
        self.machine.stop()


async def _serve(
    machine: Machine, services: list[tuple[str, int]], forwarder: SignalForwarder
) -> MachineResult:
    """Run the machine with the host side of the guest's listening ports at its service addresses (raw
    TCP: connections, bytes and closes become the guest's events; its writes come back as outputs)."""
    ids = ConnIds()
    servers = [
        NicServer(machine.net_backend, host, port, framed=False, service=index, ids=ids)
        for index, (host, port) in enumerate(services)
    ]
    transmit_to_all(machine.net_backend, servers)
    try:
        for server in servers:
            host, port = await server.start()
            print(f"vmft: service on {host}:{port}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        forwarder.install(loop)
        try:
            machine.start()
            return await machine.wait()
        finally:
            forwarder.remove(loop)
    finally:
        for server in servers:
            await server.close()


def replay(args: argparse.Namespace, layer: Path) -> int:
    personality = LinuxPersonality(_config(args, layer))
    journal: ReplayJournal = open_replay(args.log, personality.image, args.mem << 20)
    checked = check_root_files(args.log, personality.fs)  # refuses a different root before replaying
    log.info("%d root files match the recording", checked)
    machine = build_linux(personality, journal)
    started = time.monotonic()
    try:
        result = machine.run_blocking()
    finally:
        machine.close()
        personality.close()
    stats = journal.stats
    print(
        f"replayed {result.position} positions in {time.monotonic() - started:.2f} s: {stats.events} events "
        f"applied, {stats.outputs} outputs and {stats.state_hashes} state hashes verified"
    )
    if result.reason is StopReason.DIVERGED:
        print(f"verdict: DIVERGED: {result.message}")
        return EXIT_DIVERGED
    if (
        result.reason is StopReason.ERROR
        or journal.end_position is None
        or result.position != journal.end_position
    ):
        print(f"verdict: INCOMPLETE: {result.message or result.describe()}")
        return 1
    print(f"verdict: IDENTICAL to the recording (guest {stats.end_reason}: {result.describe()})")
    return 0


def main(argv: list[str]) -> int:
    command = argv[0]
    args = _parser(command).parse_args(argv[1:])
    args.command = command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else os.environ.get("VMFT_LOG", "WARNING").upper(),
        format="vmft: %(levelname)s %(name)s: %(message)s",
    )
    temporary = args.layer is None
    layer = Path(tempfile.mkdtemp(prefix="vmft-linux-")) if temporary else Path(args.layer)
    try:
        return run(args, layer) if command == "run" else replay(args, layer)
    except VmftError as err:
        hint = f" ({err.hint})" if err.hint else ""
        print(f"vmft: {err}{hint}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if temporary:
            shutil.rmtree(layer, ignore_errors=True)
