"""The guest's sockets, epoll instances, eventfds and socketpair ends in a checkpoint (proto LinuxNet,
LinuxSocket, LinuxOpenFile), and back. state.py calls these for the files and the stack.

A connection restored live has no client any more (it was the old host's): the Net device reports it
closed with the RESET payload when it restores (monitor/devices/net.py), so the guest reads ECONNRESET.
"""

from __future__ import annotations

from typing import Callable

from monitor.errors import CheckpointError
from monitor.linux import fdtable as fdt
from monitor.linux import sockets as sk
from proto import vmft_pb2


def save_net(stack: sk.NetStack) -> vmft_pb2.LinuxNet:
    msg = vmft_pb2.LinuxNet(
        socket_count=stack.sockets,
        next_port=stack.next_port,
        active=stack.active,
        listeners=[s.number for s in stack.listeners],
        unbound=[s.number for s in stack.unbound],
    )
    for sock in stack.all_sockets():
        msg.sockets.append(_save_socket(sock))
    return msg


def _save_socket(sock: sk.TcpSocket) -> vmft_pb2.LinuxSocket:
    out = vmft_pb2.LinuxSocket(
        number=sock.number,
        family=sock.family,
        flags=sock.flags,
        state=sock.state.value,
        backlog=[s.number for s in sock.backlog],
        conn=sock.conn,
        service=sock.service,
        rx=bytes(sock.rx),
        peer_closed=sock.peer_closed,
        peer_gone=sock.peer_gone,
        reset=sock.reset,
        read_shut=sock.read_shut,
        write_shut=sock.write_shut,
        waitall=sock.waitall,
    )
    if sock.local is not None:
        out.bound, out.local_address, out.local_port = True, sock.local[0], sock.local[1]
    if sock.peer is not None:
        out.peer_address, out.peer_port = sock.peer
    for (level, name), value in sock.options.items():
        out.options[level << 32 | name] = value
    return out


def restore_net(stack: sk.NetStack, msg: vmft_pb2.LinuxNet) -> None:
    """Put a fresh stack (attached to its machine) in the saved state."""
    stack.sockets, stack.next_port, stack.active = msg.socket_count, msg.next_port, msg.active
    sockets: dict[int, sk.TcpSocket] = {}
    for saved in msg.sockets:
        sock = sk.TcpSocket(stack, saved.family, 0, saved.number)
        sock.flags = saved.flags
        sock.state = sk.TcpState(saved.state)
        sock.local = (saved.local_address, saved.local_port) if saved.bound else None
        sock.peer = (saved.peer_address, saved.peer_port) if saved.peer_address else None
        sock.options = {(key >> 32, key & 0xFFFFFFFF): value for key, value in saved.options.items()}
        sock.conn, sock.service, sock.rx = saved.conn, saved.service, bytearray(saved.rx)
        sock.peer_closed, sock.peer_gone, sock.reset = saved.peer_closed, saved.peer_gone, saved.reset
        sock.read_shut, sock.write_shut = saved.read_shut, saved.write_shut
        sock.waitall = saved.waitall
        sockets[saved.number] = sock
    try:
        for saved in msg.sockets:
            sockets[saved.number].backlog.extend(sockets[n] for n in saved.backlog)
        stack.listeners = [sockets[n] for n in msg.listeners]
        stack.unbound.extend(sockets[n] for n in msg.unbound)
    except KeyError as err:
        raise CheckpointError(f"a Linux guest's socket list names socket {err} it does not hold") from None
    for sock in sockets.values():
        if sock.state is sk.TcpState.CONNECTED and sock.conn and not sock.peer_gone:
            stack.conns[sock.conn] = sock
        if sock.local is not None and sock.state is not sk.TcpState.CLOSED and sock.conn == 0:
            stack.bound[(sock.family, sock.local[1])] = sock
    stack.restored = sockets


def save_file(
    file: fdt.OpenFile,
    out: vmft_pb2.LinuxOpenFile,
    file_index: Callable[[fdt.OpenFile], int],
    pipes: dict[int, fdt.Pipe],
) -> bool:
    """Fill `out` for the kinds of file this module knows (the pipes they use into `pipes`); False for
    the others."""
    if isinstance(file, sk.TcpSocket):
        out.socket = file.number
    elif isinstance(file, fdt.EpollFile):
        for fd, (events, data, watched) in sorted(file.interest.items()):
            out.interest.add(
                fd=fd, events=events, data=data, file=file_index(watched), edge_pending=file.edge_pending(fd)
            )
    elif isinstance(file, fdt.EventFd):
        out.count, out.reading = file.count, file.semaphore
    elif isinstance(file, fdt.SocketEnd):
        out.pipe, out.tx_pipe, out.reading = file.rx.pipe.ino, file.tx.pipe.ino, file.tx_open
        pipes[file.rx.pipe.ino], pipes[file.tx.pipe.ino] = file.rx.pipe, file.tx.pipe
    else:
        return False
    return True


def open_file(
    saved: vmft_pb2.LinuxOpenFile, stack: sk.NetStack, pipe: Callable[[int], fdt.Pipe]
) -> fdt.OpenFile | None:
    """The open file `saved` describes, for the kinds this module knows (None for the others). Epoll
    interest lists are filled by `fill_epoll` once every file exists."""
    file: fdt.OpenFile
    if saved.kind == sk.TcpSocket.kind:
        sock = stack.restored.get(saved.socket)
        if sock is None:
            raise CheckpointError(f"a Linux guest's descriptor names socket {saved.socket} it does not hold")
        return sock
    if saved.kind == fdt.EpollFile.kind:
        file = fdt.EpollFile(saved.flags)
    elif saved.kind == fdt.EventFd.kind:
        file = fdt.EventFd(saved.flags, saved.count, saved.reading)
    elif saved.kind == fdt.SocketEnd.kind:
        end = fdt.SocketEnd(saved.flags, pipe(saved.pipe), pipe(saved.tx_pipe))
        if not saved.reading:
            end.shutdown_write()
        file = end
    else:
        return None
    file.flags = saved.flags
    return file


def fill_epoll(saved: vmft_pb2.LinuxOpenFile, file: fdt.OpenFile, opened: list[fdt.OpenFile]) -> None:
    if isinstance(file, fdt.EpollFile):
        for entry in saved.interest:
            file.interest[entry.fd] = (entry.events, entry.data, opened[entry.file])
            if entry.events & fdt.EPOLLET:  # whether it has a change to look at, not the count
                file.edge_seen[entry.fd] = opened[entry.file].wakeups() - int(entry.edge_pending)
