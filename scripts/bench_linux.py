"""Linux programs under the monitor (the Linux personality) against the same programs natively.

- `linux syscall round trip`: getpid in a Python loop in the VM, per call (a long run minus a short run,
  so start-up cancels), against one ring-3 port-I/O exit of the exitloop guest under the full monitor
  (what a system call costs at the least: the exit itself).
- `linux cpu-bound python`: a pure-Python function timed by itself inside the VM and natively.
- `linux python startup`: `python3 -c pass`, whole VM (build, load, run, close) against a process.
- `linux sqlite insert`: the sqlite3 command line inserting 10,000 rows in one transaction into a file in
  the writable layer (whole run), against the same natively.
Runs are interleaved; medians are reported."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_exits
import benchlib
from monitor.linux.personality import DEFAULT_ENV, LinuxConfig, LinuxPersonality, build_linux
from monitor.machine import StopReason

PYTHON = "/usr/bin/python3"
CPU_FUNCTION = (
    "import time\n"
    "def work(n):\n"
    "    total = 0\n"
    "    for i in range(n):\n"
    "        total = (total + i * i) % 1000003\n"
    "    return total\n"
    "t = time.perf_counter(); r = work({n}); print(time.perf_counter() - t, r)\n"
)
GETPID_LOOP = "import os\nfor _ in range({n}): os.getpid()\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--calls", type=int, default=20000, help="getpid calls timed (default 20000)")
    parser.add_argument(
        "--cpu", type=int, default=30_000_000, help="loop count of the Python function (~2 s)"
    )
    parser.add_argument("--rows", type=int, default=10_000, help="rows sqlite inserts (default 10000)")


def vm(argv: list[str], layer: Path | None = None) -> tuple[float, bytes]:
    """Wall seconds of a whole VM run (build, load, run, close) and its stdout."""
    start = time.perf_counter()
    layer = layer or Path(tempfile.mkdtemp(prefix="vmft-bench-linux-"))
    personality = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=layer, hang_timeout_s=600.0))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda number, data: out.extend(data) if number == 1 else None
    try:
        result = machine.run_blocking(600)
    finally:
        machine.close()
        personality.close()
    if result.reason is not StopReason.EXITED or result.exit_code != 0:
        raise RuntimeError(f"{argv}: {result.describe()}")
    return time.perf_counter() - start, bytes(out)


def native(argv: list[str]) -> tuple[float, bytes]:
    env = dict(item.split("=", 1) for item in DEFAULT_ENV)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=True, cwd="/")
    return time.perf_counter() - start, proc.stdout


def sqlite_script(rows: int) -> str:
    inserts = "\n".join(f"insert into t(name, v) values ('n{i % 97}', {i} * 0.5);" for i in range(rows))
    return (
        "create table t(id integer primary key, name text, v real);\nbegin;\n"
        + inserts
        + "\ncommit;\nselect count(*), sum(v) from t;\n"
    )


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    calls: int = args.calls
    short = max(calls // 10, 1)

    def getpid_vm() -> float:
        long_s = vm([PYTHON, "-c", GETPID_LOOP.format(n=short + calls)])[0]
        short_s = vm([PYTHON, "-c", GETPID_LOOP.format(n=short)])[0]
        return (long_s - short_s) / calls * 1e6

    def exit_reference() -> float:
        return bench_exits.monitor_run(5000)

    def cpu(side: Callable[[list[str]], tuple[float, bytes]]) -> Callable[[], float]:
        def timed() -> float:
            out = side([PYTHON, "-c", CPU_FUNCTION.format(n=args.cpu)])[1].split()
            results.setdefault("cpu-answers", []).append(float(out[1]))
            return float(out[0])

        return timed

    work = Path(tempfile.mkdtemp(prefix="vmft-bench-sqlite-"))
    (work / "home" / "guest").mkdir(parents=True)
    (work / "home" / "guest" / "load.sql").write_text(sqlite_script(args.rows))
    (work / "load.sql").write_text(sqlite_script(args.rows))

    def sqlite_vm() -> float:
        (work / "home" / "guest" / "db.sqlite").unlink(missing_ok=True)
        return vm(["/usr/bin/sqlite3", "/home/guest/db.sqlite", ".read /home/guest/load.sql"], work)[0]

    def sqlite_native() -> float:
        (work / "native.sqlite").unlink(missing_ok=True)
        return native(["/usr/bin/sqlite3", str(work / "native.sqlite"), f".read {work / 'load.sql'}"])[0]

    results: dict[str, list[float]] = {}
    vm([PYTHON, "-c", "pass"])  # warm up: the cpuid-site cache, the page cache
    results.update(
        benchlib.interleaved(
            args.rounds,
            {
                "getpid": getpid_vm,
                "exit": exit_reference,
                "cpu-vm": cpu(vm),
                "cpu-native": cpu(native),
                "start-vm": lambda: vm([PYTHON, "-c", "pass"])[0],
                "start-native": lambda: native([PYTHON, "-c", "pass"])[0],
                "sqlite-vm": sqlite_vm,
                "sqlite-native": sqlite_native,
            },
        )
    )
    if len(set(results["cpu-answers"])) != 1:
        raise RuntimeError(f"the Python function gave different answers: {set(results['cpu-answers'])}")
    m = benchlib.median
    return [
        benchlib.Figure(
            "linux syscall round trip",
            m(results["getpid"]),
            "us",
            m(results["exit"]),
            "ring-3 port-I/O exit, full monitor",
        ),  # fmt: skip
        benchlib.Figure(
            "linux cpu-bound python",
            m(results["cpu-vm"]),
            "s",
            m(results["cpu-native"]),
            "same function natively",
        ),  # fmt: skip
        benchlib.Figure(
            "linux python startup",
            m(results["start-vm"]),
            "s",
            m(results["start-native"]),
            "python3 -c pass natively",
        ),  # fmt: skip
        benchlib.Figure(
            "linux sqlite insert",
            m(results["sqlite-vm"]),
            "s",
            m(results["sqlite-native"]),
            f"sqlite3, {args.rows} rows, natively",
        ),  # fmt: skip
    ]
