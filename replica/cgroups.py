"""Per-VM resource limits through cgroups, for a node whose VMs run as threads of one process.

What this machine allows, measured (docs/design.md, "Resource limits"):
- cgroup v1's cpu controller accepts one *thread*: a thread id written to a cpu cgroup's `tasks` moves
  that thread alone, and `cpu.cfs_quota_us` then bounds it (a spinning thread under a 20 % quota got
  0.20 of a CPU, throttled in 22 of 25 periods, while its sibling thread ran unthrottled). So each VM's
  vCPU thread gets its own cpu cgroup: `VmSpec.cpu_quota` CPUs.
- cgroup v1's memory controller also accepts a thread id, but charges memory to the cgroup of the
  process's address space (its owner), not of the thread that touched it: 128 MiB touched by a thread
  moved into a 64 MiB-limited memory cgroup charged 0.8 MB there and the rest to the process's cgroup.
  All VMs of a node share one address space, so a per-VM memory limit cannot be enforced by the kernel.
  What can be: the node as a whole. With a memory budget set (`vmft node --memory-mib`), the node process
  moves into its own memory cgroup limited to the budget plus the node's own base; each VM's
  `memory_limit_mib` (guest RAM plus the monitor's overhead) is what the node reserves for it against the
  budget (replica/node.py refuses a VM beyond it).
- The cgroup2 mount here (/sys/fs/cgroup/unified) has no cpu or memory controller (v1 holds them), so
  threaded mode there (a threaded cgroup can be made) limits nothing; a host with cpu on cgroup2 needs
  threaded-mode placement (not built).
- A node started by `ip netns exec` (a namespace test host) sees a /sys remounted without the cgroup
  mounts: it finds no controller and applies no limits (its status says so).

Cgroups are made under the node's own cgroup in each hierarchy (as read from /proc/self/cgroup), named
`vmft-node-PID`, and removed when the node closes; a node that died outright leaves empty ones, which the
next node on the machine removes (`sweep_stale`). Needs root; without it (or the controllers) the node
applies no limits and says so in its status.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import HostError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# A short period: a throttled vCPU thread may hold the GIL (between KVM_RUNs it runs Python), and then the
# whole node (heartbeats, acks) waits until the period ends. 10 ms bounds that stall to under 10 ms; the
# kernel's smallest quota (1 ms) then makes 0.1 CPU the smallest limit.
CFS_PERIOD_US = 10_000
MIN_CPU_QUOTA = 1000 / CFS_PERIOD_US
PREFIX = "vmft-node-"
_VM_DIR = re.compile(r"[A-Za-z0-9._-]{1,63}")


class CgroupError(HostError):
    """A cgroup could not be made, written or removed."""

    hint = "resource limits need root and cgroup v1's cpu and memory controllers"


@dataclass(frozen=True)
class Support:
    """Where this process may make cgroups: its own cgroup directory per v1 controller (None: not
    usable), and the controllers of the cgroup2 mount."""

    cpu: Path | None
    memory: Path | None
    v2_controllers: frozenset[str]

    def describe(self) -> str:
        parts = []
        parts.append("per-VM cpu (v1, per thread)" if self.cpu else "no cpu limits")
        parts.append("node memory (v1)" if self.memory else "no memory limits")
        if self.v2_controllers:
            parts.append(f"cgroup2 controllers: {' '.join(sorted(self.v2_controllers))} (unused)")
        return ", ".join(parts)


def _own_paths(text: str) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup (v1 lines `N:ctrl,ctrl:/path`;
    the v2 line `0::/path` under the key "")."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def detect(root: Path = CGROUP_ROOT) -> Support:
    own = _own_paths(Path("/proc/self/cgroup").read_text())
    writable = os.geteuid() == 0

    def usable(controller: str, probe: str) -> Path | None:
        mount = root / controller
        path = own.get(controller)
        if not writable or path is None or not (mount / probe).exists():
            return None
        directory = mount / path.lstrip("/")
        return directory if directory.is_dir() else None

    v2 = root / "unified" / "cgroup.controllers"
    try:
        controllers = frozenset(v2.read_text().split()) if v2.exists() else frozenset()
    except OSError:
        controllers = frozenset()
    return Support(usable("cpu", "cpu.cfs_quota_us"), usable("memory", "memory.limit_in_bytes"), controllers)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"writing {value!r} to {path}: {err}") from err


def _rmdir(path: Path, quiet: bool = False) -> bool:
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError as err:
        (log.debug if quiet else log.warning)("cannot remove cgroup %s: %s", path, err)
        return False


def sweep_stale(support: Support) -> int:
    """Remove the empty cgroups of nodes that died without closing (named by their PID); how many. Two
    nodes starting together may sweep the same directory: whatever vanished meanwhile is skipped."""
    removed = 0
    for base in (support.cpu, support.memory):
        if base is None:
            continue
        for directory in base.glob(f"{PREFIX}*"):
            pid = directory.name.removeprefix(PREFIX)
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            try:
                children = [child for child in directory.iterdir() if child.is_dir()]
            except OSError:
                continue
            for child in children:
                _rmdir(child)
            removed += _rmdir(directory)
    return removed


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CgroupError(f"making cgroup {path}: {err}") from err


class NodeCgroups:
    """The cgroups of one node process: one cpu cgroup per VM (its vCPU thread), and one memory cgroup
    for the whole node. Methods are cheap file writes; call them from the event loop."""

    def __init__(self, support: Support | None = None) -> None:
        self.support = support if support is not None else detect()
        self.name = f"{PREFIX}{os.getpid()}"
        self._placed: dict[str, tuple[int, float]] = {}  # vm -> (thread id, quota) as last applied
        self.memory_limit_mib = 0
        if self.support.cpu or self.support.memory:
            sweep_stale(self.support)

    def describe(self) -> str:
        text = self.support.describe()
        if self.memory_limit_mib:
            text += f"; node memory limited to {self.memory_limit_mib} MiB"
        return text

    # ----- cpu: one cgroup per VM, holding its vCPU thread ------------------------------------------

    def cpu_dir(self, vm: str) -> Path | None:
        if self.support.cpu is None:
            return None
        if not _VM_DIR.fullmatch(vm):
            raise CgroupError(f"bad VM name for a cgroup: {vm!r}")
        return self.support.cpu / self.name / f"vm-{vm}"

    def place(self, vm: str, thread_id: int, cpu_quota: float) -> bool:
        """Put VM `vm`'s vCPU thread in its cpu cgroup, limited to `cpu_quota` CPUs (0: no limit).
        Idempotent; False when this node has no cpu controller."""
        directory = self.cpu_dir(vm)
        if directory is None:
            return False
        if self._placed.get(vm) == (thread_id, cpu_quota):
            return True
        quota = int(cpu_quota * CFS_PERIOD_US) if cpu_quota > 0 else -1
        if 0 < quota < 1000:
            raise CgroupError(f"cpu quota {cpu_quota}: at least {MIN_CPU_QUOTA} CPUs")
        _mkdir(directory)
        _write(directory / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(directory / "cpu.cfs_quota_us", str(quota))
        _write(directory / "tasks", str(thread_id))  # moves this thread only (v1)
        self._placed[vm] = (thread_id, cpu_quota)
        log.info("%s: vCPU thread %d in %s (%s CPUs)", vm, thread_id, directory, cpu_quota or "unlimited")
        return True

    def forget(self, vm: str) -> None:
        """The VM stopped here: its cgroup goes once its vCPU thread has ended (until then the cgroup is
        busy and stays placed, so the next call tries again)."""
        if vm in self._placed:
            directory = self.cpu_dir(vm)
            if directory is None or _rmdir(directory, quiet=True):
                del self._placed[vm]

    def placed(self) -> set[str]:
        return set(self._placed)

    def throttled(self, vm: str) -> int:
        """Periods in which the kernel held VM `vm`'s vCPU to its quota (0 if not placed here)."""
        directory = self.cpu_dir(vm) if vm in self._placed else None
        if directory is None:
            return 0
        try:
            for line in (directory / "cpu.stat").read_text().splitlines():
                key, _, number = line.partition(" ")
                if key == "nr_throttled":
                    return int(number)
        except (OSError, ValueError):
            pass
        return 0

    # ----- memory: the node as a whole ------------------------------------------------------------

    def limit_node_memory(self, limit_mib: int) -> bool:
        """Move this whole process into its own memory cgroup limited to `limit_mib` (the kernel charges
        a process's memory to one cgroup whatever thread touched it). False: no memory controller."""
        base = self.support.memory
        if base is None:
            return False
        directory = base / self.name
        _mkdir(directory)
        _write(directory / "memory.limit_in_bytes", str(limit_mib << 20))
        _write(directory / "cgroup.procs", str(os.getpid()))  # every thread of the process
        self.memory_limit_mib = limit_mib
        log.warning("node memory limited to %d MiB (%s)", limit_mib, directory)
        return True

    def close(self) -> None:
        """Move the process back to its parent cgroups and remove everything made here."""
        for vm in list(self._placed):
            directory = self.cpu_dir(vm)
            if directory is not None and (directory / "tasks").exists():
                parent = self.support.cpu
                assert parent is not None
                for tid in (directory / "tasks").read_text().split():  # a vCPU that has not ended yet
                    try:
                        _write(parent / "tasks", tid)
                    except CgroupError:
                        pass  # it ended meanwhile
            self.forget(vm)
        if self.support.cpu is not None:
            _rmdir(self.support.cpu / self.name)
        if self.memory_limit_mib and self.support.memory is not None:
            try:
                _write(self.support.memory / "cgroup.procs", str(os.getpid()))
            except CgroupError as err:
                log.warning("%s", err)
            _rmdir(self.support.memory / self.name)
            self.memory_limit_mib = 0
