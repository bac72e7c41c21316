"""The kv load for benchmarks: scripts/kvload.c (built into build/kvload by scripts/setup, or here on first
use), a C epoll load generator, so that the client is never what a benchmark measures; and the native kv
reference (guests/build/kv-host: guests/programs/kv.c built for the host over guests/host/host_runtime.c).

    result = kvload.run(["127.0.0.1:7000"], connections=32, seconds=4, cpu=1)
    result.rate, result.latency(99)            # req/s; seconds
    ceiling = kvload.run_ceiling(32, 2.0)      # the generator against its own trivial echo server

`run` blocks; `run_async` awaits the child process (for benchmarks whose VM serves on this event loop);
`start` returns a handle to poll while the load runs. Each answer is a LoadResult; a failed run (refused
port, a connection closed, an ERR reply, the hard deadline) raises LoadError with kvload's own message.

The history checker (replica/workload.py) needs a record per operation, which this generator does not keep:
benchmarks and campaigns that check histories keep the Python workload.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import select
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import PeerError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "scripts" / "kvload.c"
BINARY = ROOT / "build" / "kvload"
KV_HOST = ROOT / "guests" / "build" / "kv-host"
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
_GRACE = 30.0  # beyond kvload's own hard deadline, before the wrapper gives up on the child


class LoadError(PeerError):
    """The load generator could not complete its run (the kv service refused, broke or answered ERR)."""


def build(force: bool = False) -> Path:
    """Compile scripts/kvload.c into build/kvload unless it is up to date (scripts/setup does the same)."""
    if force or not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        tmp = BINARY.with_name(f"kvload.tmp{os.getpid()}")
        subprocess.run(["gcc", *CFLAGS, "-o", str(tmp), str(SOURCE)], check=True, timeout=120)
        tmp.replace(BINARY)
    return BINARY


@dataclass(frozen=True)
class Histogram:
    """Latency buckets as kvload prints them: (lowest ns, width ns, count), merged exactly across runs."""

    buckets: tuple[tuple[int, int, int], ...]

    @staticmethod
    def merge(histograms: Iterable[Histogram]) -> Histogram:
        counts: dict[tuple[int, int], int] = {}
        for h in histograms:
            for low, width, count in h.buckets:
                counts[(low, width)] = counts.get((low, width), 0) + count
        return Histogram(tuple((low, width, n) for (low, width), n in sorted(counts.items())))

    @property
    def count(self) -> int:
        return sum(n for _, _, n in self.buckets)

    def percentile(self, p: float) -> float:
        """The p-th percentile (nearest rank) in seconds: its bucket's midpoint; nan when empty."""
        total = self.count
        if not total:
            return math.nan
        rank = max(1, math.ceil(p / 100 * total))
        seen = 0
        for low, width, n in self.buckets:
            seen += n
            if seen >= rank:
                return (low + (width - 1) / 2) / 1e9
        return math.nan  # unreachable: the ranks add up to total


@dataclass(frozen=True)
class LoadResult:
    """One kvload run (the JSON it prints; `raw` keeps all of it)."""

    requests: int  # replies counted (after the warm-up)
    seconds: float  # from the first counted request to the last counted reply
    rate: float  # requests / seconds
    request_bytes: int  # payload and framing, counted requests
    started_at: float  # time.monotonic() when counting began
    cpu_seconds: float  # the generator's own CPU time (user + system)
    histogram: Histogram
    recoveries: tuple[float, ...]  # --reconnect: per break, last reply before to first reply after (s)
    raw: dict[str, Any]

    @staticmethod
    def from_json(answer: dict[str, Any]) -> LoadResult:
        return LoadResult(
            requests=int(answer["requests"]),
            seconds=float(answer["seconds"]),
            rate=float(answer["rate"]),
            request_bytes=int(answer["request_bytes"]),
            started_at=float(answer["started_at"]),
            cpu_seconds=float(answer["cpu_seconds"]),
            histogram=Histogram(tuple((int(a), int(b), int(c)) for a, b, c in answer["histogram"])),
            recoveries=tuple(float(us) / 1e6 for us in answer["recoveries_us"]),
            raw=answer,
        )

    def latency(self, p: float) -> float:
        """The p-th percentile latency in seconds."""
        return self.histogram.percentile(p)


def command(
    addresses: Sequence[str],
    connections: int,
    seconds: float | None = None,
    *,
    requests: int | None = None,
    depth: int = 1,
    keys: int = 1000,
    key_prefix: str = "k",
    set_ratio: float = 0.5,
    value_size: int = 48,
    warmup: float = 0.0,
    tag: str | None = None,
    cpu: int | None = None,
    server_cpu: int | None = None,
    echo_server: bool = False,
    reconnect: bool = False,
    reconnect_timeout: float | None = None,
    timeout: float | None = None,
) -> list[str]:
    """kvload's command line (see `build/kvload --help`)."""
    argv = [str(build()), "--connections", str(connections), "--depth", str(depth), "--keys", str(keys),
            "--key-prefix", key_prefix, "--set-ratio", str(set_ratio),
            "--value-size", str(value_size)]  # fmt: skip
    if echo_server:
        argv.append("--echo-server")
    for address in addresses:
        argv += ["--address", address]
    if seconds is not None:
        argv += ["--seconds", str(seconds)]
    if requests is not None:
        argv += ["--requests", str(requests)]
    if warmup:
        argv += ["--warmup", str(warmup)]
    if tag is not None:
        argv += ["--tag", tag]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    if server_cpu is not None:
        argv += ["--server-cpu", str(server_cpu)]
    if reconnect:
        argv.append("--reconnect")
    if reconnect_timeout is not None:
        argv += ["--reconnect-timeout", str(reconnect_timeout)]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    return argv


