"""Power: the guest's exit code, and a guest panic with its message."""

from __future__ import annotations

import struct
from typing import Callable

from monitor.devices.base import DeviceContext, read_request
from monitor.guest_abi import Port
from monitor.journal import OutputKind

MAX_PANIC_MESSAGE = 4096


class GuestStop(Exception):
    """Raised from a power port handler: the guest asked to stop."""

    def __init__(self, exit_code: int | None, panic: str | None = None, vector: int = 0, rip: int = 0):
        super().__init__(panic or f"exit {exit_code}")
        self.exit_code = exit_code
        self.panic = panic
        self.vector = vector
        self.rip = rip


class Power:
    name = "power"

    def __init__(self, ctx: DeviceContext) -> None:
        self._ctx = ctx

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.POWER_EXIT: self._exit, Port.POWER_PANIC: self._panic}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def _exit(self, value: int) -> None:
        code = struct.unpack("<i", struct.pack("<I", value))[0]
        self._ctx.emit(OutputKind.EXIT, struct.pack("<i", code))
        raise GuestStop(code)

    def _panic(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None:
            raise GuestStop(None, "guest panic (unreadable request block)")
        length = min(req.len, MAX_PANIC_MESSAGE)
        if self._ctx.memory.contains(req.addr, length):
            message = self._ctx.memory.read(req.addr, length).decode("utf-8", "replace")
        else:
            message = f"(panic message at 0x{req.addr:x} lies outside guest RAM)"
        self._ctx.emit(OutputKind.PANIC, message.encode())
        raise GuestStop(None, message, req.arg, req.arg64)
