"""TCP sockets of a Linux guest, and the network stack that serves its listening ports (docs/linux.md,
"Network").

The guest has no network of its own: a port it listens on is served at the VM's service address by the
host (monitor/netserver.py in raw mode). Connections opening, bytes arriving and connections closing reach
the guest as the NIC's messages (OPEN, DATA, CLOSE), taken from the machine's NetBackend as one NET_RX
event, so the event log, replay and replication carry them as they carry a vmft-platform guest's. Bytes
the guest writes are NET outputs (packed NIC messages) through the machine's output path, so the output
rule holds them in a pair. Everything here is guest-visible state: it is in the state hash and in
checkpoints.
"""

from __future__ import annotations

import collections
import enum
import errno
import ipaddress
import logging
import socket as pysocket
import stat
import struct
from typing import TYPE_CHECKING, Callable, Iterable

from monitor.devices.net import CLIENT_EOF, MAX_MESSAGE, RESET, NetMessage, iter_messages, pack_messages
from monitor.guest_abi import NetKind, Vector
from monitor.journal import EventKind, JournalMode, OutputKind
from monitor.linux import fdtable as fdt
from monitor.linux.mm import LinuxError

if TYPE_CHECKING:
    from monitor.journal import Journal
    from monitor.machine import Machine

log = logging.getLogger(__name__)

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_DGRAM = 1, 2
POLLIN, POLLOUT, POLLERR, POLLHUP, POLLRDHUP = 1, 4, 8, 0x10, 0x2000
# Not a poll event: a blocked MSG_WAITALL receive's wait, ready only once `TcpSocket.waitall` bytes are
# there or the stream ended (a wait on plain POLLIN would wake, run the call again and block again, in
# a loop, while fewer bytes are there).
POLL_WAITALL = 1 << 16
WAITALL_CUT = 1 << 31  # in TcpSocket.waitall: a signal ended the wait, the call returns what is there
SOCKET_DEV = 0x8
EPHEMERAL_FIRST = 32768  # ports given to bind(port 0) and to the peers of service connections
TAKE_BYTES = 1 << 20  # at most this much of the host's queued messages per NET_RX event
_IN = struct.Struct("<HH4s8x")  # sockaddr_in: family, port (big-endian), address
_IN6 = struct.Struct("<HHI16sI")  # sockaddr_in6: family, port, flowinfo, address, scope id


class TcpState(enum.Enum):
    NEW = "new"
    LISTENING = "listening"
    CONNECTED = "connected"
    CLOSED = "closed"


def parse_sockaddr(raw: bytes) -> tuple[int, bytes, int]:
    """(family, address bytes, port) from a sockaddr the guest passed."""
    if len(raw) < 2:
        raise LinuxError(errno.EINVAL)
    family = struct.unpack_from("<H", raw)[0]
    if family == AF_INET:
        if len(raw) < 16:
            raise LinuxError(errno.EINVAL)
        _f, port, addr = _IN.unpack_from(raw)
        return family, addr, pysocket.ntohs(port)
    if family == AF_INET6:
        if len(raw) < 24:
            raise LinuxError(errno.EINVAL)
        _f, port, _flow, addr, _scope = _IN6.unpack_from(raw.ljust(_IN6.size, b"\0"))
        return family, addr, pysocket.ntohs(port)
    raise LinuxError(errno.EAFNOSUPPORT)


def pack_sockaddr(family: int, addr: bytes, port: int) -> bytes:
    if family == AF_INET6:
        return _IN6.pack(AF_INET6, pysocket.htons(port), 0, addr, 0)
    return _IN.pack(AF_INET, pysocket.htons(port), addr)


def _loopback(family: int) -> bytes:
    return ipaddress.ip_address("::1" if family == AF_INET6 else "127.0.0.1").packed


def _local_address(family: int, addr: bytes) -> bool:
    """Addresses a guest may bind: any, and loopback (the guest has no other interface)."""
    ip = ipaddress.ip_address(addr)
    return ip.is_unspecified or ip.is_loopback


