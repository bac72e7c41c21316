"""The socket system calls: TCP servers over IPv4 and IPv6 (monitor/linux/sockets.py), and the calls
socketpair's AF_UNIX ends share with them (send, receive, shutdown, names, options).

The guest can listen and accept; it cannot reach out: connect is ENETUNREACH (no route leaves the VM)
and datagram, raw, netlink and unpaired AF_UNIX sockets are EACCES (docs/linux.md, "Network").
"""

from __future__ import annotations

import errno
import struct

from monitor.linux import fdtable as fdt
from monitor.linux import sockets as sk
from monitor.linux.mm import LinuxError
from monitor.linux.process import ProcessState

SOCK_TYPE_MASK, SOCK_NONBLOCK, SOCK_CLOEXEC = 0xF, 0o4000, 0o2000000
IPPROTO_TCP = 6
MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL, MSG_NOSIGNAL = 0x2, 0x40, 0x100, 0x4000
SOL_SOCKET = 1
SO_TYPE, SO_ERROR, SO_SNDBUF, SO_RCVBUF, SO_ACCEPTCONN, SO_PROTOCOL, SO_DOMAIN = 3, 4, 7, 8, 30, 38, 39
_SOCKET_DEFAULTS = {SO_SNDBUF: 16384, SO_RCVBUF: 131072}
MAX_CHUNK = 1 << 20  # one send or receive moves at most 1 MiB
_MSGHDR = struct.Struct("<QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
_IOVEC = struct.Struct("<QQ")

AnySocket = sk.TcpSocket | fdt.SocketEnd


class NetCalls(ProcessState):
    @property
    def net(self) -> sk.NetStack:
        stack = self.host.net
        if stack is None:
            raise LinuxError(errno.EACCES)
        assert isinstance(stack, sk.NetStack)
        return stack

    def _sock(self, fd: int) -> AnySocket:
        file = self.fds.get(fd)
        if not isinstance(file, (sk.TcpSocket, fdt.SocketEnd)):
            raise LinuxError(errno.ENOTSOCK)
        return file

    def _tcp(self, fd: int) -> sk.TcpSocket:
        sock = self._sock(fd)
        if not isinstance(sock, sk.TcpSocket):
            raise LinuxError(errno.EOPNOTSUPP)
        return sock

    # ----- making, binding, listening, accepting ------------------------------------------------

    def sys_socket(self, domain: int, kind: int, protocol: int, *_: int) -> int:
        if domain not in (sk.AF_INET, sk.AF_INET6):
            raise LinuxError(errno.EACCES)  # AF_UNIX (except socketpair), netlink, packet: no network
        if kind & SOCK_TYPE_MASK != sk.SOCK_STREAM or protocol not in (0, IPPROTO_TCP):
            raise LinuxError(errno.EACCES)  # UDP and raw sockets: nothing would reach them
        sock = self.net.new_socket(domain, fdt.O_NONBLOCK if kind & SOCK_NONBLOCK else 0)
        return self.fds.install(sock, cloexec=bool(kind & SOCK_CLOEXEC))

    def sys_bind(self, fd: int, addr: int, length: int, *_: int) -> int:
        sock = self._tcp(fd)
        family, address, port = sk.parse_sockaddr(self.space.read(addr, min(length, 128)))
        if family != sock.family:
            raise LinuxError(errno.EAFNOSUPPORT if sock.family == sk.AF_INET else errno.EINVAL)
        self.net.bind(sock, address, port)
        return 0

    def sys_listen(self, fd: int, backlog: int, *_: int) -> int:
        self.net.listen(self._tcp(fd))
        return 0

    def sys_accept4(self, fd: int, addr: int, length: int, flags: int, *_: int) -> int:
        if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
            raise LinuxError(errno.EINVAL)
        listener = self._tcp(fd)
        sock = self.net.accept(listener)
        if flags & SOCK_NONBLOCK:
            sock.flags |= fdt.O_NONBLOCK
        if addr and length:
            assert sock.peer is not None
            self._write_name(sk.pack_sockaddr(sock.family, *sock.peer), addr, length)
        return self.fds.install(sock, cloexec=bool(flags & SOCK_CLOEXEC))

    def sys_accept(self, fd: int, addr: int, length: int, *_: int) -> int:
        return self.sys_accept4(fd, addr, length, 0)

    def sys_connect(self, fd: int, addr: int, length: int, *_: int) -> int:
        self._sock(fd)
        raise LinuxError(errno.ENETUNREACH)  # outbound connections: none leave the VM (docs/linux.md)

    # ----- data -----------------------------------------------------------------------------------

    def _send(self, sock: AnySocket, data: bytes, flags: int) -> int:
        if isinstance(sock, sk.TcpSocket):
            saved = sock.flags
            if flags & MSG_DONTWAIT:
                sock.flags |= fdt.O_NONBLOCK
            try:
                return sock.send(data, nosignal=bool(flags & MSG_NOSIGNAL))
            finally:
                sock.flags = saved
        saved = sock.flags
        if flags & MSG_DONTWAIT:
            sock.flags |= fdt.O_NONBLOCK
        try:
            return sock.write(data)
        finally:
            sock.flags = saved

    def _receive(self, sock: AnySocket, n: int, flags: int) -> bytes:
        if isinstance(sock, sk.TcpSocket):
            nonblocking = bool(flags & MSG_DONTWAIT or sock.flags & fdt.O_NONBLOCK)
            if flags & MSG_WAITALL and not flags & MSG_PEEK and not nonblocking:
                return sock.receive_all(n)  # the full length, the end of the stream, or a signal
            return sock.receive(n, peek=bool(flags & MSG_PEEK), nonblocking=bool(flags & MSG_DONTWAIT))
        saved = sock.flags
        if flags & MSG_DONTWAIT:
            sock.flags |= fdt.O_NONBLOCK
        try:
            return sock.read(n)
        finally:
            sock.flags = saved

    def sys_sendto(self, fd: int, buf: int, length: int, flags: int, *_: int) -> int:
        sock = self._sock(fd)
        return self._send(sock, self.space.read(buf, min(length, MAX_CHUNK)), flags)

    def sys_recvfrom(self, fd: int, buf: int, length: int, flags: int, addr: int, addrlen: int) -> int:
        sock = self._sock(fd)
        data = self._receive(sock, min(length, MAX_CHUNK), flags)
        self.space.write(buf, data)
        if addr and addrlen:
            self._write_name(self._peer_name(sock), addr, addrlen)
        return len(data)

    def _msghdr(self, msg: int) -> tuple[int, int, list[tuple[int, int]]]:
        name, namelen, iov, iovlen, _control, _controllen, _flags = _MSGHDR.unpack(
            self.space.read(msg, _MSGHDR.size)
        )
        if iovlen > 1024:
            raise LinuxError(errno.EMSGSIZE)
        raw = self.space.read(iov, iovlen * _IOVEC.size) if iovlen else b""
        return name, namelen, [_IOVEC.unpack_from(raw, i * _IOVEC.size) for i in range(iovlen)]

    def sys_sendmsg(self, fd: int, msg: int, flags: int, *_: int) -> int:
        sock = self._sock(fd)
        _name, _namelen, iovecs = self._msghdr(msg)
        data = b"".join(self.space.read(base, length) for base, length in iovecs)
        return self._send(sock, data[:MAX_CHUNK], flags)

    def sys_recvmsg(self, fd: int, msg: int, flags: int, *_: int) -> int:
        sock = self._sock(fd)
        name, namelen, iovecs = self._msghdr(msg)
        data = self._receive(sock, min(sum(length for _b, length in iovecs), MAX_CHUNK), flags)
        at = 0
        for base, length in iovecs:
            if at >= len(data):
                break
            self.space.write(base, data[at : at + length])
            at += length
        if name and namelen:
            full = self._peer_name(sock)
            self.space.write(name, full[:namelen])
            self.space.write(msg + 8, struct.pack("<I", len(full)))
        self.space.write(msg + 40, struct.pack("<Q", 0))  # msg_controllen: no ancillary data
        self.space.write(msg + 48, struct.pack("<i", 0))  # msg_flags
        return len(data)

    def sys_shutdown(self, fd: int, how: int, *_: int) -> int:
        sock = self._sock(fd)
        if how not in (0, 1, 2):
            raise LinuxError(errno.EINVAL)
        if isinstance(sock, sk.TcpSocket):
            sock.shutdown(how)
        elif how in (1, 2):  # SHUT_WR, SHUT_RDWR
            sock.shutdown_write()
        return 0

    # ----- names and options ----------------------------------------------------------------------

    def _write_name(self, full: bytes, addr: int, length: int) -> None:
        room = struct.unpack("<I", self.space.read(length, 4))[0]
        self.space.write(addr, full[:room])
        self.space.write(length, struct.pack("<I", len(full)))

    def _peer_name(self, sock: AnySocket) -> bytes:
        if isinstance(sock, sk.TcpSocket):
            if sock.peer is None:
                raise LinuxError(errno.ENOTCONN)
            return sk.pack_sockaddr(sock.family, *sock.peer)
        return struct.pack("<H", sk.AF_UNIX)

    def sys_getsockname(self, fd: int, addr: int, length: int, *_: int) -> int:
        sock = self._sock(fd)
        if isinstance(sock, sk.TcpSocket):
            local = sock.local or (bytes(16 if sock.family == sk.AF_INET6 else 4), 0)
            full = sk.pack_sockaddr(sock.family, *local)
        else:
            full = struct.pack("<H", sk.AF_UNIX)
        if addr and length:
            self._write_name(full, addr, length)
        return 0

    def sys_getpeername(self, fd: int, addr: int, length: int, *_: int) -> int:
        full = self._peer_name(self._sock(fd))
        if addr and length:
            self._write_name(full, addr, length)
        return 0

    def sys_setsockopt(self, fd: int, level: int, name: int, value: int, length: int, *_: int) -> int:
        """Accepted and remembered (SO_REUSEADDR, TCP_NODELAY, SO_KEEPALIVE, IPV6_V6ONLY, ...): they
        change nothing a guest could see here beyond getsockopt reading them back."""
        sock = self._sock(fd)
        if length > 256:
            raise LinuxError(errno.EINVAL)
        if isinstance(sock, sk.TcpSocket):
            sock.options[(level, name)] = self.space.read(value, length) if value and length else b""
        return 0

    def sys_getsockopt(self, fd: int, level: int, name: int, value: int, length: int, *_: int) -> int:
        sock = self._sock(fd)
        if not value or not length:
            return 0
        answer = struct.pack("<i", 0)
        if isinstance(sock, sk.TcpSocket):
            stored = sock.options.get((level, name))
            if level == SOL_SOCKET and name == SO_TYPE:
                answer = struct.pack("<i", sk.SOCK_STREAM)
            elif level == SOL_SOCKET and name == SO_DOMAIN:
                answer = struct.pack("<i", sock.family)
            elif level == SOL_SOCKET and name == SO_PROTOCOL:
                answer = struct.pack("<i", IPPROTO_TCP)
            elif level == SOL_SOCKET and name == SO_ACCEPTCONN:
                answer = struct.pack("<i", int(sock.state is sk.TcpState.LISTENING))
            elif level == SOL_SOCKET and name == SO_ERROR:
                answer = struct.pack("<i", 0)
            elif stored is not None:
                answer = stored
            elif level == SOL_SOCKET and name in _SOCKET_DEFAULTS:
                answer = struct.pack("<i", _SOCKET_DEFAULTS[name])
        elif level == SOL_SOCKET and name == SO_TYPE:
            answer = struct.pack("<i", sk.SOCK_STREAM)
        room = struct.unpack("<I", self.space.read(length, 4))[0]
        self.space.write(value, answer[:room])
        self.space.write(length, struct.pack("<I", min(room, len(answer))))
        return 0
