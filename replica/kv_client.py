"""A small asyncio client for the `kv` guest (guests/programs/kv.c), plus a synchronous wrapper.

Wire format: every message is a 4-byte big-endian length followed by that many bytes of text; one
request, one reply, in order. Writes carry a request id `clientid:seq`; the service keeps, per client,
the last seq and its reply, so a retried request returns the original reply without being applied
again. This client sends one request at a time, gives each write a fresh seq, and on a connection
failure or timeout reconnects (each address in turn, bounded backoff, bounded total time) and resends
the *same* text with the *same* request id: every acknowledged write is applied exactly once.

    async with KvClient(["127.0.0.1:7000", "127.0.0.1:7001"], "c1", timeout=2.0) as kv:
        await kv.set("k", "v")
        assert await kv.get("k") == "v"

    with KvClientSync(["127.0.0.1:7000"], "c2") as kv:
        kv.incr("n", 5)
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from types import TracebackType
from typing import Any

from monitor.address import parse_address
from monitor.errors import PeerError

__all__ = ["KvClient", "KvClientSync", "SyncKvClient", "KvError", "KvProtocolError", "KvUnavailable"]

MAX_KEY = 128
MAX_VALUE = 1024
MAX_CLIENT_ID = 64
MAX_REPLY = 1 << 20
_LEN = struct.Struct(">I")
# Fault-injection commands the service never answers (it crashes, panics or hangs): send once, no retry.
_NO_REPLY = frozenset({"CRASH", "PANIC", "HANG"})


class KvError(PeerError):
    """The service answered `ERR ...`. `reason` is the text after `ERR `."""

    def __init__(self, reason: str, request: str = "") -> None:
        super().__init__(f"kv error: {reason}" + (f" (request {request!r})" if request else ""))
        self.reason = reason
        self.request = request


class KvProtocolError(KvError):
    """The service answered something this client does not understand."""


class KvUnavailable(PeerError):
    """No address answered within the client's total time budget."""


def _check_key(key: str) -> bytes:
    raw = key.encode()
    if not raw or len(raw) > MAX_KEY or any(c in raw for c in b" \r\n"):
        raise ValueError(f"a key is 1..{MAX_KEY} bytes without spaces or newlines: {key!r}")
    return raw


