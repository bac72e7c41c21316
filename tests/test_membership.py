"""Membership on a real etcd (replica/membership.py): nodes register with their capacity under a lease,
a node whose lease expires disappears, and a node that cannot renew knows it is no longer a member."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from replica.etcd_client import EtcdClient
from replica.etcd_server import EtcdCluster
from replica.membership import MemberInfo, Membership

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path, 1) as cluster:
        yield cluster


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd.endpoints) as c:
        yield c


async def wait_for(cond_async, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await cond_async():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_members_register_with_capacity_and_leave(client: EtcdClient) -> None:
    ms = Membership(client)
    a = await ms.register(MemberInfo("a", "10.0.0.1:7000", memory_mib=1024, max_vms=4), ttl_s=2)
    b = await ms.register(MemberInfo("b", "10.0.0.2:7000", memory_mib=2048, max_vms=1, vms=1), ttl_s=2)
    try:
        members = await ms.members()
        assert [m.name for m in members] == ["a", "b"]
        assert members[1].memory_mib == 2048 and members[1].address == "10.0.0.2:7000"
        # b has more memory but no VM slot left: a is picked.
        picked = await ms.pick(512)
        assert picked is not None and picked.name == "a"
        assert await ms.pick(4096) is None
        assert await ms.pick(512, exclude={"a"}) is None
        # Renewals keep both registered past their two-second TTL.
        await asyncio.sleep(2.5)
        assert [m.name for m in await ms.members()] == ["a", "b"] and a.alive and b.alive
        busier = MemberInfo("a", "10.0.0.1:7000", memory_mib=1024, max_vms=4, vms=1, memory_used_mib=256)
        await a.update(busier)
        got = await ms.member("a")
        assert got is not None and got.vms == 1 and got.memory_free_mib == 768
        await b.close()
        assert [m.name for m in await ms.members()] == ["a"], "a node that leaves is gone at once"
        assert not b.alive
    finally:
        await a.close()
        await b.close()


async def test_an_expired_lease_drops_the_member(client: EtcdClient) -> None:
    ms = Membership(client)
    a = await ms.register(MemberInfo("a", "x:1", memory_mib=1, max_vms=1), ttl_s=1)
    b = await ms.register(MemberInfo("b", "y:1", memory_mib=1, max_vms=1), ttl_s=1)
    try:
        await a.stop_renewing()  # what a crashed node looks like from etcd
        assert await wait_for(lambda: _names_are(ms, ["b"]), timeout_s=5.0), "a's lease never expired"
        assert b.alive, "b, still renewing, stays"
    finally:
        await a.close()
        await b.close()


async def _names_are(ms: Membership, names: list[str]) -> bool:
    return [m.name for m in await ms.members()] == names


# A node process that registers, says so, and renews until it is killed.
NODE = textwrap.dedent(
    """
    import asyncio, sys
    from replica.etcd_client import EtcdClient
    from replica.membership import MemberInfo, Membership
    async def main():
        async with EtcdClient(sys.argv[1].split(",")) as client:
            info = MemberInfo(sys.argv[2], "z:1", memory_mib=64, max_vms=2)
            await Membership(client).register(info, ttl_s=1)
            print("registered", flush=True)
            await asyncio.sleep(60)
    asyncio.run(main())
    """
)


async def test_a_killed_node_disappears(etcd: EtcdCluster, client: EtcdClient) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NODE, ",".join(etcd.endpoints), "n1", stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"registered\n"
        ms = Membership(client)
        assert await _names_are(ms, ["n1"])
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        assert await wait_for(lambda: _names_are(ms, []), timeout_s=5.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_node_cut_from_etcd_knows_its_lease_is_gone(etcd: EtcdCluster, client: EtcdClient) -> None:
    """etcd fences nobody: the node itself must see its deadline pass when renewals stop getting through."""
    reg = await Membership(client).register(MemberInfo("a", "x:1", memory_mib=1, max_vms=1), ttl_s=1)
    etcd.pause(0)  # renewals get no answer
    try:
        await asyncio.wait_for(reg.lost.wait(), timeout=3.0)
        assert not reg.alive
        assert time.monotonic() >= reg.valid_until
    finally:
        etcd.resume(0)
        await reg.stop_renewing()


async def test_registrations_survive_a_dead_member(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path, 3) as etcd:
        async with EtcdClient(etcd.endpoints, attempt_timeout_s=0.3) as client:
            ms = Membership(client)
            reg = await ms.register(MemberInfo("a", "x:1", memory_mib=1, max_vms=1), ttl_s=2)
            try:
                etcd.kill(0)
                await asyncio.sleep(3.0)  # more than the TTL: only renewals through members 1 and 2 keep it
                assert reg.alive and await _names_are(ms, ["a"])
            finally:
                await reg.close()
