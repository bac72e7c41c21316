"""What every `vmft` command shares: exit statuses, the console, and how an error is told to the user."""

from __future__ import annotations

import asyncio
import signal
import sys

from monitor.errors import VmftError
from monitor.machine import Machine, MachineResult, StopReason

EXIT_USAGE = 2  # the user asked for something that cannot work (bad option, bad file)
EXIT_UNREACHABLE = 3  # a node, service or socket did not answer
EXIT_GUEST_FAILED = 70  # the guest crashed, panicked or hung
EXIT_DIVERGED = 71


def result_exit_status(result: MachineResult) -> int:
    if result.reason is StopReason.EXITED and result.exit_code is not None:
        return result.exit_code & 0xFF
    if result.reason is StopReason.STOPPED:
        return 0
    if result.reason is StopReason.DIVERGED:
        return EXIT_DIVERGED
    return EXIT_GUEST_FAILED


def write_console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def error_line(err: BaseException) -> str:
    """One line for the user: what went wrong and, for vmft's own errors, what to do about it."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    hint = err.hint if isinstance(err, VmftError) else ""
    return f"vmft: error: {text}" + (f" ({hint})" if hint else "")


def fail(message: str, status: int = EXIT_USAGE) -> int:
    """Print one error line and return the exit status (for `return fail(...)` in a command)."""
    print(f"vmft: error: {message}", file=sys.stderr)
    return status


async def run_until_stopped(machine: Machine) -> MachineResult:
    """Start `machine` and wait until it stops; SIGINT/SIGTERM stop it cleanly at a synchronous exit."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, machine.stop)
    try:
        machine.start()
        return await machine.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
