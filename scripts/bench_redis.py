"""Debian's redis-server under `vmft run --linux --service` against the same redis-server natively, both
driven by Debian's redis-benchmark (50 connections, SET and GET, pipelining 1 and 16).

- `redis SET|GET throughput, vmft, P1|P16`: requests per second through the VM's service address (one
  unreplicated Linux VM), against native redis-server on a loopback port in the same run (ratio).
- `redis SET|GET latency p50|p99, vmft, P1`: redis-benchmark's percentiles, against native.
The replicated figures (`redis throughput, replicated`, failover recovery) need Linux VMs in nodes (issue
11, the protection half). Runs are interleaved; medians are reported."""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parent.parent
REDIS = "/usr/bin/redis-server"
BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_ARGS = ["--port", "6379", "--save", "", "--appendonly", "no"]
WAIT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per test (default 20000)")
    parser.add_argument("--clients", type=int, default=50, help="connections (default 50)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis on port {port} did not answer PING")


class Server:
    """redis-server natively or in a VM (`vmft run --linux --service`), on a free loopback port."""

    def __init__(self, in_vm: bool) -> None:
        self.port = _free_port()
        self.layer = Path(tempfile.mkdtemp(prefix="vmft-bench-redis-"))
        if in_vm:
            cmd = [sys.executable, "-m", "replica.cli", "run", "--linux", "--layer", str(self.layer)]
            cmd += ["--hang-timeout", "600", "--service", f"127.0.0.1:{self.port}", "--", REDIS, *REDIS_ARGS]
        else:
            cmd = [REDIS, *REDIS_ARGS[2:], "--port", str(self.port), "--dir", str(self.layer)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.layer, ignore_errors=True)


def benchmark(port: int, test: str, pipeline: int, requests: int, clients: int) -> dict[str, float]:
    """redis-benchmark's CSV row for one test: rps, p50_latency_ms, p99_latency_ms, ..."""
    cmd = [BENCHMARK, "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests)]
    cmd += ["-P", str(pipeline), "-t", test, "--csv"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed nothing: {done.stderr}")
    return {k: float(v) for k, v in rows[0].items() if k != "test"}


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    cases = [(test, pipeline) for pipeline in (1, 16) for test in ("set", "get")]
    rows: dict[tuple[str, str, int], list[dict[str, float]]] = {}

    def side(in_vm: bool) -> float:
        server = Server(in_vm)
        try:
            for test, pipeline in cases:
                row = benchmark(server.port, test, pipeline, args.requests, args.clients)
                rows.setdefault(("vm" if in_vm else "native", test, pipeline), []).append(row)
        finally:
            server.stop()
        return 0.0

    benchlib.interleaved(args.rounds, {"vm": lambda: side(True), "native": lambda: side(False)})
    m = benchlib.median
    figures = []
    for test, pipeline in cases:
        vm, native = rows[("vm", test, pipeline)], rows[("native", test, pipeline)]
        figures.append(
            benchlib.Figure(
                f"redis {test.upper()} throughput, vmft, P{pipeline}",
                m(r["rps"] for r in vm),
                "req/s",
                m(r["rps"] for r in native),
                f"native redis-server, {args.clients} connections",
            )
        )
    for test in ("set", "get"):
        vm, native = rows[("vm", test, 1)], rows[("native", test, 1)]
        for p in ("p50", "p99"):
            figures.append(
                benchlib.Figure(
                    f"redis {test.upper()} latency {p}, vmft, P1",
                    m(r[f"{p}_latency_ms"] for r in vm),
                    "ms",
                    m(r[f"{p}_latency_ms"] for r in native),
                    "native redis-server",
                )
            )
    return figures
