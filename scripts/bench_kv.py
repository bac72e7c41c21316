"""The kv guest as a network service: requests/s with many concurrent connections (SET/GET half and half over
1000 keys, writes with request ids) and the latency of one sequential client, against the same program,
guests/programs/kv.c, built for the host (guests/build/kv-host over guests/host/host_runtime.c: TCP with the
same framing instead of the NIC) under the same load.

The load is scripts/kvload.c (build/kvload): a C epoll generator in its own process, so that the client is
not what the figures measure. `load generator ceiling` is that generator against a trivial echo server it
forks itself (its requests per CPU-second there: what one core of generator sustains), beside the highest
rate it drove (the native kv's, as a rule); `load generator CPU` is the share of its core it used while
driving the guest.

Where things run (--placement, with 2 or more cores): `generator` (the default) pins the generator to the
last core and leaves the servers (this process: the VM's vCPU thread and the event loop serving its NIC;
the native kv) free on all cores; `split` also pins the servers to the other cores, apart from the
generator, which isolates them on a quiet machine but ties them to one core that other work on a shared
machine may take (measured here at load 10 to 12: the VM median 19k req/s with `generator`, 12k with
`split`); `none` pins nothing. The two servers are started once and measured in interleaved phases; medians
are reported."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import benchlib
import kvload
from monitor.journal import Journal
from monitor.loader import GuestImage
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import Machine
from monitor.netserver import NicServer

KEYS = 1000
MEM_MIB = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0,
                        help="the generator against its own echo server (default 2)")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--depth", type=int, default=1,
                        help="requests in flight per connection (default 1: no pipelining)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a throughput phase (default 4)")
    parser.add_argument("--latency-seconds", type=float, default=1.5,
                        help="length of a sequential-latency phase (default 1.5)")
    parser.add_argument("--placement", choices=("generator", "split", "none"), default="generator",
                        help="generator: the load generator on the last core, the servers free (default); "
                        "split: the servers pinned to the other cores; none: nothing pinned")


# ----- where the load and the servers run ---------------------------------------------------------------


def placement(args: argparse.Namespace) -> tuple[int | None, set[int] | None]:
    """(the generator's core, the servers' cores): None for what is not pinned (everything on one core)."""
    generator, servers = kvload.cpu_layout()
    if args.placement == "none" or generator is None:
        return None, None
    return generator, servers if args.placement == "split" else None


@contextmanager
def servers_pinned(args: argparse.Namespace) -> Iterator[None]:
    """This process (and the vCPU threads it starts meanwhile) on the servers' cores; restored after."""
    _, servers = placement(args)
    if servers is None:
        yield
        return
    before = os.sched_getaffinity(0)
    kvload.pin_threads(os.getpid(), servers)
    try:
        yield
    finally:
        kvload.pin_threads(os.getpid(), before)


# ----- the servers ---------------------------------------------------------------------------------------


@asynccontextmanager
async def kv_guest(
    journal: Journal | None = None, image: GuestImage | None = None
) -> AsyncIterator[tuple[Machine, str]]:
    """The kv guest served on a loopback port (as tests/test_guests_run.py's `served`)."""
    config = MachineConfig(str(benchlib.guest_path("kv.elf")), MEM_MIB, None, 0, 5.0)
    machine = builder.build(config, journal=journal, image=image)
    machine.state_digest()  # the first digest hashes all RAM: a once-per-VM cost, paid before serving
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    try:
        yield machine, f"{host}:{port}"
    finally:
        if machine.result is None:
            machine.stop()
        await asyncio.wait_for(machine.wait(), 30)
        await server.close()
        machine.close()


class ReferenceKv(kvload.NativeKv):
    """The reference: kv.c built for the host (guests/build/kv-host), started with `with`; `requests` is what
    its host runtime handed to kv.c, counted by the server."""


# ----- measuring -----------------------------------------------------------------------------------------


@dataclass
class Load:
    requests_per_s: list[float]
    p50_ms: list[float]
    p99_ms: list[float]
    generator_cpu: list[float] = field(default_factory=list)  # the generator's CPU share in throughput phases


async def measure(
    address: str, args: argparse.Namespace, tag: str, load: Load, latency: bool = True
) -> tuple[float, float]:
    """One throughput phase (and one latency phase) of build/kvload against `address`, appended to `load`.
    Returns when the throughput phase started and ended (time.monotonic)."""
    cpu, _ = placement(args)
    result = await kvload.run_async([address], args.connections, args.seconds, depth=args.depth,
                                    keys=KEYS, tag=f"{tag}t", cpu=cpu)  # fmt: skip
    if result.requests <= 0:
        raise RuntimeError(f"no request completed against {address}")
    load.requests_per_s.append(result.rate)
    load.generator_cpu.append(result.cpu_seconds / result.seconds)
    window = result.started_at, result.started_at + result.seconds
    if latency:
        seq = await kvload.run_async([address], 1, args.latency_seconds, keys=KEYS, tag=f"{tag}l", cpu=cpu)
        load.p50_ms.append(seq.latency(50) * 1e3)
        load.p99_ms.append(seq.latency(99) * 1e3)
    return window


async def _run(args: argparse.Namespace) -> tuple[Load, Load]:
    vm, ref = Load([], [], []), Load([], [], [])
    reference = ReferenceKv()
    reference.cpus = placement(args)[1]
    with reference:
        async with kv_guest() as (_machine, vm_address):
            for r in range(args.rounds):
                order = [("vm", vm_address, vm), ("ref", reference.address, ref)]
                for name, address, load in order if r % 2 == 0 else reversed(order):
                    await measure(address, args, f"{name}{r}", load)
    return vm, ref


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    generator, servers = placement(args)
    with servers_pinned(args):
        vm, ref = asyncio.run(_run(args))
    server_cpu = min(servers) if servers else None
    ceiling = kvload.run_ceiling(args.connections, args.ceiling_seconds, depth=args.depth, cpu=generator,
                                 server_cpu=server_cpu)  # fmt: skip
    med = benchlib.median
    ref_name = "kv.c native on the host, same load"
    rates = [(med(vm.requests_per_s), "kv guest"), (med(ref.requests_per_s), "kv.c native")]
    highest, highest_name = max(rates)
    where = "nothing pinned" if generator is None else f"generator on cpu {generator}, servers " + (
        f"on cpus {','.join(map(str, sorted(servers)))}" if servers else "free")
    return [
        benchlib.Figure(f"kv throughput, {args.connections} connections", med(vm.requests_per_s), "req/s",
                        med(ref.requests_per_s), ref_name),
        benchlib.Figure("kv latency p50, 1 sequential client", med(vm.p50_ms), "ms", med(ref.p50_ms),
                        ref_name),
        benchlib.Figure("kv latency p99, 1 sequential client", med(vm.p99_ms), "ms", med(ref.p99_ms),
                        ref_name),
        # What one core of generator sustains: its requests per CPU-second against the echo server with the
        # same connections and depth (conservative: a busier generator batches more per wake-up).
        benchlib.Figure(f"load generator ceiling, {args.connections} connections",
                        ceiling.requests / ceiling.cpu_seconds, "req/s", highest,
                        f"the highest rate it drove ({highest_name}; {where})"),
        benchlib.Figure("load generator CPU, driving the kv guest", med(vm.generator_cpu) * 100,
                        "% of a core", 100.0, "one core"),
    ]
