"""The one restart policy (monitor/restart.py FaultRestarter), without KVM: which checkpoint a guest fault
restarts from, when a checkpoint is distrusted, and when the policy gives up. Used by `vmft run
--on-fault restart` (Supervisor: progress = a newer trusted checkpoint) and by the node's primaries
(NODE_POLICY: progress = a reply newer than the last restart's replay target)."""

from __future__ import annotations

import time
from pathlib import Path

from monitor.checkpoint import CheckpointStore, SavedCheckpoint
from monitor.machine import MachineResult, StopReason
from monitor.restart import NODE_POLICY, FaultAction, FaultRestarter, RestartPolicy

CRASH = MachineResult(StopReason.CRASHED, 100, message="triple fault")


def _store(tmp_path: Path, ages_s: list[float]) -> CheckpointStore:
    """A store holding one checkpoint per age (seconds before now), oldest first, named c0, c1, ..."""
    store = CheckpointStore(tmp_path / "checkpoints")
    now = time.monotonic()
    for index, age in enumerate(ages_s):
        path = tmp_path / f"c{index}.ckpt"
        path.write_bytes(b"")
        store.saved.append(SavedCheckpoint(path, f"c{index}", index > 0, now - age, index * 1000))
    return store


def _restart(restarter: FaultRestarter, progressed: bool | None = None) -> str | None:
    entry = restarter.decide(CRASH, progressed)
    if entry is not None:
        restarter.restarted(entry.checkpoint_id, 0.01)
        return entry.checkpoint_id
    return None


def test_no_restart_for_a_clean_stop_or_under_the_stop_policy(tmp_path: Path) -> None:
    store = _store(tmp_path, [10.0])
    restarter = FaultRestarter(RestartPolicy(FaultAction.RESTART), store)
    assert restarter.decide(MachineResult(StopReason.EXITED, 5, exit_code=0)) is None
    assert restarter.faults == []
    stopping = FaultRestarter(RestartPolicy(FaultAction.STOP), store)
    assert stopping.decide(CRASH) is None and len(stopping.faults) == 1  # recorded, not restarted


def test_a_checkpoint_too_young_to_trust_is_skipped(tmp_path: Path) -> None:
    store = _store(tmp_path, [10.0, 5.0, 0.5])  # c2 may already hold the fault (hang timeout 2 s)
    restarter = FaultRestarter(RestartPolicy(FaultAction.RESTART), store, hang_timeout_s=2.0)
    assert _restart(restarter) == "c1"
    assert [s.checkpoint_id for s in store.saved] == ["c0", "c1"], "the rewind forgets the later timeline"


def test_supervisor_distrusts_a_checkpoint_after_repeated_faults_then_gives_up(tmp_path: Path) -> None:
    store = _store(tmp_path, [30.0, 20.0, 10.0])
    policy = RestartPolicy(FaultAction.RESTART, max_restarts=3, suspect_after=2)
    restarter = FaultRestarter(policy, store, hang_timeout_s=1.0)
    assert _restart(restarter) == "c2"
    assert _restart(restarter) == "c2"  # faulted once from c2 with no newer checkpoint: try it again
    assert _restart(restarter) == "c1" and "c2" in store.bad  # twice: c2 is bad, the one before it
    assert _restart(restarter) is None  # four faults in a row without progress: give up
    assert restarter.restarts == 3 and len(restarter.faults) == 4


def test_supervisor_progress_is_a_newer_trusted_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path, [30.0, 20.0])
    policy = RestartPolicy(FaultAction.RESTART, max_restarts=1, suspect_after=2)
    restarter = FaultRestarter(policy, store, hang_timeout_s=1.0)
    assert _restart(restarter) == "c1"
    # The restored VM ran long enough to take a newer checkpoint that is now trusted: a fresh start.
    path = tmp_path / "c9.ckpt"
    path.write_bytes(b"")
    store.saved.append(SavedCheckpoint(path, "c9", True, time.monotonic() - 5.0, 9000))
    assert _restart(restarter) == "c9"
    assert not store.bad


def test_node_policy_distrusts_at_once_without_a_new_reply_and_gives_up_after_three(tmp_path: Path) -> None:
    store = _store(tmp_path, [40.0, 30.0, 20.0, 10.0])
    restarter = FaultRestarter(NODE_POLICY, store, hang_timeout_s=1.0)
    assert _restart(restarter, progressed=True) == "c3"
    assert _restart(restarter, progressed=False) == "c2" and store.bad == {"c3"}
    assert _restart(restarter, progressed=False) == "c1" and store.bad == {"c3", "c2"}
    assert _restart(restarter, progressed=False) is None  # the third fault again right after a restart
    assert store.bad == {"c3", "c2", "c1"}


def test_node_policy_a_new_reply_resets_the_count(tmp_path: Path) -> None:
    store = _store(tmp_path, [40.0, 30.0])
    restarter = FaultRestarter(NODE_POLICY, store, hang_timeout_s=1.0)
    for _ in range(6):
        assert _restart(restarter, progressed=True) == "c1"
    assert not store.bad


def test_node_policy_falls_back_to_an_untrusted_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path, [0.2])  # the guest faulted within its first seconds
    assert _restart(FaultRestarter(NODE_POLICY, store, hang_timeout_s=2.0)) == "c0"
    strict = FaultRestarter(
        RestartPolicy(FaultAction.RESTART), _store(tmp_path / "s", [0.2]), hang_timeout_s=2.0
    )
    assert _restart(strict) is None
