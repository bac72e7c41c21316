"""The kv guest as a network service: requests/s with many concurrent connections (mixed SET/GET) and the
latency of one sequential client, against a trivial asyncio kv server in the same process that speaks the
same framing (4-byte big-endian length + payload) and the same commands.

The client load (replica/kv_client.py) runs in a separate Python process (one per phase, started with
asyncio's subprocess support and answering in JSON) so that the Python client does not compete with the
monitor, or the reference server, for this process's GIL. The two
servers are started once and measured in interleaved phases; medians are reported."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import benchlib
from monitor.journal import Journal
from monitor.loader import GuestImage
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import Machine
from monitor.netserver import NicServer

_LEN = struct.Struct(">I")
KEYS = 1000
MEM_MIB = 64
VALUE = "v" * 48


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a throughput phase (default 4)")
    parser.add_argument("--latency-seconds", type=float, default=1.5,
                        help="length of a sequential-latency phase (default 1.5)")


# ----- the client load (runs in a child process) ---------------------------------------------------------


async def _throughput(address: str, connections: int, seconds: float, tag: str) -> tuple[int, float, float]:
    from replica.kv_client import KvClient

    clients = [KvClient([address], f"{tag}x{i}", timeout=10.0) for i in range(connections)]
    try:
        await asyncio.gather(*(c.set(f"k{i % KEYS}", VALUE) for i, c in enumerate(clients)))  # connect
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(i: int, client: KvClient) -> int:
            rnd = random.Random(f"{tag}{i}")
            done = 0
            while time.perf_counter() < deadline:
                key = f"k{rnd.randrange(KEYS)}"
                if rnd.random() < 0.5:
                    await client.set(key, VALUE)
                else:
                    await client.get(key)
                done += 1
            return done

        started_at = time.monotonic()  # CLOCK_MONOTONIC: comparable with the parent process's
        counts = await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
        return sum(counts), time.perf_counter() - start, started_at
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def _latency(address: str, seconds: float, tag: str) -> list[float]:
    from replica.kv_client import KvClient

    rnd = random.Random(tag)
    latencies: list[float] = []
    async with KvClient([address], f"{tag}seq", timeout=10.0) as client:
        await client.get("k0")  # connect
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            key = f"k{rnd.randrange(KEYS)}"
            start = time.perf_counter()
            if rnd.random() < 0.5:
                await client.set(key, VALUE)
            else:
                await client.get(key)
            latencies.append(time.perf_counter() - start)
    return latencies


def client_main(argv: list[str]) -> None:
    """Entry point of the client process: `throughput ADDRESS CONNECTIONS SECONDS TAG` prints
    {"requests": N, "seconds": S, "started_at": monotonic}; `latency ADDRESS SECONDS TAG` prints
    {"latencies": [s, ...]}."""
    if argv[0] == "throughput":
        count, seconds, started_at = asyncio.run(_throughput(argv[1], int(argv[2]), float(argv[3]), argv[4]))
        print(json.dumps({"requests": count, "seconds": seconds, "started_at": started_at}))
    elif argv[0] == "latency":
        print(json.dumps({"latencies": asyncio.run(_latency(argv[1], float(argv[2]), argv[3]))}))
    else:
        raise SystemExit(f"unknown client command {argv[0]!r}")


async def in_client_process(*argv: object) -> dict[str, Any]:
    """Run client_main(argv) in a fresh Python process; its JSON answer."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(benchlib.ROOT), str(benchlib.SCRIPTS)]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, bench_kv; bench_kv.client_main(sys.argv[1:])", *map(str, argv),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(benchlib.ROOT),
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"kv client process {argv[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    answer: dict[str, Any] = json.loads(out)
    return answer


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


class ReferenceKv:
    """The reference: a trivial asyncio kv server with the same framing and GET/SET replies."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = self.data
        try:
            while True:
                (length,) = _LEN.unpack(await reader.readexactly(4))
                words = (await reader.readexactly(length)).split(b" ", 3)
                self.requests += 1
                if words[0] == b"GET" and len(words) == 2:
                    value = data.get(words[1])
                    reply = b"NOTFOUND" if value is None else b"VALUE " + value
                elif words[0] == b"SET" and len(words) == 4:
                    data[words[2]] = words[3]
                    reply = b"OK"
                else:
                    reply = b"ERR unknown command"
                writer.write(_LEN.pack(len(reply)) + reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        try:
            yield f"{host}:{port}"
        finally:
            server.close()
            await server.wait_closed()


# ----- measuring -----------------------------------------------------------------------------------------


@dataclass
class Load:
    requests_per_s: list[float]
    p50_ms: list[float]
    p99_ms: list[float]


async def measure(
    address: str, args: argparse.Namespace, tag: str, load: Load, latency: bool = True
) -> tuple[float, float]:
    """One throughput phase (and one latency phase) against `address`, appended to `load`. Returns when the
    throughput phase started and ended (time.monotonic)."""
    answer = await in_client_process("throughput", address, args.connections, args.seconds, tag)
    count, seconds = int(answer["requests"]), float(answer["seconds"])
    if count <= 0:
        raise RuntimeError(f"no request completed against {address}")
    load.requests_per_s.append(count / seconds)
    window = float(answer["started_at"]), float(answer["started_at"]) + seconds
    if latency:
        latencies = (await in_client_process("latency", address, args.latency_seconds, tag))["latencies"]
        load.p50_ms.append(benchlib.percentile(latencies, 50) * 1e3)
        load.p99_ms.append(benchlib.percentile(latencies, 99) * 1e3)
    return window


async def _run(args: argparse.Namespace) -> tuple[Load, Load]:
    vm, ref = Load([], [], []), Load([], [], [])
    reference = ReferenceKv()
    async with kv_guest() as (_machine, vm_address), reference.serving() as ref_address:
        for r in range(args.rounds):
            order = [("vm", vm_address, vm), ("ref", ref_address, ref)]
            for name, address, load in order if r % 2 == 0 else reversed(order):
                await measure(address, args, f"{name}{r}", load)
    return vm, ref


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    vm, ref = asyncio.run(_run(args))
    med = benchlib.median
    ref_name = "asyncio kv server, same process"
    return [
        benchlib.Figure(f"kv throughput, {args.connections} connections", med(vm.requests_per_s), "req/s",
                        med(ref.requests_per_s), ref_name),
        benchlib.Figure("kv latency p50, 1 sequential client", med(vm.p50_ms), "ms", med(ref.p50_ms),
                        ref_name),
        benchlib.Figure("kv latency p99, 1 sequential client", med(vm.p99_ms), "ms", med(ref.p99_ms),
                        ref_name),
    ]
