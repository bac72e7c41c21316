"""Debian's redis-server as a protected pair, and clients that keep a checkable history of it: what the
Linux campaign (replica/chaos_linux.py), the demo's second act (replica/demo_redis.py) and the tests
(tests/test_redis_pair.py) share.

- `protect_redis`: a redis-server protected on two nodes of a LocalCluster (the node API of `vmft protect
  --linux`), answering PING, its backup replaying.
- `RedisWorkload`: clients in the redis protocol (replica/resp.py) that SET unique keys and INCR shared
  counters through every service address, and `verify`, the history check: every acknowledged SET reads
  back with its value; each counter is at least its acknowledged increments (and the highest value an
  INCR returned) and at most its attempted ones; no two acknowledged INCRs returned the same value.
- `crash_redis`: SIGSEGV in the served redis-server (`DEBUG SEGFAULT`; it needs `--enable-debug-command`).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass, field

import grpc

from monitor.errors import VmftError
from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import LocalCluster, NodeProcess, ProtectedVm
from replica.faults import FaultError
from replica.resp import ErrorReply, RespClient, RespConnection, RespError

WAIT_S = 60.0
REDIS = "redis-server"  # looked up in the guest's PATH (/usr/bin/redis-server from the host's root view)
DEFAULT_ARGS = ["--save", "", "--appendonly", "no"]
# What is added to the user's arguments (later options win in redis): a fixed port inside the VM, DEBUG
# from local peers (the guest sees every client as 127.0.0.1) for the crash fault, and no crash report, so
# that SIGSEGV ends redis-server at once instead of after a report written to its console (an output: a
# restart would replay up to it, past the fatal command).
CAMPAIGN_ARGS = ["--port", "6379", "--enable-debug-command", "local", "--crash-log-enabled", "no"]


class RedisServiceError(VmftError):
    """The protected redis-server could not be brought up or checked."""


# ----- the protected redis-server ------------------------------------------------------------------------


def redis_argv(extra: list[str]) -> list[str]:
    """The guest's argv: `extra` (the user's `-- redis-server ARGS`, or the defaults) plus CAMPAIGN_ARGS."""
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra and not extra[0].startswith("-"):
        program, args = extra[0], extra[1:]
    else:
        program, args = REDIS, extra
    return [program, *(args or DEFAULT_ARGS), *CAMPAIGN_ARGS]


def protect_redis(
    cluster: LocalCluster,
    primary: NodeProcess,
    backup: NodeProcess,
    argv: list[str],
    name: str = "redis",
    mem_mib: int = 256,
    hang_timeout_s: float = 10.0,
) -> ProtectedVm:
    """Protect `argv` (a redis-server) as a pair (the node API of `vmft protect --linux`), every node's
    service address assigned, and wait until it answers PING and its backup replays."""
    spec = vmft_pb2.VmSpec(name=name, mem_mib=mem_mib, hang_timeout_s=hang_timeout_s)
    spec.linux.argv.extend(argv)
    service, backup_service = cluster.service_address(name, primary), cluster.service_address(name, backup)
    request = vmft_pb2.ProtectRequest(
        spec=spec, backup_node=backup.name, service=service, backup_service=backup_service
    )
    with cluster.channel(primary) as channel:
        try:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=WAIT_S)
        except grpc.RpcError as err:
            raise RedisServiceError(f"protect failed: {err.details()}") from err
    for node in cluster.nodes:  # clients get every address the VM may be served at
        cluster.service_address(name, node)
    vm = ProtectedVm(name, primary, backup, service, backup_service)
    deadline = time.monotonic() + WAIT_S
    while not pong(service):  # the program starts (and listens) a while after Protect returns
        if time.monotonic() > deadline:
            raise RedisServiceError(f"the protected redis at {service} did not answer PING in {WAIT_S} s")
        time.sleep(0.05)
    cluster.wait_for(backup, name, "backup", WAIT_S)
    return vm


def pong(address: str) -> bool:
    """Whether a redis answers PING at `address` (a blocking probe, for threads)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def wait_ping(addresses: list[str], limit_s: float) -> str:
    """The first of `addresses` that answers PING within `limit_s` (RedisServiceError if none)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for address in addresses:
            try:
                conn = await RespConnection.open(address, 1.0)
            except RespError:
                continue
            try:
                if await conn.call("PING", limit_s=2.0) == b"PONG":
                    return address
            except RespError:
                pass
            finally:
                await conn.close()
        await asyncio.sleep(0.05)
    raise RedisServiceError(f"no redis answered PING at {', '.join(addresses)} within {limit_s} s")


async def crash_redis(address: str) -> str:
    """SIGSEGV in the redis-server served at `address` (DEBUG SEGFAULT: it never answers)."""
    conn = await RespConnection.open(address, 2.0)
    try:
        reply = await conn.call("DEBUG", "SEGFAULT", limit_s=2.0)
    except RespError:
        return f"DEBUG SEGFAULT sent to {address}: the connection ended (redis-server got SIGSEGV)"
    finally:
        await conn.close()
    raise FaultError(f"redis at {address} answered DEBUG SEGFAULT with {reply!r} (not crashed)")


# ----- the clients and their history ---------------------------------------------------------------------


@dataclass
class Op:
    client: int
    kind: str  # "set" | "incr"
    key: str
    start: float
    end: float
    ok: bool
    server: str = ""


@dataclass
class RedisVerdict:
    operations: int
    sets_acked: int
    sets_lost: int
    sets_wrong: int
    incr_acked: int
    incr_attempted: int
    counters: dict[str, tuple[int, int, int]]  # name -> (final value, acknowledged, attempted)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        return (
            f"{self.operations} operations, {self.sets_acked} acknowledged SETs checked (lost "
            f"{self.sets_lost}, wrong {self.sets_wrong}), {self.incr_acked} acknowledged INCRs of "
            f"{self.incr_attempted} attempted on {len(self.counters)} counters (lost "
            f"{sum(max(0, acked - value) for value, acked, _a in self.counters.values())})"
        )


class RedisWorkload:
    """`clients` concurrent clients, each one request at a time through a RespClient that knows every
    address: SETs of unique keys (`set_ratio` of the requests) and INCRs of `counters` shared counters."""

    def __init__(
        self,
        addresses: list[str],
        clients: int = 4,
        seed: int = 0,
        counters: int = 3,
        set_ratio: float = 0.7,
        attempt_timeout_s: float = 0.5,
        epoch: float | None = None,
    ) -> None:
        """`epoch`: the time.monotonic() that violations count their times from (default: now)."""
        self.addresses = addresses
        self.clients = clients
        self.seed = seed
        self.counters = [f"ctr:{seed}:{i}" for i in range(counters)]
        self.set_ratio = set_ratio
        self.attempt_timeout_s = attempt_timeout_s
        self.history: list[Op] = []
        self.acked_sets: dict[str, str] = {}
        self.incr_acked: dict[str, list[int]] = {name: [] for name in self.counters}  # the values returned
        # When (since `started`) and by which address each acknowledgement came: a violation says when.
        self.started = time.monotonic() if epoch is None else epoch
        self.acked_at: dict[str, tuple[float, str]] = {}
        self.incr_at: dict[str, list[float]] = {name: [] for name in self.counters}
        self.incr_attempted: dict[str, int] = dict.fromkeys(self.counters, 0)
        self.errors: list[str] = []  # -ERR replies (a server that answered and refused)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    async def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        # The clients start spread over the addresses (a backup's refuses: they move on to the primary's).
        client = RespClient(self.addresses, self.attempt_timeout_s, first=index)
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                if rng.random() < self.set_ratio:
                    kind, key = "set", f"k:{self.seed}:{index}:{n}"
                    args: tuple[str, ...] = ("SET", key, f"v{n}")
                else:
                    kind, key = "incr", rng.choice(self.counters)
                    args = ("INCR", key)
                    self.incr_attempted[key] += 1
                start = time.monotonic()
                try:
                    reply = await client.call(*args)
                except RespError:
                    self.history.append(Op(index, kind, key, start, time.monotonic(), False))
                    await asyncio.sleep(0.005)  # the next address (or the same after a failover)
                    continue
                ok = reply == b"OK" if kind == "set" else isinstance(reply, int)
                if isinstance(reply, ErrorReply):
                    self.errors.append(f"{' '.join(args)}: {reply.message}")
                elif ok and kind == "set":
                    self.acked_sets[key] = args[2]
                    self.acked_at[key] = (time.monotonic() - self.started, client.server)
                elif ok:
                    assert isinstance(reply, int)
                    self.incr_acked[key].append(reply)
                    self.incr_at[key].append(time.monotonic() - self.started)
                self.history.append(Op(index, kind, key, start, time.monotonic(), ok, client.server))
        finally:
            await client.close()

    def recovery_after(self, at: float, window_s: float) -> list[float]:
        """Per client that got through before and after `at`: the longest gap between two of its replies
        from its last one before `at` to the end of the window (the fault may bite a little after `at`)."""
        gaps = []
        for index in range(self.clients):
            ends = [op.end for op in self.history if op.client == index and op.ok]
            before = [t for t in ends if t <= at]
            after = [t for t in ends if at < t <= at + window_s]
            if before and after:
                times = [before[-1], *after]
                gaps.append(max(b - a for a, b in zip(times, times[1:])))
        return gaps

    def clients_through_since(self, at: float) -> int:
        return len({op.client for op in self.history if op.ok and op.end > at})

    async def verify(self, limit_s: float = 30.0) -> RedisVerdict:
        """Read every acknowledged SET and every counter back from whichever address serves."""
        address = await wait_ping(self.addresses, limit_s)
        conn = await RespConnection.open(address, 5.0)
        violations: list[str] = []
        lost = wrong = 0
        lost_keys: list[str] = []
        try:
            keys = sorted(self.acked_sets)
            for at in range(0, len(keys), 200):
                chunk = keys[at : at + 200]
                values = await conn.call("MGET", *chunk, limit_s=10.0)
                if not isinstance(values, list) or len(values) != len(chunk):
                    raise RedisServiceError(f"MGET answered {values!r:.200}")
                for key, value in zip(chunk, values, strict=True):
                    if value is None:
                        lost += 1
                        lost_keys.append(key)
                    elif value != self.acked_sets[key].encode():
                        wrong += 1
                        violations.append(f"acknowledged SET {key}: read {value!r}")
            counters = {}
            for name in self.counters:
                reply = await conn.call("GET", name, limit_s=5.0)
                value = int(reply) if isinstance(reply, bytes) else 0
                returned = self.incr_acked[name]
                acked, attempted = len(returned), self.incr_attempted[name]
                counters[name] = (value, acked, attempted)
                if value < acked or (returned and value < max(returned)):
                    violations.append(
                        f"counter {name} is {value}: {acked} acknowledged increments (highest reply "
                        f"{max(returned, default=0)}) lost some"
                    )
                if value > attempted:
                    violations.append(f"counter {name} is {value}: more than {attempted} attempted")
                first: dict[int, float] = {}
                for value_returned, when in zip(returned, self.incr_at[name], strict=True):
                    if value_returned in first:
                        violations.append(
                            f"counter {name}: two acknowledged INCRs returned {value_returned} (at "
                            f"{first[value_returned]:.2f} s and {when:.2f} s): an acknowledged one was lost"
                        )
                        break
                    first[value_returned] = when
        finally:
            await conn.close()
        if lost_keys:
            times = sorted(self.acked_at[key] for key in lost_keys)
            servers = sorted({server for _t, server in times})
            violations.append(
                f"{lost} acknowledged SETs lost ({', '.join(lost_keys[:3])}, ...), acknowledged from "
                f"{times[0][0]:.2f} s to {times[-1][0]:.2f} s into the run, by {', '.join(servers)}"
            )
        violations += [f"error reply: {e}" for e in self.errors[:5]]
        return RedisVerdict(
            operations=len(self.history),
            sets_acked=len(self.acked_sets),
            sets_lost=lost,
            sets_wrong=wrong,
            incr_acked=sum(len(v) for v in self.incr_acked.values()),
            incr_attempted=sum(self.incr_attempted.values()),
            counters=counters,
            violations=violations,
        )
