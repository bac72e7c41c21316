"""Open files and the descriptor table.

An open file (Linux's `struct file`) is shared by descriptors made with dup; each keeps its own offset
here, never in a host descriptor, so the whole table can be saved and compared. Host files are read
and written with pread/pwrite at that offset.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Callable

from monitor.linux.mm import LinuxError

O_ACCMODE, O_WRONLY, O_RDWR = 3, 1, 2
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_APPEND, O_NONBLOCK = 0o100, 0o200, 0o400, 0o1000, 0o2000, 0o4000
O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC, O_PATH, O_TMPFILE = 0o200000, 0o400000, 0o2000000, 0o10000000, 0o20200000
STATUS_FLAGS = O_APPEND | O_NONBLOCK
MAX_FDS = 1024
DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_REG, DT_LNK = 0, 1, 2, 4, 8, 10
ROOT_DEV, LAYER_DEV, PROC_DEV, DEV_DEV, PIPE_DEV = 0x801, 0x802, 0x4, 0x5, 0xC

_STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")
assert _STAT.size == 144


@dataclass
class StatInfo:
    dev: int
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    def pack(self) -> bytes:
        return _STAT.pack(
            self.dev, self.ino, self.nlink, self.mode, self.uid, self.gid, 0, self.rdev, self.size,
            self.blksize, self.blocks, *_ts(self.atime_ns), *_ts(self.mtime_ns), *_ts(self.ctime_ns),
        )  # fmt: skip

    def pack_statx(self) -> bytes:
        out = bytearray(256)
        struct.pack_into(
            "<IIQIIIHxxQQQQ", out, 0, 0x7FF, self.blksize, 0, self.nlink, self.uid, self.gid, self.mode,
            self.ino, self.size, self.blocks, 0,
        )  # fmt: skip
        for at, ns in (
            (0x40, self.atime_ns),
            (0x50, self.ctime_ns),
            (0x60, self.ctime_ns),
            (0x70, self.mtime_ns),
        ):
            struct.pack_into("<qI", out, at, *_ts(ns))
        struct.pack_into("<IIII", out, 0x80, self.rdev >> 8, self.rdev & 0xFF, self.dev >> 8, self.dev & 0xFF)
        return bytes(out)


def _ts(ns: int) -> tuple[int, int]:
    return ns // 1_000_000_000, ns % 1_000_000_000


def path_ino(guest_path: str) -> int:
    """Inode numbers from the guest path: the same on every replica, whatever the host's file system."""
    return int.from_bytes(hashlib.blake2b(guest_path.encode(), digest_size=4).digest(), "little") | 1


def host_stat(host: str, guest: str, writable: bool, follow: bool = False) -> StatInfo:
    st = os.stat(host, follow_symlinks=follow)
    mtime = st.st_mtime_ns
    return StatInfo(
        dev=LAYER_DEV if writable else ROOT_DEV,
        ino=path_ino(guest),
        mode=st.st_mode,
        size=st.st_size,
        nlink=st.st_nlink if stat.S_ISDIR(st.st_mode) else 1,
        uid=st.st_uid if not writable else 0,
        gid=st.st_gid if not writable else 0,
        blocks=(st.st_size + 4095) // 4096 * 8,
        atime_ns=mtime,  # the host's atime changes with every read: not part of the guest's world
        mtime_ns=mtime,
        ctime_ns=mtime,
    )


class OpenFile:
    """Base: a file that can do nothing (each kind overrides what it supports)."""

    kind = "file"

    def __init__(self, path: str, flags: int) -> None:
        self.path = path
        self.flags = flags
        self.offset = 0
        self.refs = 0  # descriptors naming it, in every process

    @property
    def readable(self) -> bool:
        return self.flags & O_ACCMODE in (0, O_RDWR)

    @property
    def writable(self) -> bool:
        return self.flags & O_ACCMODE in (O_WRONLY, O_RDWR)

    def read(self, n: int) -> bytes:
        raise LinuxError(errno.EINVAL)

    def write(self, data: bytes) -> int:
        raise LinuxError(errno.EINVAL)

    def pread(self, n: int, offset: int) -> bytes:
        raise LinuxError(errno.ESPIPE)

    def pwrite(self, data: bytes, offset: int) -> int:
        raise LinuxError(errno.ESPIPE)

    def seek(self, offset: int, whence: int) -> int:
        raise LinuxError(errno.ESPIPE)

    def stat(self) -> StatInfo:
        raise LinuxError(errno.EBADF)

    def entries(self) -> list[tuple[int, int, str]]:
        raise LinuxError(errno.ENOTDIR)

    def truncate(self, length: int) -> None:
        raise LinuxError(errno.EINVAL)

    def sync(self) -> None:
        pass

    def poll_mask(self, events: int) -> int | None:
        """What poll reports for this file now, or None: calls_fs.poll_events decides (pipes wait,
        everything else is always ready). Sockets and eventfds answer themselves."""
        return None

    def pending_bytes(self) -> int | None:
        """FIONREAD on a socket: bytes received and not yet read (None: not a socket)."""
        return None

    def wakeups(self) -> int:
        """How many times this file's readiness may have changed (bytes or a connection arriving, an
        end, room made): an EPOLLET entry reports once per change (EpollFile). Not guest state itself:
        only whether an entry has seen the latest is (EpollFile.edge_pending)."""
        return 0

    def close(self) -> None:
        pass

    def describe(self) -> tuple[object, ...]:
        """What the state hash covers."""
        return (self.kind, self.path, self.flags, self.offset)


