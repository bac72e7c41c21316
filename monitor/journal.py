"""The nondeterminism gate between devices and the world: live, recording or replaying.

Everything the guest observes that is not a function of its own state passes through a Journal at a
synchronous exit. A live journal asks the world; a recording journal asks the world and logs the answer
at the current position (with the guest RIP); a replaying journal answers from the log and checks that
the guest asks the same question at the same place. Outputs pass through it too: recorded as hashes,
compared on replay, and suppressed there.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol

from monitor.guest_abi import Vector


class EventKind(enum.IntEnum):
    """Kinds of log records. proto/vmft.proto's EventKind uses the same numbers."""

    EVENTS = 1  # value of an EVENTS/WAIT read
    CLOCK = 2  # virtual time returned by CLOCK
    CONSOLE_IN = 3  # bytes CONSOLE_READ wrote into guest memory
    NET_RX = 4  # the RX buffer contents NET_RX wrote
    ENTROPY = 5  # random bytes
    IRQ = 6  # an interrupt became pending (value = vector)
    OUTPUT = 7  # hash of an output (console bytes, network TX, exit code): checked on replay
    STATE_HASH = 8  # hash of guest memory and vCPU state
    DISK_WRITE = 9  # outcome of a disk write (0 or an errno): the host's disk may fail one side only
    ROOT_FILE = 10  # a Linux guest read this root file: path NUL sha256; replay refuses different files
    VDSO_TIME = 11  # a Linux guest's vDSO time page was rewritten at this exit: its new clock values
    SIGNAL = 12  # a Linux guest got a signal from outside at this exit (the host's SIGTERM): its number


class OutputKind(enum.IntEnum):
    CONSOLE = 1
    NET = 2
    EXIT = 3
    PANIC = 4


class JournalMode(enum.Enum):
    LIVE = "live"
    RECORD = "record"
    REPLAY = "replay"


class Journal(Protocol):
    mode: JournalMode

    def bind(self, rip: Callable[[], int], request_stop: Callable[[], None]) -> None:
        """Attach to a machine: how to read the guest RIP, and how to stop it at the current exit."""
        ...

    def value(self, kind: EventKind, live: Callable[[], int]) -> int:
        """An integer input. `live` is called unless replaying."""
        ...

    def data(self, kind: EventKind, live: Callable[[], bytes]) -> bytes:
        """A byte-string input. `live` is called unless replaying."""
        ...

    def data_if(self, kind: EventKind, live: Callable[[], bytes | None]) -> bytes | None:
        """An input that only some exits have (the recording decides): `live` returns None for none.
        Logged with value 1, so that a replay tells it from a `data` event of the same kind later in the
        same exit: replaying, the next event if it is at this position, of `kind` and value 1, else None."""
        ...

    def irq(self, vector: Vector) -> None:
        """Record that `vector` became pending at this position (live and recording only)."""
        ...

    def due_irqs(self) -> list[Vector]:
        """Replay only: the vectors the log made pending at the current position, in order."""
        ...

    def output(self, kind: OutputKind, data: bytes) -> bool:
        """Account for an output; True if it should really be delivered (not replaying)."""
        ...

    def at_exit(self, position: int) -> None:
        """Called at every synchronous exit, before it is handled (replay waits here for log)."""
        ...

    def exit_done(self, position: int) -> None:
        """Exit `position` is fully handled: no event belongs to it any more (recording: an output made
        at it can go to the backup now, not one guest run later at the next exit)."""
        ...

    def idle(self) -> None:
        """The guest is blocked waiting for news (recording: flush what is complete)."""
        ...

    def cancel_wait(self) -> None:
        """The machine is being stopped: a replay waiting for more log gives up (raises JournalStop)."""
        ...

    def state_hash_due(self, position: int) -> bool:
        """Whether a state hash belongs at this position."""
        ...

    def state_hash(self, digest: bytes) -> None:
        """Record (or, replaying, check) a state hash at this position."""
        ...

    def finish(self, digest: bytes, reason: str) -> None:
        """The VM stopped: record (or check) the final state hash and flush. `digest` is b"" when the VM
        stopped between synchronous exits (hung, or stopped while paused): no replay reaches that state."""
        ...


class LiveJournal:
    """No recording, no replay: an unprotected VM."""

    mode = JournalMode.LIVE

    def bind(self, rip: Callable[[], int], request_stop: Callable[[], None]) -> None:
        pass

    def idle(self) -> None:
        pass

    def cancel_wait(self) -> None:
        pass

    def value(self, kind: EventKind, live: Callable[[], int]) -> int:
        return live()

    def data(self, kind: EventKind, live: Callable[[], bytes]) -> bytes:
        return live()

    def data_if(self, kind: EventKind, live: Callable[[], bytes | None]) -> bytes | None:
        return live()

    def irq(self, vector: Vector) -> None:
        pass

    def due_irqs(self) -> list[Vector]:
        return []

    def output(self, kind: OutputKind, data: bytes) -> bool:
        return True

    def at_exit(self, position: int) -> None:
        pass

    def exit_done(self, position: int) -> None:
        pass

    def state_hash_due(self, position: int) -> bool:
        return False

    def state_hash(self, digest: bytes) -> None:
        pass

    def finish(self, digest: bytes, reason: str) -> None:
        pass


class DivergenceError(Exception):
    """Replay found the guest somewhere other than where the recording was."""

    def __init__(self, position: int, what: str, expected: object, found: object) -> None:
        super().__init__(f"divergence at position {position}: {what}: expected {expected}, found {found}")
        self.position = position
        self.what = what
        self.expected = expected
        self.found = found


class JournalStop(Exception):
    """The journal cannot go on (the log ended, or replay was told to stop): stop the machine here."""