def _wrapper_timeout(argv: Sequence[str]) -> float:
    """How long to wait for the child: its own hard bound (as kvload computes it) plus a grace period."""
    def value(flag: str, default: float) -> float:
        return float(argv[argv.index(flag) + 1]) if flag in argv else default

    if "--timeout" in argv:
        bound = value("--timeout", 0)
    elif "--seconds" in argv:
        bound = value("--warmup", 0) + value("--seconds", 0) + 10
    else:
        bound = 60
    return bound + value("--connect-timeout", 5) + _GRACE


def parse_output(returncode: int, stdout: str, stderr: str) -> LoadResult:
    """A LoadResult from kvload's output, or LoadError with its message."""
    try:
        answer = json.loads(stdout)
    except json.JSONDecodeError:
        raise LoadError(f"kvload exited {returncode} without a result: {stderr.strip()[-500:]}") from None
    if returncode != 0 or not answer.get("ok"):
        raise LoadError(f"kvload: {answer.get('error') or stderr.strip()[-500:]} (exit {returncode})")
    return LoadResult.from_json(answer)


def run(
    addresses: Sequence[str], connections: int, seconds: float | None = None, **options: Any
) -> LoadResult:
    """Run the load to its end (see `command` for the options)."""
    argv = command(addresses, connections, seconds, **options)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_wrapper_timeout(argv))
    except subprocess.TimeoutExpired as err:
        raise LoadError(f"kvload did not finish within {err.timeout:.0f} s") from None
    return parse_output(done.returncode, done.stdout, done.stderr)


async def run_async(
    addresses: Sequence[str], connections: int, seconds: float | None = None, **options: Any
) -> LoadResult:
    """`run`, awaiting the child process (the event loop keeps serving meanwhile)."""
    argv = command(addresses, connections, seconds, **options)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _wrapper_timeout(argv))
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise LoadError("kvload did not finish in time") from None
    finally:
        if proc.returncode is None:  # cancelled: never leave the child behind
            proc.kill()
            await proc.wait()
    return parse_output(proc.returncode or 0, out.decode(), err.decode())


class Running:
    """A load started in the background (`start`); `done()` polls, `result()` waits for its LoadResult."""

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self._deadline = time.monotonic() + _wrapper_timeout(argv)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done(self) -> bool:
        return self._proc.poll() is not None

    def result(self) -> LoadResult:
        try:
            out, err = self._proc.communicate(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise LoadError("kvload did not finish in time") from None
        return parse_output(self._proc.returncode, out, err)

    def stop(self) -> LoadResult:
        """End the run now (SIGTERM: kvload stops issuing, drains its replies and reports)."""
        if self._proc.poll() is None:
            self._proc.terminate()
        return self.result()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def start(
    addresses: Sequence[str], connections: int, seconds: float | None = None, **options: Any
) -> Running:
    """Start the load in the background."""
    return Running(command(addresses, connections, seconds, **options))


def run_ceiling(connections: int, seconds: float, **options: Any) -> LoadResult:
    """The generator against the trivial echo server it forks itself: the most it can send."""
    return run([], connections, seconds, echo_server=True, **options)


# ----- the native kv reference and where things run ------------------------------------------------------


class NativeKv:
    """guests/programs/kv.c built for the host (guests/build/kv-host) on an ephemeral loopback port, pinned
    to `cpus` if given. As a context manager: started, then stopped with SIGTERM, after which `requests` is
    how many requests its host runtime handed to kv.c (a count kept by the server, not by the load)."""

    def __init__(self, cpus: Iterable[int] | None = None, disk: Path | None = None) -> None:
        self.cpus = set(cpus) if cpus is not None else None
        self.disk = disk
        self.address = ""
        self.requests = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> NativeKv:
        if not KV_HOST.exists():
            raise FileNotFoundError(f"{KV_HOST} is not built: run scripts/setup")
        env = dict(os.environ, VMFT_HOST_PORT="0", VMFT_HOST_DISK=str(self.disk or ""))
        self._proc = proc = subprocess.Popen([str(KV_HOST)], env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            if self.cpus is not None:
                os.sched_setaffinity(proc.pid, self.cpus)
            line = _readline_within(proc, 10.0)
            prefix = "host runtime: listening on "
            if not line.startswith(prefix):
                raise LoadError(f"native kv did not start: {line!r} (exit {proc.poll()})")
            self.address = line[len(prefix):].strip()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stderr is not None
        try:
            proc.terminate()  # its handler prints the count and exits
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        match = re.search(r"host runtime: requests (\d+)", err)
        if match:
            self.requests += int(match.group(1))


def _readline_within(proc: subprocess.Popen[str], seconds: float) -> str:
    """The child's first stderr line, waiting at most `seconds` for it."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], seconds)
    return proc.stderr.readline() if ready else ""


def pin_threads(pid: int, cpus: Iterable[int]) -> None:
    """Pin every thread of process `pid` (os.sched_setaffinity pins one thread; new threads inherit it)."""
    wanted = set(cpus)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), wanted)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


def cpu_layout() -> tuple[int | None, set[int]]:
    """Where a benchmark's load generator runs, and where the servers under test run: with two or more
    usable cores the generator takes the last one and the servers the others, so that neither competes
    with the other for a core; on one core nothing is pinned (None, all)."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None, set(usable)
    return usable[-1], set(usable[:-1])
