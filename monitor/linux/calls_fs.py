"""System calls on files, directories and descriptors."""

from __future__ import annotations

import errno
import os
import stat
import struct
import time

from monitor.linux import fdtable as fdt
from monitor.linux.fdtable import (
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_DIRECTORY,
    O_EXCL,
    O_NOFOLLOW,
    O_TMPFILE,
    O_TRUNC,
    STATUS_FLAGS,
)
from monitor.linux.fs import Node
from monitor.linux.mm import LinuxError
from monitor.linux.process import AT_FDCWD, ProcessState, synthetic_stat

AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = 0x100, 0x200, 0x400, 0x1000
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_SETLK, F_SETLKW = 0, 1, 2, 3, 4, 5, 6, 7
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_DUPFD_CLOEXEC, F_GETPIPE_SZ = 36, 37, 38, 1030, 1032
TCGETS, TIOCGWINSZ, TIOCGPGRP, FIONREAD, FIONCLEX, FIOCLEX = 0x5401, 0x5413, 0x540F, 0x541B, 0x5450, 0x5451
POLLIN, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 1, 4, 8, 0x10, 0x20
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
MAX_IO = 1 << 24  # one read or write moves at most 16 MiB (Linux: 0x7ffff000)
_DIRENT = struct.Struct("<QqHB")
_IOVEC = struct.Struct("<QQ")
_STATFS = struct.Struct("<qqqqqqqiiqqq32x")


def poll_events(file: fdt.OpenFile, events: int) -> int:
    """What poll reports for a file now. Only pipes ever wait; everything else is always ready."""
    own = file.poll_mask(events)  # sockets, eventfds (monitor/linux/sockets.py, fdtable.py)
    if own is not None:
        return own
    if isinstance(file, fdt.SocketEnd):
        return poll_events(file.rx, events & ~POLLOUT) | (poll_events(file.tx, events & ~POLLIN) & ~POLLHUP)
    if isinstance(file, fdt.PipeEnd):
        pipe = file.pipe
        if file.reading:
            return (events & POLLIN if pipe.buffer else 0) | (POLLHUP if not pipe.writers else 0)
        if not pipe.readers:
            return POLLERR
        return events & POLLOUT if len(pipe.buffer) < fdt.PIPE_CAPACITY else 0
    return events & (POLLIN | POLLOUT)