class HostFile(OpenFile):
    kind = "host"

    def __init__(self, path: str, flags: int, host: str, fd: int, layer: bool, touch: Callable[[int], None]):
        super().__init__(path, flags)
        self.host = host
        self.fd = fd
        self.layer = layer
        self._touch = touch  # stamps a changed layer file with the guest's time

    def read(self, n: int) -> bytes:
        data = self.pread(n, self.offset)
        self.offset += len(data)
        return data

    def pread(self, n: int, offset: int) -> bytes:
        if not self.readable:
            raise LinuxError(errno.EBADF)
        try:
            return os.pread(self.fd, n, offset)
        except IsADirectoryError as err:
            raise LinuxError(errno.EISDIR) from err

    def write(self, data: bytes) -> int:
        if self.flags & O_APPEND:
            self.offset = os.fstat(self.fd).st_size
        n = self.pwrite(data, self.offset)
        self.offset += n
        return n

    def pwrite(self, data: bytes, offset: int) -> int:
        if not self.writable:
            raise LinuxError(errno.EBADF)
        n = os.pwrite(self.fd, data, offset)
        self._touch(self.fd)
        return n

    def seek(self, offset: int, whence: int) -> int:
        if whence == 0:
            new = offset
        elif whence == 1:
            new = self.offset + offset
        elif whence == 2:
            new = os.fstat(self.fd).st_size + offset
        elif whence in (3, 4):  # SEEK_DATA, SEEK_HOLE: the file is all data
            size = os.fstat(self.fd).st_size
            if offset >= size:
                raise LinuxError(errno.ENXIO)
            new = offset if whence == 3 else size
        else:
            raise LinuxError(errno.EINVAL)
        if new < 0:
            raise LinuxError(errno.EINVAL)
        self.offset = new
        return new

    def stat(self) -> StatInfo:
        return host_stat(f"/proc/self/fd/{self.fd}", self.path, self.layer, follow=True)

    def truncate(self, length: int) -> None:
        if not self.writable:
            raise LinuxError(errno.EINVAL)
        os.ftruncate(self.fd, length)
        self._touch(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class DirFile(OpenFile):
    kind = "dir"

    def __init__(self, path: str, flags: int, info: StatInfo, listing: list[tuple[int, int, str]]) -> None:
        super().__init__(path, flags)
        self.info = info
        self.listing = listing  # (ino, d_type, name), "." and ".." first

    def entries(self) -> list[tuple[int, int, str]]:
        return self.listing

    def seek(self, offset: int, whence: int) -> int:
        if whence != 0 or offset < 0:
            raise LinuxError(errno.EINVAL)
        self.offset = offset
        return offset

    def stat(self) -> StatInfo:
        return self.info

    def read(self, n: int) -> bytes:
        raise LinuxError(errno.EISDIR)


class BytesFile(OpenFile):
    """Contents fixed at open (a /proc file)."""

    kind = "bytes"

    def __init__(self, path: str, flags: int, data: bytes, info: StatInfo) -> None:
        super().__init__(path, flags)
        self.data = data
        self.info = info

    def read(self, n: int) -> bytes:
        chunk = self.data[self.offset : self.offset + n]
        self.offset += len(chunk)
        return chunk

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset : offset + n]

    def seek(self, offset: int, whence: int) -> int:
        base = {0: 0, 1: self.offset, 2: len(self.data)}.get(whence)
        if base is None or base + offset < 0:
            raise LinuxError(errno.EINVAL)
        self.offset = base + offset
        return self.offset

    def stat(self) -> StatInfo:
        return self.info


