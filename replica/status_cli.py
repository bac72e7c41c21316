"""`vmft status` beyond the per-node table: the cluster as etcd sees it (`--etcd`: members and the arbiter's
claims, and every member's node asked for its VMs) and a machine-readable form (`--json`)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from proto import vmft_pb2, vmft_pb2_grpc
from replica import tls
from replica.etcd_arbiter import EtcdArbiter
from replica.etcd_client import EtcdClient
from replica.membership import Membership, info_dict
from replica.node_client import ClientAuth


async def _from_etcd(endpoints: list[str], auth: ClientAuth) -> dict[str, Any]:
    credentials = tls.channel_credentials(auth.identity) if auth.identity is not None else None
    client = EtcdClient(endpoints, credentials=credentials)
    arbiter = EtcdArbiter(endpoints, credentials=credentials)
    try:
        members = await Membership(client).members()
        claims = await arbiter.claims_async()
    finally:
        await client.close()
        await arbiter.aclose()
    return {"members": [info_dict(m) for m in members], "claims": [asdict(c) for c in claims]}


def cluster_view(endpoints: list[str], auth: ClientAuth) -> dict[str, Any]:
    """Members and claims from etcd (EtcdError if etcd does not answer)."""
    return asyncio.run(_from_etcd(endpoints, auth))


def node_view(address: str, auth: ClientAuth) -> dict[str, Any]:
    """One node's status as a dict (`error` instead when it does not answer)."""
    with auth.channel(address) as channel:
        try:
            status = vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=5)
        except grpc.RpcError as err:
            return {"address": address, "error": err.code().name}
    return {"address": address, **MessageToDict(status, preserving_proto_field_name=True)}


def print_json(view: dict[str, Any]) -> None:
    print(json.dumps(view, indent=2, sort_keys=True))
