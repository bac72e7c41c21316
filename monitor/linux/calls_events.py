"""Waiting on many files and talking between processes: socketpair (AF_UNIX stream), epoll, select and
pselect6, eventfd, built on the pipes and poll readiness of fdtable.py and calls_fs.py (sockets answer
poll themselves: monitor/linux/sockets.py; their calls are in calls_net.py)."""

from __future__ import annotations

import errno
import struct
import time

from monitor.linux import fdtable as fdt
from monitor.linux.calls_fs import poll_events
from monitor.linux.mm import LinuxError
from monitor.linux.process import ProcessState

AF_UNIX, SOCK_STREAM, SOCK_TYPE_MASK = 1, 1, 0xF
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP = 1, 2, 4, 8, 0x10
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
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
            epoll.edge_seen.pop(fd, None)
            return 0
        events, data = _EVENT.unpack(self.space.read(event, _EVENT.size))
        if op == EPOLL_CTL_ADD:
            if fd in epoll.interest and epoll.interest[fd][2] is file:
                raise LinuxError(errno.EEXIST)  # (an entry of a file closed since is replaced)
        elif op == EPOLL_CTL_MOD:
            if fd not in epoll.interest:
                raise LinuxError(errno.ENOENT)
        else:
            raise LinuxError(errno.EINVAL)
        epoll.interest[fd] = (events, data, file)
        epoll.arm(fd)
        return 0

    def sys_epoll_wait(self, epfd: int, events: int, maxevents: int, timeout: int, *_: int) -> int:
        epoll = self._epoll(epfd)
        if not 0 < maxevents < 1 << 20:
            raise LinuxError(errno.EINVAL)
        timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
        ready = epoll.scan(poll_events, maxevents, consume=True)
        if ready or timeout == 0:
            self.space.write(events, b"".join(_EVENT.pack(got, data) for got, data in ready))
            return len(ready)
        deadline = None if timeout < 0 else self.now_ns(time.CLOCK_MONOTONIC) + timeout * 1_000_000
        # Waits on the epoll file itself: it is ready when a wait would report something (level, or an
        # edge-triggered entry's file changed), and it is what a checkpoint of the waiting thread names.
        raise fdt.WouldBlock(("poll", [(epoll, POLLIN)], deadline))

    def sys_epoll_pwait(self, epfd: int, events: int, maxevents: int, timeout: int, *_: int) -> int:
        return self.sys_epoll_wait(epfd, events, maxevents, timeout)

    # ----- eventfd -------------------------------------------------------------------------------------

    def sys_eventfd2(self, initval: int, flags: int, *_: int) -> int:
        if flags & ~(fdt.O_NONBLOCK | fdt.O_CLOEXEC | fdt.EventFd.SEMAPHORE):
            raise LinuxError(errno.EINVAL)
        file = fdt.EventFd(flags, initval & 0xFFFFFFFF, bool(flags & fdt.EventFd.SEMAPHORE))
        return self.fds.install(file, cloexec=bool(flags & fdt.O_CLOEXEC))

    def sys_eventfd(self, initval: int, *_: int) -> int:
        return self.sys_eventfd2(initval, 0)

    # ----- select ---------------------------------------------------------------------------------------

    def sys_select(
        self, nfds: int, readfds: int, writefds: int, exceptfds: int, timeout: int, *_: int
    ) -> int:
        timeout_ns = None
        if timeout:
            sec, usec = struct.unpack("<qq", self.space.read(timeout, 16))
            if sec < 0 or not 0 <= usec < 1_000_000:
                raise LinuxError(errno.EINVAL)
            timeout_ns = sec * 1_000_000_000 + usec * 1000
        return self._select(nfds, readfds, writefds, exceptfds, timeout_ns, timeout)

    def sys_pselect6(
        self, nfds: int, readfds: int, writefds: int, exceptfds: int, timeout: int, *_: int
    ) -> int:
        timeout_ns = None
        if timeout:
            sec, nsec = struct.unpack("<qq", self.space.read(timeout, 16))
            if sec < 0 or not 0 <= nsec < 1_000_000_000:
                raise LinuxError(errno.EINVAL)
            timeout_ns = sec * 1_000_000_000 + nsec
        return self._select(nfds, readfds, writefds, exceptfds, timeout_ns, timeout)

    def _select(
        self, nfds: int, sets: int, writes: int, excepts: int, timeout_ns: int | None, timeout: int
    ) -> int:
        """select on poll's readiness. A call that must wait is run again when a file is ready; one with
        a timeout has its timeout zeroed first (Linux too writes back the time left), so the call run
        again at the deadline returns at once with what is ready then (nothing: all sets cleared). That
        it runs again is known from the call itself (threads.RUN_AGAIN_AT_DEADLINE), so a checkpoint of
        the wait keeps it. A pause or checkpoint of the machine meanwhile keeps the wait and its deadline
        (Scheduler.interrupt): the zeroed timeout is only read at the deadline."""
        if not 0 <= nfds <= fdt.MAX_FDS:
            raise LinuxError(errno.EINVAL)
        size = (nfds + 63) // 64 * 8
        masks = [
            int.from_bytes(self.space.read(addr, size), "little") if addr and size else 0
            for addr in (sets, writes, excepts)
        ]
        out = [0, 0, 0]
        watched: list[tuple[fdt.OpenFile, int]] = []
        for fd in range(nfds):
            bit = 1 << fd
            wanted = (POLLIN if masks[0] & bit else 0) | (POLLOUT if masks[1] & bit else 0)
            wanted |= POLLPRI if masks[2] & bit else 0
            if not wanted:
                continue
            if fd not in self.fds.fds:
                raise LinuxError(errno.EBADF)
            file = self.fds.get(fd)
            got = poll_events(file, wanted)
            watched.append((file, wanted))
            if masks[0] & bit and got & (POLLIN | POLLHUP | POLLERR):
                out[0] |= bit
            if masks[1] & bit and got & (POLLOUT | POLLERR):
                out[1] |= bit
            if masks[2] & bit and got & POLLPRI:
                out[2] |= bit
        count = sum(bin(m).count("1") for m in out)
        if count or timeout_ns == 0:
            for addr, mask in zip((sets, writes, excepts), out):
                if addr and size:
                    self.space.write(addr, mask.to_bytes(size, "little"))
            return count
        if timeout_ns is not None:
            deadline = self.now_ns(time.CLOCK_MONOTONIC) + timeout_ns
            self.space.write(timeout, bytes(16))  # run again at the deadline: it returns at once then
            raise fdt.WouldBlock(("poll", watched, deadline))
        raise fdt.WouldBlock(("poll", watched, None))
