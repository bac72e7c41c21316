"""Re-protection: a primary whose backup died gets a new backup on another node process, seeded from a
live checkpoint of the primary streamed over gRPC, then the log. Measured for a 256 MiB guest with 16 MiB
touched and with all of it touched (`memtouch`): time from the request to the new backup acknowledging,
the primary's vCPU pause in total, and the bytes streamed.

Reference, in the same process: a full checkpoint of the same guest (same memory size and touch) saved to
a local file by `Checkpointer.save`, i.e. the same work without the network and the remote restore."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib
from monitor.checkpoint import Checkpointer
from monitor import builder
from monitor.config import MachineConfig
from proto import vmft_pb2
from replica.cluster import LocalCluster

RANDOM = 1 << 32  # memtouch's arg bit for incompressible data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--quick", action="store_true", help="a 64 MiB guest, 8 MiB touched (smoke test)")


def _local_checkpoint(image: Path, mem_mib: int, arg: int, workdir: Path) -> tuple[float, float]:
    """Seconds and pause ms of a local full checkpoint of the same guest, once it has touched its memory."""
    machine = builder.build(MachineConfig(str(image), mem_mib))
    machine.start()
    try:
        deadline = time.monotonic() + 60
        while b"touched" not in machine.console_output and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        stats = Checkpointer(machine).save(workdir / "local.vmck", full=True)
        return time.perf_counter() - started, stats.pause_s * 1000
    finally:
        machine.stop()
        machine.wait_blocking(10)
        machine.close()


def _reprotect(image: Path, mem_mib: int, arg: int, workdir: Path) -> tuple[float, float, int]:
    with LocalCluster(workdir / "cluster") as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = cluster.protect(image, a, b, mem_mib=mem_mib, arg=arg)
        cluster.wait_for(b, vm.name, "backup", timeout=60)
        time.sleep(1.0 + mem_mib / 256)  # the guest touches its memory (logged and replayed too)
        cluster.kill_node(b)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = cluster.vm_status(a, vm.name)
            if status is not None and status.state == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED:
                break
            time.sleep(0.02)
        cluster.start_node(b)
        status = cluster.reprotect(vm, a, b)
        return status.reprotect_s, status.reprotect_pause_ms, status.reprotect_bytes


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    image = benchlib.guest_path("memtouch.elf")
    mem = 64 if args.quick else args.mem
    touch = 8 if args.quick else 16
    cases = [(f"{touch} MiB touched", touch)] + ([] if args.quick else [("all touched", mem)])
    figures: list[benchlib.Figure] = []
    for label, touched in cases:
        arg = touched | RANDOM
        with tempfile.TemporaryDirectory(prefix="vmft-bench-reprotect.") as tmp:
            workdir = Path(tmp)
            local_s, local_pause_ms = _local_checkpoint(image, mem, arg, workdir)
            seconds, pause_ms, sent = _reprotect(image, mem, arg, workdir)
        figures += [
            benchlib.Figure(
                f"reprotect {mem} MiB, {label}: time to a new backup", seconds, "s", local_s,
                "local full checkpoint to a file",
            ),
            benchlib.Figure(
                f"reprotect {mem} MiB, {label}: primary paused", pause_ms, "ms", local_pause_ms,
                "pause of the local checkpoint",
            ),
            benchlib.Figure(
                f"reprotect {mem} MiB, {label}: bytes streamed", sent / 2**20, "MiB", mem, "guest RAM (MiB)"
            ),
        ]  # fmt: skip
    return figures