class DeviceFile(OpenFile):
    kind = "device"

    def __init__(self, path: str, flags: int, device: str, info: StatInfo, entropy: Callable[[int], bytes]):
        super().__init__(path, flags)
        self.device = device
        self.info = info
        self._entropy = entropy

    def read(self, n: int) -> bytes:
        if self.device == "null":
            return b""
        if self.device in ("zero", "full"):
            return bytes(n)
        return self._entropy(min(n, 1 << 20))

    def pread(self, n: int, offset: int) -> bytes:
        return self.read(n)

    def write(self, data: bytes) -> int:
        if self.device == "full":
            raise LinuxError(errno.ENOSPC)
        return len(data)

    def pwrite(self, data: bytes, offset: int) -> int:
        return self.write(data)

    def seek(self, offset: int, whence: int) -> int:
        return 0

    def stat(self) -> StatInfo:
        return self.info

    def describe(self) -> tuple[object, ...]:
        return (self.kind, self.path, self.flags, self.device)


class ConsoleFile(OpenFile):
    """stdin, stdout, stderr: the VM's console. Shown to the guest as pipes (never a terminal: whether
    the host's stdout is a terminal is not the guest's business, and must not differ in replay)."""

    kind = "console"

    def __init__(self, path: str, flags: int, number: int, io: ConsoleIo) -> None:
        super().__init__(path, flags)
        self.number = number
        self.io = io

    def read(self, n: int) -> bytes:
        return self.io.read(n)

    def write(self, data: bytes) -> int:
        self.io.write(self.number, data)
        return len(data)

    def stat(self) -> StatInfo:
        return StatInfo(dev=PIPE_DEV, ino=100 + self.number, mode=stat.S_IFIFO | 0o600, blksize=4096)

    def describe(self) -> tuple[object, ...]:
        return (self.kind, self.number, self.flags)


class ConsoleIo:
    def __init__(self, read: Callable[[int], bytes], write: Callable[[int, bytes], None]) -> None:
        self.read = read
        self.write = write


class WouldBlock(Exception):
    """The call must wait for `what` (a pipe) and then run again."""

    def __init__(self, what: object) -> None:
        super().__init__("would block")
        self.what = what


@dataclass(eq=False)
class Pipe:
    buffer: bytearray = field(default_factory=bytearray)
    readers: int = 0
    writers: int = 0
    ino: int = 0
    # EPOLLET (OpenFile.wakeups), as Linux wakes a pipe's two queues: what its readers see change
    # (writes, a writer's close), and what its writers see (reads making room, a reader's close).
    for_readers: int = 0
    for_writers: int = 0


PIPE_CAPACITY = 65536


class PipeEnd(OpenFile):
    kind = "pipe"

    def __init__(self, flags: int, pipe: Pipe, reading: bool) -> None:
        super().__init__(f"pipe:[{pipe.ino}]", flags)
        self.pipe = pipe
        self.reading = reading
        if reading:
            pipe.readers += 1
        else:
            pipe.writers += 1

    def read(self, n: int) -> bytes:
        if not self.reading:
            raise LinuxError(errno.EBADF)
        pipe = self.pipe
        if not pipe.buffer:
            if pipe.writers:
                if self.flags & O_NONBLOCK:
                    raise LinuxError(errno.EAGAIN)
                raise WouldBlock(("pipe-read", pipe))  # until a writer writes or the last one closes
            return b""
        chunk = bytes(pipe.buffer[:n])
        del pipe.buffer[:n]
        pipe.for_writers += 1
        return chunk

    def write(self, data: bytes) -> int:
        if self.reading:
            raise LinuxError(errno.EBADF)
        pipe = self.pipe
        if not pipe.readers:
            raise LinuxError(errno.EPIPE)
        room = PIPE_CAPACITY - len(pipe.buffer)
        if room <= 0:
            if self.flags & O_NONBLOCK:
                raise LinuxError(errno.EAGAIN)
            raise WouldBlock(("pipe-write", pipe))  # until a reader makes room or the last one closes
        pipe.buffer += data[:room]
        pipe.for_readers += 1
        return min(room, len(data))

    def stat(self) -> StatInfo:
        return StatInfo(
            dev=PIPE_DEV, ino=self.pipe.ino, mode=stat.S_IFIFO | 0o600, size=len(self.pipe.buffer)
        )

    def close(self) -> None:
        if self.reading:
            self.pipe.readers -= 1
            self.pipe.for_writers += 1
        else:
            self.pipe.writers -= 1
            self.pipe.for_readers += 1

    def wakeups(self) -> int:
        return self.pipe.for_readers if self.reading else self.pipe.for_writers

    def describe(self) -> tuple[object, ...]:
        return (self.kind, self.pipe.ino, self.reading, bytes(self.pipe.buffer))


