"""The output rule: an output becomes visible only once the backup holds every log record up to its
position. Only outputs wait; the guest keeps running.

`hold` is called on the vCPU thread for every output; `ack` on the event loop when the backup reports
the highest position it has received. Outputs are released in order, the moment they are covered
(deliveries happen under the lock, so two threads never reorder them; delivering is only a hand-off).
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

from monitor.journal import OutputKind
from replica import hops

Deliver = Callable[[OutputKind, bytes], None]


class OutputGate:
    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._held: collections.deque[tuple[int, OutputKind, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self.acked = 0
        self.unprotected = False  # the arbiter confirmed this primary alone: release at once
        self.released = 0
        self.released_position = 0  # position of the newest network output made visible (clients saw it)
        # A Linux program's stdout and stderr are what its users see (replica/guest_kind.py): then console
        # output counts for the replay target too.
        self.console_is_output = False
        # Input moderation (replica/input_hold.py) counts the clients of released outputs back: called
        # just before held outputs are released (under the lock) and just after (outside it).
        self.before_release: Callable[[], None] | None = None
        self.after_release: Callable[[], None] | None = None

    def hold(self, kind: OutputKind, data: bytes, position: int) -> None:
        with self._lock:
            if (self.unprotected or position <= self.acked) and not self._held:
                self.released += 1
                self._note(kind, position)
                self._deliver(kind, data)
            else:
                self._held.append((position, kind, data))
                hops.hop("hold", position)

    def ack(self, position: int) -> None:
        with self._lock:
            if position > self.acked:
                self.acked = position
            releasing = bool(self._held) and self._held[0][0] <= self.acked
            if releasing and self.before_release is not None:
                self.before_release()
            self._release_while(lambda p: p <= self.acked)
        if releasing and self.after_release is not None:
            self.after_release()

    def release_unprotected(self) -> None:
        """Only after the arbiter has confirmed this node as the sole primary."""
        with self._lock:
            self.unprotected = True
            if self.before_release is not None:
                self.before_release()
            self._release_while(lambda p: True)
        if self.after_release is not None:
            self.after_release()

    def protect_again(self, acked: int) -> None:
        with self._lock:
            self.unprotected = False
            self.acked = acked

    def _release_while(self, covered: Callable[[int], bool]) -> None:
        held = self._held
        while held and covered(held[0][0]):
            position, kind, data = held.popleft()
            self.released += 1
            self._note(kind, position)
            self._deliver(kind, data)
            hops.hop("release", position)

    def _note(self, kind: OutputKind, position: int) -> None:
        # A platform guest's console lines are diagnostics (a guest announcing its own crash among them):
        # the replay target of a restart is what the service's clients saw.
        if kind is OutputKind.NET or (kind is OutputKind.CONSOLE and self.console_is_output):
            self.released_position = position

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Bytes of the outputs held (metrics read it at a scrape: O(held))."""
        with self._lock:
            return sum(len(data) for _, _, data in self._held)
