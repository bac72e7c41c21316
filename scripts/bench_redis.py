"""Debian's redis-server under `vmft run --linux --service` against the same redis-server natively, both
driven by Debian's redis-benchmark (50 connections, SET and GET, pipelining 1 and 16).

- `redis SET|GET throughput, vmft, P1|P16`: requests per second through the VM's service address (one
  unreplicated Linux VM), against native redis-server on a loopback port in the same run (ratio).
- `redis SET|GET latency p50|p99, vmft, P1`: redis-benchmark's percentiles, against native.
- `redis SET|GET throughput, vmft vdso, P1|P16` and `latency p50|p99, vmft vdso, P1`: the same VM with
  `--clock vdso` (clock reads answered by the vDSO, no exit: docs/linux.md), against native; and
  `redis SET|GET throughput, vdso over syscall clock, P1|P16`: the vDSO VM against the VM of this run.
- `redis SET|GET throughput, replicated, P1|P16`: the same through a protected pair (`vmft node` processes
  on loopback, the primary's service address), against the unreplicated VM of this run (VMware FT keeps
  0.94 to 0.98); latency p50/p99 likewise. `... throughput, replicated vdso, ...`: a pair with
  `LinuxSpec.clock = "vdso"`, against the unreplicated vDSO VM.
- `redis failover recovery p50|p99` (--kills, 10 by default): a client SETting unique keys one at a time
  (switching to the backup's address when its connection breaks) while the primary's node is SIGKILLed; the
  gap from its last reply before the kill to its first after, against the failure timeout (setting).
  Every acknowledged SET is read back from the new primary: `acknowledged SETs lost` must be 0.
Runs are interleaved; medians are reported."""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import benchlib
from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm

ROOT = Path(__file__).resolve().parent.parent
REDIS = "/usr/bin/redis-server"
BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_ARGS = ["--port", "6379", "--save", "", "--appendonly", "no"]
WAIT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per test (default 20000)")
    parser.add_argument("--clients", type=int, default=50, help="connections (default 50)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of the primary (default 10; 0: none)")
    parser.add_argument(
        "--failure-timeout-ms",
        type=float,
        default=1000.0,
        help="the pair's failure timeout (default 1000: a backup replaying redis's start-up on a loaded "
        "2-core machine fell silent past 300 ms)",
    )
    parser.add_argument("--before", type=float, default=0.5, help="seconds of SETs before each kill")
    parser.add_argument("--after", type=float, default=0.5, help="seconds of SETs after the failover")


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

    def __init__(self, in_vm: bool, clock: str = "syscall") -> None:
        self.port = _free_port()
        self.layer = Path(tempfile.mkdtemp(prefix="vmft-bench-redis-"))
        if in_vm:
            cmd = [sys.executable, "-m", "replica.cli", "run", "--linux", "--layer", str(self.layer)]
            cmd += ["--clock", clock]
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


