"""The process a Linux guest runs: its state (process.py) with every system call mixed in
(calls_*.py), and what /proc shows about it."""

from __future__ import annotations

import os
from typing import Callable

from monitor.linux.calls_events import EventCalls
from monitor.linux.calls_fs import FileCalls
from monitor.linux.calls_mm import MemoryCalls
from monitor.linux.calls_net import NetCalls
from monitor.linux.calls_proc import ProcessCalls
from monitor.linux.calls_thread import ThreadCalls
from monitor.linux.fs import Synthetic


class LinuxProcess(ThreadCalls, EventCalls, NetCalls, FileCalls, MemoryCalls, ProcessCalls):
    """The process: its state (ProcessState) with every system call mixed in, and its /proc."""

    def proc_entry(self, parts: list[str]) -> Synthetic | None:
        pid = str(self.pid)
        if not parts:
            return Synthetic("dir", entries=lambda: ["meminfo", "self", pid])
        if parts == ["self"]:
            return Synthetic("link", target=pid)
        if parts == ["meminfo"]:
            return Synthetic("file", content=self._meminfo)
        if parts[0] != pid:
            return None
        rest = parts[1:]
        files: dict[str, Callable[[], bytes]] = {
            "cmdline": lambda: b"".join(a.encode() + b"\0" for a in self.program.argv),
            "maps": lambda: self.space.maps_text().encode(),
            "status": self._status,
            "comm": lambda: (self.comm or os.path.basename(self.program.path).encode()[:15]) + b"\n",
            "stat": self._stat,
        }
        if not rest:
            return Synthetic("dir", entries=lambda: sorted([*files, "cwd", "exe", "fd"]))
        name = rest[0]
        if len(rest) == 1 and name in files:
            return Synthetic("file", content=files[name])
        if rest == ["exe"]:
            return Synthetic("link", target=self.program.path)
        if rest == ["cwd"]:
            return Synthetic("link", target=self.cwd)
        if name == "fd":
            if len(rest) == 1:
                return Synthetic("dir", entries=lambda: [str(fd) for fd in sorted(self.fds.fds)])
            if len(rest) == 2 and rest[1].isdigit() and int(rest[1]) in self.fds.fds:
                return Synthetic("link", target=self.fds.fds[int(rest[1])].file.path)
        return None

    def _stat(self) -> bytes:
        name = os.path.basename(self.program.path)[:15]
        return f"{self.pid} ({name}) R {self.ppid} {self.pid} {self.pid} 0 -1\n".encode()

    def _meminfo(self) -> bytes:
        total = self.space.memory.size >> 10
        free = total - (self.space.phys.used_bytes >> 10)
        return f"MemTotal: {total:>12} kB\nMemFree: {free:>13} kB\nMemAvailable: {free:>8} kB\n".encode()

    def _status(self) -> bytes:
        name = os.path.basename(self.program.path)[:15]
        return (
            f"Name:\t{name}\nState:\tR (running)\nTgid:\t{self.pid}\nPid:\t{self.pid}\nPPid:\t{self.ppid}\n"
            "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nThreads:\t1\n"
        ).encode()
