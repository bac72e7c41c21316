"""Shared pieces of vmft's benchmarks (scripts/bench NAME).

A benchmark is a module scripts/bench_NAME.py with `run(args: argparse.Namespace) -> list[Figure]` and,
optionally, `add_arguments(parser: argparse.ArgumentParser) -> None` for its own options. Every figure is
printed beside a reference figure measured in the same process (docs/design.md), so that the ratio
survives a noisy machine.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
BENCH_EXITS_SRC = SCRIPTS / "bench_exits.c"
BENCH_EXITS_LIB = ROOT / "build" / "libbench_exits.so"


@dataclass(frozen=True)
class Figure:
    """One measured figure and its reference. `ratio` = value / reference (nan without a reference)."""

    name: str
    value: float
    unit: str
    reference: float
    reference_name: str
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        ratio = self.value / self.reference if self.reference else math.nan
        object.__setattr__(self, "ratio", ratio)

    def to_json(self) -> str:
        def num(x: float) -> float | None:
            return None if math.isnan(x) or math.isinf(x) else x

        return json.dumps(
            {
                "name": self.name,
                "value": num(self.value),
                "unit": self.unit,
                "reference": num(self.reference),
                "ratio": num(self.ratio),
            }
        )


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if x == 0 or 0.01 <= abs(x) < 1e7:
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.3e}"


def format_table(figures: Iterable[Figure]) -> str:
    """The readable table: figure, value, unit, reference (with its name), ratio."""
    rows = [("figure", "value", "unit", "reference", "ratio", "reference is")]
    for f in figures:
        rows.append((f.name, _fmt(f.value), f.unit, _fmt(f.reference), _fmt(f.ratio), f.reference_name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4}
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(figures: list[Figure], as_json: bool = False, out: TextIO | None = None) -> None:
    """Print figures: the table, or with as_json one JSON object per line per figure."""
    import sys

    stream = out if out is not None else sys.stdout
    if as_json:
        for f in figures:
            stream.write(f.to_json() + "\n")
    else:
        stream.write(format_table(figures) + "\n")
    stream.flush()


# --- measuring on a noisy machine ------------------------------------------------------------------------

GUEST_BUILD = ROOT / "guests" / "build"


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def guest_path(name: str) -> Path:
    """guests/build/NAME (NAME.elf for a guest image); fails clearly if it is not built."""
    path = GUEST_BUILD / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is not built: run scripts/setup")
    return path


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0..100) by nearest rank."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


def interleaved(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Call every run once per round, alternating their order from round to round (so that neither side
    always goes first on a machine shared with other work); each run's results, in round order."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(runs[name]())
    return results


# --- the C reference for the exit benchmark --------------------------------------------------------------

ExitLoop = Callable[[int, int, int, int, int], int]


def build_c_exit_loop(force: bool = False) -> Path:
    """Compile scripts/bench_exits.c into build/libbench_exits.so unless it is up to date."""
    lib = BENCH_EXITS_LIB
    if force or not lib.exists() or lib.stat().st_mtime < BENCH_EXITS_SRC.stat().st_mtime:
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".so.tmp")
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(tmp)]
        subprocess.run([*cmd, str(BENCH_EXITS_SRC)], check=True)
        tmp.replace(lib)
    return lib


def load_c_exit_loop() -> ExitLoop:
    """`vmft_c_exit_loop(vcpu_fd, kvm_run_addr, nop_port, exit_port, max_exits) -> int` from C.

    Returns the count of exits to nop_port before an exit to exit_port (or max_exits), -(exit_reason+1000)
    on another exit, -errno if KVM_RUN failed. kvm_run_addr is the address of the vCPU's mmap'ed kvm_run
    (for example `ctypes.addressof(ctypes.c_char.from_buffer(run_mmap))`). The GIL is released meanwhile.
    """
    lib = ctypes.CDLL(str(build_c_exit_loop()), use_errno=True)
    fn = lib.vmft_c_exit_loop
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_long]
    fn.restype = ctypes.c_long

    def exit_loop(vcpu_fd: int, kvm_run_addr: int, nop_port: int, exit_port: int, max_exits: int) -> int:
        return int(fn(vcpu_fd, kvm_run_addr, nop_port, exit_port, max_exits))

    return exit_loop


# --- discovery -------------------------------------------------------------------------------------------


def benchmark_names() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in SCRIPTS.glob("bench_*.py"))
