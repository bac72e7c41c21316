"""Who may do what (replica/authz.py): a real grpc.aio server under mutual TLS, real etcd for membership
and the arbiter. The service is generic (raw bytes): Control needs an admin, Transfer a live member,
Replicate (request: the VM's name) the VM's current primary per the arbiter."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from replica import authz, tls
from replica.etcd_arbiter import EtcdArbiter
from replica.etcd_client import EtcdClient
from replica.etcd_server import EtcdCluster
from replica.membership import MemberInfo, Membership
from replica.tls import Identity, Role

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")

SERVICE = "vmft.test.Node"
DENIED = "PERMISSION_DENIED"


class Servicer:
    def __init__(self, membership: Membership, arbiter: EtcdArbiter) -> None:
        self.membership, self.arbiter = membership, arbiter

    async def control(self, request: bytes, context: Any) -> bytes:
        return (await authz.require_admin(context)).name.encode()

    async def transfer(self, request: bytes, context: Any) -> bytes:
        return (await authz.require_member(context, self.membership)).name.encode()

    async def replicate(self, request: bytes, context: Any) -> bytes:
        return (await authz.require_primary_of(context, self.arbiter, request.decode())).name.encode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tls.init_ca(tmp_path_factory.mktemp("ca"))
    for name in ("n1", "n2", "n3"):
        tls.issue(d, Role.NODE, name)
    tls.issue(d, Role.ADMIN, "alice")
    return d


def ident(ca: Path, name: str) -> Identity:
    return Identity.load(ca / ("admins" if name == "alice" else "nodes") / name)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path, 1) as cluster:
        yield cluster


@pytest.fixture
async def world(etcd: EtcdCluster, ca: Path) -> AsyncIterator[tuple[str, Membership, EtcdArbiter]]:
    """Node n1's service on loopback with mutual TLS; n2 a live member, n3 certified but not a member."""
    async with EtcdClient(etcd.endpoints) as client:
        membership = Membership(client)
        arbiter = EtcdArbiter(etcd.endpoints)
        reg = await membership.register(MemberInfo("n2", "127.0.0.1:1", memory_mib=64, max_vms=1), ttl_s=5)
        servicer = Servicer(membership, arbiter)
        srv = grpc.aio.server()
        srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Control": grpc.unary_unary_rpc_method_handler(servicer.control),
            "Transfer": grpc.unary_unary_rpc_method_handler(servicer.transfer),
            "Replicate": grpc.unary_unary_rpc_method_handler(servicer.replicate),
        })])
        port = tls.bind(srv, "127.0.0.1:0", ident(ca, "n1"))
        await srv.start()
        try:
            yield f"127.0.0.1:{port}", membership, arbiter
        finally:
            await srv.stop(None)
            await reg.close()
            await arbiter.aclose()


async def outcome(address: str, who: Identity, method: str, request: bytes = b"") -> str:
    """The caller's name as the server saw it, or the status code's name."""
    async with tls.open_channel(address, who) as ch:
        try:
            return bytes(await ch.unary_unary(f"/{SERVICE}/{method}")(request, timeout=5)).decode()
        except grpc.aio.AioRpcError as e:
            return e.code().name


async def test_control_needs_an_admin(world: tuple[str, Membership, EtcdArbiter], ca: Path) -> None:
    address, _, _ = world
    assert await outcome(address, ident(ca, "alice"), "Control") == "alice"
    assert await outcome(address, ident(ca, "n2"), "Control") == DENIED


async def test_transfers_only_from_live_members(world: tuple[str, Membership, EtcdArbiter], ca: Path) -> None:
    address, membership, _ = world
    assert await outcome(address, ident(ca, "n2"), "Transfer") == "n2"
    assert await outcome(address, ident(ca, "n3"), "Transfer") == DENIED, "certified, not a member"
    assert await outcome(address, ident(ca, "alice"), "Transfer") == DENIED, "admins are not nodes"
    reg = await membership.register(MemberInfo("n3", "127.0.0.1:2", memory_mib=64, max_vms=1), ttl_s=5)
    try:
        assert await outcome(address, ident(ca, "n3"), "Transfer") == "n3"
    finally:
        await reg.close()
    assert await outcome(address, ident(ca, "n3"), "Transfer") == DENIED, "it left"


async def test_replication_only_from_the_current_primary(
    world: tuple[str, Membership, EtcdArbiter], ca: Path
) -> None:
    """The audit's forged stream: any node could make the backup drop its primary. Now only the node
    the arbiter names as the VM's primary gets a stream in, and only while it is."""
    address, _, arbiter = world
    assert await outcome(address, ident(ca, "n2"), "Replicate", b"vm") == DENIED, "no primary yet"
    assert await arbiter.claim_async("vm", 1, "n2")
    assert await outcome(address, ident(ca, "n2"), "Replicate", b"vm") == "n2"
    assert await outcome(address, ident(ca, "n3"), "Replicate", b"vm") == DENIED
    assert await outcome(address, ident(ca, "alice"), "Replicate", b"vm") == DENIED
    assert await outcome(address, ident(ca, "n2"), "Replicate", b"other") == DENIED
    assert await arbiter.claim_async("vm", 2, "n3")  # a failover: n3 is the primary now
    assert await outcome(address, ident(ca, "n3"), "Replicate", b"vm") == "n3"
    assert await outcome(address, ident(ca, "n2"), "Replicate", b"vm") == DENIED, "deposed"
