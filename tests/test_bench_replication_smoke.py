"""Smoke tests of the replication benchmarks (`scripts/bench replication|failover --quick --json`): they run,
print every figure as JSON with a value and a reference, and the failover run loses no write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.kvm


def _bench(*args: str) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), *args, "--quick", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_bench_replication_quick() -> None:
    figures = {f["name"]: f for f in _bench("replication")}
    tput = figures["kv throughput, 32 connections, replicated"]
    assert isinstance(tput["value"], float) and tput["value"] > 0
    assert isinstance(tput["reference"], float) and tput["reference"] > 0
    p50 = figures["kv latency p50, one sequential client, replicated"]
    assert isinstance(p50["value"], float) and 0 < p50["value"] < 100
    assert figures["log bandwidth, 32 connections"]["value"]
    assert "latency the output rule adds at p50" in figures


def test_bench_failover_quick() -> None:
    figures = {f["name"]: f for f in _bench("failover")}
    p99 = figures["client-seen recovery p99"]
    assert isinstance(p99["value"], float) and 0 < p99["value"] < 5000
    assert figures["acknowledged writes lost or duplicated"]["value"] == 0
    assert figures["clients that never recovered"]["value"] == 0
