"""A lean kv client load, run in a child process by the replication benchmarks (so that the client's Python
does not compete for the GIL of the process that measures, or of the nodes).

`run_load` is called through a `concurrent.futures.ProcessPoolExecutor` (spawn): closed-loop clients, one
request in flight per connection, alternating SET (with a request id, as real clients send writes) and GET
on the connection's own keys, speaking the kv framing (4-byte big-endian length + text) directly.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

_LEN = struct.Struct(">I")
VALUE = "v" * 48


async def _client(
    host: str, port: int, tag: str, deadline: float, latencies: list[float] | None, counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    seq = time.time_ns() // 1000  # request ids keep increasing even when a tag is used again
    sent = 0
    try:
        while time.perf_counter() < deadline:
            seq += 1
            key = f"{tag}k{seq % 16}"
            text = f"SET {tag}:{seq} {key} {VALUE}" if seq % 2 else f"GET {key}"
            payload = text.encode()
            start = time.perf_counter()
            writer.write(_LEN.pack(len(payload)) + payload)
            (length,) = _LEN.unpack(await reader.readexactly(4))
            reply = await reader.readexactly(length)
            if reply.startswith(b"ERR"):
                raise RuntimeError(f"kv error: {reply[:80]!r}")
            if latencies is not None:
                latencies.append(time.perf_counter() - start)
            sent += len(payload) + 4
            counts[0] += 1
    finally:
        counts[1] += sent
        writer.close()


async def _run(
    address: str, connections: int, seconds: float, keep_latencies: bool, tag: str
) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    latencies: list[float] | None = [] if keep_latencies else None
    counts = [0, 0]  # operations, request bytes
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(
        *(_client(host, int(port), f"{tag}c{i}", deadline, latencies, counts) for i in range(connections))
    )
    elapsed = time.perf_counter() - start
    return {
        "ops": counts[0],
        "request_bytes": counts[1],
        "seconds": elapsed,
        "latencies": latencies or [],
    }


def run_load(
    address: str, connections: int, seconds: float, keep_latencies: bool = False, tag: str = "b"
) -> dict[str, Any]:
    """Closed-loop load for `seconds`: {'ops', 'request_bytes', 'seconds', 'latencies' (s, if kept)}."""
    return asyncio.run(_run(address, connections, seconds, keep_latencies, tag))


def warm(address: str) -> int:
    """A few requests (connects the service and warms the child process)."""
    return int(run_load(address, 1, 0.05)["ops"])
