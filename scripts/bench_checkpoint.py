"""Checkpoints of a 256 MiB memtouch guest (guests/programs/memtouch.c) with 16 MiB touched and with all of
it touched, idle in WAIT (monitor.checkpoint: pre-copy, zstd in chunks, files in a temporary directory):

- vCPU pause time of a full checkpoint (both pauses) and of an incremental one, against the 20 ms target;
- save throughput (guest RAM per second of checkpoint) against zstd level 1 on one thread compressing the
  same memory in place, in this process;
- size against the touched memory, and compression ratio;
- restore time to running (monitor.builder.restore + Machine.start) against the 20 ms target;
- restart from the checkpoint against a cold boot of the same guest to the same point (its console line).
Medians of --repeat runs (and the best restore: the floor on a quiet core)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import benchlib
import zstandard

from monitor import builder
from monitor.checkpoint import Checkpointer
from monitor.loader import load_image_file
from monitor.config import MachineConfig
from monitor.machine import Machine

TARGET_PAUSE_S = 0.020
TARGET_RESTORE_S = 0.020
MEMTOUCH_BASE = 8 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem", type=int, default=256, metavar="MiB", help="guest RAM (default 256)")
    parser.add_argument("--touched", default="16,all", help="MiB touched, comma-separated (default 16,all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--random", action="store_true", help="incompressible data instead of the pattern")
    parser.add_argument("--threads", type=int, default=2, help="zstd threads (default 2)")


def cold_boot(config: MachineConfig) -> tuple[Machine, float]:
    """Boot memtouch until its console line (it has touched its memory and idles); returns it running."""
    ready = threading.Event()
    started = time.perf_counter()
    machine = builder.build(config, on_console=lambda data: ready.set())
    machine.start()
    if not ready.wait(120):
        machine.close()
        raise RuntimeError("memtouch did not report")
    return machine, time.perf_counter() - started


def reference_compress(machine: Machine, touched: int) -> tuple[float, int]:
    """zstd level 1 on one thread over the touched memory in 256 KiB chunks, in place: (seconds, bytes)."""
    cctx = zstandard.ZstdCompressor(level=1)
    mem = machine.memory.buffer()
    end = min(machine.memory.size, MEMTOUCH_BASE + touched)
    size = 0
    started = time.perf_counter()
    for offset in range(MEMTOUCH_BASE, end, 256 << 10):
        size += len(cctx.compress(mem[offset : offset + (256 << 10)]))
    return time.perf_counter() - started, size


def scenario(args: argparse.Namespace, touched_mib: int, label: str, tmp: Path) -> list[benchlib.Figure]:
    image = load_image_file(str(benchlib.ROOT / "guests" / "build" / "memtouch.elf"))
    arg = touched_mib | ((1 << 32) if args.random else 0)
    config = MachineConfig(image.path, args.mem, None, arg, 5.0)
    mem_size = args.mem << 20
    touched = min(touched_mib << 20, mem_size - MEMTOUCH_BASE)
    boots, pauses, incr_pauses, totals, sizes, raws, restores = [], [], [], [], [], [], []
    refs: list[tuple[float, int]] = []
    for run in range(args.repeat):
        machine, boot_s = cold_boot(config)
        boots.append(boot_s)
        try:
            path = tmp / f"{label}-{run}.vmck"
            checkpointer = Checkpointer(machine, threads=args.threads)
            stats = checkpointer.save(path, full=True)
            pauses.append(stats.pause_s)
            totals.append(stats.total_s)
            sizes.append(stats.stored_bytes)
            raws.append(stats.raw_bytes)
            incr = checkpointer.save(tmp / f"{label}-{run}-incr.vmck")
            incr_pauses.append(incr.pause_s)
            refs.append(reference_compress(machine, touched))
        finally:
            machine.stop()
            machine.wait_blocking(10)
            machine.close()
        started = time.perf_counter()
        restored, _ = builder.restore(path, image=image)
        restored.start()
        restores.append(time.perf_counter() - started)
        restored.stop()
        restored.wait_blocking(10)
        restored.close()
    med = statistics.median
    total = med(totals)
    size = med(sizes)
    ref_s = med(r[0] for r in refs)
    ref_ratio = touched / med(r[1] for r in refs)
    return [
        benchlib.Figure(f"{label}: vCPU pause, full checkpoint", med(pauses) * 1e3, "ms",
                        TARGET_PAUSE_S * 1e3, "target"),
        benchlib.Figure(f"{label}: vCPU pause, incremental (idle guest)", med(incr_pauses) * 1e3, "ms",
                        TARGET_PAUSE_S * 1e3, "target"),
        benchlib.Figure(f"{label}: save throughput (guest RAM / checkpoint time)", mem_size / total / 2**20,
                        "MiB/s", touched / ref_s / 2**20, "zstd -1, one thread, touched memory in place"),
        benchlib.Figure(f"{label}: full checkpoint time", total * 1e3, "ms", ref_s * 1e3,
                        "zstd -1, one thread, touched memory in place"),
        benchlib.Figure(f"{label}: checkpoint size", size / 2**20, "MiB", touched / 2**20, "touched memory"),
        benchlib.Figure(f"{label}: compression ratio (raw carried / stored)", med(raws) / size, "x",
                        ref_ratio, "zstd -1, one thread, touched memory in place"),
        benchlib.Figure(f"{label}: restore to running", med(restores) * 1e3, "ms", TARGET_RESTORE_S * 1e3,
                        "target"),
        benchlib.Figure(f"{label}: restore to running, best run", min(restores) * 1e3, "ms",
                        TARGET_RESTORE_S * 1e3, "target"),
        benchlib.Figure(f"{label}: restart from checkpoint", med(restores) * 1e3, "ms", med(boots) * 1e3,
                        "cold boot to the same point"),
    ]


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    figures: list[benchlib.Figure] = []
    with tempfile.TemporaryDirectory(prefix="vmft-bench-ckpt-") as tmp:
        for item in args.touched.split(","):
            item = item.strip()
            if item == "all":
                mib, label = args.mem, f"{args.mem} MiB guest, all touched"
            else:
                mib, label = int(item), f"{args.mem} MiB guest, {item} MiB touched"
            figures += scenario(args, mib, label, Path(tmp))
    return figures