def benchmark(
    port: int, test: str, pipeline: int, requests: int, clients: int, host: str = "127.0.0.1"
) -> dict[str, float]:
    """redis-benchmark's CSV row for one test: rps, p50_latency_ms, p99_latency_ms, ..."""
    cmd = [BENCHMARK, "-h", host, "-p", str(port), "-c", str(clients), "-n", str(requests)]
    cmd += ["-P", str(pipeline), "-t", test, "--csv"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed nothing: {done.stderr}")
    return {k: float(v) for k, v in rows[0].items() if k != "test"}


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _protect(
    cluster: LocalCluster, primary: NodeProcess, backup: NodeProcess, name: str, clock: str = ""
) -> ProtectedVm:
    """redis-server protected as a pair (`vmft protect --linux` through the node API), serving."""
    spec = vmft_pb2.VmSpec(name=name, mem_mib=256, hang_timeout_s=60.0)
    spec.linux.argv.extend([REDIS, *REDIS_ARGS])
    spec.linux.clock = clock
    service, backup_service = cluster.service_address(name, primary), cluster.service_address(name, backup)
    request = vmft_pb2.ProtectRequest(
        spec=spec, backup_node=backup.name, service=service, backup_service=backup_service
    )
    with cluster.channel(primary) as channel:
        vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=60)
    vm = ProtectedVm(name, primary, backup, service, backup_service)
    port = _split(service)[1]
    deadline = time.monotonic() + WAIT_S
    while not _pong(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the protected redis at {service} did not answer PING")
        time.sleep(0.05)
    cluster.wait_for(backup, name, "backup", WAIT_S)
    return vm


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class SetClient(threading.Thread):
    """SETs of unique keys, one at a time; a broken connection moves to the other address and the SET
    is sent again (the same key and value: applying it twice changes nothing)."""

    def __init__(self, addresses: list[str], prefix: str) -> None:
        super().__init__(daemon=True)
        self.addresses = [_split(a) for a in addresses]
        self.prefix = prefix
        self.acked: list[str] = []
        self.times: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn: socket.socket | None = None
        at = 0
        while not self.done.is_set():
            key = f"{self.prefix}{len(self.acked)}"
            try:
                if conn is None:
                    conn = socket.create_connection(self.addresses[at], timeout=2)
                conn.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(key), key.encode()))
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = conn.recv(64)
                    if not chunk:
                        raise ConnectionResetError("closed")
                    reply += chunk
                if reply == b"+OK\r\n":
                    self.acked.append(key)
                    self.times.append(time.monotonic())
            except OSError:
                if conn is not None:
                    conn.close()
                conn = None
                at = (at + 1) % len(self.addresses)
                time.sleep(0.002)
        if conn is not None:
            conn.close()


def _missing(address: str, keys: list[str]) -> int:
    """How many of `keys` the redis at `address` does not hold."""
    host, port = _split(address)
    missing = 0
    for at in range(0, len(keys), 500):
        chunk = keys[at : at + 500]
        done = subprocess.run(
            ["/usr/bin/redis-cli", "-h", host, "-p", str(port), "MGET", *chunk],
            capture_output=True, text=True, timeout=WAIT_S, check=True,
        )  # fmt: skip
        missing += sum(1 for value in done.stdout.split("\n")[: len(chunk)] if value != "1")
    return missing


def _one_kill(cluster: LocalCluster, index: int, args: argparse.Namespace) -> tuple[float, int, int]:
    """(client-seen recovery s, acknowledged SETs, lost) for one SIGKILL of the primary's node."""
    a, b = cluster.add_node(), cluster.add_node()
    try:
        vm = _protect(cluster, a, b, f"r{index}")
        client = SetClient([vm.service, vm.backup_service], f"k{index}:")
        client.start()
        time.sleep(args.before)
        fault_at = time.monotonic()
        cluster.kill_node(a)
        cluster.wait_for(b, vm.name, "serving", WAIT_S)
        time.sleep(args.after)
        client.done.set()
        client.join(WAIT_S)
        before = [t for t in client.times if t <= fault_at]
        after = [t for t in client.times if t > fault_at]
        gap = after[0] - before[-1] if before and after else float("nan")
        return gap, len(client.acked), _missing(vm.backup_service, client.acked)
    finally:
        cluster.kill_node(a)
        cluster.stop_node(b, timeout=5)


