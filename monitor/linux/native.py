"""A few bytes of host machine code the monitor calls through ctypes (the TSC-trapping KVM_RUN, the host's
CPUID): written into a private page that is then made read-only and executable (never writable and
executable at once)."""

from __future__ import annotations

import ctypes
import mmap
import threading

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_pages: list[mmap.mmap] = []  # kept for the life of the process
_lock = threading.Lock()


def load_code(code: bytes) -> int:
    """The address of a read-only, executable copy of `code`."""
    with _lock:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        if _libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the monitor's machine code failed")
        _pages.append(page)
        return address
