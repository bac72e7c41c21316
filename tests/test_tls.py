"""Mutual TLS under a cluster CA (replica/tls.py, `vmft ca`): real grpc.aio servers and clients.

The service is a generic one (raw bytes, no proto): `Whoami` answers any authenticated caller with its
role and name, `AdminOnly` only an admin, `Watch` (a stream) only a node."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from replica import tls
from replica.cli import main as vmft
from replica.tls import Identity, Role, requires

SERVICE = "vmft.test.Guarded"


class Guarded:
    async def whoami(self, request: bytes, context: Any) -> bytes:
        peer = tls.peer_identity(context)
        return f"{peer.role.value} {peer.name}".encode() if peer else b"anonymous"

    @requires(Role.ADMIN)
    async def admin_only(self, request: bytes, context: Any) -> bytes:
        return b"done"

    @requires(Role.NODE)
    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield str(i).encode()


def handler(servicer: Guarded) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Whoami": grpc.unary_unary_rpc_method_handler(servicer.whoami),
        "AdminOnly": grpc.unary_unary_rpc_method_handler(servicer.admin_only),
        "Watch": grpc.unary_stream_rpc_method_handler(servicer.watch),
    })


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA with nodes n1, n2 and admin alice, made through the command line."""
    d = tmp_path_factory.mktemp("ca")
    assert vmft(["ca", "init", str(d)]) == 0
    assert vmft(["ca", "issue", "node", "n1", "--ca", str(d), "--address", "10.213.0.2"]) == 0
    assert vmft(["ca", "issue", "node", "n2", "--ca", str(d)]) == 0
    assert vmft(["ca", "issue", "admin", "alice", "--ca", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("other-ca")
    tls.init_ca(d, "other")
    tls.issue(d, Role.NODE, "n1")
    tls.issue(d, Role.ADMIN, "alice")
    return d


def ident(ca: Path, role: str, name: str) -> Identity:
    return Identity.load(ca / role / name)


@pytest.fixture
async def server(ca: Path) -> AsyncIterator[str]:
    """The guarded service served by n1 with mutual TLS on loopback; its address."""
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers([handler(Guarded())])
    port = tls.bind(srv, "127.0.0.1:0", ident(ca, "nodes", "n1"))
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


async def call(channel: grpc.aio.Channel, method: str) -> bytes:
    fn = channel.unary_unary(f"/{SERVICE}/{method}")
    return bytes(await fn(b"", timeout=5))


async def code_of(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    try:
        await call(channel, method)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_ca_files_and_roles(ca: Path) -> None:
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600
    n1, alice = ident(ca, "nodes", "n1"), ident(ca, "admins", "alice")
    assert (n1.name, n1.role, alice.name, alice.role) == ("n1", Role.NODE, "alice", Role.ADMIN)
    assert stat.S_IMODE(os.stat(n1.key).st_mode) == 0o600
    assert not (n1.directory / "ca.key").exists(), "the CA key never leaves the CA directory"
    with pytest.raises(tls.TlsError):
        tls.init_ca(ca)  # never overwrite a CA
    with pytest.raises(tls.TlsError):
        tls.issue(ca, Role.NODE, "n1")  # nor an issued identity
    for bad in ("../evil", "", "a/b", "-x"):
        with pytest.raises(tls.ConfigError):
            tls.issue(ca, Role.NODE, bad)
    assert vmft(["ca", "issue", "node", "../escape", "--ca", str(ca)]) != 0
    assert not (ca / "escape").exists() and not (ca.parent / "escape").exists()


async def test_node_and_admin_roles(server: str, ca: Path) -> None:
    async with tls.open_channel(server, ident(ca, "nodes", "n2")) as ch:
        assert await call(ch, "Whoami") == b"node n2"
        assert await code_of(ch, "AdminOnly") == grpc.StatusCode.PERMISSION_DENIED
        assert [bytes(x) async for x in ch.unary_stream(f"/{SERVICE}/Watch")(b"", timeout=5)] == [
            b"0", b"1", b"2"]
    async with tls.open_channel(server, ident(ca, "admins", "alice")) as ch:
        assert await call(ch, "Whoami") == b"admin alice"
        assert await call(ch, "AdminOnly") == b"done"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [x async for x in ch.unary_stream(f"/{SERVICE}/Watch")(b"", timeout=5)]
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unauthenticated_clients_are_refused(server: str, ca: Path) -> None:
    # Plaintext to a TLS port: no handshake, no call.
    async with grpc.aio.insecure_channel(server) as ch:
        assert await code_of(ch, "Whoami") == grpc.StatusCode.UNAVAILABLE
    # TLS that trusts the CA but shows no client certificate.
    creds = grpc.ssl_channel_credentials(root_certificates=(ca / "ca.crt").read_bytes())
    async with grpc.aio.secure_channel(server, creds) as ch:
        assert await code_of(ch, "Whoami") == grpc.StatusCode.UNAVAILABLE


async def test_another_cas_certificates_are_refused(server: str, ca: Path, other_ca: Path) -> None:
    # A client certificate from another CA, same names and roles: refused by the server.
    for role, name in (("nodes", "n1"), ("admins", "alice")):
        async with tls.open_channel(server, ident(other_ca, role, name)) as ch:
            assert await code_of(ch, "AdminOnly") == grpc.StatusCode.UNAVAILABLE
    # A server with another CA's certificate: refused by our client (it cannot pose as node n1).
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers([handler(Guarded())])
    port = tls.bind(srv, "127.0.0.1:0", ident(other_ca, "nodes", "n1"))
    await srv.start()
    try:
        async with tls.open_channel(f"127.0.0.1:{port}", ident(ca, "admins", "alice")) as ch:
            assert await code_of(ch, "Whoami") == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(None)


async def test_a_client_can_insist_on_the_node_it_meant(server: str, ca: Path) -> None:
    """The server at this address is n1: a client that expects n2 there refuses it."""
    async with tls.open_channel(server, ident(ca, "admins", "alice"), expect_node="n1") as ch:
        assert await call(ch, "Whoami") == b"admin alice"
    async with tls.open_channel(server, ident(ca, "admins", "alice"), expect_node="n2") as ch:
        assert await code_of(ch, "Whoami") == grpc.StatusCode.UNAVAILABLE


async def test_an_admin_certificate_cannot_serve_as_a_node(ca: Path) -> None:
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers([handler(Guarded())])
    port = tls.bind(srv, "127.0.0.1:0", ident(ca, "admins", "alice"))
    await srv.start()
    try:
        async with tls.open_channel(f"127.0.0.1:{port}", ident(ca, "nodes", "n2"), expect_node="alice") as ch:
            assert await code_of(ch, "Whoami") == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(None)


async def test_plaintext_only_with_the_flag_and_only_on_loopback() -> None:
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers([handler(Guarded())])
    with pytest.raises(tls.TlsError):
        tls.bind(srv, "127.0.0.1:0", None)  # no certificate and no --insecure
    for address in ("0.0.0.0:0", "[::]:0", "10.213.0.2:0", "example.org:0", ":0"):
        with pytest.raises(tls.TlsError):
            tls.bind(srv, address, None, insecure=True)
        with pytest.raises(tls.TlsError):
            tls.open_channel(address, None, insecure=True)
    port = tls.bind(srv, "127.0.0.1:0", None, insecure=True)
    await srv.start()
    try:
        async with tls.open_channel(f"127.0.0.1:{port}", None, insecure=True) as ch:
            assert await call(ch, "Whoami") == b"anonymous"
    finally:
        await srv.stop(None)


def test_loopback_addresses() -> None:
    for a in ("127.0.0.1:5", "127.9.9.9:5", "[::1]:5", "localhost:5", "unix:/tmp/s"):
        assert tls.is_loopback(a), a
    for a in ("0.0.0.0:5", "[::]:5", "192.0.2.2:5", "localhost.example.org:5", ":5", "[::ffff:10.0.0.1]:5"):
        assert not tls.is_loopback(a), a
