"""Where a replicated VM stands: its role, its state, and the moves allowed between them.

One `Standing` per VM (kept whole when a backup becomes the primary) owns what decides what the world may
see: the role and state, the generation the arbiter gave this node, how far the peer has acknowledged the
log, and the output gate (outputs wait in it for those acknowledgements, or go out at once when the
arbiter made this node the sole primary). Status is derived from it and crosses the wire as an enum
(proto VmState); `message` is the human detail.

A move not in `TRANSITIONS` is a bug in the caller and raises `IllegalTransition`, so that a path nobody
designed (a late link error after a restart, a second watcher of one machine) shows in the log at once
instead of leaving a VM serving in a state no one checks for.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from monitor.errors import VmftError
from proto import vmft_pb2
from replica.output_gate import Deliver, OutputGate
from replica.stream_sink import StreamSink

log = logging.getLogger(__name__)


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"


class State(enum.Enum):
    STARTING = "starting"
    SEEDING = "seeding from a checkpoint"  # backup: restoring the primary's live checkpoint
    REPLAYING = "replaying"  # backup: following the primary's log, ready to take over
    PROMOTING = "promoting"  # backup: the primary is suspected; claiming, then finishing the log
    RUNNING = "running"  # primary: serving, protected
    RUNNING_UNPROTECTED = "running unprotected"  # primary: serving alone, confirmed by the arbiter
    CONNECTING = "reaching a new backup"  # primary: unprotected, a new backup asked to accept the pair
    REPROTECTING = "re-protecting"  # primary: the new backup accepted; a live checkpoint seeds it
    RESTARTING = "restarting"  # primary: the guest faulted; restoring a checkpoint, replaying to go live
    FENCED = "fenced"  # a newer generation belongs to another node
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def wire(self) -> vmft_pb2.VmState:
        return _WIRE[self]


_WIRE = {
    State.STARTING: vmft_pb2.VM_STATE_STARTING,
    State.SEEDING: vmft_pb2.VM_STATE_SEEDING,
    State.REPLAYING: vmft_pb2.VM_STATE_REPLAYING,
    State.PROMOTING: vmft_pb2.VM_STATE_PROMOTING,
    State.RUNNING: vmft_pb2.VM_STATE_RUNNING,
    State.RUNNING_UNPROTECTED: vmft_pb2.VM_STATE_RUNNING_UNPROTECTED,
    # Reaching a backup is not yet re-protecting: until the backup accepts, the VM is simply unprotected
    # (whoever repairs a pair waits for exactly that state, and tries again when an attempt is refused).
    State.CONNECTING: vmft_pb2.VM_STATE_RUNNING_UNPROTECTED,
    State.REPROTECTING: vmft_pb2.VM_STATE_REPROTECTING,
    State.RESTARTING: vmft_pb2.VM_STATE_RESTARTING,
    State.FENCED: vmft_pb2.VM_STATE_FENCED,
    State.STOPPED: vmft_pb2.VM_STATE_STOPPED,
    State.FAILED: vmft_pb2.VM_STATE_FAILED,
}


_END = frozenset({State.STOPPED, State.FAILED})
_FENCED_OR_END = _END | {State.FENCED}
TERMINAL = frozenset({State.FENCED, State.STOPPED, State.FAILED})
SERVING = frozenset({State.RUNNING, State.RUNNING_UNPROTECTED, State.CONNECTING})

TRANSITIONS: dict[Role, dict[State, frozenset[State]]] = {
    Role.BACKUP: {
        State.STARTING: frozenset({State.SEEDING, State.REPLAYING}) | _END,
        State.SEEDING: frozenset({State.REPLAYING}) | _END,
        State.REPLAYING: frozenset({State.PROMOTING}) | _END,
        State.PROMOTING: _END,  # or, by `promote`, the primary's RUNNING_UNPROTECTED
        State.FAILED: frozenset({State.STOPPED}),
        State.STOPPED: frozenset(),
    },
    Role.PRIMARY: {
        State.STARTING: frozenset({State.RUNNING, State.RUNNING_UNPROTECTED}) | _END,
        State.RUNNING: frozenset({State.RUNNING_UNPROTECTED, State.RESTARTING, State.FENCED}) | _END,
        # A primary is fenced whenever it learns that another node holds a newer generation.
        State.RUNNING_UNPROTECTED: frozenset({State.CONNECTING, State.RESTARTING, State.FENCED}) | _END,
        State.CONNECTING: frozenset({State.REPROTECTING, State.RUNNING_UNPROTECTED, State.RESTARTING})
        | _FENCED_OR_END,
        State.REPROTECTING: frozenset({State.RUNNING, State.RUNNING_UNPROTECTED, State.RESTARTING})
        | _FENCED_OR_END,
        State.RESTARTING: frozenset({State.RUNNING_UNPROTECTED}) | _FENCED_OR_END,
        State.FENCED: frozenset({State.STOPPED}),
        State.FAILED: frozenset({State.STOPPED}),
        State.STOPPED: frozenset(),
    },
}

# The wire's serving states: a client of the status (chaos, tests) asks "does it serve?" with this.
SERVING_WIRE = frozenset({vmft_pb2.VM_STATE_RUNNING, vmft_pb2.VM_STATE_RUNNING_UNPROTECTED})


def is_serving(status: vmft_pb2.VmStatus) -> bool:
    """A primary that serves its clients (protected or not)."""
    return status.role == vmft_pb2.ROLE_PRIMARY and status.state in SERVING_WIRE


class IllegalTransition(VmftError):
    """A move the state machine does not allow: a bug in the caller, never a user error."""


@dataclass(eq=False)
class Standing:
    role: Role
    generation: int
    state: State = State.STARTING
    message: str = ""
    gate: OutputGate | None = None
    received: int = 0  # backup: the highest log position received from the primary
    replayed: int = 0  # primary: the position its backup has replayed to

    def to(self, state: State, message: str | None = None) -> None:
        """Move to `state` (and say why in `message`, if given); IllegalTransition if not allowed."""
        if state not in TRANSITIONS[self.role][self.state]:
            raise IllegalTransition(f"{self.role.value}: {self.state.value} -> {state.value} is not allowed")
        log.debug("%s: %s -> %s", self.role.value, self.state.value, state.value)
        self.state = state
        if message is not None:
            self.message = message

    def promote(self, generation: int, message: str) -> None:
        """The backup went live in `generation`: it is the (unprotected) primary from now on."""
        if self.role is not Role.BACKUP or self.state is not State.PROMOTING:
            raise IllegalTransition(f"{self.role.value} in {self.state.value} cannot be promoted")
        self.role = Role.PRIMARY
        self.generation = generation
        self.state = State.RUNNING_UNPROTECTED
        self.message = message

    def is_(self, *states: State) -> bool:
        return self.state in states

    # ----- protection and the output gate -------------------------------------------------------------

    @property
    def protected(self) -> bool:
        """A backup holds the log: the primary's outputs wait for it, the backup can take over."""
        if self.role is Role.PRIMARY:
            return self.state is State.RUNNING
        return self.state is State.REPLAYING

    def new_gate(self, deliver: Deliver) -> OutputGate:
        """A gate for a new machine (start, restart, going live). The newest output clients saw is a fact
        about the VM, not the machine: it carries over (a second restart replays at least up to it)."""
        previous = self.gate
        self.gate = OutputGate(deliver)
        if previous is not None:
            self.gate.released_position = previous.released_position
        return self.gate

    @property
    def acked(self) -> int:
        """Primary: the log position its backup holds; backup: the position it has received."""
        if self.role is Role.BACKUP:
            return self.received
        return self.gate.acked if self.gate is not None else 0

    def ack(self, received: int, replayed: int) -> None:
        """Primary: the backup acknowledged the log up to `received` (outputs up to it may go out)."""
        assert self.gate is not None
        self.gate.ack(received)
        self.replayed = replayed

    def protect_again(self, position: int) -> None:
        """Primary, vCPU parked at `position`: from here on outputs wait for the new backup."""
        assert self.gate is not None
        self.gate.protect_again(position)
        self.replayed = 0

    def run_alone(self, sink: StreamSink) -> None:
        """The arbiter confirmed this node as the sole primary (or none was asked for): no peer gets the log
        from `sink` (a vCPU throttled by it goes on), every held output goes out, and so will every later
        one. The one place that sets the gate's `unprotected` and the sink's `discard`."""
        assert self.gate is not None
        sink.drop_all()
        self.gate.release_unprotected()

    # ----- status -----------------------------------------------------------------------------------

    def wire_role(self) -> vmft_pb2.Role:
        if self.state in TERMINAL:
            return vmft_pb2.ROLE_STOPPED
        return vmft_pb2.ROLE_PRIMARY if self.role is Role.PRIMARY else vmft_pb2.ROLE_BACKUP
