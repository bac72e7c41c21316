"""Replication cost: the kv guest protected by a backup against the same guest unprotected, both in one
LocalCluster (three `vmft node` processes on loopback: the replicated primary, its backup, and the
unprotected VM's node), measured in interleaved phases. The client load is build/kvload (scripts/kvload.c),
a C epoll generator in its own process. Where things run (two cores: --no-pin leaves all of it to the
scheduler): the load generator and the backup's node on the last core, the replicated primary's node and the
unprotected VM's node on the first, so that the primary and its backup never share a core and each VM under
test has a core of its own beside the generator.

Figures: throughput with many concurrent connections; the latency one sequential client pays (p50, p99) and
what the output rule adds at p50, beside a gRPC unary round trip measured here; the log bandwidth under the
concurrent load beside the clients' request bandwidth; the backup's lag behind the primary."""

from __future__ import annotations

import argparse
import bisect
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

import benchlib
import kvload
from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import LocalCluster, NodeProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--seconds", type=float, default=4.0, help="one throughput phase (default 4)")
    parser.add_argument("--latency-seconds", type=float, default=2.0,
                        help="one sequential-latency phase (default 2)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--keep", metavar="DIR", help="run the cluster in DIR and keep its node logs")
    parser.add_argument("--no-pin", action="store_true", help="pin neither the load generator nor the nodes")
    parser.add_argument("--failure-timeout-ms", type=float, default=1000.0,
                        help="the pair's failure timeout (default 1000: see run())")  # fmt: skip
    parser.add_argument("--hops", action="store_true",
                        help="also time each hop of the sequential phases' replicated requests")  # fmt: skip


@dataclass
class Samples:
    lag_positions: list[float] = field(default_factory=list)
    position_rate: list[float] = field(default_factory=list)  # positions per second on the primary
    log_bytes_per_s: list[float] = field(default_factory=list)


def _sample_during(
    cluster: LocalCluster, primary: NodeProcess, name: str, load: kvload.Running, start: float, seconds: float
) -> Samples:
    """While the load runs: the primary's view of the backup (acks carry the replayed position)."""
    samples = Samples()
    previous: tuple[float, int] | None = None
    first = start + min(1.0, seconds / 3)
    while not load.done() and time.monotonic() < start + seconds - 0.1:
        if time.monotonic() < first:
            time.sleep(0.05)
            continue
        status = cluster.vm_status(primary, name)
        now = time.monotonic()
        if status is not None:
            samples.lag_positions.append(max(0, status.position - status.replayed_position))
            samples.log_bytes_per_s.append(status.log_bytes_per_s)
            if previous is not None and now > previous[0]:
                samples.position_rate.append((status.position - previous[1]) / (now - previous[0]))
            previous = (now, status.position)
        time.sleep(0.1)
    return samples


def _unary_rtt(cluster: LocalCluster, node: NodeProcess, count: int) -> list[float]:
    # The cluster's own credentials when it has them (mutual TLS), else plaintext.
    opened = cluster.channel(node) if hasattr(cluster, "channel") else grpc.insecure_channel(node.name)
    with opened as channel:
        stub = vmft_pb2_grpc.NodeStub(channel)
        stub.Status(vmft_pb2.StatusRequest(), timeout=5)
        out = []
        for _ in range(count):
            start = time.perf_counter()
            stub.Status(vmft_pb2.StatusRequest(), timeout=5)
            out.append(time.perf_counter() - start)
    return out


_HOPS = ("hold", "flush", "take", "recv", "ack", "ackrecv", "release")


