"""Cluster membership on etcd: nodes register with their capacity under a lease; the live ones are listed.

A node registers PREFIX/members/NAME = {address, capacity, load} attached to a lease of `ttl_s` seconds
and renews the lease every third of its TTL. etcd deletes the key when the lease expires, so
`members()` lists exactly the nodes whose renewals still reach etcd: a node that dies, hangs or is cut
off from the etcd quorum disappears within its TTL (plus etcd's expiry sweep, about half a second).

etcd expires leases on its side and fences nobody (docs/design.md), so the node keeps its own view: the lease
is valid until the moment its last successful renewal was *sent* plus the TTL etcd granted (sent, not
answered: etcd counts from when it renewed, which is after we sent). When that deadline passes without
a newer renewal, the registration is `lost` (an asyncio.Event) and the node must stop acting as a
member (stop accepting placements); it never outlives its lease in its own eyes. Safety of primaries does
not rest on this (the arbiter does that); availability and placement do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from replica.etcd_client import EtcdClient, EtcdError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/vmft"


@dataclass(frozen=True)
class MemberInfo:
    """What a node says about itself in the membership table."""

    name: str
    address: str  # HOST:PORT of its node API
    memory_mib: int  # memory it can give to guests
    max_vms: int
    vms: int = 0  # VMs it runs now (primaries and backups)
    memory_used_mib: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def memory_free_mib(self) -> int:
        return self.memory_mib - self.memory_used_mib

    def can_host(self, memory_mib: int) -> bool:
        return self.vms < self.max_vms and self.memory_free_mib >= memory_mib

    def encode(self) -> bytes:
        return json.dumps({**asdict(self), "labels": dict(self.labels)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> MemberInfo:
        try:
            data = json.loads(raw)
            return cls(
                name=str(data["name"]), address=str(data["address"]), memory_mib=int(data["memory_mib"]),
                max_vms=int(data["max_vms"]), vms=int(data.get("vms", 0)),
                memory_used_mib=int(data.get("memory_used_mib", 0)),
                labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
            )
        except (ValueError, KeyError, TypeError) as e:
            raise EtcdError(f"unusable membership record: {raw[:100]!r}") from e


def member_key(prefix: str, name: str) -> bytes:
    if not name or "/" in name:
        raise EtcdError(f"bad member name: {name!r}")
    return f"{prefix}/members/{name}".encode()


class Registration:
    """One node's live membership: its lease, the renewal task and its own view of the lease deadline."""

    def __init__(self, client: EtcdClient, key: bytes, info: MemberInfo, lease: int, ttl_s: int,
                 sent_at: float) -> None:
        self.client = client
        self.key = key
        self.info = info
        self.lease = lease
        self.ttl_s = ttl_s
        self.valid_until = sent_at + ttl_s  # monotonic
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """This node's own judgement: True while its lease cannot have expired on etcd's side."""
        return not self.lost.is_set() and time.monotonic() < self.valid_until

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew(), name=f"lease-{self.info.name}")

    async def _renew(self) -> None:
        interval = max(self.ttl_s / 3.0, 0.1)
        try:
            while True:
                # Wake for the next renewal, or at the deadline to declare the lease lost.
                await asyncio.sleep(max(0.0, min(interval, self.valid_until - time.monotonic())))
                if time.monotonic() >= self.valid_until:
                    break
                sent = time.monotonic()
                try:
                    ttl = await self.client.lease_keepalive(
                        self.lease, timeout_s=max(0.05, self.valid_until - sent)
                    )
                except EtcdError as e:
                    log.warning("member %s: lease renewal failed: %s", self.info.name, e)
                    continue
                if ttl <= 0:
                    log.warning("member %s: etcd says lease %x is gone", self.info.name, self.lease)
                    break
                self.valid_until = sent + ttl
        finally:
            if not self.lost.is_set():
                log.warning("member %s: lease lost, no longer a member", self.info.name)
                self.lost.set()

    async def update(self, info: MemberInfo) -> None:
        """Publish new load figures under the same lease."""
        if not self.alive:
            raise EtcdError(f"member {self.info.name}: lease lost, register again")
        await self.client.put(self.key, info.encode(), lease=self.lease)
        self.info = info

    async def stop_renewing(self) -> None:
        """Stop renewing without revoking (what a crash looks like to etcd); the lease runs out."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self) -> None:
        """Leave the cluster now: stop renewing and revoke the lease (the key goes with it)."""
        await self.stop_renewing()
        self.lost.set()
        try:
            await self.client.lease_revoke(self.lease)
        except EtcdError as e:
            log.warning("member %s: revoking its lease: %s (it will expire)", self.info.name, e)


class Membership:
    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    async def register(self, info: MemberInfo, ttl_s: int = 2) -> Registration:
        """Register `info` under a fresh lease of `ttl_s` seconds and keep renewing it."""
        sent = time.monotonic()
        lease, ttl = await self.client.lease_grant(ttl_s)
        key = member_key(self.prefix, info.name)
        await self.client.put(key, info.encode(), lease=lease)
        reg = Registration(self.client, key, info, lease, ttl, sent)
        reg.start()
        log.info("member %s registered (lease %x, %d s)", info.name, lease, ttl)
        return reg

    async def members(self) -> list[MemberInfo]:
        """The nodes whose leases are alive now, by name."""
        prefix = f"{self.prefix}/members/".encode()
        kvs = await self.client.range(prefix, prefix=True)
        return sorted((MemberInfo.decode(kv.value) for kv in kvs), key=lambda m: m.name)

    async def member(self, name: str) -> MemberInfo | None:
        kvs = await self.client.range(member_key(self.prefix, name))
        return MemberInfo.decode(kvs[0].value) if kvs else None

    async def pick(self, memory_mib: int, exclude: set[str] | None = None) -> MemberInfo | None:
        """A live member that can host a VM of `memory_mib` (most free memory first), not in `exclude`."""
        skip = exclude or set()
        fits = [m for m in await self.members() if m.name not in skip and m.can_host(memory_mib)]
        return max(fits, key=lambda m: (m.memory_free_mib, -m.vms, m.name), default=None)


def info_dict(info: MemberInfo) -> dict[str, Any]:
    """For `vmft status --json`."""
    return {**asdict(info), "labels": dict(info.labels), "memory_free_mib": info.memory_free_mib}
