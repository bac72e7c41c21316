"""A small asyncio client of the redis protocol (RESP2), enough for the campaigns and the demo against a
protected redis-server: commands as arrays of bulk strings, the five reply types back, one request at a
time per connection, every read bounded by a timeout. redis-py is not a dependency of vmft; the
protocol is a few lines (https://redis.io/docs/reference/protocol-spec/).

`RespConnection` is one connection. `RespClient` knows every address the service may be served at (the
pair's service addresses) and moves to the next one when a connection fails, as a client of a protected
service must: after a failover the old primary's address refuses or stays silent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeAlias

from monitor.errors import VmftError


class RespError(VmftError):
    """The connection failed, timed out, or the server sent something that is not RESP."""


@dataclass(frozen=True)
class ErrorReply:
    """A `-ERR ...` reply: the server answered, and refused."""

    message: str


Reply: TypeAlias = "bytes | int | None | ErrorReply | list[Reply]"


def encode(*args: str | bytes | int) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise RespError("connection closed" if not line else f"truncated reply {line[:40]!r}")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        return ErrorReply(body.decode(errors="replace"))
    try:
        number = int(body)
    except ValueError as err:
        raise RespError(f"not a RESP reply: {line[:40]!r}") from err
    if kind == b":":
        return number
    if kind == b"$":
        if number < 0:
            return None
        data = await reader.readexactly(number + 2)
        return data[:-2]
    if kind == b"*":
        if number < 0:
            return None
        return [await read_reply(reader) for _ in range(number)]
    raise RespError(f"not a RESP reply: {line[:40]!r}")


class RespConnection:
    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, address: str, limit_s: float) -> RespConnection:
        host, port = address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), limit_s)
        except (OSError, asyncio.TimeoutError) as err:
            raise RespError(f"{address}: {err or 'connect timed out'}") from err
        return cls(address, reader, writer)

    async def call(self, *args: str | bytes | int, limit_s: float = 5.0) -> Reply:
        """Send one command and read its reply (RespError: the connection is unusable afterwards)."""
        try:
            self._writer.write(encode(*args))
            await self._writer.drain()
            return await asyncio.wait_for(read_reply(self._reader), limit_s)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
            raise RespError(f"{self.address}: {type(err).__name__} {err}") from err

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass


class RespClient:
    """One connection at a time to whichever of `addresses` answers. `call` makes one attempt: on a
    failure it drops the connection, moves to the next address and raises RespError (the caller decides
    whether the command may be sent again: a SET may, an INCR may not be counted as done)."""

    def __init__(self, addresses: list[str], timeout: float = 0.5, first: int = 0) -> None:
        """`first`: the index of the address to try first."""
        if not addresses:
            raise ValueError("no address to connect to")
        self.addresses = list(addresses)
        self.timeout = timeout
        self._at = first % len(self.addresses)
        self._conn: RespConnection | None = None

    @property
    def server(self) -> str:
        """The address the last call went to."""
        return self.addresses[self._at]

    async def call(self, *args: str | bytes | int) -> Reply:
        try:
            if self._conn is None:
                self._conn = await RespConnection.open(self.addresses[self._at], self.timeout)
            return await self._conn.call(*args, limit_s=self.timeout)
        except RespError:
            await self._drop()
            self._at = (self._at + 1) % len(self.addresses)
            raise

    async def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def close(self) -> None:
        await self._drop()
