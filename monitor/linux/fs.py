"""The guest's file tree: a read-only root, a writable layer, and /proc and /dev answered here.

Paths are resolved component by component in the guest's namespace, never by the host: `..` stops at
the guest root and every symlink (host or layer) is read and followed inside the guest tree, so no path
reaches a host file outside the view. The host only ever sees fully resolved paths, opened with
O_NOFOLLOW.

Default root: a view of the host's system directories (/usr, /bin, /sbin, /lib*, and of /etc only the
files programs need: never shadow, keys or credentials). `root=DIR` uses a prepared tree instead.
/tmp and /home are the VM's own writable layer (a directory the VM owns). Everything else is read-only.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from monitor.linux.mm import LinuxError

TOP_ALLOWED = frozenset({"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc"})
ETC_ALLOWED = frozenset(
    {
        "alternatives", "bash.bashrc", "debian_version", "environment", "group", "host.conf", "hostname",
        "hosts", "inputrc", "issue", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
        "localtime", "magic", "magic.mime", "mime.types", "networks", "nsswitch.conf", "os-release",
        "passwd", "profile", "protocols", "python3", "python3.11", "services", "terminfo", "timezone",
        "gai.conf", "ethertypes",
    }
)  # fmt: skip
LAYER_MOUNTS = ("tmp", "home")
SYNTHETIC_MOUNTS = ("proc", "dev")
MAX_SYMLINKS = 40
HOME = "/home/guest"


@dataclass
class Synthetic:
    """A file, directory or symlink the personality answers (under /proc and /dev)."""

    kind: str  # "file", "dir", "link", "dev"
    content: Callable[[], bytes] | None = None  # file
    entries: Callable[[], list[str]] | None = None  # dir
    target: str = ""  # link
    device: str = ""  # dev: null, zero, full, random, urandom, tty


@dataclass
class Node:
    guest: str  # normalised absolute guest path
    host: str | None = None  # backing host path (root or layer)
    writable: bool = False  # inside the writable layer
    synthetic: Synthetic | None = None
    root_dir: bool = False  # the guest's "/" (a listing made here)

    @property
    def exists(self) -> bool:
        if self.synthetic is not None or self.root_dir:
            return True
        return self.host is not None and os.path.lexists(self.host)


class ProcSource(Protocol):
    """What /proc shows about the one process."""

    def proc_entry(self, parts: list[str]) -> Synthetic | None: ...


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


class FileSystem:
    def __init__(self, layer: Path, root: str | None = None, proc: ProcSource | None = None) -> None:
        self.view = root is None  # the host's system directories, filtered
        self.root = os.path.realpath(root or "/")
        self.layer = layer
        self.proc = proc
        self._modes: dict[str, int | None] = {}  # root host path -> file type (lstat), or None: missing
        for sub in ("tmp", "home/guest"):
            (layer / sub).mkdir(parents=True, exist_ok=True)
        (layer / "tmp").chmod(0o1777)

    # ----- where a guest path lives ----------------------------------------------------------------

    def _backing(self, parts: list[str]) -> Node:
        guest = _join(parts)
        if not parts:
            return Node(guest, root_dir=True)
        top = parts[0]
        if top in LAYER_MOUNTS:
            return Node(guest, host=os.path.join(str(self.layer), *parts), writable=True)
        if top == "proc":
            return Node(guest, synthetic=self._proc(parts[1:]))
        if top == "dev":
            return Node(guest, synthetic=_dev(parts[1:]))
        if self.view and (
            top not in TOP_ALLOWED or (top == "etc" and len(parts) > 1 and parts[1] not in ETC_ALLOWED)
        ):
            return Node(guest)  # hidden: does not exist in the guest
        return Node(guest, host=os.path.join(self.root, *parts))

    def _proc(self, parts: list[str]) -> Synthetic | None:
        if self.proc is None:
            return None
        return self.proc.proc_entry(parts)

    def listing(self, node: Node) -> list[str]:
        """Names in a directory as the guest sees them (without . and ..)."""
        if node.root_dir:
            if self.view:
                names = [n for n in TOP_ALLOWED if os.path.lexists(os.path.join(self.root, n))]
            else:
                names = [n for n in os.listdir(self.root) if n not in LAYER_MOUNTS + SYNTHETIC_MOUNTS]
            return sorted(names + list(LAYER_MOUNTS + SYNTHETIC_MOUNTS))
        if node.synthetic is not None:
            if node.synthetic.entries is None:
                raise LinuxError(errno.ENOTDIR)
            return node.synthetic.entries()
        assert node.host is not None
        names = os.listdir(node.host)
        if self.view and node.guest == "/etc":
            names = [n for n in names if n in ETC_ALLOWED]
        return names

    # ----- resolution -----------------------------------------------------------------------------

    def resolve(self, path: str, cwd: str = "/", follow: bool = True) -> Node:
        """The node `path` names. A missing last component gives a node that does not exist (for
        O_CREAT, mkdir); a missing directory on the way is ENOENT, a file on the way ENOTDIR."""
        if not path:
            raise LinuxError(errno.ENOENT)
        if len(path) > 4095:
            raise LinuxError(errno.ENAMETOOLONG)
        stack: list[str] = [] if path.startswith("/") else [p for p in cwd.split("/") if p]
        todo = deque(path.split("/"))
        links = 0
        node = self._backing(stack)
        while todo:
            comp = todo.popleft()
            if comp in ("", "."):
                continue
            if comp == "..":
                if stack:
                    stack.pop()
                node = self._backing(stack)
                continue
            if len(comp) > 255:
                raise LinuxError(errno.ENAMETOOLONG)
            stack.append(comp)
            last = all(c in ("", ".") for c in todo)
            node = self._backing(stack)
            mode = self._mode(node)
            target = self._link_target(node) if mode is not None and stat.S_ISLNK(mode) else None
            if target is not None and (follow or not last):
                links += 1
                if links > MAX_SYMLINKS:
                    raise LinuxError(errno.ELOOP)
                stack.pop()
                if target.startswith("/"):
                    stack = []
                todo.extendleft(reversed(target.split("/")))
                node = self._backing(stack)
                continue
            if not last:
                if mode is None:
                    raise LinuxError(errno.ENOENT)
                if not stat.S_ISDIR(mode):
                    raise LinuxError(errno.ENOTDIR)
        if path.endswith("/") and node.exists and not self.is_dir(node):
            raise LinuxError(errno.ENOTDIR)
        return node

    def _mode(self, node: Node) -> int | None:
        """The node's file type (lstat), None if it does not exist. The read-only root's answers are
        cached: it does not change under a running VM (a replica checks its files before replaying)."""
        if node.root_dir:
            return stat.S_IFDIR
        if node.synthetic is not None:
            kind = node.synthetic.kind
            return {"dir": stat.S_IFDIR, "link": stat.S_IFLNK, "dev": stat.S_IFCHR}.get(kind, stat.S_IFREG)
        if node.host is None:
            return None
        if not node.writable:
            cached = self._modes.get(node.host, -1)
            if cached != -1:
                return cached
        try:
            mode: int | None = stat.S_IFMT(os.lstat(node.host).st_mode)
        except OSError:
            mode = None
        if not node.writable:
            self._modes[node.host] = mode
        return mode

    def _link_target(self, node: Node) -> str | None:
        if node.synthetic is not None:
            return node.synthetic.target if node.synthetic.kind == "link" else None
        if node.host is None:
            return None
        try:
            st = os.lstat(node.host)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        return os.readlink(node.host)

    def is_dir(self, node: Node) -> bool:
        if node.root_dir:
            return True
        if node.synthetic is not None:
            return node.synthetic.kind == "dir"
        return node.host is not None and os.path.isdir(node.host) and not os.path.islink(node.host)

    def readlink(self, node: Node) -> str:
        target = self._link_target(node)
        if target is None:
            raise LinuxError(errno.EINVAL if node.exists else errno.ENOENT)
        return target

    def writable_host(self, node: Node) -> str:
        """The host path of a node the guest may change, else EROFS (or ENOENT/EACCES)."""
        if not node.writable or node.host is None:
            if node.synthetic is not None or node.root_dir:
                raise LinuxError(errno.EACCES)
            raise LinuxError(errno.EROFS)
        if node.guest in ("/tmp", "/home"):
            raise LinuxError(errno.EBUSY)
        return node.host


def _dev(parts: list[str]) -> Synthetic | None:
    devices = ("null", "zero", "full", "random", "urandom", "tty")
    links = {
        "stdin": "/proc/self/fd/0",
        "stdout": "/proc/self/fd/1",
        "stderr": "/proc/self/fd/2",
        "fd": "/proc/self/fd",
    }
    if not parts:
        return Synthetic("dir", entries=lambda: sorted(devices + tuple(links)))
    if len(parts) > 1:
        return None
    name = parts[0]
    if name in devices:
        return Synthetic("dev", device=name)
    if name in links:
        return Synthetic("link", target=links[name])
    return None
