"""Migration: move a protected VM's primary to another node, with no acknowledged write lost and one short
pause that clients see (`vmft migrate VM --to NODE`; docs/design.md, "Migration").

On the primary's node (`migrate`, the admin's Migrate call):

1. **Seed.** The target becomes the backup, unless it is already: the current backup is released (the
   primary claims the next generation first, so that the backup, seeing its stream end, loses its own
   claim and stops) and the target is seeded from a live checkpoint (the re-protection path).
2. **Catch up.** Wait until the target has replayed what the primary had run when we looked (twice, so
   that the target is within one round of the primary when the switch begins).
3. **Switch.** The primary's vCPU is parked at a synchronous exit, position X, and the log up to X goes to
   the stream; once the target has acknowledged X, every output up to X has gone out and no later one
   exists. Handover(X) to the target's node.
4. On the target (`take_over`, the Handover call, accepted only from the VM's current primary per the
   arbiter): wait until it holds the log up to X, claim generation g+1, finish the log and go live at X
   (the failover's own go-live path), serve, and re-protect onto the next backup.
5. The old primary closes its service (its clients reconnect to the target) and is fenced: its VM
   stops and frees its memory.

The old primary stops rather than becoming the backup in place: its machine records and is parked at X,
and turning a recording machine into a replaying one would be a second road into the backup role beside
the checkpoint seed that re-protection, failover and restarts already share. The pair after migration is
(target, next backup): the old backup if it is not the target, else the old primary's node, seeded by a
live checkpoint from the new primary (its service address is the one the old primary served on). Migrating
to the current backup therefore swaps the pair's roles; migrating to a third node keeps the backup.

If the switch fails before the target claimed (it refuses: FAILED_PRECONDITION), the primary resumes,
still protected. Any other failure is settled by the arbiter: the primary releases the target (claims
g+1 itself); if it wins it runs on alone, if the target already won, the primary is fenced.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from proto import vmft_pb2, vmft_pb2_grpc
from replica import tls
from replica.backup import BackupVm
from replica.placement import service_address
from replica.primary import PrimaryVm
from replica.roles import TERMINAL, State
from replica.vm_common import ReplicationRefused

if TYPE_CHECKING:
    from replica.node import Node

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT_S = 60.0
ACK_TIMEOUT_S = 2.0  # the target acknowledges the parked position (one round trip, normally)
HOLDS_TIMEOUT_S = 2.0  # on the target: the acknowledged log reaches its replay
HANDOVER_TIMEOUT_S = 30.0  # the target claims, finishes its replay and serves
NEXT_BACKUP_ATTEMPTS = 5
# The new primary's re-protection waits this long after the switch: its live checkpoint and the new
# backup's restore (outputs wait for that backup's first acknowledgement) then do not land on the clients
# reconnecting to it, which would lengthen the one pause they see.
PROTECT_AGAIN_AFTER_S = 0.3  # the new primary's re-protection onto the next backup, a second apart


class MigrationError(ReplicationRefused):
    """A migration could not be done (the VM runs on where it ran, or on the target)."""


class HandoverRefused(MigrationError):
    """The target refused the switch before claiming anything: the primary may simply go on."""


class Phase(enum.Enum):
    SEEDING = "seeding the target"
    CATCHING_UP = "catching up"
    SWITCHING = "switching"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Migration:
    """One migration on the primary's node, with its timings."""

    name: str
    target: str
    target_service: str
    next_backup: str
    next_backup_service: str
    phase: Phase = Phase.SEEDING
    began: float = field(default_factory=time.monotonic)
    seed_s: float = 0.0
    catch_up_s: float = 0.0
    switch_ms: float = 0.0
    parked_at: float = 0.0  # unix time

    def reply(self, handover: vmft_pb2.HandoverReply, position: int) -> vmft_pb2.MigrateReply:
        return vmft_pb2.MigrateReply(
            name=self.name,
            target_node=self.target,
            generation=handover.generation,
            position=position,
            total_s=time.monotonic() - self.began,
            seed_s=self.seed_s,
            catch_up_s=self.catch_up_s,
            switch_ms=self.switch_ms,
            parked_at=self.parked_at,
            next_backup_node=self.next_backup,
            message=f"{self.name} runs on {self.target} in generation {handover.generation} from position "
            f"{handover.live_from}; switch {self.switch_ms:.1f} ms"
            + (f"; re-protecting onto {self.next_backup}" if self.next_backup else ""),
        )


