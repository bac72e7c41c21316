"""A small grpc.aio client for etcd's v3 API (the subset in proto/etcd.proto).

Why our own: `etcd3` does not import with protobuf 7, `aetcd` has no TLS, `etcd3gw` is synchronous and
`etcd3aio` is young (docs/design.md). The stubs generated from proto/etcd.proto speak etcd's wire format, and
this module adds only what a node needs: several endpoints (one channel each), a bounded deadline on
every call, failing over to the next member when one does not answer, and mutual TLS through ordinary
gRPC channel credentials.

Failover between members matters for partitions, not only for crashes: a member cut off from its quorum
still accepts connections, and a linearizable request to it waits until it times out. So each attempt
has its own short deadline, and an attempt that fails (UNAVAILABLE, DEADLINE_EXCEEDED) moves on to the
next endpoint while the call's overall deadline lasts. A write whose attempt timed out may still have
been applied: callers make their writes safe to retry (the arbiter's claim is a compare-and-set) and
never assume an outcome etcd did not report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from proto import etcd_pb2, etcd_pb2_grpc
from replica.arbiter import ArbiterUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Codes after which another member may well answer: the member is down, cut off, or busy electing.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# etcd answers a request whose deadline passed inside the server (a linearizable read waiting for its
# read index on a busy machine) with UNKNOWN "context deadline exceeded": the same as a timeout.
RETRYABLE_UNKNOWN = ("context deadline exceeded", "context canceled")


def _retryable(e: grpc.aio.AioRpcError) -> bool:
    if e.code() in RETRYABLE:
        return True
    return e.code() == grpc.StatusCode.UNKNOWN and any(s in (e.details() or "") for s in RETRYABLE_UNKNOWN)


class EtcdError(ArbiterUnavailable):
    """etcd did not answer in time, or answered with an error (an ArbiterUnavailable: nodes handle an
    etcd outage as they handle an unusable arbiter file)."""

    hint = "check that the etcd endpoints are up and reachable (and the certificates, with TLS)"


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with `prefix` (etcd's convention)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every key


class EtcdClient:
    """Channels to every endpoint of one etcd cluster; all methods are coroutines of the loop that
    created the client."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float = 2.0,
        attempt_timeout_s: float = 0.5,
    ) -> None:
        """`endpoints`: HOST:PORT of each member's client URL. Without `credentials` the channels are
        plaintext (for etcd on loopback or inside the test hosts' bridge)."""
        if not endpoints:
            raise EtcdError("no etcd endpoints given")
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 500)]
        self._channels = [
            grpc.aio.secure_channel(ep, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(ep, options=options)
            for ep in self.endpoints
        ]
        self._kv = [etcd_pb2_grpc.KVStub(ch) for ch in self._channels]
        self._lease = [etcd_pb2_grpc.LeaseStub(ch) for ch in self._channels]
        self._maint = [etcd_pb2_grpc.MaintenanceStub(ch) for ch in self._channels]
        self._preferred = 0  # the member that answered last: try it first

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def kv(self, index: int) -> Any:
        """Member `index`'s KV stub, for a caller's own attempt function (see `call`)."""
        return self._kv[index]

    # --- the one retry loop -----------------------------------------------------------------------------
    async def call(self, what: str, attempt: Callable[[int, float], Awaitable[T]],
                   timeout_s: float | None = None) -> T:
        """Run `attempt(member_index, attempt_timeout)` on one member after another (starting with the
        last that answered) until one answers, a non-retryable error comes back, or the deadline passes."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        n = len(self.endpoints)
        index = self._preferred
        last: grpc.aio.AioRpcError | None = None
        tries = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                result = await attempt(index, min(self.attempt_timeout_s, remaining))
                self._preferred = index
                return result
            except grpc.aio.AioRpcError as e:
                where = self.endpoints[index]
                if not _retryable(e):
                    raise EtcdError(f"etcd {what} at {where}: {e.code().name}: {e.details()}") from e
                last = e
                log.debug("etcd %s at %s: %s, trying the next member", what, where, e.code().name)
            tries += 1
            index = (index + 1) % n
            if tries % n == 0:  # every member failed once: do not spin, give them a moment
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        detail = f"{last.code().name}: {last.details()}" if last is not None else "no attempt"
        raise EtcdError(f"etcd {what}: no member answered within the deadline ({detail})")

    # --- KV -------------------------------------------------------------------------------------------
    async def range(self, key: bytes, *, prefix: bool = False, timeout_s: float | None = None
                    ) -> list[Any]:
        """The KeyValues at `key` (or under it, with `prefix`); linearizable."""
        req = etcd_pb2.RangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")

        async def attempt(i: int, t: float) -> Any:
            return await self._kv[i].Range(req, timeout=t)

        resp = await self.call("range", attempt, timeout_s)
        return list(resp.kvs)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0, timeout_s: float | None = None) -> int:
        """Put `value` at `key` (attached to `lease` if not 0); the store's revision after it."""
        req = etcd_pb2.PutRequest(key=key, value=value, lease=lease)

        async def attempt(i: int, t: float) -> Any:
            return await self._kv[i].Put(req, timeout=t)

        resp = await self.call("put", attempt, timeout_s)
        return int(resp.header.revision)

    async def delete(self, key: bytes, *, prefix: bool = False, timeout_s: float | None = None) -> int:
        req = etcd_pb2.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")

        async def attempt(i: int, t: float) -> Any:
            return await self._kv[i].DeleteRange(req, timeout=t)

        resp = await self.call("delete", attempt, timeout_s)
        return int(resp.deleted)

    async def txn(self, req: Any, *, timeout_s: float | None = None) -> Any:
        """One transaction (etcd_pb2.TxnRequest); the TxnResponse. Retried on another member when an
        attempt fails, so the compares must make a second application harmless."""

        async def attempt(i: int, t: float) -> Any:
            return await self._kv[i].Txn(req, timeout=t)

        return await self.call("txn", attempt, timeout_s)

    # --- leases -----------------------------------------------------------------------------------------
    async def lease_grant(self, ttl_s: int, *, timeout_s: float | None = None) -> tuple[int, int]:
        """A new lease: (id, the TTL etcd granted in seconds)."""
        req = etcd_pb2.LeaseGrantRequest(TTL=ttl_s)

        async def attempt(i: int, t: float) -> Any:
            return await self._lease[i].LeaseGrant(req, timeout=t)

        resp = await self.call("lease grant", attempt, timeout_s)
        if resp.error:
            raise EtcdError(f"etcd lease grant: {resp.error}")
        return int(resp.ID), int(resp.TTL)

    async def lease_revoke(self, lease: int, *, timeout_s: float | None = None) -> None:
        req = etcd_pb2.LeaseRevokeRequest(ID=lease)

        async def attempt(i: int, t: float) -> Any:
            return await self._lease[i].LeaseRevoke(req, timeout=t)

        try:
            await self.call("lease revoke", attempt, timeout_s)
        except EtcdError as e:
            if "not found" not in str(e):  # already expired: what revoking wanted anyway
                raise

    async def lease_keepalive(self, lease: int, *, timeout_s: float | None = None) -> int:
        """Renew `lease` once; the TTL etcd granted (<= 0: the lease is gone). One short stream per
        renewal: renewals are seconds apart, and a fresh stream fails over like any other call."""

        async def attempt(i: int, t: float) -> Any:
            stream = self._lease[i].LeaseKeepAlive(timeout=t)
            try:
                await stream.write(etcd_pb2.LeaseKeepAliveRequest(ID=lease))
                resp = await stream.read()
            finally:
                stream.cancel()
            if resp is grpc.aio.EOF:
                raise EtcdError("etcd lease keepalive: the stream closed without an answer")
            return resp

        resp = await self.call("lease keepalive", attempt, timeout_s)
        return int(resp.TTL)

    async def lease_ttl(self, lease: int, *, timeout_s: float | None = None) -> int:
        """Seconds left on `lease` (-1: expired or unknown)."""
        req = etcd_pb2.LeaseTimeToLiveRequest(ID=lease)

        async def attempt(i: int, t: float) -> Any:
            return await self._lease[i].LeaseTimeToLive(req, timeout=t)

        resp = await self.call("lease ttl", attempt, timeout_s)
        return int(resp.TTL)

    # --- health -----------------------------------------------------------------------------------------
    async def status(self, index: int, *, timeout_s: float = 0.5) -> Any:
        """Maintenance.Status of member `index` only (no failover): raises if that member does not answer."""
        try:
            return await self._maint[index].Status(etcd_pb2.StatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise EtcdError(f"etcd status at {self.endpoints[index]}: {e.code().name}: {e.details()}") from e
