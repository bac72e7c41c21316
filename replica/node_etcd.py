"""A node on etcd (`vmft node --etcd ENDPOINTS`): the arbiter is etcd (replica/etcd_arbiter.py) instead of the
machine's SQLite file, and the node registers in the membership table (replica/membership.py) with its
name (its certificate's), its address and its capacity, renewed under a lease, updated with what it runs.

The node talks to etcd with its own node certificate when it has one (etcd then requires client
certificates from the cluster CA: only nodes can claim or register), plaintext otherwise (an --insecure
node, etcd on loopback). Losing the lease (its renewals no longer reach the etcd quorum) is logged: safety
does not rest on it (the arbiter's claims do), placement will.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from replica import tls
from replica.etcd_arbiter import EtcdArbiter
from replica.etcd_client import EtcdClient, EtcdError
from replica.membership import MemberInfo, Membership, Registration
from replica.vm_common import NodeSettings

if TYPE_CHECKING:
    from replica.node import NodeLimits

log = logging.getLogger(__name__)

UPDATE_EVERY_S = 1.0


def parse_endpoints(text: str) -> list[str]:
    return [e.strip().removeprefix("https://").removeprefix("http://") for e in text.split(",") if e.strip()]


def credentials(settings: NodeSettings) -> grpc.ChannelCredentials | None:
    return tls.channel_credentials(settings.identity) if settings.identity is not None else None


def open_arbiter(settings: NodeSettings, endpoints: Sequence[str]) -> EtcdArbiter:
    return EtcdArbiter(endpoints, credentials=credentials(settings))


class NodeMembership:
    """This node's entry in the membership table, kept up to date while it runs."""

    def __init__(
        self,
        settings: NodeSettings,
        endpoints: Sequence[str],
        usage: Callable[[], tuple[int, int]],
        limits: NodeLimits,
    ) -> None:
        """`usage()`: (VMs this node runs, guest memory they use in MiB); `limits`: its capacity."""
        self.settings = settings
        self.limits = limits
        self.client = EtcdClient(endpoints, credentials=credentials(settings))
        self.membership = Membership(self.client)
        self.usage = usage
        self.registration: Registration | None = None
        self.ttl_s = 2
        self._task: asyncio.Task[None] | None = None

    def _info(self) -> MemberInfo:
        vms, used = self.usage()
        return MemberInfo(
            name=self.settings.node_id, address=self.settings.name, memory_mib=self.limits.budget_mib(),
            max_vms=self.limits.max_vms, vms=vms, memory_used_mib=used,
        )  # fmt: skip

    async def start(self, ttl_s: int = 2) -> None:
        self.ttl_s = ttl_s
        self.registration = await self.membership.register(self._info(), ttl_s=ttl_s)
        self._task = asyncio.create_task(self._keep_up(), name="membership")
        log.warning("node %s registered in etcd membership", self.settings.node_id)

    async def _keep_up(self) -> None:
        registration = self.registration
        assert registration is not None
        last = self._info()
        lost_logged = False
        while True:
            await asyncio.sleep(UPDATE_EVERY_S)
            if not registration.alive:
                if not lost_logged:  # once per lapse
                    log.error("node %s: membership lease lapsed (etcd unreachable?)", self.settings.node_id)
                    lost_logged = True
                # A lapsed lease is gone for good: come back as a new registration once etcd answers
                # (else a node cut off for a moment would never again be a member: no backup placed on it).
                try:
                    fresh = await self.membership.register(self._info(), ttl_s=self.ttl_s)
                except EtcdError as err:
                    log.warning("registering again failed: %s", err)
                    continue
                await registration.stop_renewing()  # its renewals ended with the lease: tidy up only
                registration = self.registration = fresh
                last = fresh.info
                log.warning("node %s registered in etcd membership again", self.settings.node_id)
                lost_logged = False
                continue
            info = self._info()
            if info != last:
                try:
                    await registration.update(info)
                    last = info
                except EtcdError as err:
                    log.warning("membership update failed: %s", err)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.registration is not None:
            try:
                await self.registration.close()
            except EtcdError as err:
                log.warning("leaving the membership failed: %s", err)
        await self.client.close()


async def _pick(endpoints: Sequence[str], creds: grpc.ChannelCredentials | None, memory_mib: int,
                exclude_address: str) -> MemberInfo | None:  # fmt: skip
    client = EtcdClient(endpoints, credentials=creds)
    try:
        membership = Membership(client)
        skip = {m.name for m in await membership.members() if m.address == exclude_address}
        return await membership.pick(memory_mib, exclude=skip)
    finally:
        await client.close()


def pick_backup(
    endpoints: Sequence[str], identity: tls.Identity | None, memory_mib: int, primary_address: str
) -> MemberInfo | None:
    """Placement for `vmft protect --etcd` without --backup: the live member with the most free memory
    that can host the VM, other than the primary's node (None: no such member)."""
    creds = tls.channel_credentials(identity) if identity is not None else None
    return asyncio.run(_pick(endpoints, creds, memory_mib, primary_address))
