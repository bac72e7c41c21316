"""Both ends of a bidirectional gRPC stream driven through gRPC's C core from the caller's own threads.

The replication stream is the busiest gRPC call in a node. Python's gRPC drives each stream with threads of
its own (one consuming the request iterator, one polling the channel, a condition per message; grpc.aio
adds its event engine's threads and a hop through the event loop) at a few hundred microseconds of CPU per
message and reply on this machine, and as much latency. The extension (replica/native/grpc_stream.c, built
by scripts/setup into build/_grpc_stream.so against Debian's libgrpc) does a send or a receive in the
calling thread, without the interpreter lock, through a pluck completion queue: one thread sends, one
receives, and nothing else runs for the stream. `ClientStream` is the primary's end; `StreamServer` serves
the backup's end on a port of its own (`ServerStream`). The wire is gRPC's (HTTP/2, mutual TLS).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

import grpc

from monitor.errors import PeerError
from replica import tls

LIBRARY = Path(__file__).resolve().parents[1] / "build" / "_grpc_stream.so"

# gRPC's status names by number (the extension returns the number).
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class NativeStreamError(PeerError):
    """The stream could not be opened (no connection, the extension missing)."""


class _RawStream(Protocol):
    def start_send(self, data: bytes, /) -> bool: ...
    def send_done(self, timeout: float = -1, /) -> int: ...
    def recv(self, timeout: float = -1, /) -> bytes | None: ...
    def done_writing(self) -> bool: ...
    def cancel(self) -> None: ...
    def status(self, timeout: float = -1, /) -> tuple[int, str]: ...
    def finish(self, code: int, details: str, timeout: float = -1, /) -> bool: ...
    def ended(self, timeout: float = 0, /) -> bool | None: ...
    def peer(self) -> str: ...
    def auth_context(self) -> dict[str, list[bytes]]: ...


class _RawServer(Protocol):
    port: int

    def accept(self, timeout: float = -1, /) -> _RawStream | None: ...
    def shutdown(self) -> None: ...


@functools.cache
def _extension() -> ModuleType:
    if not LIBRARY.exists():
        raise NativeStreamError(
            f"{LIBRARY} is missing: run scripts/setup (it builds it with gcc and libgrpc-dev)"
        )
    loader = importlib.machinery.ExtensionFileLoader("_grpc_stream", str(LIBRARY))
    spec = importlib.util.spec_from_file_location("_grpc_stream", str(LIBRARY), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _pems(
    address: str, identity: tls.Identity | None, insecure: bool
) -> tuple[str | None, str | None, str | None]:
    """The CA, key and certificate PEMs for mutual TLS as `identity`; none for plaintext, which
    replica/tls.py allows only when `insecure` and only on loopback."""
    if identity is None:
        tls.check_plaintext(address, insecure)
        return (None, None, None)
    return (identity.ca.read_text(), identity.key.read_text(), identity.cert.read_text())


class SendingStream(Protocol):
    """The sending side of a stream as its writers use it (a test may stand in for it)."""

    def start_send(self, data: bytes) -> bool: ...
    def send_done(self, timeout: float = -1) -> int: ...
    def done_writing(self) -> bool: ...


class _Stream:
    """What both ends of a stream do alike (the extension's one Stream type serves both)."""

    _raw: _RawStream

    def start_send(self, data: bytes) -> bool:
        """Start writing one serialized message; the previous write must have been collected by
        `send_done` (one write in flight per stream). False if the stream refused it."""
        return self._raw.start_send(data)

    def send_done(self, timeout: float = -1) -> int:
        """Collect the write in flight: 1 written (or none in flight), 0 the stream is broken or
        cancelled, -1 still going out after `timeout` seconds (if >= 0)."""
        return self._raw.send_done(timeout)

    def recv(self, timeout: float = -1) -> bytes | None:
        """The next message's bytes; None when the stream has ended. TimeoutError after `timeout` seconds
        (if >= 0) leaves the read pending: the next call goes on waiting for it."""
        return self._raw.recv(timeout)

    def cancel(self) -> None:
        """End the call (any thread): a blocked send or receive returns."""
        self._raw.cancel()


class ClientStream(_Stream):
    """One client stream to `method` (e.g. "/vmft.v1.Replication/Stream") at `target`: mutual TLS as
    `identity`, or plaintext only where `insecure` allows it on loopback (replica/tls.py's rule). Opening
    blocks until the request headers are sent (at most `timeout` seconds): call it off the event loop.

    `send` and `recv` block their caller without holding the interpreter lock; one thread may send while
    another receives. `cancel` is safe from any thread and makes both return."""

    def __init__(
        self,
        target: str,
        method: str,
        identity: tls.Identity | None,
        *,
        insecure: bool = False,
        timeout: float = 5.0,
    ) -> None:
        pems = _pems(target, identity, insecure)
        try:
            self._raw = cast(_RawStream, _extension().Stream(target, method, *pems, None, timeout))
        except ConnectionError as err:
            raise NativeStreamError(f"{target}: {err}") from err

    def done_writing(self) -> bool:
        """Half-close: no more messages from this side. False if the stream is broken or cancelled."""
        return self._raw.done_writing()

    def status(self, timeout: float = 1.0) -> str:
        """How the stream ended: "OK", or a status name and the server's details."""
        try:
            code, details = self._raw.status(timeout)
        except TimeoutError:
            return "not ended"
        name = _STATUS_NAMES.get(code, str(code))
        return f"{name}: {details}" if details and code else name


class ServerStream(_Stream):
    """The server's end of one stream (from `StreamServer.accept`): the same `start_send`, `send_done`,
    `recv` (None once the client half-closed or the call ended: `cancelled` says which) and `cancel` as a
    client's, then `finish` with a status."""

    def __init__(self, raw: _RawStream) -> None:
        self._raw = raw

    def finish(
        self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "", timeout: float = 1.0
    ) -> bool:
        """End the call with a status (collect any write in flight first). False if the client is gone."""
        return self._raw.finish(code.value[0], details, timeout)

    def cancelled(self) -> bool:
        """The call ended without a status from this side (the client cancelled, or its connection
        dropped); False while it goes on."""
        return bool(self._raw.ended(0))

    def peer(self) -> str:
        return self._raw.peer()

    def auth_context(self) -> dict[str, list[bytes]]:
        """The shape of grpc's `ServicerContext.auth_context()` (tls.peer_identity reads it)."""
        return self._raw.auth_context()


class StreamServer:
    """A server of one bidirectional-streaming `method` on `address` (port 0: any free one; `port` says
    which): mutual TLS as `identity` (clients must prove themselves with the same CA), or plaintext only
    where `insecure` allows it on loopback; messages of at most `max_message` bytes (0: gRPC's 4 MiB).
    Calls of other methods end UNIMPLEMENTED. One thread calls `accept`; `shutdown` (any thread) cancels
    the calls going on and makes `accept` return None."""

    def __init__(
        self,
        address: str,
        method: str,
        identity: tls.Identity | None,
        *,
        insecure: bool = False,
        max_message: int = 0,
    ) -> None:
        pems = _pems(address, identity, insecure)
        try:
            self._raw = cast(_RawServer, _extension().Server(address, method, *pems, max_message))
        except OSError as err:
            raise NativeStreamError(str(err)) from err
        self.port: int = self._raw.port

    def accept(self, timeout: float = -1) -> ServerStream | None:
        """The next call (TimeoutError after `timeout` seconds if >= 0); None once shut down."""
        raw = self._raw.accept(timeout)
        return None if raw is None else ServerStream(raw)

    def shutdown(self) -> None:
        self._raw.shutdown()
