"""The history checker (replica/workload.py) against small in-process kv servers that break it on purpose:
a correct server passes, and a server that applies one INCR twice, answers one GET with the value before
the last acknowledged SET, or acknowledges a SET it never applies is caught with the matching verdict
("duplicated", "inconsistent-read", "lost"). Pure: no VM, no KVM."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from replica.workload import Verdict, Workload

_LEN = struct.Struct(">I")


@dataclass
class FakeKv:
    """The kv guest's protocol and exactly-once writes (per client: last seq and its reply), with one
    deliberate fault: `duplicate_incr` (the Nth INCR is applied twice), `stale_get` (the Nth GET of a key
    written twice answers the older value) or `lose_set` (from the Nth SET on, SETs are acknowledged and
not applied)."""

    duplicate_incr: int = 0
    stale_get: int = 0
    lose_set: int = 0
    data: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)
    last: dict[str, tuple[int, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)

    def _nth(self, kind: str, n: int) -> bool:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return n > 0 and self.counts[kind] == n

    def _write(self, words: list[str]) -> str:
        client, seq = words[1].rsplit(":", 1)
        cached = self.last.get(client)
        if cached is not None and int(seq) <= cached[0]:
            return cached[1] if int(seq) == cached[0] else "ERR stale"
        key = words[2]
        if words[0] == "SET":
            self._nth("SET", self.lose_set)
            if 0 < self.lose_set <= self.counts["SET"]:
                self.faults.append(f"lost SET {key}")
            else:
                self.data[key] = words[3]
                self.history.setdefault(key, []).append(words[3])
            reply = "OK"
        else:
            value = int(self.data.get(key, "0")) + int(words[3])
            if self._nth("INCR", self.duplicate_incr):
                value += int(words[3])
                self.faults.append(f"INCR {key} applied twice")
            self.data[key] = str(value)
            reply = f"VALUE {value}"
        self.last[client] = (int(seq), reply)
        return reply

    def answer(self, request: str) -> str:
        words = request.split(" ", 3)
        if words[0] in ("SET", "INCR") and len(words) == 4:
            return self._write(words)
        if words[0] == "GET" and len(words) == 2:
            key = words[1]
            written = self.history.get(key, [])
            if len(written) >= 2 and self._nth("GET", self.stale_get):
                self.faults.append(f"stale GET {key}")
                return f"VALUE {written[-2]}"
            value = self.data.get(key)
            return "NOTFOUND" if value is None else f"VALUE {value}"
        return "ERR unknown command"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = _LEN.unpack(await reader.readexactly(4))
                reply = self.answer((await reader.readexactly(length)).decode()).encode()
                writer.write(_LEN.pack(len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        try:
            yield f"{host}:{port}"
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)


async def checked(kv: FakeKv, clients: int = 2, ops: int = 150) -> Verdict:
    async with kv.serving() as address:
        workload = Workload([address], clients=clients, keys_per_client=2, seed=7)
        await asyncio.wait_for(workload.run(max_ops_per_client=ops), 30)
        return await asyncio.wait_for(workload.verify_final(), 30)


async def test_a_correct_service_passes() -> None:
    verdict = await checked(FakeKv())
    assert verdict.ok, verdict.violations[:5]
    assert verdict.acknowledged_writes > 100 and verdict.failed_ops == 0, verdict.summary()
    assert "lost 0, duplicated 0, inconsistent reads 0" in verdict.summary()


async def test_an_increment_applied_twice_is_duplicated() -> None:
    kv = FakeKv(duplicate_incr=5)
    verdict = await checked(kv, clients=1)
    assert kv.faults == [kv.faults[0]] and "applied twice" in kv.faults[0]
    kinds = {v.kind for v in verdict.violations}
    assert kinds == {"duplicated"}, verdict.violations[:5]
    # Caught at the INCR that went wrong (the fifth: 6 where at most 5 were sent), not only at the end.
    assert verdict.violations[0].detail == "counter after INCR is 6, at most 5 increments were sent"
    assert "duplicated " in verdict.summary() and "duplicated 0" not in verdict.summary()


async def test_a_stale_read_is_an_inconsistent_read() -> None:
    kv = FakeKv(stale_get=1)
    verdict = await checked(kv, clients=1)
    assert len(kv.faults) == 1 and kv.faults[0].startswith("stale GET"), kv.faults
    assert [v.kind for v in verdict.violations] == ["inconsistent-read"], verdict.violations
    key = kv.faults[0].split()[-1]
    assert f"read of {key} gave" in verdict.violations[0].detail, verdict.violations[0]
    assert "inconsistent reads 1" in verdict.summary(), verdict.summary()


async def test_an_acknowledged_set_never_applied_is_lost() -> None:
    kv = FakeKv(lose_set=20)
    verdict = await checked(kv, clients=1)
    assert kv.faults, "the server lost no SET"
    assert {v.kind for v in verdict.violations} <= {"lost", "inconsistent-read"}, verdict.violations
    lost = [v for v in verdict.violations if v.kind == "lost"]
    assert lost and all(v.detail.startswith("final of ") for v in lost), verdict.violations