_in_progress: dict[str, Migration] = {}  # by VM name: one migration of a VM at a time on this node
_tasks: set[asyncio.Task[Any]] = set()  # detached work a cancelled call must not cut short
T = TypeVar("T")


def _detached(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


# ----- the primary's node ---------------------------------------------------------------------------


async def migrate(node: Node, request: vmft_pb2.MigrateRequest) -> vmft_pb2.MigrateReply:
    """The whole migration (shielded: a client that gives up does not leave a switch half done)."""
    vm = node.vms.get(request.name)
    if not isinstance(vm, PrimaryVm) or vm.core.result is not None:
        raise MigrationError(f"this node is not the primary of {request.name}")
    if request.name in _in_progress:
        raise MigrationError(f"{request.name} is being migrated to {_in_progress[request.name].target}")
    if not request.target_node or request.target_node == node.settings.name:
        raise MigrationError("the target must be another node")
    migration = _plan(node, vm, request)
    _in_progress[vm.name] = migration  # until _run ends (it goes on if this call is cancelled)
    reply: vmft_pb2.MigrateReply = await asyncio.shield(_detached(_run(node, vm, migration)))
    return reply


def _plan(node: Node, vm: PrimaryVm, request: vmft_pb2.MigrateRequest) -> Migration:
    """Where the VM goes and its backup after. A service address not given follows placement's rule: the
    primary's port on another host, a free port on this one (replica/placement.py)."""
    target = request.target_node
    backup = vm.backup_node if vm.standing.protected else ""
    target_service = request.target_service
    if backup == target:
        target_service = vm.backup_service  # it serves where it would after a failover
    elif not target_service:
        target_service = service_address(target, vm.core.service)
    if request.next_backup_node:
        next_backup = request.next_backup_node
        next_service = request.next_backup_service or service_address(next_backup, vm.core.service)
    elif backup and backup != target:
        next_backup, next_service = backup, vm.backup_service  # the pair keeps its backup
    else:
        next_backup, next_service = node.settings.name, vm.core.service  # the pair swaps its roles
    if next_backup == target:
        raise MigrationError("the next backup must not be the target")
    return Migration(vm.name, target, target_service, next_backup, next_service)


async def _run(node: Node, vm: PrimaryVm, migration: Migration) -> vmft_pb2.MigrateReply:
    try:
        await _seed(node, vm, migration)
        migration.phase = Phase.CATCHING_UP
        started = time.monotonic()
        await asyncio.wait_for(_catch_up(vm), CATCH_UP_TIMEOUT_S)
        migration.catch_up_s = time.monotonic() - started
        migration.phase = Phase.SWITCHING
        reply = await _switch(node, vm, migration)
        migration.phase = Phase.DONE
        log.warning("%s", reply.message)
        return reply
    except TimeoutError as err:
        migration.phase = Phase.FAILED
        raise MigrationError(f"{vm.name}: the target did not catch up in {CATCH_UP_TIMEOUT_S:.0f} s") from err
    except BaseException:
        migration.phase = Phase.FAILED
        raise
    finally:
        _in_progress.pop(vm.name, None)


async def _seed(node: Node, vm: PrimaryVm, migration: Migration) -> None:
    """Make the target the VM's backup (a live checkpoint), unless it is already."""
    standing, target = vm.standing, migration.target
    if standing.is_(State.RUNNING) and vm.backup_node == target:
        return
    # Before the backup is let go: the target is a member (on etcd) and answers at all.
    await node._check_member(target)
    await _reachable(node, target)
    started = time.monotonic()
    old = (vm.backup_node, vm.backup_service) if standing.is_(State.RUNNING) else ("", "")
    if standing.is_(State.RUNNING):
        if not await vm.release_backup(f"migrating to {target}"):
            raise MigrationError(f"{vm.name}: another node took over while its backup was released")
    elif not standing.is_(State.RUNNING_UNPROTECTED):
        raise MigrationError(f"{vm.name} cannot migrate now ({standing.state.value})")
    try:
        await vm.reprotect(target, migration.target_service)
    except ReplicationRefused as err:
        if standing.is_(State.RUNNING_UNPROTECTED) and old[0]:
            # The VM stays here: protected again by its old backup (a live checkpoint), in the background.
            vm.backup_node, vm.backup_service = old
            _detached(_protect_again(node, vm, *old, after_s=0.0))
        raise MigrationError(f"{vm.name}: seeding {target} failed: {err}") from err
    if not standing.is_(State.RUNNING) or vm.backup_node != target:
        raise MigrationError(f"{vm.name}: {target} did not become its backup ({standing.state.value})")
    migration.seed_s = time.monotonic() - started


async def _reachable(node: Node, target: str, within_s: float = 5.0) -> None:
    channel = tls.open_channel(target, node.settings.identity, insecure=node.settings.insecure)
    try:
        await asyncio.wait_for(channel.channel_ready(), within_s)
    except TimeoutError as err:
        raise MigrationError(f"{target} does not answer (within {within_s:.0f} s)") from err
    finally:
        await channel.close()


async def _catch_up(vm: PrimaryVm) -> None:
    """Until the target has replayed what the primary had run when we looked, twice."""
    machine = vm.core.machine
    assert machine is not None
    for _ in range(2):
        goal = machine.position
        await _until(lambda goal=goal: vm.standing.replayed >= goal, vm, "catching up")  # type: ignore[misc]


async def _until(done: Callable[[], bool], vm: PrimaryVm, what: str, poll_s: float = 0.0005) -> None:
    """Poll `done` (bounded by the caller) while the VM stays protected by its target."""
    while not done():
        if not vm.standing.is_(State.RUNNING):
            raise MigrationError(f"{vm.name} lost its backup while {what} ({vm.standing.state.value})")
        await asyncio.sleep(poll_s)


async def _switch(node: Node, vm: PrimaryVm, migration: Migration) -> vmft_pb2.MigrateReply:
    """Park the vCPU, let the target acknowledge the log up to there, hand over; fence this primary."""
    # The channel (its TLS handshake: milliseconds) is made before the guest stops, not during the pause.
    channel = tls.open_channel(migration.target, node.settings.identity, insecure=node.settings.insecure)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), HANDOVER_TIMEOUT_S)
        except TimeoutError as err:
            raise HandoverRefused(f"{migration.target} unreachable") from err
        handover, position = await _parked_switch(vm, migration, vmft_pb2_grpc.NodeStub(channel))
        if not vm.standing.is_(State.FENCED, State.STOPPED):
            vm.standing.to(State.FENCED, f"migrated to {migration.target} (generation {handover.generation})")
        machine = vm.core.machine
        if machine is not None:  # the parked vCPU stops at its next exit now, not at its next look (0.1 s)
            machine.stop()
            machine.resume()
        await vm.stop()  # the service closes first: its clients reconnect to the target
        log.info("%s: stopped %.1f ms after the park", vm.name, (time.time() - migration.parked_at) * 1000)
    finally:
        await channel.close()
    return migration.reply(handover, position)