class KvClient:
    """An asyncio client for the kv guest. One request in flight at a time (an internal lock).

    `client_id` defaults to a random one. `timeout` bounds one attempt (connect plus reply);
    `total_timeout` (default: max(10 s, 5 attempts)) bounds the whole retrying of one request, after
    which `KvUnavailable` is raised.
    """

    def __init__(
        self,
        addresses: list[str],
        client_id: str | None = None,
        timeout: float = 2.0,
        *,
        total_timeout: float | None = None,
        backoff_initial: float = 0.02,
        backoff_max: float = 0.5,
    ) -> None:
        if not addresses:
            raise ValueError("KvClient needs at least one address")
        if client_id is None:
            client_id = "c" + secrets.token_hex(6)
        cid = client_id.encode()
        if not cid or len(cid) > MAX_CLIENT_ID or any(c in cid for c in b" :\r\n"):
            raise ValueError(
                f"a client id is 1..{MAX_CLIENT_ID} bytes without spaces or colons: {client_id!r}"
            )
        self.addresses = [parse_address(a, default_host="127.0.0.1") for a in addresses]
        self.client_id = client_id
        self.timeout = timeout
        self.total_timeout = total_timeout if total_timeout is not None else max(10.0, 5 * timeout)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Start from the clock so that a new client object reusing an id keeps its seqs increasing.
        self._seq = time.time_ns() // 1000
        self._current = 0  # index of the address to try first
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.reconnects = 0  # connections made after the first (for tests and benchmarks)
        self._connected_once = False

    # ---------------------------------------------------------------- connection management

    async def __aenter__(self) -> KvClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass

    @property
    def address(self) -> str:
        host, port = self.addresses[self._current]
        return f"{host}:{port}"

    async def _connect(self, deadline: float) -> None:
        """Connect to the current address (one attempt, bounded by timeout and the deadline)."""
        host, port = self.addresses[self._current]
        budget = min(self.timeout, max(0.0, deadline - time.monotonic()))
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), budget)
        self._reader, self._writer = reader, writer
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True

    async def _drop(self) -> None:
        await self.close()

    async def _exchange(self, payload: bytes, deadline: float, expect_reply: bool) -> bytes:
        if self._writer is None:
            await self._connect(deadline)
        assert self._reader is not None and self._writer is not None
        self._writer.write(_LEN.pack(len(payload)) + payload)
        budget = min(self.timeout, max(0.0, deadline - time.monotonic()))
        await asyncio.wait_for(self._writer.drain(), budget)
        if not expect_reply:
            return b""
        budget = min(self.timeout, max(0.0, deadline - time.monotonic()))

        async def read_reply() -> bytes:
            assert self._reader is not None
            (length,) = _LEN.unpack(await self._reader.readexactly(4))
            if length > MAX_REPLY:
                raise ConnectionError(f"reply of {length} bytes is too large")
            return await self._reader.readexactly(length)

        return await asyncio.wait_for(read_reply(), budget)

    async def _request(self, text: str, *, retry: bool = True, expect_reply: bool = True) -> str:
        payload = text.encode()
        async with self._lock:
            deadline = time.monotonic() + self.total_timeout
            backoff = self.backoff_initial
            last_error: BaseException | None = None
            while True:
                try:
                    reply = await self._exchange(payload, deadline, expect_reply)
                    return reply.decode(errors="replace")
                except (OSError, EOFError, asyncio.TimeoutError, asyncio.IncompleteReadError) as err:
                    last_error = err
                    await self._drop()
                    if not retry or time.monotonic() + backoff >= deadline:
                        break
                    # Try the next address after a short, bounded backoff.
                    self._current = (self._current + 1) % len(self.addresses)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
            tried = ", ".join(f"{h}:{p}" for h, p in self.addresses)
            raise KvUnavailable(
                f"no kv service answered {text[:40]!r} within {self.total_timeout:.1f}s"
                f" (tried {tried}): {last_error!r}"
            ) from last_error

    def _next_rid(self) -> str:
        self._seq += 1
        return f"{self.client_id}:{self._seq}"

    # ---------------------------------------------------------------- commands

    async def command(self, text: str, *, retry: bool = True) -> str:
        """Send one raw request and return the raw reply (`ERR ...` is returned, not raised).

        CRASH, PANIC and HANG are never answered: they are sent once and "" is returned."""
        verb = text.split(" ", 1)[0].upper()
        if verb in _NO_REPLY:
            return await self._request(text, retry=False, expect_reply=False)
        return await self._request(text, retry=retry)

    async def _checked(self, text: str) -> str:
        reply = await self._request(text)
        if reply.startswith("ERR"):
            raise KvError(reply[4:] if reply.startswith("ERR ") else reply, text[:80])
        return reply

    async def get(self, key: str) -> str | None:
        k = _check_key(key)
        reply = await self._checked(f"GET {k.decode()}")
        if reply == "NOTFOUND":
            return None
        if reply.startswith("VALUE "):
            return reply[6:]
        raise KvProtocolError(f"unexpected reply {reply[:80]!r}", f"GET {key}")

    async def set(self, key: str, value: str) -> None:
        k = _check_key(key)
        raw = value.encode()
        if len(raw) > MAX_VALUE or raw.endswith((b"\n", b"\r")):
            raise ValueError(f"a value is at most {MAX_VALUE} bytes and does not end with a newline")
        reply = await self._checked(f"SET {self._next_rid()} {k.decode()} {value}")
        if reply != "OK":
            raise KvProtocolError(f"unexpected reply {reply[:80]!r}", f"SET {key}")

    async def incr(self, key: str, delta: int = 1) -> int:
        k = _check_key(key)
        if not -(2**63) <= delta < 2**63:
            raise ValueError("delta must fit in a signed 64-bit integer")
        reply = await self._checked(f"INCR {self._next_rid()} {k.decode()} {delta}")
        if reply.startswith("VALUE "):
            try:
                return int(reply[6:])
            except ValueError:
                pass
        raise KvProtocolError(f"unexpected reply {reply[:80]!r}", f"INCR {key}")

    async def delete(self, key: str) -> bool:
        """True if the key existed."""
        k = _check_key(key)
        reply = await self._checked(f"DEL {self._next_rid()} {k.decode()}")
        if reply in ("OK", "NOTFOUND"):
            return reply == "OK"
        raise KvProtocolError(f"unexpected reply {reply[:80]!r}", f"DEL {key}")

    async def stats(self) -> dict[str, int]:
        reply = await self._checked("STATS")
        words = reply.split()
        if not words or words[0] != "STATS":
            raise KvProtocolError(f"unexpected reply {reply[:80]!r}", "STATS")
        out: dict[str, int] = {}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if sep and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out


class KvClientSync:
    """The same client for simple scripts: each method runs the async one on a private event loop."""

    def __init__(
        self, addresses: list[str], client_id: str | None = None, timeout: float = 2.0, **kwargs: Any
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = KvClient(addresses, client_id, timeout, **kwargs)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    @property
    def client(self) -> KvClient:
        return self._client

    def __enter__(self) -> KvClientSync:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def command(self, text: str, *, retry: bool = True) -> str:
        return str(self._run(self._client.command(text, retry=retry)))

    def get(self, key: str) -> str | None:
        result: str | None = self._run(self._client.get(key))
        return result

    def set(self, key: str, value: str) -> None:
        self._run(self._client.set(key, value))

    def incr(self, key: str, delta: int = 1) -> int:
        return int(self._run(self._client.incr(key, delta)))

    def delete(self, key: str) -> bool:
        return bool(self._run(self._client.delete(key)))

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self._run(self._client.stats())
        return result


SyncKvClient = KvClientSync  # the name replica/cli.py uses
