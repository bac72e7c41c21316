"""Four real `vmft node` processes opening one fresh arbiter file at the same instant all come up (a fresh
SQLite file's switch to WAL used to fail in all but one of them with "database is locked")."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc

from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
NODES = 4
ROUNDS = 12  # each on its own fresh arbiter file: the race hits about one round in five to eight

# The child is a real `vmft node` (replica.cli.main); only its first sqlite3.connect waits for the common
# start time, so that the four arbiter opens land within a fraction of a millisecond of each other (started
# plainly, the nodes' start-up jitter of a few milliseconds hides the race most of the time).
_AT_ONCE = (
    "import sqlite3, sys, time\n"
    "from replica.cli import main\n"
    "start_at = float(sys.argv[1])\n"
    "connect = sqlite3.connect\n"
    "def at_once(*args, **kwargs):\n"
    "    time.sleep(max(0.0, start_at - time.time()))\n"
    "    return connect(*args, **kwargs)\n"
    "sqlite3.connect = at_once\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=0.5)
            return True
        except grpc.RpcError:
            return False


def _start_round(workdir: Path) -> list[str]:
    """Start NODES nodes on one fresh arbiter file at the same instant; the failures (empty: none)."""
    arbiter = workdir / "arbiter.sqlite"
    start_at = time.time() + 1.5  # every child has imported everything by then (two cores, shared)
    nodes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(NODES):
            address = f"127.0.0.1:{free_port()}"
            log_path = workdir / f"node{index}.log"
            with open(log_path, "wb") as log_file:
                process = subprocess.Popen(
                    [sys.executable, "-c", _AT_ONCE, repr(start_at), "node", "--listen", address,
                     "--data-dir", str(workdir / f"node{index}"), "--arbiter", str(arbiter),
                     "--insecure"],  # plaintext on loopback: this test is about the arbiter file
                    stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                )  # fmt: skip
            nodes.append((address, process, log_path))
        failures: list[str] = []
        for address, process, log_path in nodes:
            deadline = time.monotonic() + 30
            while process.poll() is None and not _serving(address) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is not None or not _serving(address):
                failures.append(f"{address}: {log_path.read_text()[-600:]}")
        return failures
    finally:
        for _, process, _ in nodes:
            process.kill()
            process.wait(10)


def test_four_nodes_start_at_once_on_a_fresh_arbiter_file(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        failures = _start_round(workdir)
        assert not failures, f"round {round_}: " + "\n".join(failures)
