"""The message NIC: client connections' messages in, replies out, many per exit.

The host side (`NetBackend`) is filled by the network server on another thread. The guest drains it with
NET_RX into a buffer of `vmft_net_msg` records (recorded as one event: the bytes written), and sends a
buffer of records with NET_TX (an output, so the replication layer can hold it until acknowledged).
"""

from __future__ import annotations

import collections
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from monitor.component import parse_state
from monitor.errors import GuestError
from monitor.devices.base import DeviceContext, check_buffer, complete, read_request
from monitor.guest_abi import NET_MESSAGE, EventBit, NetKind, Port, Status, Vector, net_message_padded_len
from monitor.journal import EventKind, OutputKind
from proto import vmft_pb2

MAX_MESSAGE = 64 * 1024
MAX_TX_BUFFER = 4 << 20
# The payload of a CLOSE the host makes for a connection that died with the old primary (or host): a
# Linux guest's socket reads it as ECONNRESET; a vmft-platform guest ignores CLOSE payloads.
RESET = b"reset"
# The payload of a CLOSE an unframed server (a Linux guest's service) makes when the client has finished
# sending: the guest reads the end, but its replies still go out until it closes the connection itself.
CLIENT_EOF = b"eof"
_HEADER = struct.Struct(NET_MESSAGE.fmt)


@dataclass(frozen=True)
class NetMessage:
    conn: int
    kind: NetKind
    payload: bytes


def pack_messages(messages: list[NetMessage]) -> bytes:
    out = bytearray()
    for msg in messages:
        out += _HEADER.pack(msg.conn, msg.kind, len(msg.payload), 0)
        out += msg.payload
        out += bytes(net_message_padded_len(len(msg.payload)) - _HEADER.size - len(msg.payload))
    return bytes(out)


class MalformedMessages(GuestError, ValueError):
    pass


def iter_messages(buf: bytes | memoryview) -> Iterator[NetMessage]:
    """Parse records; raises MalformedMessages on a record that runs past the buffer or a bad kind."""
    offset = 0
    end = len(buf)
    while offset < end:
        if end - offset < _HEADER.size:
            raise MalformedMessages(f"truncated message header at offset {offset}")
        conn, kind, length, _ = _HEADER.unpack_from(buf, offset)
        step = net_message_padded_len(length)
        if length > MAX_MESSAGE or offset + _HEADER.size + length > end:
            raise MalformedMessages(f"message at offset {offset} of {length} bytes runs past the buffer")
        try:
            net_kind = NetKind(kind)
        except ValueError:
            raise MalformedMessages(f"message at offset {offset} has unknown kind {kind}") from None
        yield NetMessage(conn, net_kind, bytes(buf[offset + _HEADER.size : offset + _HEADER.size + length]))
        offset += step


class NetBackend:
    """Host side of the NIC. `push` from any thread; the rest from the vCPU thread."""

    def __init__(self) -> None:
        self._rx: collections.deque[NetMessage] = collections.deque()
        self._lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None
        self.transmit: Callable[[list[NetMessage]], None] = lambda messages: None
        self.rx_messages = 0
        self.tx_messages = 0
        self.arrived = 0  # messages pushed (counted as they arrive, before the guest takes them)

    def push(self, message: NetMessage) -> None:
        with self._lock:
            self._rx.append(message)
            self.arrived += 1
        self.wake()

    def has_news(self) -> bool:
        return bool(self._rx)

    def queued(self) -> list[NetMessage]:
        """Messages not yet taken by the guest (for checkpoints)."""
        with self._lock:
            return list(self._rx)

    def requeue(self, messages: list[NetMessage]) -> None:
        """Put messages (from a checkpoint) back at the head of the queue."""
        with self._lock:
            self._rx.extendleft(reversed(messages))
        if messages:
            self.wake()

    def take(self, capacity: int) -> bytes:
        """As many whole queued messages as fit in `capacity` bytes, packed."""
        taken: list[NetMessage] = []
        used = 0
        with self._lock:
            while self._rx:
                size = net_message_padded_len(len(self._rx[0].payload))
                if used + size > capacity:
                    break
                taken.append(self._rx.popleft())
                used += size
        self.rx_messages += len(taken)
        return pack_messages(taken)


