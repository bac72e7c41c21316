"""Cost of one port-I/O exit: the exitloop guest under the full monitor against the same guest, in the
same VM set-up, driven by the tightest C loop on KVM_RUN (scripts/bench_exits.c), and by a bare Python
KVM_RUN loop (no device dispatch). Runs are interleaved; medians are reported."""

from __future__ import annotations

import argparse
import ctypes
import struct
import time
from collections.abc import Callable

import benchlib
from monitor import guest_abi as g
from monitor.journal import Journal
from monitor.kvm_abi import RUN_IO_OFFSET, ExitReason
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import Machine, StopReason

NOP_PORT = int(g.Port.NOP)
EXIT_PORT = int(g.Port.POWER_EXIT)
_IO = struct.Struct("<BBHIQ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exits", type=int, default=5000, help="NOP exits per run (default 5000)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare Python KVM_RUN loop")


def new_machine(exits: int, journal: Journal | None = None) -> Machine:
    """The exitloop guest loaded into a fresh VM: the same set-up for every driver."""
    config = MachineConfig(str(benchlib.guest_path("exitloop.elf")), 64, None, exits, 30.0)
    return builder.build(config, journal=journal)


def monitor_run(exits: int, journal_factory: Callable[[], Journal] | None = None) -> float:
    """µs per exit under Machine.run_blocking (full device dispatch, its own vCPU thread)."""
    machine = new_machine(exits, journal_factory() if journal_factory else None)
    # The first state digest hashes every page of guest RAM (about 0.15 s for 64 MiB here): a once-per-VM
    # cost that the final digest at the end of a run would otherwise charge to this run's exits.
    machine.state_digest()
    try:
        start = time.perf_counter()
        result = machine.run_blocking(120)
        elapsed = time.perf_counter() - start
    finally:
        machine.close()
    if result.reason is not StopReason.EXITED or result.exit_code != 0 or result.position < exits:
        raise RuntimeError(f"exitloop under the monitor: {result.describe()}")
    return elapsed / result.position * 1e6


def c_run(exits: int) -> float:
    """µs per exit from the C loop (scripts/bench_exits.c) on the same machine's vCPU."""
    loop = benchlib.load_c_exit_loop()
    machine = new_machine(exits)
    try:
        start = time.perf_counter()
        count = loop(machine.vcpu.fd, ctypes.addressof(machine.vcpu.run), NOP_PORT, EXIT_PORT, exits + 10)
        elapsed = time.perf_counter() - start
    finally:
        machine.close()
    if count != exits:
        raise RuntimeError(f"C exit loop returned {count}, expected {exits}")
    return elapsed / (count + 1) * 1e6  # +1: the exit to EXIT_PORT, as the monitor counts it


def bare_python_run(exits: int) -> float:
    """µs per exit from a bare Python KVM_RUN loop: one ctypes ioctl and one unpack per exit."""
    machine = new_machine(exits)
    vcpu = machine.vcpu
    run_once, run, buf, unpack = vcpu.run_once, vcpu.run, vcpu.run_buffer, _IO.unpack_from
    exit_io = int(ExitReason.IO)
    count = 0
    try:
        start = time.perf_counter()
        while True:
            err = run_once()
            if err or run.exit_reason != exit_io:
                raise RuntimeError(f"bare loop: errno {err}, exit reason {run.exit_reason}")
            port = unpack(buf, RUN_IO_OFFSET)[2]
            if port == NOP_PORT:
                count += 1
            elif port == EXIT_PORT:
                break
            else:
                raise RuntimeError(f"bare loop: exit to port {port:#x}")
        elapsed = time.perf_counter() - start
    finally:
        machine.close()
    if count != exits:
        raise RuntimeError(f"bare loop counted {count} exits, expected {exits}")
    return elapsed / (count + 1) * 1e6


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    exits: int = args.exits
    runs: dict[str, Callable[[], float]] = {
        "monitor": lambda: monitor_run(exits),
        "c": lambda: c_run(exits),
    }
    if not args.no_bare:
        runs["bare"] = lambda: bare_python_run(exits)
    c_run(min(exits, 1000))  # warm up: build/load the C library, first VM
    results = benchlib.interleaved(args.rounds, runs)
    c = benchlib.median(results["c"])
    figures = [
        benchlib.Figure(
            "exit cost, monitor (full dispatch)", benchlib.median(results["monitor"]), "us/exit", c, "C loop"
        )
    ]
    if "bare" in results:
        figures.append(
            benchlib.Figure("exit cost, bare Python KVM_RUN loop", benchlib.median(results["bare"]),
                            "us/exit", c, "C loop")
        )
    return figures