@dataclass
class Descriptor:
    file: OpenFile
    cloexec: bool = False


class FdTable:
    """A process's descriptors. An open file counts the descriptors naming it in every table (dup, fork)
    and is closed with the last."""

    def __init__(self) -> None:
        self.fds: dict[int, Descriptor] = {}

    def copy(self) -> FdTable:
        """fork: the same open files under the same numbers."""
        table = FdTable()
        for fd, entry in self.fds.items():
            table.install(entry.file, entry.cloexec, at=fd)
        return table

    def close_on_exec(self) -> None:
        for fd in [fd for fd, entry in self.fds.items() if entry.cloexec]:
            self.close(fd)

    def get(self, fd: int) -> OpenFile:
        entry = self.fds.get(fd)
        if entry is None:
            raise LinuxError(errno.EBADF)
        return entry.file

    def install(self, file: OpenFile, cloexec: bool = False, lowest: int = 0, at: int | None = None) -> int:
        if at is None:
            at = lowest
            while at in self.fds:
                at += 1
        if at >= MAX_FDS:
            raise LinuxError(errno.EMFILE)
        if at in self.fds:
            self.close(at)
        self.fds[at] = Descriptor(file, cloexec)
        file.refs += 1
        return at

    def close(self, fd: int) -> None:
        entry = self.fds.pop(fd, None)
        if entry is None:
            raise LinuxError(errno.EBADF)
        entry.file.refs -= 1
        if not entry.file.refs:
            entry.file.close()

    def close_all(self) -> None:
        for fd in list(self.fds):
            self.close(fd)

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for fd in sorted(self.fds):
            entry = self.fds[fd]
            h.update(repr((fd, entry.cloexec, entry.file.describe())).encode())
        return h.digest()


class SocketEnd(OpenFile):
    """One end of a socketpair (AF_UNIX, SOCK_STREAM): a pipe each way."""

    kind = "socket"

    def __init__(self, flags: int, rx: Pipe, tx: Pipe) -> None:
        super().__init__(f"socket:[{rx.ino}]", flags | O_RDWR)
        self.rx = PipeEnd(0, rx, True)
        self.tx = PipeEnd(1, tx, False)
        self.tx_open = True

    def read(self, n: int) -> bytes:
        self.rx.flags = self.flags & O_NONBLOCK
        return self.rx.read(n)

    def write(self, data: bytes) -> int:
        if not self.tx_open:
            raise LinuxError(errno.EPIPE)
        self.tx.flags = 1 | (self.flags & O_NONBLOCK)
        return self.tx.write(data)

    def pending_bytes(self) -> int | None:
        return len(self.rx.pipe.buffer)

    def wakeups(self) -> int:
        return self.rx.wakeups() + self.tx.wakeups()

    def shutdown_write(self) -> None:
        if self.tx_open:
            self.tx_open = False
            self.tx.close()

    def stat(self) -> StatInfo:
        return StatInfo(dev=PIPE_DEV, ino=self.rx.pipe.ino, mode=stat.S_IFSOCK | 0o777)

    def close(self) -> None:
        self.rx.close()
        self.shutdown_write()

    def describe(self) -> tuple[object, ...]:
        return (self.kind, self.flags, bytes(self.rx.pipe.buffer), bytes(self.tx.pipe.buffer), self.tx_open)


EPOLLONESHOT, EPOLLET = 1 << 30, 1 << 31
EPOLL_FLAGS = 0xF << 28  # EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET: not events
PollFn = Callable[["OpenFile", int], int]


