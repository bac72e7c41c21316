"""Dirty-page tracking: KVM's dirty log (guest writes) ORed with the monitor's own writes, fanned out
to every consumer (state hashing, incremental checkpoints), each with its own accumulated set."""

from __future__ import annotations

from monitor.kvm import VmFd
from monitor.memory import PAGE_SIZE, GuestMemory


def bitmap_to_pages(bitmap: bytes) -> list[int]:
    """Indices of the set bits of a little-endian bitmap (one bit per page)."""
    pages: list[int] = []
    value = int.from_bytes(bitmap, "little")
    while value:
        low = value & -value
        pages.append(low.bit_length() - 1)
        value ^= low
    return pages


class DirtyTracker:
    def __init__(self, vm: VmFd, slot: int, memory: GuestMemory) -> None:
        self._vm = vm
        self._slot = slot
        self._memory = memory
        self.pages = memory.size // PAGE_SIZE
        self._consumers: dict[str, set[int]] = {}

    def register(self, name: str, all_dirty: bool = True) -> None:
        """A new consumer; it starts with every page dirty (it has seen nothing yet)."""
        self.collect()
        self._consumers[name] = set(range(self.pages)) if all_dirty else set()

    def collect(self) -> None:
        """Fetch KVM's log (which clears it) and the monitor's writes into every consumer's set."""
        guest = bitmap_to_pages(self._vm.get_dirty_log(self._slot, self.pages))
        monitor = self._memory.take_monitor_dirty()
        dirty = set(guest)
        index = monitor.find(1)
        while index != -1:
            dirty.add(index)
            index = monitor.find(1, index + 1)
        for pages in self._consumers.values():
            pages |= dirty

    def take(self, name: str) -> list[int]:
        """The pages dirtied since this consumer last took them (sorted)."""
        self.collect()
        pages = self._consumers[name]
        self._consumers[name] = set()
        return sorted(pages)
