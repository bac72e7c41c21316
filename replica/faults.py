"""The fault catalogue: each fault a user can inject into a running protected VM, and where it goes.

Faults are named from the pair's point of view (`kill-primary`, `stop-backup`, `cut-link`); the node that
carries one out is found by asking the nodes who holds which role. The same catalogue serves the command
line (`vmft fault`), the campaign runner and the pytest plugin; the node API takes the node-relative
FaultKind of proto/vmft.proto.

Partition faults (`isolate-primary`, `split-pair`, `isolate-backup`, `isolate-etcd`) are not carried out by a
node: they take real links down between test hosts (replica/hosts.py), so they exist only where each node
and each etcd member is its own host (`vmft chaos --hosts N`). `plan_partition` turns one into the cut it
makes, `apply_partition`/`heal_partition` make and undo it. The relay's faults (cut/delay/drop of the
replication link inside the primary's node) stay as they are: this kernel has no netem for delay and loss.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from proto import vmft_pb2, vmft_pb2_grpc
from monitor.errors import VmftError
from replica import node_client
from replica.tls import TlsError

if TYPE_CHECKING:
    from replica.hosts import HostNetwork


class Fault(enum.Enum):
    KILL_PRIMARY = "kill-primary"
    KILL_BACKUP = "kill-backup"
    STOP_PRIMARY = "stop-primary"
    STOP_BACKUP = "stop-backup"
    CRASH = "crash"
    PANIC = "panic"
    HANG = "hang"
    SCRIBBLE = "scribble"
    CUT_LINK = "cut-link"
    DELAY_LINK = "delay-link"
    DROP_LINK = "drop-link"
    FAIL_DISK = "fail-disk"
    HEAL = "heal"
    # Partitions between test hosts (no node carries them out: see PARTITIONS).
    ISOLATE_PRIMARY = "isolate-primary"  # the primary's host cut off from everyone (clients, etcd, peers)
    SPLIT_PAIR = "split-pair"  # the primary's and the backup's hosts cut from each other only
    ISOLATE_BACKUP = "isolate-backup"  # the backup's host cut off from everyone
    ISOLATE_ETCD = "isolate-etcd"  # one etcd member's host cut off from everyone


PARTITIONS = frozenset({Fault.ISOLATE_PRIMARY, Fault.SPLIT_PAIR, Fault.ISOLATE_BACKUP, Fault.ISOLATE_ETCD})


@dataclass(frozen=True)
class FaultTarget:
    on_backup: bool  # carried out by the backup's node (else the primary's)
    kind: vmft_pb2.FaultKind


CATALOGUE: dict[Fault, FaultTarget] = {
    Fault.KILL_PRIMARY: FaultTarget(False, vmft_pb2.FAULT_KILL_NODE),
    Fault.KILL_BACKUP: FaultTarget(True, vmft_pb2.FAULT_KILL_NODE),
    Fault.STOP_PRIMARY: FaultTarget(False, vmft_pb2.FAULT_STOP_NODE),
    Fault.STOP_BACKUP: FaultTarget(True, vmft_pb2.FAULT_STOP_NODE),
    Fault.CRASH: FaultTarget(False, vmft_pb2.FAULT_CRASH_GUEST),
    Fault.PANIC: FaultTarget(False, vmft_pb2.FAULT_PANIC_GUEST),
    Fault.HANG: FaultTarget(False, vmft_pb2.FAULT_HANG_GUEST),
    Fault.SCRIBBLE: FaultTarget(False, vmft_pb2.FAULT_SCRIBBLE_GUEST),
    Fault.CUT_LINK: FaultTarget(False, vmft_pb2.FAULT_CUT_LINK),
    Fault.DELAY_LINK: FaultTarget(False, vmft_pb2.FAULT_DELAY_LINK),
    Fault.DROP_LINK: FaultTarget(False, vmft_pb2.FAULT_DROP_LINK),
    Fault.FAIL_DISK: FaultTarget(False, vmft_pb2.FAULT_FAIL_DISK_WRITES),
    Fault.HEAL: FaultTarget(False, vmft_pb2.FAULT_HEAL),
}


class FaultError(VmftError):
    """A fault that cannot be injected (unknown VM, no node answered, nothing to act on)."""


def find_roles(
    nodes: list[str], vm: str, timeout: float = 2.0, auth: node_client.ClientAuth | None = None
) -> tuple[str | None, str | None]:
    """(primary's node, backup's node) of `vm` among `nodes`, by asking each (with `auth`, else the
    credentials remembered for each address or those of the environment: replica/node_client.py)."""
    primary: str | None = None
    backup: str | None = None
    for address in nodes:
        try:
            with (auth or node_client.for_address(address)).channel(address) as channel:
                status = vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            continue
        for entry in status.vms:
            if entry.name != vm:
                continue
            if entry.role == vmft_pb2.ROLE_PRIMARY:
                primary = address
            elif entry.role == vmft_pb2.ROLE_BACKUP:
                backup = address
    return primary, backup


def inject(
    nodes: list[str],
    vm: str,
    fault: Fault,
    duration_s: float = 1.0,
    delay_ms: float = 20.0,
    fraction: float = 0.1,
    *,
    auth: node_client.ClientAuth | None = None,
) -> vmft_pb2.FaultReply:
    """Inject `fault` into `vm`, which runs on some of `nodes` (HOST:PORT of node daemons). Faults are
    control operations: `auth` (or the remembered credentials) must be an admin's."""
    if fault in PARTITIONS:
        raise FaultError(f"{fault.value} cuts links between test hosts: only `vmft chaos --hosts N` has them")
    target = CATALOGUE[fault]
    try:
        primary, backup = find_roles(nodes, vm, auth=auth)
    except TlsError as err:
        raise FaultError(str(err)) from err
    address = backup if target.on_backup else primary
    if address is None:
        role = "backup" if target.on_backup else "primary"
        raise FaultError(f"no node among {', '.join(nodes)} holds the {role} of {vm}")
    request = vmft_pb2.FaultRequest(
        vm=vm, kind=target.kind, duration_s=duration_s, delay_ms=delay_ms, fraction=fraction
    )
    with (auth or node_client.for_address(address)).channel(address) as channel:
        try:
            reply: vmft_pb2.FaultReply = vmft_pb2_grpc.NodeStub(channel).InjectFault(request, timeout=5)
        except grpc.RpcError as err:
            raise FaultError(f"{fault.value} on {address}: {err.details()}") from err
    return reply


