"""Dirty-page tracking: KVM's dirty log (guest writes) ORed with the monitor's own writes, fanned out
to every consumer (state hashing, incremental checkpoints), each with its own accumulated set."""

from __future__ import annotations

from monitor.kvm import VmFd
from monitor.memory import PAGE_SIZE, GuestMemory


_BYTE_BITS = [tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)]


def bitmap_to_pages(bitmap: bytes) -> list[int]:
    """Indices of the set bits of a little-endian bitmap (one bit per page), ascending. Linear in the
    bitmap's size: skips zero 64-bit words, then expands set bytes from a table."""
    pages: list[int] = []
    extend = pages.extend
    length = len(bitmap)
    whole = length - length % 8
    table = _BYTE_BITS
    for word_index, word in enumerate(memoryview(bitmap)[:whole].cast("Q")):
        if word:
            base = word_index * 8
            for at in range(base, base + 8):
                byte = bitmap[at]
                if byte:
                    first = at * 8
                    extend([first + bit for bit in table[byte]])
    for at in range(whole, length):
        byte = bitmap[at]
        if byte:
            extend([at * 8 + bit for bit in table[byte]])
    return pages


class DirtyTracker:
    """Consumers keep their dirty sets as bitmaps (Python ints): merging a collection into every consumer
    is one big-integer OR each, however many pages are dirty; only `take` lists pages."""

    def __init__(self, vm: VmFd, slot: int, memory: GuestMemory) -> None:
        self._vm = vm
        self._slot = slot
        self._memory = memory
        self.pages = memory.size // PAGE_SIZE
        self._bytes = (self.pages + 7) // 8
        self._consumers: dict[str, int] = {}

    def register(self, name: str, all_dirty: bool = True) -> None:
        """A new consumer (or one starting over); it starts with every page dirty (it has seen nothing
        yet), or with none (`all_dirty=False`: it only wants writes from now on)."""
        self.collect()
        self._consumers[name] = (1 << self.pages) - 1 if all_dirty else 0

    def collect(self) -> None:
        """Fetch KVM's log (which clears it) and the monitor's writes into every consumer's set."""
        dirty = int.from_bytes(self._vm.get_dirty_log(self._slot, self.pages), "little")
        monitor = self._memory.take_monitor_dirty()
        index = monitor.find(1)
        if index != -1:
            bits = bytearray(self._bytes)
            while index != -1:
                bits[index >> 3] |= 1 << (index & 7)
                index = monitor.find(1, index + 1)
            dirty |= int.from_bytes(bits, "little")
        if dirty:
            for name, pages in self._consumers.items():
                self._consumers[name] = pages | dirty

    def take(self, name: str) -> list[int]:
        """The pages dirtied since this consumer last took them (sorted)."""
        self.collect()
        pages = self._consumers[name]
        self._consumers[name] = 0
        if not pages:
            return []
        return bitmap_to_pages(pages.to_bytes(self._bytes, "little"))