class TcpSocket(fdt.OpenFile):
    """A TCP socket: new, listening (with its queue of connections not yet accepted), or connected (one
    connection of the service address, with the bytes received and not yet read)."""

    kind = "tcp"

    def __init__(self, stack: NetStack, family: int, flags: int, number: int) -> None:
        super().__init__(f"socket:[{number}]", (flags & fdt.O_NONBLOCK) | fdt.O_RDWR)
        self.stack = stack
        self.family = family
        self.number = number
        self.state = TcpState.NEW
        self.local: tuple[bytes, int] | None = None  # bound (address, port)
        self.peer: tuple[bytes, int] | None = None
        self.options: dict[tuple[int, int], bytes] = {}  # (level, name) -> the value set
        self.backlog: collections.deque[TcpSocket] = collections.deque()  # listening: not yet accepted
        self.conn = 0  # connected: the NIC connection id
        self.service = 0  # connected: which service address it came through (0: the first)
        self.rx = bytearray()
        self.peer_closed = False  # the client finished sending: reads end after the bytes received
        self.peer_gone = False  # the client went away: writes fail (EPIPE)
        self.reset = False  # the connection died (with an old primary): reads fail with ECONNRESET once
        self.read_shut = False
        self.write_shut = False
        self.changes = 0  # bytes, connections and ends arriving: EPOLLET (fdtable.OpenFile.wakeups)
        self.waitall = 0  # the length a blocked MSG_WAITALL receive waits for (POLL_WAITALL)

    def wakeups(self) -> int:
        return self.changes

    # ----- data -------------------------------------------------------------------------------------

    def receive(self, n: int, peek: bool = False, nonblocking: bool = False) -> bytes:
        if self.state is TcpState.LISTENING or self.state is TcpState.NEW:
            raise LinuxError(errno.ENOTCONN)
        if self.rx:
            chunk = bytes(self.rx[:n])
            if not peek:
                del self.rx[:n]
            return chunk
        if self.reset:
            self.reset = False  # reported once; then the connection reads as ended
            self.peer_closed = True
            raise LinuxError(errno.ECONNRESET)
        if self.peer_closed or self.read_shut or self.state is TcpState.CLOSED:
            return b""
        if nonblocking or self.flags & fdt.O_NONBLOCK:
            raise LinuxError(errno.EAGAIN)
        raise fdt.WouldBlock(("poll", [(self, POLLIN)], None))  # runs again when bytes or the end arrive

    def receive_all(self, n: int) -> bytes:
        """MSG_WAITALL: `n` bytes, or fewer only at the end of the stream; until then the call waits
        (and runs again) for all of them, the bytes staying received meanwhile (a signal ends the wait
        with EINTR and loses none, or, if some are there, makes the call return them after the handler:
        `cut_waitall`). A reset is reported as receive reports it."""
        ended = self.peer_closed or self.read_shut or self.reset or self.state is not TcpState.CONNECTED
        if len(self.rx) < n and not ended and not self.waitall & WAITALL_CUT:
            self.waitall = n
            raise fdt.WouldBlock(("poll", [(self, POLLIN | POLL_WAITALL)], None))
        self.waitall = 0
        return self.receive(n)

    def cut_waitall(self) -> bool:
        """A signal to handle ends a blocked MSG_WAITALL receive: with bytes there, the call runs again
        after the handler and returns them, as Linux returns what it had copied (True); else False
        (EINTR, or a restart under SA_RESTART, as for any receive)."""
        if not self.rx:
            return False
        self.waitall |= WAITALL_CUT
        return True

    def send(self, data: bytes, nosignal: bool = False) -> int:
        if self.state is not TcpState.CONNECTED and self.state is not TcpState.CLOSED:
            raise LinuxError(errno.ENOTCONN if self.state is TcpState.NEW else errno.EPIPE)
        if self.write_shut or self.peer_gone or self.reset or self.state is TcpState.CLOSED:
            if not nosignal:
                self.stack.raise_sigpipe()
            raise LinuxError(errno.EPIPE)
        if data:
            self.stack.transmit(self.conn, data)
        return len(data)

    def read(self, n: int) -> bytes:
        return self.receive(n)

    def write(self, data: bytes) -> int:
        return self.send(data)

    def poll_mask(self, events: int) -> int | None:
        if self.state is TcpState.LISTENING:
            return events & POLLIN if self.backlog else 0
        if self.state is TcpState.NEW:
            return (events & POLLOUT) | POLLHUP  # as Linux: an unconnected stream socket
        mask = 0
        short = events & POLL_WAITALL and len(self.rx) < self.waitall  # a MSG_WAITALL wait: not yet
        if self.rx and not short or self.peer_closed or self.read_shut or self.reset:
            mask |= events & (POLLIN | POLLRDHUP)
        if self.reset:
            mask |= POLLERR | POLLHUP
        elif self.peer_gone or self.peer_closed and self.write_shut:
            mask |= POLLHUP
        if not self.reset and not self.write_shut:
            mask |= events & POLLOUT
        return mask

    def pending_bytes(self) -> int | None:
        return len(self.rx)

    def shutdown(self, how: int) -> None:
        if self.state is not TcpState.CONNECTED:
            raise LinuxError(errno.ENOTCONN)
        self.changes += 1
        if how in (0, 2):  # SHUT_RD, SHUT_RDWR
            self.read_shut = True
        if how in (1, 2) and not self.write_shut:  # SHUT_WR: the client sees the end
            self.write_shut = True
            self.stack.hang_up(self)

    def stat(self) -> fdt.StatInfo:
        return fdt.StatInfo(dev=SOCKET_DEV, ino=self.number, mode=stat.S_IFSOCK | 0o777)

    def close(self) -> None:
        self.stack.closed(self)

    def describe(self) -> tuple[object, ...]:
        return (
            self.kind, self.number, self.family, self.flags, self.state.value, self.local, self.peer,
            sorted(self.options.items()), [s.conn for s in self.backlog], self.conn, self.service,
            bytes(self.rx), self.peer_closed, self.peer_gone, self.reset, self.read_shut, self.write_shut,
            self.waitall,
        )  # fmt: skip


