"""Virtual time and the one-shot timer.

The guest's clock is the host's monotonic clock shifted so that it starts at zero and never runs
backwards across a restore or a failover (`resume_from`). Every read is an event; so is the timer
firing (an interrupt becoming pending), decided live at a synchronous exit and replayed from the log.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

from monitor.component import parse_state
from monitor.devices.base import DeviceContext, complete, read_request, set_arg64
from monitor.guest_abi import EventBit, Port, Status, Vector
from monitor.journal import EventKind
from proto import vmft_pb2

_U64 = struct.Struct("<Q")


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

    # ----- monitor/component.py: the virtual clock and the last time the guest read -----

    def save(self) -> vmft_pb2.ClockState:
        return vmft_pb2.ClockState(
            now_ns=max(self._clock.now_ns(), self.last_seen_ns), last_seen_ns=self.last_seen_ns
        )

    def restore(self, data: bytes, live: bool) -> None:
        state = parse_state(vmft_pb2.ClockState, data, self.name)
        self._clock.resume_from(max(state.now_ns, state.last_seen_ns))  # never backwards for the guest
        self.last_seen_ns = state.last_seen_ns

    def replicated(self) -> bytes:
        return _U64.pack(self.last_seen_ns)  # the current time is host state; what the guest saw is not


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

    # ----- monitor/component.py: the deadline is set by the guest, so replicated state -----

    def save(self) -> vmft_pb2.TimerState:
        return vmft_pb2.TimerState(deadline_ns=self.deadline)

    def restore(self, data: bytes, live: bool) -> None:
        self.deadline = parse_state(vmft_pb2.TimerState, data, self.name).deadline_ns

    def replicated(self) -> bytes:
        return _U64.pack(self.deadline)
