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
    for figure in figures.values():
        assert isinstance(figure["value"], float) and isinstance(figure["reference"], float), figure
        assert figure["value"] > 0 and figure["reference"] > 0, figure  # both sides measured
    tput = figures["kv throughput, 32 connections, replicated"]
    assert tput["value"] > 100 and tput["reference"] > 100, tput  # the unreplicated reference really ran
    # The output rule holds every reply until the backup acknowledges its log: a replicated request costs
    # at least a round trip more than the same request unreplicated.
    p50 = figures["kv latency p50, one sequential client, replicated"]
    assert p50["reference"] < p50["value"] < 100, p50
    added = figures["latency the output rule adds at p50"]
    assert added["value"] == pytest.approx(p50["value"] - p50["reference"], rel=0.05), (added, p50)
    # The log carries every request the clients sent (compressed: zstd, a few times smaller at most).
    log = figures["log bandwidth, 32 connections"]
    assert log["value"] > 0.05 * log["reference"], log


def test_bench_failover_quick() -> None:
    figures = {f["name"]: f for f in _bench("failover")}
    p50, p99 = figures["client-seen recovery p50"], figures["client-seen recovery p99"]
    assert isinstance(p99["value"], float) and 0 < p50["value"] <= p99["value"] < 5000, (p50, p99)
    checked = figures["acknowledged writes lost or duplicated"]
    assert checked["value"] == 0 and checked["reference"] > 100, checked  # writes really were checked
    clients = figures["clients that never recovered"]
    assert clients["value"] == 0 and clients["reference"] > 0, clients
