"""Machine.pause's bound: a pause request that times out is withdrawn, so a vCPU that reaches its next exit
only afterwards runs on instead of parking with nobody left to resume it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.builder import MachineConfig, build
from monitor.journal import OutputKind
from monitor.netserver import NicServer
from replica.kv_client import KvClient
from tests.test_nic import shutdown

pytestmark = pytest.mark.kvm


async def test_a_timed_out_pause_does_not_park_the_vcpu_later(guest_image: Callable[[str], Path]) -> None:
    machine = build(MachineConfig(str(guest_image("kv"))))
    busy, let_go = threading.Event(), threading.Event()

    def slow_first_output(kind: OutputKind, data: bytes, position: int) -> None:
        if not let_go.is_set():  # the vCPU thread is held inside an exit's handler (no exit to park at)
            busy.set()
            let_go.wait(10)
        machine.deliver(kind, data)

    machine.output_handler = slow_first_output
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    try:
        assert await asyncio.to_thread(busy.wait, 10)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(machine.pause, 0.2)
        let_go.set()  # its next exit comes after the pause gave up: it must not park there
        async with KvClient([f"{host}:{port}"], client_id="after", timeout=5) as kv:
            await kv.set("k", "v")
            assert await kv.get("k") == "v"
        await asyncio.to_thread(machine.pause, 5.0)  # and a later pause still works
        machine.resume()
    finally:
        let_go.set()
        await shutdown(machine, server)
