"""The NIC's host side on the network: a TCP listener whose connections become guest messages.

Framing on the wire: each message is a 4-byte big-endian length and that many payload bytes. Each client
connection gets an id; its messages reach the guest as NET_RX DATA records tagged with that id, and
connecting and closing reach it as OPEN and CLOSE records. Replies come back through `transmit`, called
on the vCPU thread or on the thread that received the backup's acknowledgement: there a reply is sent at
once on a duplicate of the connection's socket when nothing is queued ahead of it (no trip through the
event loop: a loop wake-up costs tens of microseconds of every reply on a busy core); whatever cannot go
at once (a full socket buffer, a close) is written by the event loop, in order.

Unframed (`framed=False`, a Linux guest's TCP service: monitor/linux/sockets.py), the bytes of a
connection go both ways as they come, each read of up to 64 KiB one DATA message. A VM with several
service addresses has one server per address, sharing one ConnIds (connection ids stay unique); the
OPEN message of server `service` > 0 carries that number (2 bytes, little-endian), so the guest knows
which of its listening ports the connection is for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass

from monitor.devices.net import CLIENT_EOF, MAX_MESSAGE, NetBackend, NetMessage
from monitor.guest_abi import NetKind

log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")
_SERVICE = struct.Struct("<H")


@dataclass(frozen=True)
class _Rest:
    """What a direct send left of a message (already framed), for the loop to write first."""

    conn: int
    data: bytes


class ConnIds:
    """Connection ids, shared by the servers of one VM."""

    def __init__(self, first: int = 1) -> None:
        self.next = first

    def take(self) -> int:
        self.next += 1
        return self.next - 1


class NicServer:
    def __init__(
        self,
        backend: NetBackend,
        host: str,
        port: int,
        first_conn_id: int = 1,
        framed: bool = True,
        service: int = 0,
        ids: ConnIds | None = None,
    ) -> None:
        self._backend = backend
        self._framed = framed
        self._open = _SERVICE.pack(service) if service else b""
        self._host = host
        self._port = port
        self._ids = ids if ids is not None else ConnIds(first_conn_id)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        # A duplicate of each connection's socket, for sends off the loop (closed with the connection).
        self._direct: dict[int, socket.socket] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = 0  # transmissions queued on the loop and not yet written
        # Held by every write and by every change to the connections: direct sends and the loop's writes
        # never interleave, and a direct send never uses a socket being closed.
        self._lock = threading.Lock()
        self._loop_thread = 0
        backend.transmit = self._transmit_threadsafe

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def next_conn_id(self) -> int:
        return self._ids.next

    def inject(self, payload: bytes) -> int:
        """Deliver one message to the guest as if a client connected, sent it and left (fault injection,
        administration). Its reply, if any, goes nowhere. Returns the connection id used."""
        conn = self._ids.take()
        for kind, data in ((NetKind.OPEN, self._open), (NetKind.DATA, payload), (NetKind.CLOSE, b"")):
            self._backend.push(NetMessage(conn, kind, data))
        return conn

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._server = await asyncio.start_server(self._accept, self._host, self._port, reuse_address=True)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with self._lock:
            for conn in list(self._writers):
                self._drop(conn)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self._ids.take()
        sock = writer.get_extra_info("socket")
        direct = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        direct.setblocking(False)
        with self._lock:
            self._writers[conn] = writer
            self._direct[conn] = direct
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._backend.push(NetMessage(conn, NetKind.OPEN, self._open))
        half_closed = False
        try:
            while not self._framed:
                data = await reader.read(MAX_MESSAGE)
                if not data:
                    # The client finished sending (a half-close, or all of it): the guest reads the end
                    # and the connection stays open for its replies until it closes it (_write).
                    half_closed = conn in self._writers
                    if half_closed:
                        self._backend.push(NetMessage(conn, NetKind.CLOSE, CLIENT_EOF))
                    break
                self._backend.push(NetMessage(conn, NetKind.DATA, data))
            while self._framed:
                header = await reader.readexactly(_LENGTH.size)
                (length,) = _LENGTH.unpack(header)
                if length > MAX_MESSAGE:
                    log.warning(
                        "connection %d sent a %d-byte message (limit %d): closing", conn, length, MAX_MESSAGE
                    )
                    break
                payload = await reader.readexactly(length)
                self._backend.push(NetMessage(conn, NetKind.DATA, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if not half_closed:
                with self._lock:
                    known = self._drop(conn)
                if known:
                    self._backend.push(NetMessage(conn, NetKind.CLOSE, b""))
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _transmit_threadsafe(self, messages: list[NetMessage]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        rest: list[NetMessage | _Rest] = list(messages)
        with self._lock:
            if self._scheduled == 0:  # nothing queued ahead: write now
                if threading.get_ident() == self._loop_thread:
                    self._write(rest)
                    return
                rest = self._send_direct(messages)
                if not rest:
                    return
            self._scheduled += 1
        loop.call_soon_threadsafe(self._transmit, rest)

    def _send_direct(self, messages: list[NetMessage]) -> list[NetMessage | _Rest]:
        """Off the loop, under the lock: send what can go at once on the duplicate sockets. Returns what is
        left for the loop, from the first message that could not go (a close, a connection whose writes
        are buffered, a full socket buffer: then the rest of that message's bytes first)."""
        for i, msg in enumerate(messages):
            writer = self._writers.get(msg.conn)
            if writer is None:
                continue  # the client went away; the guest hears CLOSE
            if msg.kind is not NetKind.DATA or writer.transport.get_write_buffer_size():
                return list(messages[i:])
            data = self._frame(msg.payload)
            try:
                sent = self._direct[msg.conn].send(data, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:
                return list(messages[i:])  # broken: the loop's write finds out and closes it
            if sent < len(data):
                return [_Rest(msg.conn, data[sent:]), *messages[i + 1 :]]
        return []

    def _transmit(self, pending: list[NetMessage | _Rest]) -> None:
        with self._lock:
            self._scheduled -= 1
            self._write(pending)

    def _write(self, pending: list[NetMessage | _Rest]) -> None:
        """On the loop, under the lock."""
        for item in pending:
            writer = self._writers.get(item.conn)
            if writer is None:
                continue  # the client went away; the guest hears CLOSE
            if isinstance(item, _Rest):
                writer.write(item.data)
            elif item.kind is NetKind.DATA:
                writer.write(self._frame(item.payload))
            elif item.kind is NetKind.CLOSE:
                self._drop(item.conn)

    def _frame(self, payload: bytes) -> bytes:
        return _LENGTH.pack(len(payload)) + payload if self._framed else payload

    def _drop(self, conn: int) -> bool:
        """Under the lock: forget a connection (its duplicate socket closed); whether it was known."""
        writer = self._writers.pop(conn, None)
        direct = self._direct.pop(conn, None)
        if direct is not None:
            direct.close()
        if writer is not None:
            writer.close()
        return writer is not None


def transmit_to_all(backend: NetBackend, servers: list[NicServer]) -> None:
    """Several servers of one VM (sharing ConnIds): each batch of outputs goes to every one of them, and
    each writes the connections it holds (the last server made would otherwise take every output)."""
    senders = [server._transmit_threadsafe for server in servers]

    def transmit(messages: list[NetMessage]) -> None:
        for send in senders:
            send(messages)

    backend.transmit = transmit
