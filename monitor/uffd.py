"""userfaultfd(2) through ctypes: missing-page faults of a registered range are reported to us and
resolved by copying a page run in (UFFDIO_COPY) or mapping the zero page (UFFDIO_ZEROPAGE).

Python has no binding; the numbers come from include/uapi/linux/userfaultfd.h (struct sizes: uffdio_api
24, uffdio_register 32, uffdio_range 16, uffdio_copy 40, uffdio_zeropage 32, uffd_msg 32). Faults taken by
the kernel on a process's behalf (KVM's get_user_pages from KVM_RUN) are reported like any other.
Calls through ctypes release the GIL, so a thread blocked in a fault never stalls the thread that serves
it; a thread that touches a missing page while *holding* the GIL would (whoever serves faults needs the
GIL), which is why guest memory is read through monitor/memory.py, which loads a range before touching it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from monitor.errors import HostError

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_REGISTER_MODE_MISSING = 1
PAGE_SIZE = 4096
_MAX_STALLS = 1000
MSG = struct.Struct("<B7xQQ8x")  # event, then pagefault: flags, address
assert MSG.size == 32


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, 24)
UFFDIO_REGISTER = _iowr(0x00, 32)
UFFDIO_UNREGISTER = _ior(0x01, 16)
UFFDIO_WAKE = _ior(0x02, 16)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0x04, 32)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class UffdError(HostError):
    """userfaultfd is missing, refused, or failed."""

    hint = "userfaultfd needs root (or vm.unprivileged_userfaultfd=1); restore without lazy loading"


class Userfaultfd:
    """One userfaultfd (non-blocking, close-on-exec) for one registered range."""

    def __init__(self) -> None:
        fd = _syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise UffdError(f"userfaultfd: {os.strerror(err)}")
        self.fd = int(fd)
        try:
            api = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
            self._call(UFFDIO_API, api, "UFFDIO_API")
        except BaseException:
            os.close(self.fd)
            raise
        self._copy = (ctypes.c_uint64 * 5)()  # dst, src, len, mode, copy (out)
        self._zero = (ctypes.c_uint64 * 4)()  # start, len, mode, zeropage (out)
        self._range = (ctypes.c_uint64 * 2)()

    def _call(self, request: int, arg: ctypes.Array[ctypes.c_uint64], name: str) -> int:
        """The ioctl; 0, or the errno for EEXIST (a page already there) and ENOENT/ESRCH (the mapping or
        its process is going away); any other failure raises."""
        if _ioctl(self.fd, request, ctypes.addressof(arg)) == 0:
            return 0
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOENT, errno.ESRCH):
            return err
        raise UffdError(f"{name}: {os.strerror(err)}")

    def register(self, address: int, length: int) -> None:
        """Report missing-page faults in [address, address+length) (page-aligned) to this fd."""
        reg = (ctypes.c_uint64 * 4)(address, length, UFFDIO_REGISTER_MODE_MISSING, 0)
        self._call(UFFDIO_REGISTER, reg, "UFFDIO_REGISTER")

    def unregister(self, address: int, length: int) -> None:
        """Stop reporting (threads waiting on the range are woken and fault normally)."""
        self._range[0], self._range[1] = address, length
        self._call(UFFDIO_UNREGISTER, self._range, "UFFDIO_UNREGISTER")

    def copy(self, dst: int, src: int, length: int) -> int:
        """Map fresh pages holding [src, src+length) at dst and wake whoever waits there. Pages already
        present are kept (the kernel stops at each one: the copy goes on after it); returns how many."""
        return self._fill(UFFDIO_COPY, self._copy, 4, dst, src, length)

    def zeropage(self, dst: int, length: int) -> int:
        """Map the shared zero page over [dst, dst+length) (a later write copies it, with no report);
        returns how many pages were already present (kept)."""
        return self._fill(UFFDIO_ZEROPAGE, self._zero, 3, dst, None, length)

    def _fill(
        self,
        request: int,
        arg: ctypes.Array[ctypes.c_uint64],
        out: int,
        dst: int,
        src: int | None,
        length: int,
    ) -> int:
        """UFFDIO_COPY or _ZEROPAGE over a range, to its end: a partial copy (EAGAIN with the bytes done in
        the `out` field) goes on where it stopped, a present page (EEXIST) is stepped over."""
        name = "UFFDIO_COPY" if src is not None else "UFFDIO_ZEROPAGE"
        present = 0
        done = 0
        stalls = 0
        while done < length:
            arg[0] = dst + done
            if src is not None:
                arg[1], arg[2], arg[3], arg[4] = src + done, length - done, 0, 0
            else:
                arg[1], arg[2], arg[3] = length - done, 0, 0
            if _ioctl(self.fd, request, ctypes.addressof(arg)) == 0:
                return present
            err = ctypes.get_errno()
            progress = ctypes.c_int64(arg[out]).value
            if err == errno.EAGAIN and progress > 0:
                done += progress
            elif err == errno.EEXIST:
                present += 1
                done += PAGE_SIZE
            elif err == errno.EAGAIN and stalls < _MAX_STALLS:  # the mapping is changing: try again
                stalls += 1
            elif err in (errno.ENOENT, errno.ESRCH):
                return present  # the mapping or its process is going away
            else:
                raise UffdError(f"{name}: {os.strerror(err)}")
        return present

    def wake(self, address: int, length: int) -> None:
        self._range[0], self._range[1] = address, length
        self._call(UFFDIO_WAKE, self._range, "UFFDIO_WAKE")

    def read_faults(self, buffer: bytearray) -> list[int]:
        """The addresses of the page faults reported so far (none if there are none: non-blocking)."""
        try:
            n = os.readv(self.fd, [buffer])
        except BlockingIOError:
            return []
        addresses = []
        for at in range(0, n - n % MSG.size, MSG.size):
            event, _flags, address = MSG.unpack_from(buffer, at)
            if event == UFFD_EVENT_PAGEFAULT:
                addresses.append(address)
        return addresses

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