class NetStack:
    """The guest's sockets and the connections of its service address (one per personality, shared by
    every process). Bound to a machine by `attach`; `poll_news` runs at every system call once the guest
    listens, and `take` when every thread waits and the host has news (netwait.py)."""

    def __init__(self) -> None:
        self.sockets = 0  # numbers sockets (inode numbers, socket:[N])
        self.listeners: list[TcpSocket] = []  # in the order they listened: service i -> the i-th port
        self.conns: dict[int, TcpSocket] = {}  # NIC connection id -> its socket (queued or accepted)
        self.unbound: list[TcpSocket] = []  # connections that came before their port was listened on
        self.bound: dict[tuple[int, int], TcpSocket] = {}  # (family, port) -> socket
        self.next_port = EPHEMERAL_FIRST
        self.active = False  # the guest has listened: news is taken at every system call from now on
        self.detached = False  # the VM is gone: closing descriptors makes no output
        self.restored: dict[int, TcpSocket] = {}  # a restore's sockets by number (socket_state.py)
        self.sigpipe: Callable[[], object] = lambda: None  # SIGPIPE to the running process
        self._machine: Machine | None = None

    def attach(self, machine: Machine) -> None:
        """Serve the machine's NIC queue. The Net device keeps the connections the guest believes open
        (open_conns, max_conn: a backup going live reports them lost, a restore knows the ids in use);
        its news must not become interrupts here (the personality takes it at system calls)."""
        self._machine = machine
        machine._sources = [s for s in machine._sources if s is not machine.net]
        machine._source_checks = [c for c in machine._source_checks if c[1] is not machine.net]

    @property
    def machine(self) -> Machine:
        assert self._machine is not None
        return self._machine

    def new_socket(self, family: int, flags: int) -> TcpSocket:
        self.sockets += 1
        return TcpSocket(self, family, flags, 0x5000 + self.sockets)

    def raise_sigpipe(self) -> None:
        self.sigpipe()

    # ----- binding and listening -------------------------------------------------------------------

    def bind(self, sock: TcpSocket, addr: bytes, port: int) -> None:
        if sock.local is not None:
            raise LinuxError(errno.EINVAL)
        if not _local_address(sock.family, addr):
            raise LinuxError(errno.EADDRNOTAVAIL)
        if port == 0:
            port = self._ephemeral(sock.family)
        if (sock.family, port) in self.bound:
            raise LinuxError(errno.EADDRINUSE)
        self.bound[(sock.family, port)] = sock
        sock.local = (addr, port)

    def _ephemeral(self, family: int) -> int:
        while (family, self.next_port) in self.bound:
            self.next_port += 1
        self.next_port += 1
        return self.next_port - 1

    def listen(self, sock: TcpSocket) -> None:
        if sock.state is TcpState.LISTENING:
            return
        if sock.state is not TcpState.NEW:
            raise LinuxError(errno.EINVAL)
        if sock.local is None:
            self.bind(sock, bytes(16 if sock.family == AF_INET6 else 4), 0)
        sock.state = TcpState.LISTENING
        self.listeners.append(sock)
        self.active = True
        waiting = [c for c in self.unbound if self.service_listener(c.service) is sock]
        if waiting:  # connections that came before their port was listened on
            sock.backlog.extend(waiting)
            sock.changes += 1
            self.unbound = [c for c in self.unbound if c not in waiting]

    def service_listener(self, index: int = 0) -> TcpSocket | None:
        """The socket the index-th service address is served by: the first listening socket on the
        index-th port the guest listened on (ports in the order the guest first listened on them)."""
        ports: list[int] = []
        for sock in self.listeners:
            assert sock.local is not None
            if sock.local[1] not in ports:
                ports.append(sock.local[1])
        if index >= len(ports):
            return None
        return next(s for s in self.listeners if s.local is not None and s.local[1] == ports[index])

    def accept(self, sock: TcpSocket) -> TcpSocket:
        if sock.state is not TcpState.LISTENING:
            raise LinuxError(errno.EINVAL)
        if not sock.backlog:
            if sock.flags & fdt.O_NONBLOCK:
                raise LinuxError(errno.EAGAIN)
            raise fdt.WouldBlock(("poll", [(sock, POLLIN)], None))
        return sock.backlog.popleft()

    # ----- the host's news (events) ---------------------------------------------------------------

    def poll_news(self) -> None:
        """At a system call: take what the host queued (live, recording) or what the log says arrived
        here (replay). The news is the NIC's: an IRQ NET_RX record marks it, a NET_RX record carries it."""
        machine = self.machine
        journal = machine.journal
        if journal.mode is JournalMode.REPLAY:
            while Vector.NET_RX in journal.due_irqs():
                self.take(journal)
        elif machine.net_backend.has_news():
            journal.irq(Vector.NET_RX)
            self.take(journal)

    def take(self, journal: Journal) -> None:
        """One NET_RX event: the messages the host queued (live, recording) or the log's (replay)."""
        backend = self.machine.net_backend
        data = journal.data(EventKind.NET_RX, lambda: backend.take(TAKE_BYTES))
        for msg in iter_messages(data):
            self._apply(msg)

    def _apply(self, msg: NetMessage) -> None:
        net = self.machine.net
        if msg.kind is NetKind.OPEN:
            net.open_conns.add(msg.conn)
            net.max_conn = max(net.max_conn, msg.conn)
            service = int.from_bytes(msg.payload[:2], "little")  # netserver.py: b"" for the first
            self._open(msg.conn, service)
            return
        sock = self.conns.get(msg.conn)
        if sock is not None:
            sock.changes += 1
        if msg.kind is NetKind.DATA:
            if sock is not None and not sock.peer_closed and not sock.read_shut:
                sock.rx += msg.payload
            return
        if sock is not None:
            sock.peer_closed = True
        if msg.payload == CLIENT_EOF:
            return  # a half-close: the connection stays open for the guest's replies and its own close
        net.open_conns.discard(msg.conn)
        if sock is not None:
            sock.peer_gone = True
            sock.reset = msg.payload == RESET
            del self.conns[msg.conn]

    def _open(self, conn: int, service: int) -> None:
        listener = self.service_listener(service)
        family = listener.family if listener is not None else AF_INET
        sock = self.new_socket(family, 0)
        sock.state = TcpState.CONNECTED
        sock.conn, sock.service = conn, service
        port = listener.local[1] if listener is not None and listener.local is not None else 0
        sock.local = (_loopback(family), port)
        sock.peer = (_loopback(family), EPHEMERAL_FIRST + conn % 28000)
        self.conns[conn] = sock
        if listener is not None:
            listener.backlog.append(sock)
            listener.changes += 1
        else:
            self.unbound.append(sock)

    # ----- outputs --------------------------------------------------------------------------------

    def transmit(self, conn: int, data: bytes) -> None:
        messages = [
            NetMessage(conn, NetKind.DATA, data[at : at + MAX_MESSAGE])
            for at in range(0, len(data), MAX_MESSAGE)
        ]
        self.machine._emit(OutputKind.NET, pack_messages(messages))

    def hang_up(self, sock: TcpSocket) -> None:
        """The guest ends a connection (close or SHUT_WR): the client sees the end."""
        if self.detached or not sock.conn:
            return
        net = self.machine.net
        if sock.conn in net.open_conns:
            net.open_conns.discard(sock.conn)
            self.machine._emit(OutputKind.NET, pack_messages([NetMessage(sock.conn, NetKind.CLOSE, b"")]))
        self.conns.pop(sock.conn, None)

    def closed(self, sock: TcpSocket) -> None:
        """The last descriptor of `sock` closed."""
        if sock.state is TcpState.LISTENING:
            self.listeners.remove(sock)
            for queued in sock.backlog:
                self.closed(queued)
            sock.backlog.clear()
        elif sock.state is TcpState.CONNECTED and not sock.write_shut:
            self.hang_up(sock)
        if sock.conn:
            self.conns.pop(sock.conn, None)
        if sock.local is not None and self.bound.get((sock.family, sock.local[1])) is sock:
            del self.bound[(sock.family, sock.local[1])]
        sock.state = TcpState.CLOSED

    # ----- state ----------------------------------------------------------------------------------

    def describe(self) -> bytes:
        """What the state hash covers beyond each descriptor's socket."""
        return repr(
            (
                self.sockets, self.next_port, self.active, [s.number for s in self.listeners],
                sorted((c, s.number) for c, s in self.conns.items()), [s.describe() for s in self.unbound],
                sorted((k, s.number) for k, s in self.bound.items()),
            )
        ).encode()  # fmt: skip

    def all_sockets(self) -> Iterable[TcpSocket]:
        seen: dict[int, TcpSocket] = {}
        for sock in [*self.listeners, *self.conns.values(), *self.unbound, *self.bound.values()]:
            seen.setdefault(sock.number, sock)
            for queued in sock.backlog:
                seen.setdefault(queued.number, queued)
        return [seen[n] for n in sorted(seen)]