async def _parked_switch(
    vm: PrimaryVm, migration: Migration, stub: vmft_pb2_grpc.NodeStub
) -> tuple[vmft_pb2.HandoverReply, int]:
    standing = vm.standing
    generation = standing.generation
    async with vm.parked() as position:
        parked_at = time.monotonic()
        migration.parked_at = time.time()
        try:
            await asyncio.wait_for(_until(lambda: standing.acked >= position, vm, "switching"), ACK_TIMEOUT_S)
        except TimeoutError as err:
            raise MigrationError(f"{vm.name}: the target did not acknowledge position {position}") from err
        acked_ms = (time.monotonic() - parked_at) * 1000
        request = vmft_pb2.HandoverRequest(
            name=vm.name, generation=generation, position=position,
            next_backup_node=migration.next_backup, next_backup_service=migration.next_backup_service,
        )  # fmt: skip
        try:
            handover = await _handover(stub, migration.target, request)
        except HandoverRefused:
            raise  # the target claimed nothing: resume, still protected
        except MigrationError as err:
            # Did the target claim? The arbiter settles it: this primary claims the next generation.
            log.warning("%s: handover to %s failed (%s); asking the arbiter", vm.name, migration.target, err)
            if standing.is_(State.RUNNING) and await vm.release_backup("the handover failed"):
                raise MigrationError(f"{err}; {vm.name} runs on here, unprotected") from err
            vm.handed_over = True  # the target won: this guest must not run on
            raise MigrationError(f"{err}; the target won the arbiter: {vm.name} runs there") from err
        vm.handed_over = True
        migration.switch_ms = (time.monotonic() - parked_at) * 1000
    log.info(
        "%s: switch: acknowledged %.1f ms after the park, target serving after %.1f ms (its part %.1f ms)",
        vm.name, acked_ms, migration.switch_ms, handover.took_ms,
    )  # fmt: skip
    return handover, position


