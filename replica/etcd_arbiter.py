"""The arbiter on etcd: the same interface as replica/arbiter.py's SqliteArbiter, across machines.

Each VM has one key, PREFIX/arbiter/VM, whose value is the newest claim (generation, node, time). etcd
counts every modification of a key in its `version`, and only claims ever write this key, so after g
claims its version is g. A claim of generation g is therefore ONE transaction on the VM's key:

    if version(key) == g - 1 then put(key, {g, node}) else range(key)

It succeeds for exactly one claimant of g, and only if g is the next generation; the failure branch
returns the current owner in the same answer. A node acts only on what etcd answered: if no member
answers within the deadline, `claim` raises `EtcdError` (the claimant has not won and must not act as if
it had). An attempt that got no answer may have been applied anyway, even much later: a leader that lost
its quorum keeps the proposal in its log and commits it when a quorum returns (seen in the tests). So
the arbiter remembers such claims, and a retry of the same (vm, generation, node), within the call or
later, that finds the key at version g holding this node returns True: that is etcd saying this node won.
The key is never deleted (deleting would reset the version and let generations start over).

No lease guards a claim: safety needs none (a protected primary releases output only with its backup's
acknowledgement, an unprotected one only after winning its own claim; see replica/arbiter.py). Leases are
for membership and liveness (replica/membership.py).

The `Arbiter` protocol is synchronous (nodes call it through asyncio.to_thread); `EtcdArbiter` serves it
from a private event loop thread holding the gRPC client, and offers `claim_async`/`current_async` for
code already on an event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from proto import etcd_pb2
from replica.arbiter import Claim
from replica.etcd_client import EtcdClient, EtcdError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PREFIX = "/vmft"


def claim_key(prefix: str, vm: str) -> bytes:
    if not vm or "/" in vm:
        raise EtcdError(f"bad VM name for the arbiter: {vm!r}")
    return f"{prefix}/arbiter/{vm}".encode()


def claim_txn(key: bytes, generation: int, node: str, now: float) -> Any:
    """The one transaction that claims `generation` for `node` on `key` (see the module doc)."""
    value = json.dumps({"generation": generation, "node": node, "claimed_at": now}).encode()
    return etcd_pb2.TxnRequest(
        compare=[
            etcd_pb2.Compare(
                key=key,
                target=etcd_pb2.Compare.VERSION,
                result=etcd_pb2.Compare.EQUAL,
                version=generation - 1,
            )
        ],
        success=[etcd_pb2.RequestOp(request_put=etcd_pb2.PutRequest(key=key, value=value))],
        failure=[etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=key))],
    )


def parse_claim(vm: str, kv: Any) -> Claim:
    """A Claim from the VM key's KeyValue; the stored generation must match etcd's version count."""
    try:
        data = json.loads(kv.value)
        claim = Claim(vm, int(data["generation"]), str(data["node"]), float(data["claimed_at"]))
    except (ValueError, KeyError, TypeError) as e:
        raise EtcdError(f"arbiter key of {vm} holds an unusable value: {kv.value[:100]!r}") from e
    if claim.generation != kv.version:
        raise EtcdError(
            f"arbiter key of {vm}: generation {claim.generation} but {kv.version} writes"
            " (something other than claims wrote it)"
        )
    return claim


class EtcdArbiter:
    """The arbiter (replica/arbiter.py's `Arbiter`) on an etcd cluster."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 2.0,
        attempt_timeout_s: float = 0.5,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self._client_args: dict[str, Any] = dict(
            credentials=credentials, timeout_s=timeout_s, attempt_timeout_s=attempt_timeout_s
        )
        self.timeout_s = timeout_s
        # Clients per event loop: grpc.aio channels belong to the loop that made them.
        self._clients: dict[asyncio.AbstractEventLoop, EtcdClient] = {}
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Claims that raised (no answer in time) but may have been applied: a later claim of the same
        # (vm, generation, node) that finds this node holding it has won it (etcd says so).
        self._uncertain: set[tuple[str, int, str]] = set()

    def _client(self) -> EtcdClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = EtcdClient(self.endpoints, **self._client_args)
        return client

    # --- async interface --------------------------------------------------------------------------------
    async def claim_async(self, vm: str, generation: int, node: str) -> bool:
        if generation < 1:
            return False
        key = claim_key(self.prefix, vm)
        txn = claim_txn(key, generation, node, time.time())
        client = self._client()
        attempts = 0

        async def attempt(i: int, t: float) -> Any:
            nonlocal attempts
            attempts += 1
            return await client.kv(i).Txn(txn, timeout=t)

        try:
            resp = await client.call("claim", attempt)
        except EtcdError:
            self._uncertain.add((vm, generation, node))
            raise
        uncertain = attempts > 1 or (vm, generation, node) in self._uncertain
        self._uncertain.discard((vm, generation, node))
        if resp.succeeded:
            log.info("arbiter: %s won generation %d of %s", node, generation, vm)
            return True
        kvs = resp.responses[0].response_range.kvs if resp.responses else []
        if kvs:
            current = parse_claim(vm, kvs[0])
            # Our own earlier attempt was applied though its answer was lost (see the module doc). Only
            # then: a node asking twice for a generation it already won loses, as with SqliteArbiter.
            if uncertain and current.generation == generation and current.node == node:
                log.info("arbiter: %s holds generation %d of %s (an earlier attempt applied)",
                         node, generation, vm)
                return True
        return False

    async def current_async(self, vm: str) -> Claim | None:
        kvs = await self._client().range(claim_key(self.prefix, vm))
        return parse_claim(vm, kvs[0]) if kvs else None

    async def claims_async(self) -> list[Claim]:
        """The newest claim of every VM the arbiter knows (for a cluster-wide status), by VM name."""
        prefix = f"{self.prefix}/arbiter/".encode()
        kvs = await self._client().range(prefix, prefix=True)
        return sorted((parse_claim(kv.key[len(prefix):].decode(), kv) for kv in kvs), key=lambda c: c.vm)

    async def claim_or_owner_async(self, vm: str, generation: int, node: str) -> str | None:
        """None if `node` won `generation`, else the node holding the VM now (as replica.arbiter's
        claim_or_owner, without a thread)."""
        if await self.claim_async(vm, generation, node):
            return None
        current = await self.current_async(vm)
        return current.node if current else "?"

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    # --- the synchronous Arbiter protocol ---------------------------------------------------------------
    def claim(self, vm: str, generation: int, node: str) -> bool:
        return self._run(self.claim_async(vm, generation, node))

    def current(self, vm: str) -> Claim | None:
        return self._run(self.current_async(vm))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        # The client's own deadline bounds the call; this bound only catches a wedged loop.
        return future.result(timeout=self.timeout_s + 5.0)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._thread_loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="etcd-arbiter", daemon=True)
                thread.start()
                self._thread_loop, self._thread = loop, thread
            return self._thread_loop

    def close(self) -> None:
        """Close the synchronous side's client and loop thread (the async side: aclose())."""
        with self._lock:
            loop, thread = self._thread_loop, self._thread
            self._thread_loop = self._thread = None
        if loop is None or thread is None:
            return
        client = self._clients.pop(loop, None)
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
