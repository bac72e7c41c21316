"""The one Linux process a VM runs: its state, and the helpers every system call uses.

The system calls themselves live in calls_*.py (mixins over this state); syscalls.py is the table.
Everything the guest observes from outside its own state goes through the journal here (time, entropy,
console input), so a recording replays.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

from monitor.journal import DivergenceError, EventKind, Journal, JournalMode
from monitor.linux import cpuid_trap
from monitor.linux import fdtable as fdt
from monitor.linux.fs import FileSystem, Node, Synthetic
from monitor.linux.mm import AddressSpace, LinuxError
from monitor.linux.threads import Scheduler, Thread

log = logging.getLogger(__name__)

AT_FDCWD = -100
PID = 100
PPID = 1


@dataclass
class Host:
    """How the process reaches the world: the machine's journal and outputs, the host console."""

    journal: Callable[[], Journal]
    emit_console: Callable[[int, bytes], None]  # (fd number 1 or 2, bytes): an output
    read_console: Callable[[int], bytes]  # at most n bytes from the console (blocks; b"" at end)
    set_fs_base: Callable[[int], None]
    spawn: Callable[[Thread, int, int], None]  # a new thread: (thread, stack, FS base) from the running one
    fork: Callable[[bool, int], int]  # a new process (vfork: sharing memory until exec; stack) -> its pid
    execve: Callable[[str, list[str], list[str]], None]
    wait_child: Callable[[int, int], tuple[int, int]]  # (pid or -1, options) -> (pid, wait status)
    signal_process: Callable[[int, int], None]  # (pid, signal) to another process
    net: object = None  # the guest's sockets (monitor/linux/sockets.py NetStack), shared by its processes
    # --clock vdso: the time page's clock (monitor/linux/vdso.py VdsoClock.now_ns) answers the clocks it
    # holds (None for the others): a system call and the vDSO then read one clock.
    page_clock: Callable[[int], int | None] | None = None


@dataclass
class ProgramInfo:
    path: str  # guest path of the executable
    argv: list[str]
    envp: list[str]


@dataclass
class SignalState:
    actions: dict[int, bytes] = field(default_factory=dict)  # signal -> raw struct sigaction (32 bytes)
    mask: int = 0
    altstack: bytes = bytes(24)
    pending: int = 0  # signals sent with a handler to run, not yet delivered (bit sig-1)


