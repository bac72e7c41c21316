"""NicServer's replies from threads other than the event loop (the vCPU, the acknowledgement thread):
sent at once when nothing is queued ahead, else by the loop, and in either case in order and whole, even
when a slow client lets the socket buffer fill up in the middle of a message."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from monitor.devices.net import NetBackend, NetMessage
from monitor.guest_abi import NetKind
from monitor.netserver import NicServer


async def _server() -> tuple[NicServer, NetBackend, list[NetMessage]]:
    backend = NetBackend()
    server = NicServer(backend, "127.0.0.1", 0)
    received: list[NetMessage] = []
    original_push = backend.push

    def push(message: NetMessage) -> None:
        received.append(message)
        original_push(message)

    backend.push = push  # type: ignore[method-assign]
    await server.start()
    return server, backend, received


async def _opened(received: list[NetMessage], count: int) -> list[int]:
    for _ in range(500):
        conns = [m.conn for m in received if m.kind is NetKind.OPEN]
        if len(conns) >= count:
            return conns
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} connections did not open: {received}")


def _read_frames(sock: socket.socket, count: int) -> list[bytes]:
    sock.settimeout(20)
    frames: list[bytes] = []
    buffer = b""
    while len(frames) < count:
        while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
            length = struct.unpack(">I", buffer[:4])[0]
            frames.append(buffer[4 : 4 + length])
            buffer = buffer[4 + length :]
        if len(frames) >= count:
            break
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        buffer += chunk
    return frames


def _small_window_client(host: str, port: int) -> socket.socket:
    """A client with a small receive buffer: a host's send buffer fills after a few hundred KB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    return sock


async def test_replies_from_another_thread_arrive_in_order_and_whole_through_a_full_buffer() -> None:
    server, backend, received = await _server()
    host, port = server.address
    clients = [_small_window_client(host, port) for _ in range(2)]
    try:
        slow, fast = await _opened(received, 2)
        # Large messages to the slow client fill its socket buffer (it reads nothing yet): a direct send
        # stops part-way and the loop must write the rest before anything after it.
        payloads = [bytes([i]) * (300_000 + i) for i in range(12)]
        small = [f"reply {i}".encode() for i in range(200)]

        def vcpu() -> None:
            for i, payload in enumerate(payloads):
                backend.transmit(
                    [NetMessage(slow, NetKind.DATA, payload), NetMessage(fast, NetKind.DATA, small[i])]
                )
            for text in small[len(payloads) :]:
                backend.transmit([NetMessage(fast, NetKind.DATA, text)])

        sender = threading.Thread(target=vcpu)
        sender.start()
        got_fast = await asyncio.to_thread(_read_frames, clients[1], len(small))
        got_slow = await asyncio.to_thread(_read_frames, clients[0], len(payloads))
        sender.join(timeout=20)
        assert got_fast == small
        assert [len(p) for p in got_slow] == [len(p) for p in payloads]
        assert got_slow == payloads
        # A close from another thread goes through the loop after the data before it: the client reads
        # the data, then the end.
        backend.transmit([NetMessage(fast, NetKind.DATA, b"last"), NetMessage(fast, NetKind.CLOSE, b"")])
        assert await asyncio.to_thread(_read_frames, clients[1], 1) == [b"last"]
        clients[1].settimeout(5)
        assert await asyncio.to_thread(clients[1].recv, 10) == b""
    finally:
        for client in clients:
            client.close()
        await server.close()


async def test_a_client_that_left_is_skipped_and_closing_the_server_frees_its_sockets() -> None:
    server, backend, received = await _server()
    host, port = server.address
    gone = socket.create_connection((host, port))
    stays = socket.create_connection((host, port))
    try:
        first, second = await _opened(received, 2)
        gone.close()
        for _ in range(500):
            if any(m.kind is NetKind.CLOSE and m.conn == first for m in received):
                break
            await asyncio.sleep(0.01)
        sent = threading.Thread(
            target=backend.transmit,
            args=([NetMessage(first, NetKind.DATA, b"nobody"), NetMessage(second, NetKind.DATA, b"hello")],),
        )
        sent.start()
        sent.join(timeout=10)
        assert await asyncio.to_thread(_read_frames, stays, 1) == [b"hello"]
    finally:
        stays.close()
        await server.close()
    assert not server._direct and not server._writers
