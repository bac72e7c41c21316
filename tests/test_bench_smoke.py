"""Every benchmark's run() with tiny parameters (a second or two each), so that the suite keeps them working.
The figures are noise at this size: only their sanity is checked, not their values."""

from __future__ import annotations

import argparse
import json
import math
from types import ModuleType

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
        assert f.reference > 0, f
        assert f.ratio == pytest.approx(f.value / f.reference)
        assert json.loads(f.to_json())["ratio"] == pytest.approx(f.ratio)
    assert len(benchlib.format_table(figures).splitlines()) == count + 2
    return {f.name: f for f in figures}


def test_benchmarks_are_listed() -> None:
    assert {"exits", "spin", "kv", "record"} <= set(benchlib.benchmark_names())


def test_percentile_and_interleaving() -> None:
    assert benchlib.percentile(range(1, 101), 50) == 50
    assert benchlib.percentile(range(1, 101), 99) == 99
    order: list[str] = []
    runs = {"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}
    assert benchlib.interleaved(3, runs) == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert order == ["a", "b", "b", "a", "a", "b"]


@pytest.mark.kvm
def test_exits_smoke() -> None:
    figures = check(bench_exits.run(parse(bench_exits, "--exits", "300", "--rounds", "1")), 2)
    assert all(f.value > 0 for f in figures.values())


@pytest.mark.kvm
def test_spin_smoke() -> None:
    # Both sides run the same two counts and must print the same checksum line (run() raises otherwise).
    args = parse(bench_spin, "--iterations", "40000000", "--short", "2000000", "--rounds", "1")
    (figure,) = check(bench_spin.run(args), 1).values()
    assert figure.value > 0
    assert bench_spin.checksum("spin: iterations=5 checksum=abc123") == "abc123"


@pytest.mark.kvm
def test_kv_smoke() -> None:
    args = parse(
        bench_kv, "--connections", "4", "--seconds", "0.4", "--latency-seconds", "0.3", "--rounds", "1"
    )
    figures = check(bench_kv.run(args), 3)
    assert all(f.value > 0 for f in figures.values())
    p50 = figures["kv latency p50, 1 sequential client"]
    p99 = figures["kv latency p99, 1 sequential client"]
    assert p50.value <= p99.value and p50.reference <= p99.reference


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
    assert all(f.value > 0 for f in figures.values())
    per_event = figures["log bytes per event, kv under load (zstd)"]
    assert per_event.value < per_event.reference  # compression helps