class ProcessState:
    def __init__(self, space: AddressSpace, fs: FileSystem, host: Host, program: ProgramInfo) -> None:
        self.space = space
        self.fs = fs
        self.host = host
        self.program = program
        self.fds = fdt.FdTable()
        self.sched = Scheduler()
        self.pid = PID
        self.ppid = PPID
        self.comm = b""
        self.cwd = "/"
        self.umask = 0o022
        self.signals = SignalState()
        self.fs_base = 0
        self.clear_child_tid = 0
        self.robust_list = (0, 0)
        self.exit_code: int | None = None
        self.last_time_ns = 0  # the latest time the guest saw: stamps files it changes
        self.pipes = 0
        self.unknown_logged: set[int] = set()
        self.console_eof = False
        self.root_files: dict[str, bytes] = {}  # guest path -> the ROOT_FILE event's data
        self.cpuid_sites: dict[str, frozenset[int]] = {}  # guest path -> file offsets rewritten to ud2

    def filter_code(
        self, guest: str, host: str, read: Callable[[], bytes], contents: bytes, offset: int
    ) -> bytes:
        """Executable bytes from a file on their way into guest memory: cpuid becomes a trap."""
        sites = cpuid_trap.cpuid_sites(host, read, file_sha256(host))
        if not sites:
            return contents
        self.cpuid_sites[guest] = sites
        return cpuid_trap.patch(contents, offset, sites)[0]

    # ----- the world, through the journal ----------------------------------------------------------

    def now_ns(self, clock: int = time.CLOCK_REALTIME) -> int:
        page = self.host.page_clock
        value = page(clock) if page is not None else None
        if value is None:
            value = self.host.journal().value(EventKind.CLOCK, lambda: time.clock_gettime_ns(clock))
        if clock == time.CLOCK_REALTIME:
            self.last_time_ns = max(self.last_time_ns, value)
        return value

    def entropy(self, n: int) -> bytes:
        return self.host.journal().data(EventKind.ENTROPY, lambda: os.urandom(n))

    def console_read(self, n: int) -> bytes:
        if self.console_eof:
            return b""
        data = self.host.journal().data(EventKind.CONSOLE_IN, lambda: self.host.read_console(n))
        if not data:
            self.console_eof = True
        return data

    def console_write(self, number: int, data: bytes) -> None:
        self.host.emit_console(number, data)

    def note_root_file(self, guest: str, host: str) -> None:
        """The guest reads a file of the read-only root: its content hash is an event, so a replica whose
        file differs is refused (before replay, from the log's manifest; or here, naming the file)."""
        if guest in self.root_files:
            return
        mine = f"{guest}\0{file_sha256(host)}".encode()
        recorded = self.host.journal().data(EventKind.ROOT_FILE, lambda: mine)
        self.root_files[guest] = recorded
        if recorded != mine:
            raise DivergenceError(
                0, f"root file {guest}", recorded.split(b"\0")[-1].decode(), mine.split(b"\0")[-1].decode()
            )

    @property
    def replaying(self) -> bool:
        return self.host.journal().mode is JournalMode.REPLAY

    def touch(self, host_fd: int) -> None:
        """A layer file changed: its times are the guest's, not the host's (replay must see the same)."""
        os.utime(host_fd, ns=(self.last_time_ns, self.last_time_ns))

    # ----- guest memory ---------------------------------------------------------------------------

    def read_path(self, addr: int) -> str:
        if not addr:
            raise LinuxError(errno.EFAULT)
        return self.space.read_cstring(addr, 4096).decode("utf-8", "surrogateescape")

    # ----- paths ----------------------------------------------------------------------------------

    def base_dir(self, dirfd: int) -> str:
        if dirfd == AT_FDCWD or dirfd == (AT_FDCWD & 0xFFFFFFFF):
            return self.cwd
        file = self.fds.get(dirfd)
        if file.kind != "dir":
            raise LinuxError(errno.ENOTDIR)
        return file.path

    def lookup(self, dirfd: int, path: str, follow: bool = True) -> Node:
        base = "/" if path.startswith("/") else self.base_dir(dirfd)
        return self.fs.resolve(path, base, follow)

    def stat_node(self, node: Node) -> fdt.StatInfo:
        if node.root_dir:
            info = fdt.host_stat(self.fs.root, "/", False)
            info.ino = 2
            return info
        if node.synthetic is not None:
            return synthetic_stat(node.guest, node.synthetic)
        if node.host is None or not os.path.lexists(node.host):
            raise LinuxError(errno.ENOENT)
        return fdt.host_stat(node.host, node.guest, node.writable)

    # ----- state ----------------------------------------------------------------------------------

    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.space.digest())
        h.update(self.fds.digest())
        h.update(
            repr(
                (
                    self.cwd, self.umask, sorted(self.signals.actions.items()), self.signals.mask,
                    self.signals.pending, self.signals.altstack,
                    self.fs_base, self.clear_child_tid, self.robust_list, self.last_time_ns,
                    self.sched.digest(),
                )
            ).encode()
        )  # fmt: skip
        return h.digest()


_DEVICE_NUMBERS = {
    "null": 0x103,
    "zero": 0x105,
    "full": 0x107,
    "random": 0x108,
    "urandom": 0x109,
    "tty": 0x500,
}


def synthetic_stat(guest: str, node: Synthetic) -> fdt.StatInfo:
    ino = fdt.path_ino(guest)
    dev = fdt.DEV_DEV if guest.startswith("/dev") else fdt.PROC_DEV
    if node.kind == "dir":
        return fdt.StatInfo(dev=dev, ino=ino, mode=stat.S_IFDIR | 0o555, nlink=2)
    if node.kind == "link":
        return fdt.StatInfo(dev=dev, ino=ino, mode=stat.S_IFLNK | 0o777, size=len(node.target))
    if node.kind == "dev":
        return fdt.StatInfo(dev=dev, ino=ino, mode=stat.S_IFCHR | 0o666, rdev=_DEVICE_NUMBERS[node.device])
    return fdt.StatInfo(dev=dev, ino=ino, mode=stat.S_IFREG | 0o444, blksize=1024)


_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(host: str) -> str:
    """A file's content hash, cached by (path, inode, size, mtime): the root is read-only to guests."""
    st = os.stat(host)
    key = (host, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _SHA_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(host, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = _SHA_CACHE[key] = h.hexdigest()
    return digest


def output_tag(number: int, data: bytes) -> bytes:
    """Console outputs are hashed with the stream they went to."""
    return bytes((number,)) + data
