"""What every device sees of the machine, and what the machine sees of every device.

Devices run on the vCPU thread, inside a synchronous exit. Anything a device hands the guest that is
not a function of guest state goes through `DeviceContext.journal`, which records it (primary), replays
it (backup) or just passes it through (an unprotected VM). Outputs go through `DeviceContext.outputs`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable, Protocol

from monitor.journal import Journal, OutputKind

from monitor.guest_abi import REQUEST, REQUEST_STATUS_OFFSET, EventBit, Port, Status, Vector
from monitor.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)


class Interrupts(Protocol):
    def raise_irq(self, vector: Vector) -> None:
        """Make `vector` pending. Only for causes that are a function of guest state (a disk request
        completing inside its own exit); asynchronous news goes through `AsyncSource`."""
        ...


@dataclass
class DeviceContext:
    memory: GuestMemory
    journal: Journal
    interrupts: Interrupts
    emit: Callable[[OutputKind, bytes], None]  # an output (the journal decides whether it is delivered)
    guest_faults: list[str]  # guest programming errors seen (bad addresses, bad requests)

    def guest_fault(self, message: str) -> None:
        log.warning("guest fault: %s", message)
        self.guest_faults.append(message)
        del self.guest_faults[:-100]


@dataclass
class Request:
    """A decoded request block (see guest_abi.REQUEST)."""

    block_addr: int
    addr: int
    len: int
    arg: int
    arg64: int


_REQUEST_STRUCT = struct.Struct(REQUEST.fmt)
_STATUS_RESULT = struct.Struct("<iI")
_ARG64_OFFSET = REQUEST.offset("arg64")


def read_request(ctx: DeviceContext, block_addr: int) -> Request | None:
    """Decode the request block at `block_addr`, or log a guest fault and return None."""
    if block_addr % 8 or not ctx.memory.contains(block_addr, REQUEST.size):
        ctx.guest_fault(f"request block at 0x{block_addr:x} is unaligned or outside guest RAM")
        return None
    addr, length, arg, arg64, _status, _result = _REQUEST_STRUCT.unpack(
        ctx.memory.view(block_addr, REQUEST.size)
    )
    return Request(block_addr, addr, length, arg, arg64)


def complete(ctx: DeviceContext, req: Request, status: Status, result: int = 0) -> None:
    ctx.memory.write(req.block_addr + REQUEST_STATUS_OFFSET, _STATUS_RESULT.pack(status, result))


def set_arg64(ctx: DeviceContext, req: Request, value: int) -> None:
    ctx.memory.write(req.block_addr + _ARG64_OFFSET, struct.pack("<Q", value))


def check_buffer(ctx: DeviceContext, req: Request, what: str) -> bool:
    """True if the request's buffer lies inside guest RAM; otherwise complete it with EFAULT."""
    try:
        ctx.memory.check(req.addr, req.len)
    except GuestMemoryError as err:
        ctx.guest_fault(f"{what}: {err}")
        complete(ctx, req, Status.EFAULT)
        return False
    return True


class Device(Protocol):
    """A device owns some ports. Handlers run on the vCPU thread during a synchronous exit."""

    name: str

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        """Handlers for `out PORT, value` (value: 32-bit, usually a request-block address)."""
        ...

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        """Handlers for `in PORT`."""
        ...


class AsyncSource(Protocol):
    """A device with asynchronous news (network RX, console input, timer expiry).

    The machine asks `has_news()` at synchronous exits (live and recording only) and raises the
    source's interrupt, recording it; on replay the log says when it was raised instead.
    """

    event_bit: EventBit
    vector: Vector

    def has_news(self) -> bool: ...

    def deadline_ns(self) -> int | None:
        """Virtual time at which news will exist without outside input (an armed timer), else None."""
        ...

    def on_raised(self) -> None:
        """Its interrupt was made pending (live or replayed): a one-shot timer disarms."""
        ...
