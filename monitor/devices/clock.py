"""Virtual time and the one-shot timer.

The guest's clock is the host's monotonic clock shifted so that it starts at zero and never runs
backwards across a restore or a failover (`resume_from`). Every read is an event; so is the timer
firing (an interrupt becoming pending), decided live at a synchronous exit and replayed from the log.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

from monitor.devices.base import DeviceContext, complete, read_request, set_arg64
from monitor.guest_abi import EventBit, Port, Status, Vector
from monitor.journal import EventKind


class VirtualClock:
    def __init__(self) -> None:
        self._base = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._base

    def resume_from(self, guest_ns: int) -> None:
        """Continue from `guest_ns` (the last time the guest saw) on a new host or after a restore."""
        self._base = time.monotonic_ns() - guest_ns


class Clock:
    name = "clock"

    def __init__(self, ctx: DeviceContext, clock: VirtualClock) -> None:
        self._ctx = ctx
        self._clock = clock
        self.last_seen_ns = 0

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.CLOCK: self._read}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def _read(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None:
            return
        now = self._ctx.journal.value(EventKind.CLOCK, self._clock.now_ns)
        self.last_seen_ns = now
        set_arg64(self._ctx, req, now)
        complete(self._ctx, req, Status.OK)


class Timer:
    name = "timer"
    event_bit = EventBit.TIMER
    vector = Vector.TIMER

    def __init__(self, ctx: DeviceContext, clock: VirtualClock) -> None:
        self._ctx = ctx
        self._clock = clock
        self.deadline = 0  # guest ns; 0 = disarmed. Set by the guest, so replicated state.

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.TIMER: self._arm}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def _arm(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None:
            return
        self.deadline = req.arg64
        complete(self._ctx, req, Status.OK)

    def has_news(self) -> bool:
        return self.deadline != 0 and self._clock.now_ns() >= self.deadline

    def deadline_ns(self) -> int | None:
        return self.deadline or None

    def on_raised(self) -> None:
        self.deadline = 0  # one-shot: the guest re-arms

    def state(self) -> bytes:
        return struct.pack("<Q", self.deadline)

    def load_state(self, data: bytes) -> None:
        (self.deadline,) = struct.unpack("<Q", data)
