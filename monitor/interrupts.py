"""Userspace interrupt state: pending vectors, latched event bits, and the one injection rule.

The rule (docs/design.md): at a synchronous exit, if a vector is pending and the vCPU reports
`ready_for_interrupt_injection` with IF set, inject the lowest pending vector with KVM_INTERRUPT;
otherwise it stays pending. The decision depends only on guest state, so replay makes it identically.
The interrupt window is never requested: its exit lands at timing-dependent instructions here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from monitor.component import parse_state
from monitor.guest_abi import VECTOR_EVENT_BITS, EventBit, Vector
from proto import vmft_pb2

_FIRST_VECTOR = int(Vector.TIMER)
_STATE = struct.Struct("<IIQ")


@dataclass
class InterruptState:
    name = "interrupts"  # a monitor/component.py Component
    pending: int = 0  # bit i: vector 0x20 + i is pending
    latched: int = 0  # EventBit mask reported by the next EVENTS/WAIT read
    injected: int = 0  # count, for statistics

    def raise_vector(self, vector: Vector) -> None:
        self.pending |= 1 << (int(vector) - _FIRST_VECTOR)
        self.latched |= int(VECTOR_EVENT_BITS[vector])

    def is_latched(self, bit: EventBit) -> bool:
        return bool(self.latched & bit)

    def take_latched(self, value: int) -> None:
        self.latched &= ~value

    def next_vector(self) -> int:
        """The vector to inject now (pending is nonzero), removing it from the pending set."""
        lowest = self.pending & -self.pending
        self.pending &= ~lowest
        self.injected += 1
        return _FIRST_VECTOR + lowest.bit_length() - 1

    # ----- monitor/component.py: all of it is a function of guest execution and the log -----

    def save(self) -> vmft_pb2.InterruptsState:
        return vmft_pb2.InterruptsState(pending=self.pending, latched=self.latched, injected=self.injected)

    def restore(self, data: bytes, live: bool) -> None:
        state = parse_state(vmft_pb2.InterruptsState, data, self.name)
        self.pending, self.latched, self.injected = state.pending, state.latched, state.injected

    def replicated(self) -> bytes:
        return _STATE.pack(self.pending, self.latched, self.injected)