def replicated(
    args: argparse.Namespace, cases: list[tuple[str, int]]
) -> tuple[dict[tuple[str, str, int], dict[str, float]], list[tuple[float, int, int]], float]:
    """The pairs' benchmark rows by (clock, test, pipeline), each kill's (recovery, acknowledged, lost),
    the failure timeout."""
    rows: dict[tuple[str, str, int], dict[str, float]] = {}
    kills = []
    with (
        tempfile.TemporaryDirectory(prefix="vmft-bench-redis.") as tmp,
        LocalCluster(Path(tmp), failure_timeout_ms=args.failure_timeout_ms) as cluster,
    ):
        for clock in ("syscall", "vdso"):
            a, b = cluster.add_node(), cluster.add_node()
            try:
                vm = _protect(cluster, a, b, f"bench-{clock}", "" if clock == "syscall" else clock)
                host, port = _split(vm.service)
                for test, pipeline in cases:
                    row = benchmark(port, test, pipeline, args.requests, args.clients, host)
                    rows[(clock, test, pipeline)] = row
            finally:
                cluster.stop_node(a, timeout=5)
                cluster.stop_node(b, timeout=5)
        for index in range(args.kills):
            kills.append(_one_kill(cluster, index, args))
        return rows, kills, cluster.failure_timeout_ms


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    cases = [(test, pipeline) for pipeline in (1, 16) for test in ("set", "get")]
    rows: dict[tuple[str, str, int], list[dict[str, float]]] = {}

    def side(kind: str) -> float:
        server = Server(kind != "native", "vdso" if kind == "vdso" else "syscall")
        try:
            for test, pipeline in cases:
                row = benchmark(server.port, test, pipeline, args.requests, args.clients)
                rows.setdefault((kind, test, pipeline), []).append(row)
        finally:
            server.stop()
        return 0.0

    benchlib.interleaved(args.rounds, {kind: partial(side, kind) for kind in ("vm", "vdso", "native")})
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
    for test, pipeline in cases:
        vdso, native, vm = (rows[(k, test, pipeline)] for k in ("vdso", "native", "vm"))
        figures.append(
            benchlib.Figure(
                f"redis {test.upper()} throughput, vmft vdso, P{pipeline}",
                m(r["rps"] for r in vdso),
                "req/s",
                m(r["rps"] for r in native),
                f"native redis-server, {args.clients} connections",
            )
        )
        figures.append(
            benchlib.Figure(
                f"redis {test.upper()} throughput, vdso over syscall clock, P{pipeline}",
                m(r["rps"] for r in vdso),
                "req/s",
                m(r["rps"] for r in vm),
                "the VM reading the clock by system call (--clock syscall)",
            )
        )
    for test in ("set", "get"):
        vdso, native = rows[("vdso", test, 1)], rows[("native", test, 1)]
        for p in ("p50", "p99"):
            figures.append(
                benchlib.Figure(
                    f"redis {test.upper()} latency {p}, vmft vdso, P1",
                    m(r[f"{p}_latency_ms"] for r in vdso),
                    "ms",
                    m(r[f"{p}_latency_ms"] for r in native),
                    "native redis-server",
                )
            )
    pair, kills, timeout_ms = replicated(args, cases)
    for test, pipeline in cases:
        figures.append(
            benchlib.Figure(
                f"redis {test.upper()} throughput, replicated vdso, P{pipeline}",
                pair[("vdso", test, pipeline)]["rps"],
                "req/s",
                m(r["rps"] for r in rows[("vdso", test, pipeline)]),
                "the unreplicated vDSO VM",
            )
        )
    for test, pipeline in cases:
        figures.append(
            benchlib.Figure(
                f"redis {test.upper()} throughput, replicated, P{pipeline}",
                pair[("syscall", test, pipeline)]["rps"],
                "req/s",
                m(r["rps"] for r in rows[("vm", test, pipeline)]),
                "the unreplicated VM (VMware FT keeps 0.94 to 0.98)",
            )
        )
    for test in ("set", "get"):
        for p in ("p50", "p99"):
            figures.append(
                benchlib.Figure(
                    f"redis {test.upper()} latency {p}, replicated, P1",
                    pair[("syscall", test, 1)][f"{p}_latency_ms"],
                    "ms",
                    m(r[f"{p}_latency_ms"] for r in rows[("vm", test, 1)]),
                    "the unreplicated VM",
                )
            )
    if kills:
        gaps = [gap * 1000 for gap, _acked, _lost in kills]
        reference = f"failure timeout (setting); {len(kills)} kills"
        figures += [
            benchlib.Figure(
                "redis failover recovery p50", benchlib.percentile(gaps, 50), "ms", timeout_ms, reference
            ),
            benchlib.Figure(
                "redis failover recovery p99", benchlib.percentile(gaps, 99), "ms", timeout_ms, reference
            ),
            benchlib.Figure(
                "redis acknowledged SETs lost",
                float(sum(lost for _g, _a, lost in kills)),
                "SETs",
                float(sum(acked for _g, acked, _l in kills)),
                "acknowledged SETs checked",
            ),
        ]
    return figures
