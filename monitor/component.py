"""The protocol by which each part of a VM saves and restores its own state (checkpoints, restarts).

A component is the interrupt state, a device, or a guest personality (monitor/linux/). It owns one
protobuf message in proto/vmft.proto; a checkpoint's MachineState holds the vCPU plus, per component,
`name -> save().SerializeToString()`. The machine never reads a component's fields: adding a component
is its own module, its own message, and one line where the machine lists its components.

Rules for an implementation:
- `name` is unique within a machine and never changes (it keys saved state across versions).
- `save()` and `restore()` run with the vCPU parked (or not started), on any thread.
- `restore(data, live)` gets the bytes `save()` produced, on a freshly built machine whose memory is
  already restored. `live`: the machine will run on live; replaying (`live=False`), the event log
  supplies all host input, so host-side queues are not restored.
- `replicated()` is the part of the state that is a function of guest execution and the event log:
  equal on a primary and its backup at the same position (a recorded run and its replay). It is
  covered by the state hash, so it must not include host-side state (input queues, host counters,
  wall-clock time). Return b"" if there is none.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from google.protobuf.message import Message

from monitor.errors import CheckpointError

_M = TypeVar("_M", bound=Message)


class Component(Protocol):
    name: str

    def save(self) -> Message:
        """The component's whole state, as its own message."""
        ...

    def restore(self, data: bytes, live: bool) -> None:
        """Load the state `save()` produced (serialized)."""
        ...

    def replicated(self) -> bytes:
        """The deterministic part of the state, for the state hash (see the module docstring)."""
        ...


def parse_state(message: type[_M], data: bytes, name: str) -> _M:
    """Parse a component's saved state, refusing damaged bytes as a CheckpointError."""
    msg = message()
    try:
        msg.ParseFromString(data)
    except Exception as err:  # DecodeError and whatever else damaged bytes make protobuf raise
        raise CheckpointError(f"the saved state of component {name!r} is corrupted: {err}") from err
    return msg


def save_all(components: list[Component]) -> dict[str, bytes]:
    return {c.name: c.save().SerializeToString(deterministic=True) for c in components}


def restore_all(components: list[Component], states: dict[str, bytes], live: bool) -> None:
    """Restore every component from `states`. A saved component this machine does not have is refused
    (its state would be silently lost); a component with no saved state keeps its fresh state."""
    known = {c.name for c in components}
    unknown = sorted(set(states) - known)
    if unknown:
        raise CheckpointError(f"saved state of components this vmft does not have: {', '.join(unknown)}")
    for component in components:
        data = states.get(component.name)
        if data is not None:
            component.restore(data, live)


def replicated_state(components: list[Component]) -> bytes:
    """The components' deterministic state, framed by name, for the state hash."""
    out = bytearray()
    for component in components:
        part = component.replicated()
        if part:
            name = component.name.encode()
            out += len(name).to_bytes(2, "little") + name + len(part).to_bytes(4, "little") + part
    return bytes(out)
