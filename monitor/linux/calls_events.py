"""Waiting on many files and talking between processes without a network: socketpair (AF_UNIX stream)
and epoll, built on the pipes and poll readiness of fdtable.py and calls_fs.py."""

from __future__ import annotations

import errno
import struct
import time

from monitor.linux import fdtable as fdt
from monitor.linux.calls_fs import poll_events
from monitor.linux.mm import LinuxError
from monitor.linux.process import ProcessState

AF_UNIX, SOCK_STREAM, SOCK_TYPE_MASK = 1, 1, 0xF
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
MSG_DONTWAIT = 0x40
EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
FIONBIO = 0x5421
_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86-64


class EventCalls(ProcessState):
    # ----- socketpair ----------------------------------------------------------------------------------

    def sys_socketpair(self, domain: int, kind: int, protocol: int, sv: int, *_: int) -> int:
        if domain != AF_UNIX:
            raise LinuxError(errno.EAFNOSUPPORT)
        if kind & SOCK_TYPE_MASK != SOCK_STREAM:
            raise LinuxError(errno.EOPNOTSUPP)
        self.pipes += 2
        a, b = fdt.Pipe(ino=0x1000 + self.pipes - 1), fdt.Pipe(ino=0x1000 + self.pipes)
        flags = fdt.O_NONBLOCK if kind & SOCK_NONBLOCK else 0
        cloexec = bool(kind & SOCK_CLOEXEC)
        first = self.fds.install(fdt.SocketEnd(flags, a, b), cloexec)
        second = self.fds.install(fdt.SocketEnd(flags, b, a), cloexec)
        self.space.write(sv, struct.pack("<ii", first, second))
        return 0

    def _socket(self, fd: int) -> fdt.SocketEnd:
        file = self.fds.get(fd)
        if not isinstance(file, fdt.SocketEnd):
            raise LinuxError(errno.ENOTSOCK)
        return file

    def sys_sendto(self, fd: int, buf: int, length: int, flags: int, *_: int) -> int:
        sock = self._socket(fd)
        saved = sock.flags
        if flags & MSG_DONTWAIT:
            sock.flags |= fdt.O_NONBLOCK
        try:
            return sock.write(self.space.read(buf, min(length, 1 << 20)))
        finally:
            sock.flags = saved

    def sys_recvfrom(self, fd: int, buf: int, length: int, flags: int, addr: int, addrlen: int) -> int:
        sock = self._socket(fd)
        saved = sock.flags
        if flags & MSG_DONTWAIT:
            sock.flags |= fdt.O_NONBLOCK
        try:
            data = sock.read(min(length, 1 << 20))
        finally:
            sock.flags = saved
        self.space.write(buf, data)
        if addr and addrlen:
            self.space.write(addrlen, struct.pack("<I", 0))
        return len(data)

    def sys_shutdown(self, fd: int, how: int, *_: int) -> int:
        sock = self._socket(fd)
        if how in (1, 2):  # SHUT_WR, SHUT_RDWR
            sock.shutdown_write()
        return 0

    def sys_setsockopt(self, fd: int, *_: int) -> int:
        self._socket(fd)
        return 0

    def sys_getsockopt(self, fd: int, level: int, name: int, value: int, length: int, *_: int) -> int:
        self._socket(fd)
        if value and length:
            self.space.write(value, struct.pack("<i", 0))
            self.space.write(length, struct.pack("<I", 4))
        return 0

    def sys_getsockname(self, fd: int, addr: int, length: int, *_: int) -> int:
        self._socket(fd)
        if addr and length:
            self.space.write(addr, struct.pack("<H", AF_UNIX))
            self.space.write(length, struct.pack("<I", 2))
        return 0

    sys_getpeername = sys_getsockname

    # ----- epoll ---------------------------------------------------------------------------------------

    def sys_epoll_create1(self, flags: int, *_: int) -> int:
        return self.fds.install(fdt.EpollFile(0), cloexec=bool(flags & fdt.O_CLOEXEC))

    def sys_epoll_create(self, size: int, *_: int) -> int:
        if size <= 0 or size >= 1 << 31:
            raise LinuxError(errno.EINVAL)
        return self.sys_epoll_create1(0)

    def _epoll(self, fd: int) -> fdt.EpollFile:
        file = self.fds.get(fd)
        if not isinstance(file, fdt.EpollFile):
            raise LinuxError(errno.EINVAL)
        return file

    def sys_epoll_ctl(self, epfd: int, op: int, fd: int, event: int, *_: int) -> int:
        epoll = self._epoll(epfd)
        file = self.fds.get(fd)
        if file is epoll:
            raise LinuxError(errno.EINVAL)
        if op == EPOLL_CTL_DEL:
            if fd not in epoll.interest:
                raise LinuxError(errno.ENOENT)
            del epoll.interest[fd]
            return 0
        events, data = _EVENT.unpack(self.space.read(event, _EVENT.size))
        if op == EPOLL_CTL_ADD:
            if fd in epoll.interest:
                raise LinuxError(errno.EEXIST)
        elif op == EPOLL_CTL_MOD:
            if fd not in epoll.interest:
                raise LinuxError(errno.ENOENT)
        else:
            raise LinuxError(errno.EINVAL)
        epoll.interest[fd] = (events, data, file)
        return 0

    def sys_epoll_wait(self, epfd: int, events: int, maxevents: int, timeout: int, *_: int) -> int:
        epoll = self._epoll(epfd)
        if not 0 < maxevents < 1 << 20:
            raise LinuxError(errno.EINVAL)
        timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
        ready: list[bytes] = []
        watched: list[tuple[fdt.OpenFile, int]] = []
        for fd in sorted(epoll.interest):
            wanted, data, file = epoll.interest[fd]
            if self.fds.fds.get(fd) is None or self.fds.fds[fd].file is not file:
                continue  # closed since: Linux drops it with the file
            got = poll_events(file, wanted | 0x18)  # EPOLLERR and EPOLLHUP are always reported
            watched.append((file, wanted | 0x18))
            if got and len(ready) < maxevents:
                ready.append(_EVENT.pack(got, data))
        if ready or timeout == 0:
            self.space.write(events, b"".join(ready))
            return len(ready)
        deadline = None if timeout < 0 else self.now_ns(time.CLOCK_MONOTONIC) + timeout * 1_000_000
        raise fdt.WouldBlock(("poll", watched, deadline))

    def sys_epoll_pwait(self, epfd: int, events: int, maxevents: int, timeout: int, *_: int) -> int:
        return self.sys_epoll_wait(epfd, events, maxevents, timeout)
