"""A client workload against a kv service, its complete operation history, and the checker.

Each client owns its keys, so every read has exactly one right answer: its own counter increments by one
per acknowledged INCR (so a value above that is a write applied twice, below it a write lost), and a GET
of its own key must return the last acknowledged SET (or, after a failed SET whose outcome is unknown,
that value or the older one). At the end every key is read back. The recovery a client saw is the gap
between its last success before a fault and its first success after it.

With `shared_counter` the clients also increment one key they all share, and the checker adds: **never two
primaries releasing output**. It is judged from what the clients saw, not from the nodes' status (a cut-off
host cannot be asked, and a status read races the failover it describes): two copies of the service that
both release replies must, under load, answer increments of the shared counter from diverged states. So
two acknowledged increments that returned the same value, or an increment that returned a value no higher
than one acknowledged before it was sent (real-time order), mean two primaries released output. Each reply
also records the address that answered it, so a violation names both servers.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

from replica.kv_client import KvClient, KvError, KvUnavailable

SHARED_FRACTION = 0.15  # of each client's operations, with the shared counter on


@dataclass(slots=True)  # a long campaign keeps a million of these
class Op:
    client: int
    kind: str  # set, incr, get, shared (an INCR of the key every client shares), final
    key: str
    argument: str
    start: float
    end: float
    ok: bool
    result: str = ""
    error: str = ""
    server: str = ""  # the address that answered (ok ops)


@dataclass
class Violation:
    client: int
    kind: str  # lost, duplicated, inconsistent-read, two-primaries
    detail: str


@dataclass
class Verdict:
    ops: int
    acknowledged_writes: int
    failed_ops: int
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lost = sum(v.kind == "lost" for v in self.violations)
        duplicated = sum(v.kind == "duplicated" for v in self.violations)
        inconsistent = sum(v.kind == "inconsistent-read" for v in self.violations)
        two = sum(v.kind == "two-primaries" for v in self.violations)
        return (
            f"{self.ops} operations, {self.acknowledged_writes} acknowledged writes checked, "
            f"lost {lost}, duplicated {duplicated}, inconsistent reads {inconsistent}, "
            f"two primaries {two}, failed ops {self.failed_ops}"
        )


@dataclass
class ClientModel:
    """What one client knows it did: the expected state of its keys."""

    counter_acked: int = 0
    counter_unknown: int = 0
    values: dict[str, set[str]] = field(default_factory=dict)  # key -> acceptable current values


class Workload:
    def __init__(
        self,
        addresses: list[str],
        clients: int = 4,
        keys_per_client: int = 4,
        seed: int = 0,
        op_timeout_s: float = 10.0,
        pause_s: float = 0.0,
        attempt_timeout_s: float = 0.5,
        shared_counter: bool = False,
    ) -> None:
        self.addresses = addresses
        self.shared_counter = shared_counter
        self.shared_acked = 0
        self.shared_unknown = 0
        self.clients = clients
        self.keys_per_client = keys_per_client
        self.seed = seed
        self.op_timeout_s = op_timeout_s
        self.pause_s = pause_s
        self.attempt_timeout_s = attempt_timeout_s
        self.history: list[Op] = []
        self.models = [ClientModel() for _ in range(clients)]
        self.violations: list[Violation] = []
        self._stop = asyncio.Event()
        self.run_id = f"{seed}-{int(time.time() * 1000) % 10**9}"

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration_s: float | None = None, max_ops_per_client: int | None = None) -> None:
        """Run every client until `stop()`, `duration_s` or `max_ops_per_client`."""
        async with asyncio.TaskGroup() as group:
            for index in range(self.clients):
                group.create_task(self._client(index, max_ops_per_client))
            if duration_s is not None:
                await asyncio.sleep(duration_s)
                self.stop()

    def _client_for(self, client_id: str) -> KvClient:
        # Short attempts and a short backoff: a failover shows as a brief gap, not as the backoff schedule.
        return KvClient(
            self.addresses,
            client_id=client_id,
            timeout=self.attempt_timeout_s,
            total_timeout=self.op_timeout_s,
            backoff_initial=0.002,
            backoff_max=0.01,
        )

    def _key(self, client: int, name: str) -> str:
        return f"w{self.run_id}c{client}{name}"

    async def _client(self, index: int, max_ops: int | None) -> None:
        rng = random.Random(self.seed * 1000 + index)
        model = self.models[index]
        client = self._client_for(f"w{self.run_id}c{index}")
        counter_key = self._key(index, "ctr")
        done = 0
        try:
            while not self._stop.is_set() and (max_ops is None or done < max_ops):
                done += 1
                # Drawn only with the shared counter on, so the other ops' sequence is otherwise unchanged.
                if self.shared_counter and rng.random() < SHARED_FRACTION:
                    await self._shared_incr(client, index)
                    continue
                choice = rng.random()
                if choice < 0.4:
                    await self._incr(client, index, counter_key, model)
                elif choice < 0.75:
                    key = self._key(index, f"k{rng.randrange(self.keys_per_client)}")
                    await self._set(client, index, key, f"v{done}", model)
                else:
                    key = self._key(index, f"k{rng.randrange(self.keys_per_client)}")
                    await self._get(client, index, key, model)
                if self.pause_s:
                    await asyncio.sleep(rng.random() * self.pause_s)
        finally:
            await client.close()

    async def _incr(self, client: KvClient, index: int, key: str, model: ClientModel) -> None:
        start = time.monotonic()
        try:
            value = await client.incr(key, 1)
        except (KvUnavailable, KvError, OSError) as err:
            model.counter_unknown += 1
            self.history.append(Op(index, "incr", key, "1", start, time.monotonic(), False, error=str(err)))
            return
        self.history.append(
            Op(index, "incr", key, "1", start, time.monotonic(), True, str(value), server=client.address)
        )
        model.counter_acked += 1
        self._check_counter(index, model, value, "after INCR")

    async def _set(self, client: KvClient, index: int, key: str, value: str, model: ClientModel) -> None:
        start = time.monotonic()
        try:
            await client.set(key, value)
        except (KvUnavailable, KvError, OSError) as err:
            model.values.setdefault(key, {""}).add(value)  # outcome unknown: either may be read
            self.history.append(Op(index, "set", key, value, start, time.monotonic(), False, error=str(err)))
            return
        self.history.append(
            Op(index, "set", key, value, start, time.monotonic(), True, server=client.address)
        )
        model.values[key] = {value}

    async def _get(self, client: KvClient, index: int, key: str, model: ClientModel) -> None:
        start = time.monotonic()
        try:
            value = await client.get(key)
        except (KvUnavailable, KvError, OSError) as err:
            self.history.append(Op(index, "get", key, "", start, time.monotonic(), False, error=str(err)))
            return
        self.history.append(
            Op(index, "get", key, "", start, time.monotonic(), True, value or "", server=client.address)
        )
        self._check_value(index, model, key, value or "", "read")

    def shared_key(self) -> str:
        return f"w{self.run_id}shared"

    async def _shared_incr(self, client: KvClient, index: int) -> None:
        key = self.shared_key()
        start = time.monotonic()
        try:
            value = await client.incr(key, 1)
        except (KvUnavailable, KvError, OSError) as err:
            self.shared_unknown += 1
            self.history.append(Op(index, "shared", key, "1", start, time.monotonic(), False, error=str(err)))
            return
        self.shared_acked += 1
        self.history.append(
            Op(index, "shared", key, "1", start, time.monotonic(), True, str(value), server=client.address)
        )

    def _check_counter(self, index: int, model: ClientModel, value: int, when: str) -> None:
        low, high = model.counter_acked, model.counter_acked + model.counter_unknown
        if value < low:
            self.violations.append(
                Violation(index, "lost", f"counter {when} is {value}, {low} increments were acknowledged")
            )
        elif value > high:
            self.violations.append(
                Violation(
                    index, "duplicated", f"counter {when} is {value}, at most {high} increments were sent"
                )
            )

    def _check_value(self, index: int, model: ClientModel, key: str, value: str, when: str) -> None:
        acceptable = model.values.get(key, {""})
        if value not in acceptable:
            kind = "lost" if when == "final" else "inconsistent-read"
            self.violations.append(
                Violation(
                    index, kind, f"{when} of {key} gave {value!r}, expected one of {sorted(acceptable)}"
                )
            )
        elif len(acceptable) > 1:
            model.values[key] = {value}  # the read settles an unknown outcome

    async def verify_final(self) -> Verdict:
        """Read back every client's keys through a fresh client and check them against the models."""
        client = self._client_for(f"w{self.run_id}check")
        try:
            for index, model in enumerate(self.models):
                counter = await client.get(self._key(index, "ctr"))
                self._check_counter(index, model, int(counter or 0), "at the end")
                for key in list(model.values):
                    value = await client.get(key)
                    self._check_value(index, model, key, value or "", "final")
            if self.shared_counter:
                final = int(await client.get(self.shared_key()) or 0)
                low, high = self.shared_acked, self.shared_acked + self.shared_unknown
                if not low <= final <= high:
                    kind = "lost" if final < low else "duplicated"
                    self.violations.append(
                        Violation(-1, kind, f"shared counter is {final} at the end, {low} increments were "
                                  f"acknowledged and {high - low} have an unknown outcome")
                    )  # fmt: skip
                self.violations.extend(check_shared(self.history))
        finally:
            await client.close()
        writes = sum(1 for op in self.history if op.ok and op.kind in ("set", "incr"))
        failed = sum(1 for op in self.history if not op.ok)
        return Verdict(len(self.history), writes, failed, list(self.violations))

    # ----- recovery time ---------------------------------------------------------------------------

    def recovery_after(self, fault_at: float, window_s: float = 5.0) -> list[float]:
        """Per client, the recovery it saw from a fault injected at `fault_at`: the longest gap between two
        consecutive successes of that client, from its last success before the fault to the end of
        `window_s` after it (a fault can take effect a little after it is injected)."""
        gaps: list[float] = []
        for index in range(self.clients):
            ends = sorted(op.end for op in self.history if op.client == index and op.ok)
            before = [t for t in ends if t <= fault_at]
            after = [t for t in ends if fault_at < t <= fault_at + window_s]
            if before and after:
                points = [before[-1], *after]
                gaps.append(max(b - a for a, b in zip(points, points[1:])))
        return gaps

    def latencies(self) -> list[float]:
        return [op.end - op.start for op in self.history if op.ok]