# ----- partitions between test hosts --------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionCut:
    """The links one partition fault takes down: `isolated` hosts cut off from everyone (their bridge link
    down), or with `between` the two hosts of `isolated` cut from each other only (blackhole routes)."""

    fault: Fault
    isolated: tuple[str, ...]
    between: bool = False

    def describe(self) -> str:
        if self.between:
            return f"hosts {self.isolated[0]} and {self.isolated[1]} cut from each other"
        return f"host {self.isolated[0]} cut off"


def plan_partition(
    fault: Fault,
    primary_host: str | None,
    backup_host: str | None,
    etcd_hosts: Sequence[str],
    rng: random.Random,
) -> PartitionCut:
    """The cut `fault` makes, given which hosts hold the primary and the backup now (the etcd member is
    drawn with `rng`, so a seeded campaign repeats)."""
    if fault not in PARTITIONS:
        raise FaultError(f"{fault.value} is not a partition fault")
    if fault is Fault.ISOLATE_ETCD:
        if not etcd_hosts:
            raise FaultError("isolate-etcd needs etcd members on their own hosts")
        return PartitionCut(fault, (rng.choice(list(etcd_hosts)),))
    if primary_host is None:
        raise FaultError(f"{fault.value}: no host holds the primary")
    if fault is Fault.ISOLATE_PRIMARY:
        return PartitionCut(fault, (primary_host,))
    if backup_host is None:
        raise FaultError(f"{fault.value}: no host holds the backup")
    if fault is Fault.ISOLATE_BACKUP:
        return PartitionCut(fault, (backup_host,))
    return PartitionCut(fault, (primary_host, backup_host), between=True)


def apply_partition(net: HostNetwork, cut: PartitionCut) -> None:
    if cut.between:
        net.cut_between(*cut.isolated)
    else:
        for host in cut.isolated:
            net.cut(host)


def heal_partition(net: HostNetwork, cut: PartitionCut) -> None:
    if cut.between:
        net.heal_between(*cut.isolated)
    else:
        for host in cut.isolated:
            net.heal(host)
