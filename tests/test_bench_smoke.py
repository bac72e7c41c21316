"""Every benchmark's run() with tiny parameters (a second or two each), so that the suite keeps them working.
The figures are noise at this size, so no value is checked against a target; what is checked is that they
are measured: figures move the right way when the workload changes (more work costs more), and the
reference side of each figure really ran (a benchmark returning constants fails here)."""

from __future__ import annotations

import argparse
import json
import math
from types import ModuleType
from typing import Any

import pytest

import bench_exits
import bench_kv
import bench_record
import bench_spin
import benchlib


def parse(module: ModuleType, *argv: str) -> argparse.Namespace:
    """The benchmark's own options, as scripts/bench parses them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--json", action="store_true")
    module.add_arguments(parser)
    return parser.parse_args([module.__name__.removeprefix("bench_"), *argv])


def check(figures: list[benchlib.Figure], count: int) -> dict[str, benchlib.Figure]:
    assert len(figures) == count
    for f in figures:
        assert math.isfinite(f.value) and math.isfinite(f.reference), f
        assert f.value > 0 and f.reference > 0, f
        assert json.loads(f.to_json())["value"] == pytest.approx(f.value)
    assert len(benchlib.format_table(figures).splitlines()) == count + 2
    return {f.name: f for f in figures}


def test_benchmarks_are_listed() -> None:
    assert {"exits", "spin", "kv", "record", "checkpoint", "replication"} <= set(benchlib.benchmark_names())


def test_percentile_and_interleaving() -> None:
    assert benchlib.percentile(range(1, 101), 50) == 50
    assert benchlib.percentile(range(1, 101), 99) == 99
    order: list[str] = []
    runs = {"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}
    assert benchlib.interleaved(3, runs) == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert order == ["a", "b", "b", "a", "a", "b"]


@pytest.mark.kvm
def test_exits_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference: the C loop on KVM_RUN really ran, every round, for the asked number of exits.
    counts: list[int] = []
    real_loader = benchlib.load_c_exit_loop

    def counting_loader() -> benchlib.ExitLoop:
        loop = real_loader()

        def counted(*args: int) -> int:
            counts.append(loop(*args))
            return counts[-1]

        return counted

    monkeypatch.setattr(benchlib, "load_c_exit_loop", counting_loader)
    figures = check(bench_exits.run(parse(bench_exits, "--exits", "300", "--rounds", "2")), 2)
    assert counts == [300] * 3, counts  # the warm-up (min(exits, 1000)) and two rounds
    # An exit costs tens of µs on this host (docs: 26-40 µs); a Python loop cannot beat the kernel's part.
    for f in figures.values():
        assert 5 < f.value < 5000 and 5 < f.reference < 5000, f


@pytest.mark.kvm
def test_spin_smoke() -> None:
    # Both sides run the same two counts and must print the same checksum line (run() raises otherwise).
    # Ten times the iterations costs more on both sides (the guest and the native reference).
    def once(iterations: int) -> benchlib.Figure:
        args = parse(bench_spin, "--iterations", str(iterations), "--short", "1000000", "--rounds", "1")
        (figure,) = check(bench_spin.run(args), 1).values()
        return figure

    small, large = once(10_000_000), once(100_000_000)
    assert large.value > 3 * small.value, (small, large)
    assert large.reference > 3 * small.reference, (small, large)
    assert bench_spin.checksum("spin: iterations=5 checksum=abc123") == "abc123"


@pytest.mark.kvm
def test_kv_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    references: list[Any] = []
    real = bench_kv.ReferenceKv

    def recorded() -> Any:
        references.append(real())
        return references[-1]

    monkeypatch.setattr(bench_kv, "ReferenceKv", recorded)
    args = parse(
        bench_kv, "--connections", "4", "--seconds", "0.4", "--latency-seconds", "0.3", "--rounds", "1",
        "--ceiling-seconds", "0.3",
    )
    figures = check(bench_kv.run(args), 5)
    tput = figures["kv throughput, 4 connections"]
    p50 = figures["kv latency p50, 1 sequential client"]
    p99 = figures["kv latency p99, 1 sequential client"]
    assert p50.value <= p99.value and p50.reference <= p99.reference
    # The reference server answered what its figure says (throughput phase plus latency phase).
    (reference,) = references
    assert reference.requests >= 0.9 * tput.reference * 0.4, (reference.requests, tput)
    # A request to the guest costs VM exits (tens of µs each); kv.c native on the host has none.
    assert p50.value > p50.reference, p50


@pytest.mark.kvm
def test_record_smoke() -> None:
    args = parse(
        bench_record,
        "--exits",
        "300",
        "--exit-rounds",
        "1",
        "--connections",
        "4",
        "--seconds",
        "0.4",
        "--kv-rounds",
        "1",
        "--idle-seconds",
        "0.4",
    )
    figures = check(bench_record.run(args), 6)  # run() also checks that every kv log replays identically
    per_event = figures["log bytes per event, kv under load (zstd)"]
    assert per_event.value < per_event.reference  # compression helps
    # More work, more log: a kv guest under load logs far more per second than one ticking its timer.
    loaded = figures["log bandwidth, kv under load"]
    idle = figures["log bandwidth, idle kv guest (50 ms timer)"]
    assert loaded.value > 5 * idle.value, (loaded, idle)
    # Both sides of the throughput figure really served requests (recording on and off).
    tput = figures["kv throughput, 4 connections, recording on"]
    assert tput.value > 100 and tput.reference > 100, tput
