"""Processes: fork, vfork, execve, exit, wait, and signals between processes.

Every process has its own address space (page tables; the frames come from the VM's one allocator),
descriptor table and signal state; all threads of all processes share the vCPU and the monitor's
scheduler (threads.py), so a switch between processes is a thread switch plus a CR3 load. fork copies
the parent's pages eagerly; vfork (and clone with CLONE_VM) shares them and parks the parent until the
child calls execve or exits. The first process is the VM's: when it exits, the VM stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Zombie:
    pid: int
    ppid: int
    status: int  # the wait status: exit code << 8, or the signal number


@dataclass
class ProcessTable:
    zombies: list[Zombie] = field(default_factory=list)
    children: dict[int, set[int]] = field(default_factory=dict)  # pid -> its live and zombie children

    def reap(self, ppid: int, pid: int) -> Zombie | None:
        """The first zombie child of `ppid` (any if pid is -1), removed from the table."""
        for zombie in self.zombies:
            if zombie.ppid == ppid and pid in (-1, zombie.pid):
                self.zombies.remove(zombie)
                self.children.get(ppid, set()).discard(zombie.pid)
                return zombie
        return None

    def has_zombie(self, ppid: int, pid: int) -> bool:
        return any(z.ppid == ppid and pid in (-1, z.pid) for z in self.zombies)


def exit_status(code: int) -> int:
    return (code & 0xFF) << 8


def signal_status(sig: int) -> int:
    return sig & 0x7F
