"""Entropy: random bytes into a guest buffer (an event: the backup gets the primary's bytes)."""

from __future__ import annotations

import os
from typing import Callable

from monitor.devices.base import DeviceContext, check_buffer, complete, read_request
from monitor.guest_abi import Port, Status
from monitor.journal import EventKind

MAX_ENTROPY_REQUEST = 1 << 16


class Entropy:
    name = "entropy"

    def __init__(self, ctx: DeviceContext) -> None:
        self._ctx = ctx

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.ENTROPY: self._fill}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def _fill(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None or not check_buffer(self._ctx, req, "entropy"):
            return
        if req.len > MAX_ENTROPY_REQUEST:
            self._ctx.guest_fault(f"entropy request of {req.len} bytes exceeds {MAX_ENTROPY_REQUEST}")
            complete(self._ctx, req, Status.EINVAL)
            return
        length = req.len
        data = self._ctx.journal.data(EventKind.ENTROPY, lambda: os.urandom(length))
        self._ctx.memory.write(req.addr, data)
        complete(self._ctx, req, Status.OK, len(data))
