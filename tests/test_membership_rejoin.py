"""A node whose membership lease lapsed while etcd did not answer registers again once it does
(replica/node_etcd.py). Before, it stayed out of the membership for good while running: a re-protection
onto it was refused as "not a live member" (seen in `vmft chaos --hosts 3` after partitions)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from replica.etcd_client import EtcdClient
from replica.etcd_server import EtcdCluster
from replica.membership import Membership
from replica.node import NodeLimits
from replica.node_etcd import NodeMembership
from replica.vm_common import NodeSettings

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")


async def names(client: EtcdClient) -> list[str]:
    return sorted(m.name for m in await Membership(client).members())


async def until(what: str, check: object, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {limit_s} s")


async def test_a_lapsed_node_registers_again(tmp_path: Path) -> None:
    etcd = await asyncio.to_thread(EtcdCluster(tmp_path / "etcd", 1).start)
    try:
        settings = NodeSettings(name="127.0.0.1:1", data_dir=tmp_path, insecure=True)
        node = NodeMembership(settings, etcd.endpoints, lambda: (0, 0), NodeLimits())
        async with EtcdClient(etcd.endpoints) as client:
            await node.start(ttl_s=1)
            try:
                assert await names(client) == ["127.0.0.1:1"]
                first = node.registration
                assert first is not None
                etcd.pause(0)  # renewals get no answer: the lease lapses (TTL 1 s)
                try:
                    await asyncio.wait_for(first.lost.wait(), timeout=5.0)
                finally:
                    etcd.resume(0)
                # (Right after the pause etcd may not have expired the old lease yet: wait for the new one.)
                await until("the node registered again", lambda: _again(node, first), 10)
                await until("the node listed again", lambda: _registered(client), 10)
            finally:
                await node.close()
            assert await names(client) == []
    finally:
        await asyncio.to_thread(etcd.stop)


async def _again(node: NodeMembership, first: object) -> bool:
    return node.registration is not first and node.registration is not None and node.registration.alive


async def _registered(client: EtcdClient) -> bool:
    return await names(client) == ["127.0.0.1:1"]
