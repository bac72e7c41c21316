"""Console: guest output (an output of the VM) and host input (an event)."""

from __future__ import annotations

import collections
import threading
from typing import Callable

from monitor.component import parse_state
from monitor.devices.base import DeviceContext, check_buffer, complete, read_request
from monitor.guest_abi import EventBit, Port, Status, Vector
from monitor.journal import EventKind, OutputKind
from proto import vmft_pb2

MAX_CONSOLE_WRITE = 1 << 20


class Console:
    name = "console"
    event_bit = EventBit.CONSOLE_IN
    vector = Vector.CONSOLE_IN

    def __init__(self, ctx: DeviceContext, wake: Callable[[], None]) -> None:
        self._ctx = ctx
        self._wake = wake
        self._input: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.CONSOLE_WRITE: self._write, Port.CONSOLE_READ: self._read}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def feed(self, data: bytes) -> None:
        """Host input for the guest (any thread)."""
        with self._lock:
            self._input.append(data)
        self._wake()

    def has_news(self) -> bool:
        return bool(self._input)

    # ----- monitor/component.py: only host input not yet read, which is host state -----

    def save(self) -> vmft_pb2.ConsoleState:
        with self._lock:
            return vmft_pb2.ConsoleState(input=list(self._input))

    def restore(self, data: bytes, live: bool) -> None:
        if not live:
            return  # replaying, the log supplies the input the guest reads
        pending = list(parse_state(vmft_pb2.ConsoleState, data, self.name).input)
        with self._lock:
            self._input = collections.deque(pending)
        if pending:
            self._wake()

    def replicated(self) -> bytes:
        return b""

    def deadline_ns(self) -> int | None:
        return None

    def on_raised(self) -> None:
        pass

    def _write(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None or not check_buffer(self._ctx, req, "console write"):
            return
        if req.len > MAX_CONSOLE_WRITE:
            self._ctx.guest_fault(f"console write of {req.len} bytes exceeds {MAX_CONSOLE_WRITE}")
            complete(self._ctx, req, Status.EINVAL)
            return
        self._ctx.emit(OutputKind.CONSOLE, self._ctx.memory.read(req.addr, req.len))
        complete(self._ctx, req, Status.OK, req.len)

    def _take_input(self, capacity: int) -> bytes:
        with self._lock:
            out = bytearray()
            while self._input and len(out) < capacity:
                chunk = self._input.popleft()
                room = capacity - len(out)
                out += chunk[:room]
                if len(chunk) > room:
                    self._input.appendleft(chunk[room:])
            return bytes(out)

    def _read(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None or not check_buffer(self._ctx, req, "console read"):
            return
        capacity = req.len
        data = self._ctx.journal.data(EventKind.CONSOLE_IN, lambda: self._take_input(capacity))
        self._ctx.memory.write(req.addr, data[:capacity])
        complete(self._ctx, req, Status.OK, len(data))