def _hop_delays(directory: Path, windows: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Join the nodes' hop records (replica/hops.py) by position: for each output held during one of
    `windows` (monotonic seconds), when each later hop first covered its position; the delay from the
    previous hop, per hop (seconds)."""
    records: dict[str, list[tuple[int, int]]] = {name: [] for name in _HOPS}
    for path in directory.glob("*.hops"):
        for line in path.read_text().splitlines():
            name, key, ns = line.split()
            if name in records:
                records[name].append((int(ns), int(key)))
    for values in records.values():
        values.sort()
    delays: dict[str, list[float]] = {name: [] for name in _HOPS[1:]}
    for held_ns, position in records["hold"]:
        if not any(lo * 1e9 <= held_ns <= hi * 1e9 for lo, hi in windows):
            continue
        previous = held_ns
        found: dict[str, int] = {}
        for name in _HOPS[1:]:
            values = records[name]
            i = bisect.bisect_left(values, (previous - 1000, 0))
            while i < len(values) and values[i][1] < position:
                i += 1
            if i == len(values):
                break
            hit = values[i][0]
            found[name] = hit
            previous = hit
        if len(found) == len(_HOPS) - 1:
            last = held_ns
            for name in _HOPS[1:]:
                delays[name].append((found[name] - last) / 1e9)
                last = found[name]
    return delays


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    seconds, latency_seconds, rounds = args.seconds, args.latency_seconds, args.rounds
    if args.quick:
        seconds, latency_seconds, rounds = 0.8, 0.4, 1
    image = benchlib.guest_path("kv.elf")
    cpu, servers = kvload.cpu_layout()
    if args.no_pin:
        cpu = None
    hop_windows: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="vmft-bench-replication.") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        hop_dir = workdir / "hops"
        if args.hops:
            hop_dir.mkdir(parents=True, exist_ok=True)
            os.environ["VMFT_HOPS"] = str(hop_dir)  # inherited by the nodes (replica/hops.py)
        # A node pinned to one core shared with the generator (and, on this machine, with whatever else runs)
        # has had its event loop stalled for up to ~410 ms, old sender and new alike: at the default 300 ms
        # failure timeout the pair then failed over in the middle of a phase. This measures steady state.
        with LocalCluster(workdir, failure_timeout_ms=args.failure_timeout_ms) as cluster:
            a, b, c = cluster.add_node(), cluster.add_node(), cluster.add_node()
            if cpu is not None:
                kvload.pin_threads(a.pid, {min(servers)})  # threads it starts later inherit it
                kvload.pin_threads(b.pid, {cpu})
                kvload.pin_threads(c.pid, {min(servers)})
            rep = cluster.protect(image, a, b, name="rep")
            cluster.wait_for(b, "rep", "backup", timeout=20)
            solo = cluster.protect(image, c, None, name="solo")
            services = {"replicated": rep.service, "unreplicated": solo.service}
            for address in services.values():
                kvload.run([address], 1, requests=20, tag="warm", timeout=60)  # connects the service

            throughput: dict[str, list[float]] = {k: [] for k in services}
            # CPU each node spends per request under the concurrent load: on two cores the primary's
            # node is CPU-bound, so replication's own CPU is what its throughput pays for.
            cpu_per_request: dict[str, list[float]] = {k: [] for k in ("primary", "backup", "unreplicated")}
            nodes_of = {
                "replicated": {"primary": a.pid, "backup": b.pid},
                "unreplicated": {"unreplicated": c.pid},
            }
            # Synchronous guest exits per request (the VM's position counts them): fewer, larger guest loop
            # iterations under the output rule are what input moderation buys (replica/input_hold.py).
            exits_per_request: dict[str, list[float]] = {k: [] for k in services}
            vm_of = {"replicated": (a, "rep"), "unreplicated": (c, "solo")}
            request_rate: list[float] = []
            samples = Samples()
            latencies: dict[str, list[kvload.Histogram]] = {k: [] for k in services}
            order = list(services)
            for r in range(rounds):
                for which in order if r % 2 == 0 else reversed(order):
                    start = time.monotonic()
                    cpu_before = {k: benchlib.process_cpu_seconds(p) for k, p in nodes_of[which].items()}
                    position_before = cluster.vm_status(*vm_of[which])
                    load = kvload.start([services[which]], args.connections, seconds, tag=f"t{r}", cpu=cpu)
                    if which == "replicated":
                        got = _sample_during(cluster, a, "rep", load, start, seconds)
                        samples.lag_positions += got.lag_positions
                        samples.position_rate += got.position_rate
                        samples.log_bytes_per_s += got.log_bytes_per_s
                    result = load.result()
                    throughput[which].append(result.rate)
                    # the whole phase (warm-up included) at the counted rate: CPU was read around all of it
                    requests = max(1.0, result.rate * (time.monotonic() - start))
                    for k, p in nodes_of[which].items():
                        used = benchlib.process_cpu_seconds(p) - cpu_before[k]
                        cpu_per_request[k].append(used / requests)
                    position_after = cluster.vm_status(*vm_of[which])
                    if position_before is not None and position_after is not None:
                        exits = position_after.position - position_before.position
                        exits_per_request[which].append(exits / requests)
                    if which == "replicated":
                        request_rate.append(result.request_bytes / result.seconds)
                for which in order if r % 2 else reversed(order):
                    began = time.monotonic()
                    result = kvload.run([services[which]], 1, latency_seconds, tag=f"l{r}", cpu=cpu)
                    latencies[which].append(result.histogram)
                    if which == "replicated":
                        hop_windows.append((began, time.monotonic()))
            rtt = _unary_rtt(cluster, a, 50 if args.quick else 300)
            status = cluster.vm_status(a, "rep")
            if status is None or not status.protected:
                raise RuntimeError(f"the replicated VM lost its backup during the benchmark: {status}")
        hop_delays = _hop_delays(hop_dir, hop_windows) if args.hops else {}

    ms = 1000.0
    rep_tput, solo_tput = _median(throughput["replicated"]), _median(throughput["unreplicated"])
    rep_lat = kvload.Histogram.merge(latencies["replicated"])
    solo_lat = kvload.Histogram.merge(latencies["unreplicated"])
    rep_p50, solo_p50 = rep_lat.percentile(50) * ms, solo_lat.percentile(50) * ms
    rep_p99, solo_p99 = rep_lat.percentile(99) * ms, solo_lat.percentile(99) * ms
    rate = _median(samples.position_rate)
    lag_positions = _median(samples.lag_positions)
    lag_ms = lag_positions / rate * ms if rate and rate == rate else float("nan")
    failure_timeout_ms = cluster.failure_timeout_ms
    conns = args.connections
    rtt_p50 = benchlib.percentile(rtt, 50) * ms
    log_rate = _median(samples.log_bytes_per_s) / 1024
    cpu_us = {k: _median(v) * 1e6 for k, v in cpu_per_request.items()}
    figures = [
        benchlib.Figure(f"kv throughput, {conns} connections, replicated", rep_tput, "ops/s",
                        solo_tput, "the same, unreplicated (target ratio >= 0.9)"),
        benchlib.Figure("kv latency p50, one sequential client, replicated", rep_p50, "ms",
                        solo_p50, "the same, unreplicated"),
        benchlib.Figure("kv latency p99, one sequential client, replicated", rep_p99, "ms",
                        solo_p99, "the same, unreplicated"),
        benchlib.Figure("latency the output rule adds at p50", rep_p50 - solo_p50, "ms",
                        rtt_p50, "gRPC unary round trip p50 (target: < 1 ms added)"),
        benchlib.Figure(f"primary node CPU per request, {conns} connections", cpu_us["primary"], "us",
                        cpu_us["unreplicated"], "the unreplicated node's"),
        benchlib.Figure(f"backup node CPU per request, {conns} connections", cpu_us["backup"], "us",
                        cpu_us["unreplicated"], "the unreplicated node's"),
        benchlib.Figure(f"guest exits per request, {conns} connections, replicated",
                        _median(exits_per_request["replicated"]), "exits",
                        _median(exits_per_request["unreplicated"]), "the same, unreplicated"),
        benchlib.Figure(f"log bandwidth, {conns} connections", log_rate, "KiB/s",
                        _median(request_rate) / 1024, "client request bytes/s"),
        benchlib.Figure(f"backup lag, {conns} connections", lag_positions, "positions",
                        rate / ms if rate == rate else float("nan"), "positions the primary runs per ms"),
        benchlib.Figure(f"backup lag, {conns} connections", lag_ms, "ms",
                        failure_timeout_ms, "failure timeout (setting)"),
    ]  # fmt: skip
    figures += [
        benchlib.Figure(f"replication hop p50: {previous} -> {name}", _median(values) * ms, "ms",
                        float(len(values)), "outputs joined")
        for previous, (name, values) in zip(_HOPS, hop_delays.items())
    ]  # fmt: skip
    return figures
