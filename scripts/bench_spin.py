"""CPU-bound guest code: the spin guest (ring 3, no exits while it loops) in the VM against the same loop
built natively for the host (guests/build/spin-native), with the same iteration count. Both print a
checksum, which must match. VM and process set-up and teardown are subtracted: each side runs a short
and a long count, and the figure is the time of the difference in iterations. Runs are interleaved;
medians are reported."""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable

import benchlib
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import StopReason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=400_000_000,
                        help="iterations timed: the long run minus the short run (default 400M)")
    parser.add_argument("--short", type=int, default=100_000_000,
                        help="iterations of the short run (default 100M)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")


def vm_run(iterations: int) -> tuple[float, str]:
    """Seconds from starting the vCPU to the guest's exit, and the guest's console line."""
    image = benchlib.guest_path("spin.elf")
    console = bytearray()
    config = MachineConfig(str(image), 64, None, iterations, hang_timeout_s=600.0)
    machine = builder.build(config, on_console=console.extend)
    try:
        machine.state_digest()  # the first digest hashes all RAM: do it before timing (see bench_exits)
        start = time.perf_counter()
        result = machine.run_blocking(600)
        elapsed = time.perf_counter() - start
    finally:
        machine.close()
    if result.reason is not StopReason.EXITED or result.exit_code != 0:
        raise RuntimeError(f"spin guest: {result.describe()}")
    return elapsed, console.decode(errors="replace")


def native_run(iterations: int) -> tuple[float, str]:
    """Seconds for the spin-native process, and what it printed."""
    start = time.perf_counter()
    proc = subprocess.run([str(benchlib.guest_path("spin-native")), str(iterations)], capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - start, proc.stdout


def checksum(line: str) -> str:
    """The checksum from `spin: iterations=N checksum=X`."""
    for word in line.split():
        if word.startswith("checksum="):
            return word.removeprefix("checksum=")
    raise RuntimeError(f"no checksum in {line!r}")


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    short: int = args.short
    long_ = short + args.iterations
    outputs: dict[tuple[str, int], set[str]] = {}

    def timed(kind: str, fn: Callable[[int], tuple[float, str]]) -> Callable[[], float]:
        def difference() -> float:
            times = []
            for n in (short, long_):
                seconds, text = fn(n)
                outputs.setdefault((kind, n), set()).add(text)
                times.append(seconds)
            return times[1] - times[0]

        return difference

    results = benchlib.interleaved(
        args.rounds, {"vm": timed("vm", vm_run), "native": timed("native", native_run)}
    )
    for n in (short, long_):
        seen = outputs[("vm", n)] | outputs[("native", n)]
        if len(seen) != 1:
            raise RuntimeError(f"spin {n}: the guest and the host printed different lines: {sorted(seen)}")
        checksum(seen.pop())
    return [
        benchlib.Figure(f"spin loop, {args.iterations:,} iterations in the VM",
                        benchlib.median(results["vm"]), "s", benchlib.median(results["native"]),
                        "same loop natively on the host")
    ]