def check_shared(history: list[Op], limit: int = 20) -> list[Violation]:
    """Two primaries releasing output, as the clients saw it on the shared counter (every acknowledged
    INCR of it adds 1): two acknowledged increments with the same value (two diverged copies both replied),
    or an increment whose value is not above that of one acknowledged before it was sent (a copy that
    missed an acknowledged write replied). At most `limit` violations are detailed, then one that counts
    the rest."""
    acked = [op for op in history if op.kind == "shared" and op.ok]
    out: list[Violation] = []
    extra = 0

    def found(op: Op, detail: str) -> None:
        nonlocal extra
        if len(out) < limit:
            out.append(Violation(op.client, "two-primaries", detail))
        else:
            extra += 1

    first_with: dict[int, Op] = {}
    for op in acked:
        other = first_with.setdefault(int(op.result), op)
        if other is not op:
            found(op, f"shared counter value {op.result} was returned twice: to client {other.client} by "
                      f"{other.server} and to client {op.client} by {op.server}")  # fmt: skip
    # Real-time order: sweep the ops by start, keeping the highest value among those that ended before.
    by_end = sorted(acked, key=lambda op: op.end)
    highest: Op | None = None
    i = 0
    for op in sorted(acked, key=lambda op: op.start):
        while i < len(by_end) and by_end[i].end < op.start:
            if highest is None or int(by_end[i].result) > int(highest.result):
                highest = by_end[i]
            i += 1
        if highest is not None and int(op.result) <= int(highest.result):
            found(op, f"shared counter gave {op.result} (client {op.client}, by {op.server}) after "
                      f"{highest.result} was acknowledged (client {highest.client}, by {highest.server}) "
                      "before it was sent")  # fmt: skip
    if extra:
        out.append(Violation(-1, "two-primaries", f"{extra} more shared-counter violations"))
    return out


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