class EpollFile(OpenFile):
    """An epoll instance: its interest list. A level-triggered entry reports while its file is ready;
    an edge-triggered one (EPOLLET) once per change of its file (`OpenFile.wakeups`) that finds it
    ready, as Linux's ready list does: a server that reads until EAGAIN is not woken again until more
    arrives. A fired EPOLLONESHOT entry is kept as events == EPOLLONESHOT until EPOLL_CTL_MOD. An entry
    goes with its file's last descriptor (as Linux's, whatever descriptor named it)."""

    kind = "epoll"

    def __init__(self, flags: int) -> None:
        super().__init__("anon_inode:[eventpoll]", flags)
        self.interest: dict[int, tuple[int, int, OpenFile]] = {}  # fd -> (events, data, the file)
        self.edge_seen: dict[int, int] = {}  # EPOLLET entries: fd -> its file's wakeups() last looked at

    def arm(self, fd: int) -> None:
        """EPOLL_CTL_ADD or MOD: an edge-triggered entry looks at its file at the next wait."""
        events, _data, file = self.interest[fd]
        if events & EPOLLET:
            self.edge_seen[fd] = file.wakeups() - 1
        else:
            self.edge_seen.pop(fd, None)

    def edge_pending(self, fd: int) -> bool:
        """An EPOLLET entry whose file changed since the last wait looked at it."""
        events, _data, file = self.interest[fd]
        return bool(events & EPOLLET) and self.edge_seen.get(fd) != file.wakeups()

    def scan(self, poll: PollFn, maxevents: int, consume: bool) -> list[tuple[int, int]]:
        """(events, data) of the entries to report now, at most `maxevents`; `consume`: epoll_wait
        reports them (edges seen, one-shots fired), else only a look (poll of the epoll file)."""
        ready: list[tuple[int, int]] = []
        for fd in sorted(self.interest):
            wanted, data, file = self.interest[fd]
            if not file.refs or wanted == EPOLLONESHOT:
                continue  # closed (Linux drops it with the file), or a one-shot that fired
            if wanted & EPOLLET and not self.edge_pending(fd):
                continue  # nothing new since the last wait looked
            got = poll(file, (wanted & ~EPOLL_FLAGS) | 0x18)  # EPOLLERR, EPOLLHUP: always
            if got and len(ready) >= maxevents:
                continue  # not reported: an edge stays pending
            if consume and wanted & EPOLLET:
                self.edge_seen[fd] = file.wakeups()  # a change that found it not ready is spent too
            if got:
                ready.append((got, data))
                if consume and wanted & EPOLLONESHOT:
                    self.interest[fd] = (EPOLLONESHOT, data, file)
        return ready

    def poll_mask(self, events: int) -> int | None:
        from monitor.linux.calls_fs import poll_events  # calls_fs builds on this module

        return events & 1 if self.scan(poll_events, 1, consume=False) else 0  # POLLIN: a wait would report

    def stat(self) -> StatInfo:
        return StatInfo(dev=PIPE_DEV, ino=9, mode=0o600)

    def describe(self) -> tuple[object, ...]:
        return (
            self.kind,
            sorted((fd, ev, data, self.edge_pending(fd)) for fd, (ev, data, _f) in self.interest.items()),
        )


class EventFd(OpenFile):
    """eventfd2: a 64-bit counter that write adds to and read takes (or, with EFD_SEMAPHORE, takes one)."""

    kind = "eventfd"
    SEMAPHORE = 1

    def __init__(self, flags: int, count: int, semaphore: bool) -> None:
        super().__init__("anon_inode:[eventfd]", (flags & O_NONBLOCK) | O_RDWR)
        self.count = count
        self.semaphore = semaphore
        self.changes = 0  # reads and writes: EPOLLET (OpenFile.wakeups)

    def wakeups(self) -> int:
        return self.changes

    def read(self, n: int) -> bytes:
        if n < 8:
            raise LinuxError(errno.EINVAL)
        if not self.count:
            if self.flags & O_NONBLOCK:
                raise LinuxError(errno.EAGAIN)
            raise WouldBlock(("poll", [(self, 1)], None))  # POLLIN: runs again when counted up
        value = 1 if self.semaphore else self.count
        self.count -= value
        self.changes += 1
        return struct.pack("<Q", value)

    def write(self, data: bytes) -> int:
        if len(data) < 8:
            raise LinuxError(errno.EINVAL)
        value = struct.unpack_from("<Q", data)[0]
        if value == (1 << 64) - 1:
            raise LinuxError(errno.EINVAL)
        if self.count + value >= (1 << 64) - 1:
            if self.flags & O_NONBLOCK:
                raise LinuxError(errno.EAGAIN)
            raise WouldBlock(("poll", [(self, 4)], None))  # POLLOUT
        self.count += value
        self.changes += 1
        return 8

    def poll_mask(self, events: int) -> int | None:
        return (events & 1 if self.count else 0) | (events & 4 if self.count < (1 << 64) - 2 else 0)

    def stat(self) -> StatInfo:
        return StatInfo(dev=PIPE_DEV, ino=10, mode=0o600)

    def describe(self) -> tuple[object, ...]:
        return (self.kind, self.flags, self.count, self.semaphore)
