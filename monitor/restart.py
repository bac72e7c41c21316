"""Fast restart after a software fault: when the guest crashes, panics or hangs, bring it back from its
latest good checkpoint instead of booting it, record the fault, and run on live.

Replaying the log into the same fault would be pointless for a deterministic bug, so the restored guest
continues live from the checkpoint. A checkpoint the restarted guest faults from again before a newer
one is taken is suspected (the fault may be latent in it) and marked bad after `suspect_after` such
faults; the next restart then uses the one before it. After `max_restarts` faults in a row without a
newer checkpoint, the policy gives up and the VM stops.

`FaultRestarter` is the policy alone, the only one: the node daemon's primaries use it with their own
restart procedure (replica/primary.py, with `NODE_POLICY` and progress measured by replies clients saw);
`Supervisor` (`vmft run --on-fault restart`) runs one VM with periodic checkpoints, a control interface
for one-off snapshots, and the policy.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from monitor import builder
from monitor.checkpoint import Checkpointer, CheckpointStats, CheckpointStore, Loading, SavedCheckpoint
from monitor.machine import Machine, MachineResult, StopReason

log = logging.getLogger(__name__)

FAULTS = frozenset({StopReason.CRASHED, StopReason.PANICKED, StopReason.HUNG})


class FaultAction(enum.Enum):
    RESTART = "restart"  # restart from the latest good checkpoint
    STOP = "stop"  # stop the VM (the node daemon may add: fail over to the backup)


@dataclass
class RestartPolicy:
    action: FaultAction = FaultAction.STOP
    max_restarts: int = 5  # faults in a row without progress since the last restart before giving up
    suspect_after: int = 2  # faults in a row from one checkpoint (no progress) before it is marked bad
    # A checkpoint is trusted for a restart only once the VM has run this long past it without a fault:
    # one taken between a fatal request and the fault (or while the guest was already hung) would
    # restore the fault. None: the hang timeout plus 0.1 s (a hung guest is caught within its timeout).
    trust_after_s: float | None = None
    # With no trusted checkpoint, restart from the newest one anyway (the node: a guest that faults within
    # its first seconds still comes back) rather than stop.
    untrusted_if_none: bool = False


# The node daemon's policy (replica/primary.py): a primary restarts at once, distrusts a checkpoint the
# first time the guest faults again from it without a new reply, and gives up after three such faults.
NODE_POLICY = RestartPolicy(FaultAction.RESTART, max_restarts=3, suspect_after=1, untrusted_if_none=True)


@dataclass
class FaultRecord:
    reason: str
    position: int
    message: str
    at: float  # time.time()
    restarted_from: str = ""  # checkpoint id ("" if not restarted)
    restart_s: float = 0.0  # from the fault's report to the restored VM running

    def describe(self) -> str:
        text = f"{self.reason} at position {self.position}"
        if self.message:
            text += f" ({self.message})"
        if self.restarted_from:
            text += f"; restarted from checkpoint {self.restarted_from[:12]} in {self.restart_s * 1e3:.1f} ms"
        return text


class FaultRestarter:
    """Decides, for each result of a VM run, whether and from which checkpoint to restart it."""

    def __init__(
        self, policy: RestartPolicy, store: CheckpointStore | None, hang_timeout_s: float = 2.0
    ) -> None:
        self.policy = policy
        self.store = store
        self.trust_after_s = (
            policy.trust_after_s if policy.trust_after_s is not None else hang_timeout_s + 0.1
        )
        self.faults: list[FaultRecord] = []
        self.restarts = 0
        self._streak = 0  # faults in a row without a newer trusted checkpoint
        self._from = ""  # the checkpoint the current run was restored from
        self._from_faults = 0

    @staticmethod
    def is_fault(result: MachineResult) -> bool:
        return result.reason in FAULTS

    def decide(self, result: MachineResult, progressed: bool | None = None) -> SavedCheckpoint | None:
        """Record a fault; the checkpoint to restart from, or None to stop (no fault, policy stop, no
        trusted checkpoint, or too many restarts). `progressed`: whether the VM made progress since the
        last restart (the node: a new reply reached a client); None: a newer trusted checkpoint exists."""
        if not self.is_fault(result):
            return None
        record = FaultRecord(result.reason.value, result.position, result.message, time.time())
        self.faults.append(record)
        log.warning("guest fault #%d: %s", len(self.faults), record.describe())
        store = self.store
        if self.policy.action is not FaultAction.RESTART or store is None:
            return None
        trusted_before = time.monotonic() - self.trust_after_s
        candidate = store.latest_entry(before=trusted_before)
        restored_from = store.find(self._from) if self._from else None
        if restored_from is not None and restored_from.checkpoint_id not in store.bad:
            if progressed is None:
                progressed = candidate is not None and candidate.saved_at > restored_from.saved_at
            if not progressed:
                # The fault came back from the checkpoint of the last restart (or the log replayed onto it).
                self._from_faults += 1
                self._streak += 1
                if self._from_faults >= self.policy.suspect_after:
                    log.warning(
                        "checkpoint %s faulted %d times: marked bad", self._from[:12], self._from_faults
                    )
                    store.mark_bad(self._from)
                    candidate = store.latest_entry(before=trusted_before)
                else:
                    candidate = restored_from
            else:
                self._streak = 1
        else:
            self._streak += 1
        if self._streak > self.policy.max_restarts:
            log.error("%d faults in a row without progress: giving up", self._streak)
            return None
        if candidate is None and self.policy.untrusted_if_none:
            candidate = store.latest_entry()
        if candidate is None:
            log.error("no trusted checkpoint to restart from")
        return candidate

    def restarted(self, checkpoint_id: str, seconds: float) -> None:
        """The VM runs again, restored from `checkpoint_id`."""
        if checkpoint_id != self._from:
            self._from_faults = 0
        self._from = checkpoint_id
        if self.store is not None:
            self.store.rewind_to(checkpoint_id)
        self.restarts += 1
        self.faults[-1].restarted_from = checkpoint_id
        self.faults[-1].restart_s = seconds
        log.warning("restarted from checkpoint %s in %.1f ms", checkpoint_id[:12], seconds * 1e3)


MachineHook = Callable[[Machine], Awaitable[None]]


async def _nothing(machine: Machine) -> None:
    return None


@dataclass
class SupervisorStats:
    checkpoints: int = 0
    last_checkpoint: CheckpointStats | None = None
    snapshots: int = 0
    errors: list[str] = field(default_factory=list)


class Supervisor:
    """Runs one VM: periodic checkpoints into `store` (every `every_s`; the first right after start),
    one-off snapshots (`snapshot`), and restarts after faults per `policy`. `attach(machine)` is awaited
    before each machine starts (bind its NIC server), `detach(machine)` after it stops."""

    def __init__(
        self,
        machine: Machine,
        policy: RestartPolicy | None = None,
        store: CheckpointStore | None = None,
        every_s: float | None = None,
        attach: MachineHook = _nothing,
        detach: MachineHook = _nothing,
        restored_from: str = "",
    ) -> None:
        self.machine = machine
        self.policy = policy or RestartPolicy()
        self.store = store
        self.every_s = every_s
        self.attach = attach
        self.detach = detach
        self.restarter = FaultRestarter(self.policy, store, machine.config.hang_timeout_s)
        self.stopping = False
        self.checkpointer = Checkpointer(machine)
        self.stats = SupervisorStats()
        self._snapshotter: Checkpointer | None = None
        self._lock = threading.Lock()  # one checkpoint at a time; restarts wait for it
        if restored_from:
            self.checkpointer.continue_from(restored_from)

    # -- checkpoints (blocking; call from a worker thread) --

    def checkpoint_now(self) -> CheckpointStats | None:
        """A periodic checkpoint into the store (full first, then incremental)."""
        if self.store is None:
            return None
        with self._lock:
            stats = self.store.save(self.checkpointer)
        self.stats.checkpoints += 1
        self.stats.last_checkpoint = stats
        log.info("%s", stats.describe())
        return stats

    def snapshot(self, path: str | Path) -> CheckpointStats:
        """A one-off full checkpoint to `path` (its own dirty tracking: the periodic chain is undisturbed)."""
        with self._lock:
            if self._snapshotter is None or self._snapshotter.machine is not self.machine:
                self._snapshotter = Checkpointer(self.machine, name="snapshot")
            stats = self._snapshotter.save(path, full=True)
        self.stats.snapshots += 1
        return stats

    async def _periodic(self, machine: Machine, first: bool) -> None:
        """Checkpoints every `every_s`; the first at once unless the machine was just restored."""
        every = self.every_s
        assert every is not None
        while machine.result is None:
            if not first:
                await asyncio.sleep(every)
            first = False
            if machine.result is not None:
                return
            try:
                await asyncio.to_thread(self.checkpoint_now)
            except Exception as err:  # a failed checkpoint must not stop the VM
                log.exception("periodic checkpoint failed")
                self.stats.errors.append(str(err))

    # -- running --

    async def run(self) -> MachineResult:
        """Run until the VM stops for good; returns its last result. The caller closes `self.machine`."""
        fault_at: float | None = None
        while True:
            machine = self.machine
            await self.attach(machine)
            if not machine.is_running() and machine.result is None:
                machine.start()
            if fault_at is not None:
                self.restarter.restarted(self.checkpointer.last_id, time.perf_counter() - fault_at)
            periodic = None
            if self.store is not None and self.every_s:
                periodic = asyncio.create_task(self._periodic(machine, first=fault_at is None))
            try:
                result = await machine.wait()
            finally:
                if periodic is not None:
                    periodic.cancel()
                    await asyncio.gather(periodic, return_exceptions=True)
                await self.detach(machine)
            fault_at = time.perf_counter()
            if self.stopping:
                return result
            path = await asyncio.to_thread(self._locked_decide, result)
            if path is None:
                return result
            try:
                restored = await asyncio.to_thread(self._restore, path)
            except Exception as err:
                log.error("restart from %s failed: %s", path, err)
                self.stats.errors.append(f"restart from {path}: {err}")
                return result
            machine.close()
            self.machine = restored

    def stop(self) -> None:
        """Stop the VM for good (no restart)."""
        self.stopping = True
        self.machine.stop()

    def _locked_decide(self, result: MachineResult) -> Path | None:
        with self._lock:  # a checkpoint in progress (of the now-stopped machine) finishes first
            entry = self.restarter.decide(result)
        return entry.path if entry is not None else None

    def _restore(self, path: Path) -> Machine:
        old = self.machine
        restored, stats = builder.restore(
            path,
            image=old.image,
            mem_size=old.memory.size,
            disk=old.config.disk,
            hang_timeout_s=old.config.hang_timeout_s,
            on_console=old.on_console,
            output_handler=old.output_handler,
            loading=Loading.LAZY,  # the guest runs again at once; memory loads as it touches it
        )
        self.checkpointer = Checkpointer(restored)
        self.checkpointer.continue_from(stats.checkpoint_id)
        self._snapshotter = None
        return restored
