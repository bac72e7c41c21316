"""Guest RAM: one anonymous mapping, bounds-checked access, and a bitmap of pages the monitor wrote.

KVM's dirty log only sees writes the guest makes; device DMA and image loading are the monitor's own
writes, so they are tracked here and ORed into the dirty set by whoever takes a checkpoint.

After a lazy restore (monitor/checkpoint/lazy.py) pages load on first touch until a `Filler` is done: every
access here asks it to load the range first, because a thread holding the GIL must not touch a missing
page itself (the page would be served by another Python thread, which needs the GIL).
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Protocol

from monitor.errors import GuestError

PAGE_SIZE = 4096


class GuestMemoryError(GuestError):
    """A guest-physical range that lies (partly) outside guest RAM."""

    def __init__(self, addr: int, length: int, size: int) -> None:
        super().__init__(f"guest address range 0x{addr:x}+{length} lies outside guest RAM (0x0..0x{size:x})")
        self.addr = addr
        self.length = length


class Filler(Protocol):
    """Loads guest memory on demand (a lazy restore) until it detaches itself."""

    def ensure(self, addr: int, length: int) -> None: ...

    def ensure_all(self) -> None: ...

    def close(self) -> None: ...


class GuestMemory:
    def __init__(self, size: int) -> None:
        if size <= 0 or size % (2 << 20):
            raise ValueError(f"guest RAM size must be a positive multiple of 2 MiB, not {size}")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._map)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.monitor_dirty = bytearray(size // PAGE_SIZE)  # one byte per page: simple and fast to OR
        self.filler: Filler | None = None  # set while pages still load on first touch
        self._filler_owner: Filler | None = None  # the last filler attached, closed with the memory

    def contains(self, addr: int, length: int) -> bool:
        return 0 <= addr and 0 <= length and addr + length <= self.size

    def check(self, addr: int, length: int) -> None:
        if not self.contains(addr, length):
            raise GuestMemoryError(addr, length, self.size)

    def read(self, addr: int, length: int) -> bytes:
        self.check(addr, length)
        if self.filler is not None:
            self.filler.ensure(addr, length)
        return self._map[addr : addr + length]

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy read-only view; do not keep it across a call that may close the memory."""
        self.check(addr, length)
        if self.filler is not None:
            self.filler.ensure(addr, length)
        return self._view[addr : addr + length].toreadonly()

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        self.check(addr, length)
        if self.filler is not None:
            self.filler.ensure(addr, length)
        self._map[addr : addr + length] = data
        self.mark_dirty(addr, length)

    def mark_dirty(self, addr: int, length: int) -> None:
        if length <= 0:
            return
        first = addr // PAGE_SIZE
        last = (addr + length - 1) // PAGE_SIZE
        self.monitor_dirty[first : last + 1] = b"\x01" * (last - first + 1)

    def take_monitor_dirty(self) -> bytearray:
        dirty = self.monitor_dirty
        self.monitor_dirty = bytearray(len(dirty))
        return dirty

    def buffer(self) -> memoryview:
        """The whole of guest RAM (for hashing and checkpoints), all of it loaded."""
        if self.filler is not None:
            self.filler.ensure_all()
        return self._view

    def attach_filler(self, filler: Filler) -> None:
        if self.filler is not None:
            raise ValueError("guest memory already has a filler")
        self.filler = filler
        self._filler_owner = filler

    def detach_filler(self, filler: Filler) -> None:
        """The filler is done (everything loaded): accesses go straight to memory again. It stays owned
        until `stop_filling`, which makes sure its thread has ended."""
        if self.filler is filler:
            self.filler = None

    def stop_filling(self) -> None:
        """Stop on-demand loading (the machine is closing): its thread is ended (also one that finished
        loading and is on its way out), pages never loaded read as zero."""
        owner = self._filler_owner
        self.filler = None
        if owner is not None:
            owner.close()
            self._filler_owner = None

    def close(self) -> None:
        self.stop_filling()
        self._view.release()
        self._map.close()
