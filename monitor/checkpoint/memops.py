"""Host memory helpers for taking and restoring checkpoints: zero tests, pre-faulting, range arithmetic.

The libc functions are bound once (immutable); whether MADV_POPULATE_WRITE works is state of a
`Prefaulter`, one per restore, not of the module.
"""

from __future__ import annotations

import ctypes

from monitor.checkpoint.format import CHUNK_SIZE
from monitor.memory import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
_ZEROS = ctypes.create_string_buffer(CHUNK_SIZE)
_ZEROS_ADDR = ctypes.addressof(_ZEROS)
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in, writable, in one call


def is_zero(address: int, length: int) -> bool:
    """Whether host memory [address, address+length) is all zero (length <= CHUNK_SIZE)."""
    return bool(_memcmp(address, _ZEROS_ADDR, length) == 0)


class Prefaulter:
    """Pre-faults fresh guest memory about to be written (much cheaper than a fault per page here).
    On a kernel without MADV_POPULATE_WRITE it stops trying: plain faults."""

    def __init__(self) -> None:
        self.works = True

    def populate(self, address: int, length: int) -> None:
        if not self.works:
            return
        start = address - address % PAGE_SIZE
        if _madvise(start, length + (address - start), _MADV_POPULATE_WRITE) != 0:
            self.works = False


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) ranges merged where they touch or overlap, sorted."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], start + length - out[-1][0]))
        else:
            out.append((start, length))
    return out


def page_runs(pages: list[int], max_pages: int) -> list[tuple[int, int]]:
    """Sorted page indices as (first page, count) runs of at most max_pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page and runs[-1][1] < max_pages:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def split_ranges(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """(offset, length) ranges cut into pieces of at most `limit` bytes."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        while length > 0:
            n = min(length, limit)
            out.append((offset, n))
            offset += n
            length -= n
    return out
