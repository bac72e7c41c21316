"""A hash of guest memory and vCPU state that costs only the pages written since the last one.

Each page keeps an 8-byte hash; a state hash rehashes the dirty pages and then hashes the table of
page hashes together with the vCPU registers. Both sides of a pair compute it at the same positions.
"""

from __future__ import annotations

import hashlib

from monitor.dirty import DirtyTracker
from monitor.memory import PAGE_SIZE, GuestMemory

_CONSUMER = "statehash"


_ZERO_PAGE_HASH = hashlib.blake2b(bytes(PAGE_SIZE), digest_size=8).digest()


class StateHasher:
    """Create it while guest memory is still all zero (a new machine): every page starts with the zero
    page's hash and only pages written since are hashed, so even the first digest is cheap."""

    def __init__(self, memory: GuestMemory, dirty: DirtyTracker) -> None:
        self._memory = memory
        self._dirty = dirty
        self._page_hashes = bytearray(_ZERO_PAGE_HASH * (memory.size // PAGE_SIZE))
        dirty.register(_CONSUMER, all_dirty=False)

    def digest(self, cpu_state: bytes) -> bytes:
        mem = self._memory.buffer()
        table = self._page_hashes
        for page in self._dirty.take(_CONSUMER):
            start = page * PAGE_SIZE
            table[page * 8 : page * 8 + 8] = hashlib.blake2b(
                mem[start : start + PAGE_SIZE], digest_size=8
            ).digest()
        h = hashlib.blake2b(table, digest_size=16)
        h.update(cpu_state)
        return h.digest()