def _entry_type(entry: os.DirEntry[str]) -> int:
    if entry.is_symlink():
        return fdt.DT_LNK
    if entry.is_dir(follow_symlinks=False):
        return fdt.DT_DIR
    if entry.is_file(follow_symlinks=False):
        return fdt.DT_REG
    return fdt.DT_UNKNOWN


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class FileCalls(ProcessState):
    # ----- descriptors and data ----------------------------------------------------------------------

    def sys_read(self, fd: int, buf: int, count: int, *_: int) -> int:
        file = self.fds.get(fd)
        if not file.readable:
            raise LinuxError(errno.EBADF)
        data = file.read(min(count, MAX_IO))
        self.space.write(buf, data)
        return len(data)

    def sys_write(self, fd: int, buf: int, count: int, *_: int) -> int:
        file = self.fds.get(fd)
        if not file.writable:
            raise LinuxError(errno.EBADF)
        return file.write(self.space.read(buf, min(count, MAX_IO)))

    def sys_pread64(self, fd: int, buf: int, count: int, offset: int, *_: int) -> int:
        data = self.fds.get(fd).pread(min(count, MAX_IO), offset)
        self.space.write(buf, data)
        return len(data)

    def sys_pwrite64(self, fd: int, buf: int, count: int, offset: int, *_: int) -> int:
        return self.fds.get(fd).pwrite(self.space.read(buf, min(count, MAX_IO)), offset)

    def _iovecs(self, iov: int, count: int) -> list[tuple[int, int]]:
        if count > 1024:
            raise LinuxError(errno.EINVAL)
        raw = self.space.read(iov, count * _IOVEC.size)
        return [_IOVEC.unpack_from(raw, i * _IOVEC.size) for i in range(count)]

    def sys_readv(self, fd: int, iov: int, count: int, *_: int) -> int:
        file = self.fds.get(fd)
        total = 0
        for base, length in self._iovecs(iov, count):
            if not length:
                continue
            if total and file.poll_mask(1) == 0:
                break  # a socket emptied after the first buffers: what was read is the result
            try:
                data = file.read(length)
            except fdt.WouldBlock:
                if not total:
                    raise
                break  # a pipe emptied after the first buffers: what was read is the result
            except LinuxError as err:
                if not total or err.errno != errno.EAGAIN:
                    raise
                break
            self.space.write(base, data)
            total += len(data)
            if len(data) < length:
                break
        return total

    def sys_writev(self, fd: int, iov: int, count: int, *_: int) -> int:
        file = self.fds.get(fd)
        if not file.writable:
            raise LinuxError(errno.EBADF)
        data = b"".join(self.space.read(base, length) for base, length in self._iovecs(iov, count))
        return file.write(data) if data else 0

    def sys_preadv(self, fd: int, iov: int, count: int, offset: int, *_: int) -> int:
        file = self.fds.get(fd)
        total = 0
        for base, length in self._iovecs(iov, count):
            data = file.pread(length, offset + total)
            self.space.write(base, data)
            total += len(data)
            if len(data) < length:
                break
        return total

    def sys_pwritev(self, fd: int, iov: int, count: int, offset: int, *_: int) -> int:
        data = b"".join(self.space.read(base, length) for base, length in self._iovecs(iov, count))
        return self.fds.get(fd).pwrite(data, offset)

    def sys_lseek(self, fd: int, offset: int, whence: int, *_: int) -> int:
        if offset >= 1 << 63:
            offset -= 1 << 64
        return self.fds.get(fd).seek(offset, whence)

    def sys_close(self, fd: int, *_: int) -> int:
        self.fds.close(fd)
        return 0

    def sys_close_range(self, first: int, last: int, flags: int, *_: int) -> int:
        for fd in [f for f in self.fds.fds if first <= f <= last]:
            if flags & 4:  # CLOSE_RANGE_CLOEXEC
                self.fds.fds[fd].cloexec = True
            else:
                self.fds.close(fd)
        return 0

    def sys_dup(self, fd: int, *_: int) -> int:
        return self.fds.install(self.fds.get(fd))

    def sys_dup2(self, old: int, new: int, *_: int) -> int:
        file = self.fds.get(old)
        if old == new:
            return new
        return self.fds.install(file, at=new)

    def sys_dup3(self, old: int, new: int, flags: int, *_: int) -> int:
        if old == new:
            raise LinuxError(errno.EINVAL)
        return self.fds.install(self.fds.get(old), cloexec=bool(flags & O_CLOEXEC), at=new)

    def sys_fcntl(self, fd: int, cmd: int, arg: int, *_: int) -> int:
        file = self.fds.get(fd)
        entry = self.fds.fds[fd]
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            return self.fds.install(file, cloexec=cmd == F_DUPFD_CLOEXEC, lowest=arg)
        if cmd == F_GETFD:
            return 1 if entry.cloexec else 0
        if cmd == F_SETFD:
            entry.cloexec = bool(arg & 1)
            return 0
        if cmd == F_GETFL:
            return file.flags & ~O_CLOEXEC
        if cmd == F_SETFL:
            file.flags = (file.flags & ~STATUS_FLAGS) | (arg & STATUS_FLAGS)
            return 0
        if cmd in (F_GETLK, F_OFD_GETLK):
            self.space.write(arg, struct.pack("<h", 2))  # F_UNLCK: one process holds every lock there is
            return 0
        if cmd in (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW):
            return 0
        if cmd == F_GETPIPE_SZ:
            return fdt.PIPE_CAPACITY
        raise LinuxError(errno.EINVAL)

    def sys_flock(self, fd: int, *_: int) -> int:
        self.fds.get(fd)
        return 0

    def sys_ioctl(self, fd: int, request: int, arg: int, *_: int) -> int:
        file = self.fds.get(fd)
        if request == FIOCLEX:
            self.fds.fds[fd].cloexec = True
            return 0
        if request == FIONCLEX:
            self.fds.fds[fd].cloexec = False
            return 0
        if request == 0x5421:  # FIONBIO
            on = struct.unpack("<i", self.space.read(arg, 4))[0]
            file.flags = file.flags | fdt.O_NONBLOCK if on else file.flags & ~fdt.O_NONBLOCK
            return 0
        if request == FIONREAD and file.kind == "pipe":
            assert isinstance(file, fdt.PipeEnd)
            self.space.write(arg, struct.pack("<i", len(file.pipe.buffer)))
            return 0
        if request == FIONREAD and file.pending_bytes() is not None:  # sockets: received, not yet read
            self.space.write(arg, struct.pack("<i", file.pending_bytes()))
            return 0
        raise LinuxError(errno.ENOTTY)  # no terminals here (TCGETS, TIOCGWINSZ...)

    def sys_fadvise64(self, fd: int, *_: int) -> int:
        self.fds.get(fd)
        return 0  # advice only

    def sys_fsync(self, fd: int, *_: int) -> int:
        self.fds.get(fd).sync()
        return 0

    sys_fdatasync = sys_fsync

    def sys_ftruncate(self, fd: int, length: int, *_: int) -> int:
        self.fds.get(fd).truncate(length)
        return 0

    def sys_truncate(self, path: int, length: int, *_: int) -> int:
        host = self.fs.writable_host(self.lookup(AT_FDCWD, self.read_path(path)))
        os.truncate(host, length)
        return 0

    def sys_fallocate(self, fd: int, mode: int, offset: int, length: int, *_: int) -> int:
        file = self.fds.get(fd)
        if mode or not isinstance(file, fdt.HostFile) or not file.writable:
            raise LinuxError(errno.EOPNOTSUPP if mode else errno.EBADF)
        os.posix_fallocate(file.fd, offset, length)
        return 0

    def sys_pipe2(self, fds: int, flags: int, *_: int) -> int:
        self.pipes += 1
        pipe = fdt.Pipe(ino=0x1000 + self.pipes)
        status = flags & STATUS_FLAGS
        cloexec = bool(flags & O_CLOEXEC)
        reader = self.fds.install(fdt.PipeEnd(status, pipe, True), cloexec)
        writer = self.fds.install(fdt.PipeEnd(status | 1, pipe, False), cloexec)
        self.space.write(fds, struct.pack("<ii", reader, writer))
        return 0

    def sys_pipe(self, fds: int, *_: int) -> int:
        return self.sys_pipe2(fds, 0)

    def sys_sendfile(self, out_fd: int, in_fd: int, offset_ptr: int, count: int, *_: int) -> int:
        src, dst = self.fds.get(in_fd), self.fds.get(out_fd)
        count = min(count, MAX_IO)
        if offset_ptr:
            offset = struct.unpack("<q", self.space.read(offset_ptr, 8))[0]
            data = src.pread(count, offset)
            self.space.write(offset_ptr, struct.pack("<q", offset + len(data)))
        else:
            data = src.read(count)
        return dst.write(data) if data else 0

    def sys_poll(self, fds: int, nfds: int, timeout: int, *_: int) -> int:
        timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
        return self._poll(fds, nfds, None if timeout < 0 else timeout * 1_000_000)

    def sys_ppoll(self, fds: int, nfds: int, timeout: int, *_: int) -> int:
        if not timeout:
            return self._poll(fds, nfds, None)
        sec, nsec = struct.unpack("<qq", self.space.read(timeout, 16))
        return self._poll(fds, nfds, sec * 1_000_000_000 + nsec)

    def _poll(self, fds: int, nfds: int, timeout_ns: int | None) -> int:
        """Ready now, or the thread waits (with the files it watches) and polls again when one is."""
        raw = bytearray(self.space.read(fds, nfds * 8))
        ready = 0
        watched: list[tuple[fdt.OpenFile, int]] = []
        for i in range(nfds):
            fd, events, _revents = struct.unpack_from("<ihh", raw, i * 8)
            revents = 0
            if fd >= 0:
                if fd not in self.fds.fds:
                    revents = POLLNVAL
                else:
                    file = self.fds.get(fd)
                    revents = poll_events(file, events)
                    watched.append((file, events))
            struct.pack_into("<h", raw, i * 8 + 6, revents)
            ready += bool(revents)
        self.space.write(fds, bytes(raw))
        if ready or timeout_ns == 0:
            return ready
        deadline = None if timeout_ns is None else self.now_ns(time.CLOCK_MONOTONIC) + timeout_ns
        raise fdt.WouldBlock(("poll", watched, deadline))

    # ----- opening ------------------------------------------------------------------------------

    def sys_open(self, path: int, flags: int, mode: int, *_: int) -> int:
        return self.sys_openat(AT_FDCWD, path, flags, mode)

    def sys_creat(self, path: int, mode: int, *_: int) -> int:
        return self.sys_openat(AT_FDCWD, path, O_CREAT | 1 | O_TRUNC, mode)

    def sys_openat(self, dirfd: int, path_ptr: int, flags: int, mode: int, *_: int) -> int:
        path = self.read_path(path_ptr)
        if flags & O_TMPFILE == O_TMPFILE:
            raise LinuxError(errno.EOPNOTSUPP)
        nofollow = bool(flags & O_NOFOLLOW) or (flags & O_CREAT and flags & O_EXCL)
        node = self.lookup(_s32(dirfd), path, follow=not nofollow)
        file = self.open_node(node, flags, mode)
        return self.fds.install(file, cloexec=bool(flags & O_CLOEXEC))

    def open_node(self, node: Node, flags: int, mode: int) -> fdt.OpenFile:
        access = flags & O_ACCMODE
        wants_write = access != 0 or bool(flags & O_TRUNC)
        if not node.exists:
            if not flags & O_CREAT:
                raise LinuxError(errno.ENOENT)
            host = self.fs.writable_host(node)
            host_flags = (
                (flags & (O_ACCMODE | O_APPEND)) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            fd = os.open(host, host_flags, mode & ~self.umask & 0o7777)
            self.touch(fd)
            return fdt.HostFile(node.guest, flags, host, fd, True, self.touch)
        if flags & O_CREAT and flags & O_EXCL:
            raise LinuxError(errno.EEXIST)
        if node.synthetic is not None or node.root_dir:
            return self._open_synthetic(node, flags, wants_write)
        assert node.host is not None
        st = os.lstat(node.host)
        if stat.S_ISLNK(st.st_mode):
            raise LinuxError(errno.ELOOP)
        if stat.S_ISDIR(st.st_mode):
            if wants_write:
                raise LinuxError(errno.EISDIR)
            return fdt.DirFile(node.guest, flags, self.stat_node(node), self._listing(node))
        if flags & O_DIRECTORY:
            raise LinuxError(errno.ENOTDIR)
        if not stat.S_ISREG(st.st_mode):
            raise LinuxError(
                errno.EACCES
            )  # host devices, FIFOs and sockets are not part of the guest's world
        host = self.fs.writable_host(node) if wants_write else node.host
        if not node.writable:
            self.note_root_file(node.guest, host)
        host_flags = (flags & (O_ACCMODE | O_APPEND | O_TRUNC)) | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(host, host_flags)
        if flags & O_TRUNC:
            self.touch(fd)
        return fdt.HostFile(node.guest, flags, host, fd, node.writable, self.touch)

    def _open_synthetic(self, node: Node, flags: int, wants_write: bool) -> fdt.OpenFile:
        synthetic = node.synthetic
        if node.root_dir or (synthetic is not None and synthetic.kind == "dir"):
            if wants_write:
                raise LinuxError(errno.EISDIR)
            return fdt.DirFile(node.guest, flags, self.stat_node(node), self._listing(node))
        assert synthetic is not None
        if flags & O_DIRECTORY:
            raise LinuxError(errno.ENOTDIR)
        info = synthetic_stat(node.guest, synthetic)
        if synthetic.kind == "dev":
            if synthetic.device == "tty":
                raise LinuxError(errno.ENXIO)
            return fdt.DeviceFile(node.guest, flags, synthetic.device, info, self.entropy)
        if synthetic.kind == "link":
            raise LinuxError(errno.ELOOP)
        if wants_write:
            raise LinuxError(errno.EACCES)
        assert synthetic.content is not None
        return fdt.BytesFile(node.guest, flags, synthetic.content(), info)

    def _listing(self, node: Node) -> list[tuple[int, int, str]]:
        parent = node.guest.rsplit("/", 1)[0] or "/"
        base = node.guest.rstrip("/")
        out = [(fdt.path_ino(node.guest), fdt.DT_DIR, "."), (fdt.path_ino(parent), fdt.DT_DIR, "..")]
        if node.host is not None and node.synthetic is None and not node.root_dir:
            # A host directory: the types come with the listing (no lookup per entry).
            allowed = set(self.fs.listing(node)) if self.fs.view and node.guest == "/etc" else None
            with os.scandir(node.host) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if allowed is not None and entry.name not in allowed:
                        continue
                    out.append((fdt.path_ino(f"{base}/{entry.name}"), _entry_type(entry), entry.name))
            return out
        for name in sorted(self.fs.listing(node)):
            child = self.fs.resolve(name, node.guest, follow=False)
            out.append((fdt.path_ino(child.guest), self._dtype(child), name))
        return out

    def _dtype(self, node: Node) -> int:
        try:
            mode = self.stat_node(node).mode
        except (LinuxError, OSError):
            return fdt.DT_UNKNOWN
        return {
            stat.S_IFDIR: fdt.DT_DIR,
            stat.S_IFREG: fdt.DT_REG,
            stat.S_IFLNK: fdt.DT_LNK,
            stat.S_IFCHR: fdt.DT_CHR,
            stat.S_IFIFO: fdt.DT_FIFO,
        }.get(stat.S_IFMT(mode), fdt.DT_UNKNOWN)

    def sys_getdents64(self, fd: int, buf: int, count: int, *_: int) -> int:
        file = self.fds.get(fd)
        entries = file.entries()
        out = bytearray()
        index = file.offset
        while index < len(entries):
            ino, dtype, name = entries[index]
            raw = name.encode("utf-8", "surrogateescape") + b"\0"
            reclen = (_DIRENT.size + len(raw) + 7) & ~7
            if len(out) + reclen > count:
                if not out:
                    raise LinuxError(errno.EINVAL)
                break
            out += _DIRENT.pack(ino, index + 1, reclen, dtype) + raw + bytes(reclen - _DIRENT.size - len(raw))
            index += 1
        file.offset = index
        self.space.write(buf, bytes(out))
        return len(out)

    # ----- metadata ------------------------------------------------------------------------------

    def _stat_at(self, dirfd: int, path_ptr: int, flags: int) -> fdt.StatInfo:
        path = self.read_path(path_ptr) if path_ptr else ""
        if not path:
            if not flags & AT_EMPTY_PATH:
                raise LinuxError(errno.ENOENT)
            if _s32(dirfd) == AT_FDCWD:
                return self.stat_node(self.fs.resolve(self.cwd))
            return self.fds.get(dirfd).stat()
        node = self.lookup(_s32(dirfd), path, follow=not flags & AT_SYMLINK_NOFOLLOW)
        return self.stat_node(node)

    def sys_stat(self, path: int, buf: int, *_: int) -> int:
        self.space.write(buf, self._stat_at(AT_FDCWD, path, 0).pack())
        return 0

    def sys_lstat(self, path: int, buf: int, *_: int) -> int:
        self.space.write(buf, self._stat_at(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW).pack())
        return 0

    def sys_fstat(self, fd: int, buf: int, *_: int) -> int:
        self.space.write(buf, self.fds.get(fd).stat().pack())
        return 0

    def sys_newfstatat(self, dirfd: int, path: int, buf: int, flags: int, *_: int) -> int:
        self.space.write(buf, self._stat_at(dirfd, path, flags).pack())
        return 0

    def sys_statx(self, dirfd: int, path: int, flags: int, _mask: int, buf: int, *_: int) -> int:
        self.space.write(buf, self._stat_at(dirfd, path, flags).pack_statx())
        return 0

    def _statfs(self, buf: int) -> int:
        # Fixed figures: free space on the host is not the guest's business.
        self.space.write(
            buf, _STATFS.pack(0xEF53, 4096, 1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 0, 0, 255, 4096, 0)
        )
        return 0

    def sys_statfs(self, path: int, buf: int, *_: int) -> int:
        node = self.lookup(AT_FDCWD, self.read_path(path))
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        return self._statfs(buf)

    def sys_fstatfs(self, fd: int, buf: int, *_: int) -> int:
        self.fds.get(fd)
        return self._statfs(buf)

    def sys_access(self, path: int, mode: int, *_: int) -> int:
        return self.sys_faccessat2(AT_FDCWD, path, mode, 0)

    def sys_faccessat(self, dirfd: int, path: int, mode: int, *_: int) -> int:
        return self.sys_faccessat2(dirfd, path, mode, 0)

    def sys_faccessat2(self, dirfd: int, path: int, mode: int, flags: int, *_: int) -> int:
        info = self._stat_at(dirfd, path, flags)
        node = (
            self.lookup(_s32(dirfd), self.read_path(path), follow=not flags & AT_SYMLINK_NOFOLLOW)
            if path
            else None
        )
        if mode & 2 and node is not None and not node.writable and not stat.S_ISCHR(info.mode):
            raise LinuxError(errno.EROFS)
        if mode & 1 and not info.mode & 0o111 and not stat.S_ISDIR(info.mode):
            raise LinuxError(errno.EACCES)
        return 0

    def sys_readlink(self, path: int, buf: int, size: int, *_: int) -> int:
        return self.sys_readlinkat(AT_FDCWD, path, buf, size)

    def sys_readlinkat(self, dirfd: int, path: int, buf: int, size: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path), follow=False)
        target = self.fs.readlink(node).encode("utf-8", "surrogateescape")[: max(size, 0)]
        self.space.write(buf, target)
        return len(target)

    def sys_getcwd(self, buf: int, size: int, *_: int) -> int:
        raw = self.cwd.encode() + b"\0"
        if size < len(raw):
            raise LinuxError(errno.ERANGE)
        self.space.write(buf, raw)
        return len(raw)

    def sys_chdir(self, path: int, *_: int) -> int:
        node = self.lookup(AT_FDCWD, self.read_path(path))
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        if not self.fs.is_dir(node):
            raise LinuxError(errno.ENOTDIR)
        self.cwd = node.guest
        return 0

    def sys_fchdir(self, fd: int, *_: int) -> int:
        file = self.fds.get(fd)
        if file.kind != "dir":
            raise LinuxError(errno.ENOTDIR)
        self.cwd = file.path
        return 0

    def sys_umask(self, mask: int, *_: int) -> int:
        old, self.umask = self.umask, mask & 0o777
        return old

    # ----- extended attributes: none here --------------------------------------------------------

    def sys_getxattr(self, *_: int) -> int:
        raise LinuxError(errno.EOPNOTSUPP)

    sys_lgetxattr = sys_getxattr
    sys_fgetxattr = sys_getxattr
    sys_listxattr = sys_getxattr
    sys_llistxattr = sys_getxattr
    sys_flistxattr = sys_getxattr
    sys_setxattr = sys_getxattr
    sys_lsetxattr = sys_getxattr
    sys_fsetxattr = sys_getxattr

    # ----- changing the tree (the writable layer only) ----------------------------------------------

    def sys_mkdir(self, path: int, mode: int, *_: int) -> int:
        return self.sys_mkdirat(AT_FDCWD, path, mode)

    def sys_mkdirat(self, dirfd: int, path: int, mode: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path), follow=False)
        if node.exists:
            raise LinuxError(errno.EEXIST)
        os.mkdir(self.fs.writable_host(node), mode & ~self.umask & 0o7777)
        return 0

    def sys_unlink(self, path: int, *_: int) -> int:
        return self.sys_unlinkat(AT_FDCWD, path, 0)

    def sys_rmdir(self, path: int, *_: int) -> int:
        return self.sys_unlinkat(AT_FDCWD, path, AT_REMOVEDIR)

    def sys_unlinkat(self, dirfd: int, path: int, flags: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path), follow=False)
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        host = self.fs.writable_host(node)
        if flags & AT_REMOVEDIR:
            os.rmdir(host)
        elif os.path.isdir(host) and not os.path.islink(host):
            raise LinuxError(errno.EISDIR)
        else:
            os.unlink(host)
        return 0

    def sys_rename(self, old: int, new: int, *_: int) -> int:
        return self.sys_renameat2(AT_FDCWD, old, AT_FDCWD, new, 0)

    def sys_renameat(self, olddir: int, old: int, newdir: int, new: int, *_: int) -> int:
        return self.sys_renameat2(olddir, old, newdir, new, 0)

    def sys_renameat2(self, olddir: int, old: int, newdir: int, new: int, flags: int, *_: int) -> int:
        src = self.lookup(_s32(olddir), self.read_path(old), follow=False)
        dst = self.lookup(_s32(newdir), self.read_path(new), follow=False)
        if not src.exists:
            raise LinuxError(errno.ENOENT)
        if flags & 1 and dst.exists:  # RENAME_NOREPLACE
            raise LinuxError(errno.EEXIST)
        os.rename(self.fs.writable_host(src), self.fs.writable_host(dst))
        return 0

    def sys_symlink(self, target: int, path: int, *_: int) -> int:
        return self.sys_symlinkat(target, AT_FDCWD, path)

    def sys_symlinkat(self, target: int, dirfd: int, path: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path), follow=False)
        if node.exists:
            raise LinuxError(errno.EEXIST)
        os.symlink(self.read_path(target), self.fs.writable_host(node))
        return 0

    def sys_link(self, old: int, new: int, *_: int) -> int:
        return self.sys_linkat(AT_FDCWD, old, AT_FDCWD, new, 0)

    def sys_linkat(self, olddir: int, old: int, newdir: int, new: int, flags: int, *_: int) -> int:
        src = self.lookup(_s32(olddir), self.read_path(old), follow=bool(flags & AT_SYMLINK_FOLLOW))
        dst = self.lookup(_s32(newdir), self.read_path(new), follow=False)
        if dst.exists:
            raise LinuxError(errno.EEXIST)
        os.link(self.fs.writable_host(src), self.fs.writable_host(dst), follow_symlinks=False)
        return 0

    def sys_chmod(self, path: int, mode: int, *_: int) -> int:
        return self.sys_fchmodat(AT_FDCWD, path, mode)

    def sys_fchmodat(self, dirfd: int, path: int, mode: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path))
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        os.chmod(self.fs.writable_host(node), mode & 0o7777)
        return 0

    def sys_fchmod(self, fd: int, mode: int, *_: int) -> int:
        file = self.fds.get(fd)
        if not isinstance(file, fdt.HostFile) or not file.layer:
            raise LinuxError(errno.EROFS)
        os.fchmod(file.fd, mode & 0o7777)
        return 0

    def sys_fchown(self, fd: int, *_: int) -> int:
        file = self.fds.get(fd)
        if not isinstance(file, fdt.HostFile) or not file.layer:
            raise LinuxError(errno.EROFS)
        return 0  # the guest's files all belong to its one user

    def sys_fchownat(self, dirfd: int, path: int, *_: int) -> int:
        node = self.lookup(_s32(dirfd), self.read_path(path))
        if not node.exists:
            raise LinuxError(errno.ENOENT)
        self.fs.writable_host(node)
        return 0

    def sys_chown(self, path: int, *_: int) -> int:
        return self.sys_fchownat(AT_FDCWD, path)

    sys_lchown = sys_chown

    def sys_utimensat(self, dirfd: int, path: int, times: int, flags: int, *_: int) -> int:
        if path:
            node = self.lookup(_s32(dirfd), self.read_path(path), follow=not flags & AT_SYMLINK_NOFOLLOW)
            if not node.exists:
                raise LinuxError(errno.ENOENT)
            host = self.fs.writable_host(node)
        else:
            file = self.fds.get(dirfd)
            if not isinstance(file, fdt.HostFile) or not file.layer:
                raise LinuxError(errno.EROFS)
            host = file.host
        now = self.last_time_ns
        current = os.stat(host, follow_symlinks=False)
        stamps = [current.st_atime_ns, current.st_mtime_ns]
        if times:
            values = struct.unpack("<qqqq", self.space.read(times, 32))
            for i in range(2):
                sec, nsec = values[2 * i], values[2 * i + 1]
                if nsec == UTIME_NOW:
                    stamps[i] = now
                elif nsec != UTIME_OMIT:
                    stamps[i] = sec * 1_000_000_000 + nsec
        else:
            stamps = [now, now]
        os.utime(host, ns=(stamps[0], stamps[1]), follow_symlinks=False)
        return 0