async def _handover(
    stub: vmft_pb2_grpc.NodeStub, target: str, request: vmft_pb2.HandoverRequest
) -> vmft_pb2.HandoverReply:
    """Handover on the target's node, with this node's certificate (it names the VM's primary)."""
    try:
        reply: vmft_pb2.HandoverReply = await stub.Handover(request, timeout=HANDOVER_TIMEOUT_S)
        return reply
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise HandoverRefused(f"{target} refused the switch: {err.details()}") from err
        raise MigrationError(f"handover to {target}: {err.code().name} {err.details() or ''}") from err


# ----- the target's node ----------------------------------------------------------------------------


async def take_over(node: Node, request: vmft_pb2.HandoverRequest) -> vmft_pb2.HandoverReply:
    """The planned switch on the target: HandoverRefused before any claim; MigrationError after."""
    began = time.monotonic()
    vm = node.vms.get(request.name)
    if not isinstance(vm, BackupVm) or not vm.following() or not vm.standing.is_(State.REPLAYING):
        raise HandoverRefused(f"this node does not follow {request.name}'s primary")
    if vm.standing.generation != request.generation:
        raise HandoverRefused(
            f"this node follows generation {vm.standing.generation} of {vm.name}, not {request.generation}"
        )
    deadline = began + HOLDS_TIMEOUT_S
    while vm.standing.received < request.position:  # acknowledged on receipt; replay takes it just after
        if time.monotonic() > deadline or not vm.standing.is_(State.REPLAYING):
            raise HandoverRefused(f"{vm.name}: the log up to position {request.position} is not here")
        await asyncio.sleep(0.0002)
    reason = f"planned switch from {vm.primary_node} at position {request.position} (migration)"
    going_live = _detached(vm.primary_lost(reason))  # claims, finishes the log, goes live, serves
    # Answer once the service is up: the rest of the promotion (the node adopting the VM as its primary,
    # whose first periodic checkpoint starts at once) need not hold back the old primary's clients.
    while vm.core.times.serving_at < began and not going_live.done():
        await asyncio.wait({going_live}, timeout=0.0005)
    if vm.core.times.serving_at < began or vm.standing.state in TERMINAL:
        await asyncio.wait({going_live}, timeout=HANDOVER_TIMEOUT_S)
        raise MigrationError(f"{vm.name} did not go live here: {vm.standing.message}")
    took_ms = (time.monotonic() - began) * 1000
    log.warning(
        "%s: took over from %s in %.1f ms (%s)", vm.name, vm.primary_node, took_ms, vm.core.times.describe()
    )
    if request.next_backup_node:
        _detached(_after_promotion(node, vm, going_live, request))
    return vmft_pb2.HandoverReply(generation=vm.standing.generation, live_from=vm.live_from, took_ms=took_ms)


async def _after_promotion(
    node: Node, backup: BackupVm, going_live: asyncio.Task[None], request: vmft_pb2.HandoverRequest
) -> None:
    """Once the node has adopted the VM as its primary, re-protect it onto the next backup."""
    await asyncio.wait({going_live}, timeout=HANDOVER_TIMEOUT_S)
    primary = node.vms.get(backup.name)
    if not isinstance(primary, PrimaryVm) or primary.core is not backup.core:
        log.error("%s: not this node's primary after the switch: %s", backup.name, backup.standing.message)
        return
    await _protect_again(node, primary, request.next_backup_node, request.next_backup_service)


async def _protect_again(
    node: Node, vm: PrimaryVm, backup: str, service: str, after_s: float = PROTECT_AGAIN_AFTER_S
) -> None:
    """Re-protect `vm` onto `backup` (bounded retries): the new primary onto the next backup (the old
    primary's VM may still be stopping), or a primary whose migration failed onto its old backup."""
    request = vmft_pb2.ReprotectRequest(name=vm.name, backup_node=backup, backup_service=service)
    await asyncio.sleep(after_s)
    for attempt in range(NEXT_BACKUP_ATTEMPTS):
        if node.vms.get(vm.name) is not vm or vm.core.result is not None:
            return
        if vm.standing.protected:
            return  # protected meanwhile (automatic re-protection)
        try:
            await node.reprotect(request)
            return
        except ReplicationRefused as err:
            log.info("%s: re-protection onto %s (attempt %d): %s", vm.name, backup, attempt + 1, err)
        await asyncio.sleep(1.0)
    log.warning("%s: not re-protected onto %s after migration (automatic re-protection may)", vm.name, backup)