class Net:
    name = "net"
    event_bit = EventBit.NET_RX
    vector = Vector.NET_RX

    def __init__(self, ctx: DeviceContext, backend: NetBackend) -> None:
        self._ctx = ctx
        self.backend = backend
        # Connections the guest believes open, and the highest id it has seen: guest-visible state, kept
        # on both sides, so a backup going live can tell the guest which connections died with the primary.
        self.open_conns: set[int] = set()
        self.max_conn = 0

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.NET_RX: self._rx, Port.NET_TX: self._tx}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def has_news(self) -> bool:
        return self.backend.has_news()

    def deadline_ns(self) -> int | None:
        return None

    def on_raised(self) -> None:
        pass

    def _rx(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None or not check_buffer(self._ctx, req, "net rx"):
            return
        capacity = req.len
        data = self._ctx.journal.data(EventKind.NET_RX, lambda: self.backend.take(capacity))
        if len(data) > capacity:
            complete(self._ctx, req, Status.EINVAL)
            return
        self._ctx.memory.write(req.addr, data)
        count = 0
        for msg in iter_messages(data):
            count += 1
            if msg.kind is NetKind.OPEN:
                self.open_conns.add(msg.conn)
                self.max_conn = max(self.max_conn, msg.conn)
            elif msg.kind is NetKind.CLOSE:
                self.open_conns.discard(msg.conn)
        complete(self._ctx, req, Status.OK, count)

    def _tx(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None or not check_buffer(self._ctx, req, "net tx"):
            return
        if req.len > MAX_TX_BUFFER:
            self._ctx.guest_fault(f"net tx buffer of {req.len} bytes exceeds {MAX_TX_BUFFER}")
            complete(self._ctx, req, Status.EINVAL)
            return
        data = self._ctx.memory.read(req.addr, req.len)
        try:
            messages = list(iter_messages(data))
        except MalformedMessages as err:
            self._ctx.guest_fault(f"net tx: {err}")
            complete(self._ctx, req, Status.EINVAL)
            return
        count = len(messages)
        for msg in messages:
            if msg.kind is NetKind.CLOSE:
                self.open_conns.discard(msg.conn)
        self._ctx.emit(OutputKind.NET, data)
        complete(self._ctx, req, Status.OK, count)

    # ----- monitor/component.py -----

    def save(self) -> vmft_pb2.NetState:
        backend = self.backend
        return vmft_pb2.NetState(
            rx_queue=pack_messages(backend.queued()),
            open_conns=sorted(self.open_conns),
            conn_high=self.max_conn,
            rx_messages=backend.rx_messages,
            tx_messages=backend.tx_messages,
        )

    def restore(self, data: bytes, live: bool) -> None:
        """Live, host-side input queued at the checkpoint is queued again and connections open then are
        reported closed (their clients are gone); replaying, the log supplies all input instead."""
        state = parse_state(vmft_pb2.NetState, data, self.name)
        backend = self.backend
        backend.rx_messages = state.rx_messages
        backend.tx_messages = state.tx_messages
        self.open_conns = set(state.open_conns)
        self.max_conn = state.conn_high
        if not live:
            return
        queued = list(iter_messages(state.rx_queue))
        backend.requeue(queued)
        gone = set(state.open_conns)
        for msg in queued:
            if msg.kind is NetKind.OPEN:
                gone.add(msg.conn)
            elif msg.kind is NetKind.CLOSE:
                gone.discard(msg.conn)
        for conn in sorted(gone):
            backend.push(NetMessage(conn, NetKind.CLOSE, RESET))

    def replicated(self) -> bytes:
        """The connections the guest believes open (host queues and counters are host state)."""
        conns = sorted(self.open_conns)
        return struct.pack(f"<I{len(conns)}I", self.max_conn, *conns)

    def connections_lost(self) -> None:
        """The host side lost every connection (a failover): tell the guest, as live news."""
        for conn in sorted(self.open_conns):
            self.backend.push(NetMessage(conn, NetKind.CLOSE, RESET))


def deliver_tx(backend: NetBackend, data: bytes) -> None:
    """Deliver an output batch (already validated by the device) to the network."""
    messages = list(iter_messages(data))
    backend.tx_messages += len(messages)
    backend.transmit(messages)
