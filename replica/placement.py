"""Placement of a primary's new backup on etcd membership (replica/membership.py), for automatic
re-protection: the pair's other node while it is a live member, else another live member that can host the
VM (capacity-aware: VMs and free memory as the members publish them; the chosen node still checks its own
limits when the backup's Hello arrives).

A member is live while its lease is renewed (a TTL of 2 s by default), so a backup node absent from the
membership has been dead, hung or cut off from the etcd quorum for at least that long: that is what "its
node stays dead" means here, and a node that comes back registers again. `vmft protect --etcd` without
`--backup` places the first backup the same way (replica/node_etcd.py: pick_backup).

The new backup serves the VM after a failover on its own host: the same port as the primary's service on
another host (namespace hosts, machines), or a free port when it shares this node's host (a loopback
cluster on one machine, where this process can ask the kernel).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from monitor.address import parse_address
from replica.etcd_client import EtcdError
from replica.membership import MemberInfo, Membership

if TYPE_CHECKING:
    from replica.primary import PrimaryVm

log = logging.getLogger(__name__)


class Placement:
    """Where this node's primaries get their next backup."""

    def __init__(self, membership: Membership, node_address: str) -> None:
        self.membership = membership
        self.node_address = node_address  # this node's own address: never its own backup

    async def backup_for(self, vm: PrimaryVm) -> tuple[str, str] | None:
        """(node address, service address) for `vm`'s next backup; None: no live member fits (or etcd is
        unreachable): try again later."""
        try:
            members = await self.membership.members()
        except EtcdError as err:
            log.info("%s: placement needs etcd: %s", vm.name, err)
            return None
        if any(m.address == vm.backup_node for m in members):
            return vm.backup_node, vm.backup_service  # the pair's node is (again) a live member
        chosen = choose(members, vm.core.spec.mem_mib, exclude={self.node_address, vm.backup_node})
        if chosen is None:
            log.info("%s: backup node %s is gone and no live member can host the VM", vm.name, vm.backup_node)
            return None
        service = service_address(chosen.address, vm.core.service)
        log.warning(
            "%s: backup node %s is not a live member; placing the new backup on %s (%s, %d MiB free)",
            vm.name, vm.backup_node, chosen.name, chosen.address, chosen.memory_free_mib,
        )  # fmt: skip
        return chosen.address, service


def choose(members: list[MemberInfo], memory_mib: int, exclude: set[str]) -> MemberInfo | None:
    """The member with the most free memory (then the fewest VMs) that can host `memory_mib` more, whose
    address is not in `exclude`."""
    fits = [m for m in members if m.address not in exclude and m.can_host(memory_mib)]
    return max(fits, key=lambda m: (m.memory_free_mib, -m.vms, m.name), default=None)


def service_address(node_address: str, primary_service: str) -> str:
    """Where a backup on `node_address` serves the VM after a failover (see the module docstring)."""
    host, _ = parse_address(node_address)
    service_host, port = parse_address(primary_service)
    if host != service_host:
        return f"{host}:{port}"
    with socket.socket() as sock:  # the same host as this node: this process may ask for a free port
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"
