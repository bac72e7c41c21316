"""The NIC end to end: many concurrent client connections carried through one guest, message framing,
oversized messages, and connection open/close reaching the guest."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.devices.net import MAX_MESSAGE
from monitor.builder import MachineConfig, build
from monitor.machine import Machine
from monitor.netserver import NicServer
from replica.kv_client import KvClient

pytestmark = pytest.mark.kvm


async def serve_kv(image: Path) -> tuple[Machine, NicServer, str]:
    machine = build(MachineConfig(str(image)))
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    return machine, server, f"{host}:{port}"


async def shutdown(machine: Machine, server: NicServer) -> None:
    machine.stop()
    await asyncio.wait_for(machine.wait(), 10)
    await server.close()
    machine.close()


async def test_many_concurrent_connections(guest_image: Callable[[str], Path]) -> None:
    machine, server, address = await serve_kv(guest_image("kv"))
    try:

        async def client(index: int) -> list[str]:
            async with KvClient([address], client_id=f"n{index}", timeout=5) as kv:
                seen = []
                for round_ in range(20):
                    await kv.set(f"c{index}", f"{index}-{round_}")
                    seen.append(await kv.get(f"c{index}") or "")
                    await kv.incr("shared", 1)
                return seen

        results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(32))), 60)
        for index, seen in enumerate(results):
            assert seen == [f"{index}-{r}" for r in range(20)]
        async with KvClient([address], client_id="check", timeout=5) as kv:
            assert await kv.get("shared") == str(32 * 20)
        assert machine.net_backend.rx_messages >= 32 * 60
        assert machine.guest_faults == []
    finally:
        await shutdown(machine, server)


async def test_oversized_message_closes_only_that_connection(guest_image: Callable[[str], Path]) -> None:
    machine, server, address = await serve_kv(guest_image("kv"))
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(struct.pack(">I", MAX_MESSAGE + 1))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node
        writer.close()
        async with KvClient([address], client_id="after", timeout=5) as kv:
            await kv.set("still", "works")
            assert await kv.get("still") == "works"
    finally:
        await shutdown(machine, server)


async def test_injected_command_reaches_the_guest(guest_image: Callable[[str], Path]) -> None:
    """NicServer.inject: a message delivered as if a client connected, sent it and left."""
    machine, server, address = await serve_kv(guest_image("kv"))
    try:
        server.inject(b"SET admin:1 injected yes")
        async with KvClient([address], client_id="reader", timeout=5) as kv:
            for _ in range(100):
                if await kv.get("injected") == "yes":
                    break
                await asyncio.sleep(0.01)
            assert await kv.get("injected") == "yes"
    finally:
        await shutdown(machine, server)
