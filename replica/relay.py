"""A fault-injecting TCP relay: put it between two nodes (or a client and a service) and cut, delay or heal
the link while they talk. The network faults this kernel cannot make (no netem, no iptables: docs/design.md).

    with Relay("127.0.0.1:7001") as relay:       # listens on relay.address, forwards to 127.0.0.1:7001
        ...                                       # point the peer at relay.address
        relay.cut()                               # close every connection and refuse new ones
        relay.cut(silent=True)                    # or: keep connections open, hold every byte (no FIN)
        relay.heal()                              # forward again
        relay.set_delay(0.05)                     # every byte arrives 50 ms later (order kept)

The relay runs its own asyncio loop on a daemon thread, so synchronous tests and asyncio programs can both
drive it; every control call returns once the relay has applied it. `python -m replica.relay --listen
HOST:PORT --target HOST:PORT` runs one as a process controlled by lines on stdin (`cut`, `cut silent`,
`heal`, `delay SECONDS`, `quit`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from monitor.address import parse_address

log = logging.getLogger(__name__)

T = TypeVar("T")
_CHUNK = 1 << 16
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, like a dead host's stack


@dataclass
class RelayStats:
    accepted: int = 0
    refused: int = 0  # connections closed at once because the link was cut
    cuts: int = 0
    bytes_forwarded: int = 0
    lost: int = 0  # segments "lost" (held for a retransmission timeout)


class _Pipe:
    """One direction of one connection: read, hold for the delay, write; in order."""

    def __init__(self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def read_loop(self) -> None:
        try:
            while True:
                await self.relay._flowing.wait()
                data = await self.reader.read(_CHUNK)
                if not data:
                    break
                due = time.monotonic() + self.relay._delay
                if self.relay._loss and self.relay._random.random() < self.relay._loss:
                    due += self.relay._rto  # a lost segment: TCP resends it after a timeout; later ones wait
                    self.relay.stats.lost += 1
                self.queue.put_nowait((due, data))
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait(None)

    async def write_loop(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.relay._flowing.wait()
                self.writer.write(data)
                self.relay.stats.bytes_forwarded += len(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass


class Relay:
    """Listens on `listen` (default: a free loopback port) and forwards every connection to `target`."""

    def __init__(self, target: str, listen: str = "127.0.0.1:0") -> None:
        self.target = parse_address(target, default_host="127.0.0.1")
        self._listen = parse_address(listen, default_host="127.0.0.1")
        self._delay = 0.0
        self._loss = 0.0
        self._rto = 0.2
        self._random = random.Random()
        self._cut = False
        self._silent = False
        self._flowing = asyncio.Event()  # set unless silently cut; used only on the relay's loop
        self._flowing.set()
        self.stats = RelayStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], list[asyncio.StreamWriter]] = {}
        self.port = 0

    @property
    def address(self) -> str:
        """HOST:PORT to give the peer instead of the target."""
        return f"{self._listen[0]}:{self.port}"

    # ----- life cycle ------------------------------------------------------------------------------

    def start(self) -> Relay:
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as err:  # reported to start()'s caller
                failure.append(err)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"relay->{self.target[1]}", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the relay did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            try:
                self._call(self._shutdown())
            except RuntimeError:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- faults -----------------------------------------------------------------------------------

    def cut(self, silent: bool = False) -> None:
        """Cut the link. Default: reset every connection and refuse new ones (the peers see the link break
        at once). `silent`: keep connections open (and accept new ones) but hold every byte, as a partition
        does (TCP delivers what was held once the link heals), so that only the peers' timeouts notice."""
        self._call(self._set_cut(silent))

    def heal(self) -> None:
        """Forward again (connections reset by a cut stay closed; the peers reconnect)."""
        self._call(self._set_heal())

    def set_delay(self, seconds: float) -> None:
        """Every byte read from now on is forwarded `seconds` later (order kept in each direction)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self._delay = float(seconds)

    def set_loss(self, fraction: float, rto_s: float = 0.2) -> None:
        """Lose `fraction` of the segments read from now on. A TCP link cannot lose bytes, only time: a
        lost segment arrives after a retransmission timeout (Linux's minimum RTO is 200 ms) and everything
        behind it waits, which is what this does."""
        if not 0 <= fraction <= 1 or rto_s < 0:
            raise ValueError("loss is a fraction between 0 and 1, and the timeout is not negative")
        self._loss = float(fraction)
        self._rto = float(rto_s)

    @property
    def is_cut(self) -> bool:
        return self._cut or self._silent

    @property
    def connections(self) -> int:
        return len(self._connections)

    # ----- inside the relay's loop ----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the relay is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._listen[0], self._listen[1])
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _set_cut(self, silent: bool) -> None:
        self.stats.cuts += 1
        if silent:
            self._silent = True
            self._flowing.clear()
            return
        self._cut = True
        await self._reset_all()

    async def _set_heal(self) -> None:
        self._cut = False
        self._silent = False
        self._flowing.set()

    async def _reset_all(self) -> None:
        for task, writers in list(self._connections.items()):
            for writer in writers:
                _reset(writer)
            task.cancel()
        for task in list(self._connections):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._connections.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as err:
            log.info("relay: target %s:%d unreachable: %s", *self.target, err)
            _reset(writer)
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = [writer, up_writer]
        try:
            forward = _Pipe(self, reader, up_writer)
            backward = _Pipe(self, up_reader, writer)
            await asyncio.gather(forward.read_loop(), forward.write_loop(),
                                 backward.read_loop(), backward.write_loop())  # fmt: skip
        finally:
            self._connections.pop(task, None)
            for w in (writer, up_writer):
                w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (no orderly FIN): what a cut cable looks like once the peer writes."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    writer.transport.abort()


# ----- as a process ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fault-injecting TCP relay controlled by stdin lines.")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    relay = Relay(args.target, args.listen).start()
    print(f"relay {relay.address} -> {args.target}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            try:
                if words[0] == "cut":
                    relay.cut(silent=words[1:2] == ["silent"])
                elif words[0] == "heal":
                    relay.heal()
                elif words[0] == "delay" and len(words) == 2:
                    relay.set_delay(float(words[1]))
                elif words[0] == "quit":
                    break
                else:
                    print(f"unknown command: {line.strip()}", flush=True)
                    continue
            except ValueError as err:
                print(f"error: {err}", flush=True)
                continue
            print("ok", flush=True)
    finally:
        relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
