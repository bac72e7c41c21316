"""The NIC's host side on the network: a TCP listener whose connections become guest messages.

Framing on the wire: each message is a 4-byte big-endian length and that many payload bytes. Each client
connection gets an id; its messages reach the guest as NET_RX DATA records tagged with that id, and
connecting and closing reach it as OPEN and CLOSE records. Replies come back through `transmit`, which
the vCPU thread calls; the writes happen on the event loop.

Unframed (`framed=False`, a Linux guest's TCP service: monitor/linux/sockets.py), the bytes of a
connection go both ways as they come, each read of up to 64 KiB one DATA message. A VM with several
service addresses has one server per address, sharing one ConnIds (connection ids stay unique); the
OPEN message of server `service` > 0 carries that number (2 bytes, little-endian), so the guest knows
which of its listening ports the connection is for.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading

from monitor.devices.net import CLIENT_EOF, MAX_MESSAGE, NetBackend, NetMessage
from monitor.guest_abi import NetKind

log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")
_SERVICE = struct.Struct("<H")


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
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = 0  # transmissions queued on the loop and not yet written
        self._scheduled_lock = threading.Lock()
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
        for writer in list(self._writers.values()):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self._ids.take()
        self._writers[conn] = writer
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
                if self._writers.pop(conn, None) is not None:
                    self._backend.push(NetMessage(conn, NetKind.CLOSE, b""))
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _transmit_threadsafe(self, messages: list[NetMessage]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._scheduled_lock:
            # On the loop's own thread (outputs released by an acknowledgement) with nothing scheduled
            # ahead: write now and save a trip through the loop; otherwise queue behind what is scheduled.
            direct = self._scheduled == 0 and threading.get_ident() == self._loop_thread
            if not direct:
                self._scheduled += 1
        if direct:
            self._write(messages)
        else:
            loop.call_soon_threadsafe(self._transmit, messages)

    def _transmit(self, messages: list[NetMessage]) -> None:
        with self._scheduled_lock:
            self._scheduled -= 1
        self._write(messages)

    def _write(self, messages: list[NetMessage]) -> None:
        for msg in messages:
            writer = self._writers.get(msg.conn)
            if writer is None:
                continue  # the client went away; the guest hears CLOSE
            if msg.kind is NetKind.DATA:
                writer.write(_LENGTH.pack(len(msg.payload)) + msg.payload if self._framed else msg.payload)
            elif msg.kind is NetKind.CLOSE:
                self._writers.pop(msg.conn, None)
                writer.close()


def transmit_to_all(backend: NetBackend, servers: list[NicServer]) -> None:
    """Several servers of one VM (sharing ConnIds): each batch of outputs goes to every one of them, and
    each writes the connections it holds (the last server made would otherwise take every output)."""
    senders = [server._transmit_threadsafe for server in servers]

    def transmit(messages: list[NetMessage]) -> None:
        for send in senders:
            send(messages)

    backend.transmit = transmit
