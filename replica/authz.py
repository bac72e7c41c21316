"""Who may do what on a node: the checks a servicer makes on the caller's certificate.

- `require_admin`: control operations (protect, stop, fault, reprotect, migrate).
- `require_member`: node-to-node operations (checkpoint transfer, re-protection onto this node): a node
  certificate of the cluster CA whose name is a live member (replica/membership.py). A valid certificate
  of a node that left (or whose lease expired) is refused.
- `require_primary_of` (a handover) and `primary_of` (a replication stream, on its own C-core server:
  replica/replication.py): a node certificate naming the VM's current primary per the arbiter. A forged
  stream from anyone else (another node included) is refused before it can touch the backup.

Each `require_` returns the caller (`tls.Peer`) or ends the call: UNAUTHENTICATED without a certificate,
PERMISSION_DENIED otherwise (`primary_of` returns the refusal, `Denied`, for its caller to end the call).
On a plaintext (insecure, loopback-only) server there is no certificate to check and every caller
passes, as with `tls.requires`. Node names here are certificate names (CN), so nodes must claim and
register under the names their certificates carry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc

from replica import tls
from replica.arbiter import Arbiter
from replica.membership import Membership

log = logging.getLogger(__name__)

# A plaintext caller: nobody could be checked (tls.bind allows plaintext only on loopback).
ANONYMOUS = tls.Peer("anonymous", tls.Role.ADMIN)


def _plaintext(context: Any) -> bool:
    return bool(context.auth_context().get("transport_security_type") != [b"ssl"])


async def require_admin(context: Any) -> tls.Peer:
    if _plaintext(context):
        return ANONYMOUS
    return await tls.require_role(context, tls.Role.ADMIN)


async def require_member(context: Any, membership: Membership) -> tls.Peer:
    if _plaintext(context):
        return ANONYMOUS
    peer = await tls.require_role(context, tls.Role.NODE)
    if await membership.member(peer.name) is None:
        log.warning("refused node %s (%s): not a live member", peer.name, context.peer())
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {peer.name} is not a member")
    return peer


@dataclass(frozen=True)
class Denied:
    """Why a caller was refused, as the status its call ends with."""

    code: grpc.StatusCode
    why: str


async def primary_of(context: Any, arbiter: Arbiter, vm: str) -> Denied | None:
    """None if the caller (anything with grpc's `auth_context()` and `peer()`: a grpc.aio context, or a
    replication stream, replica/native_stream.py) is `vm`'s current primary per the arbiter, or the
    connection is plaintext; else why not."""
    if _plaintext(context):
        return None
    peer = tls.peer_identity(context)
    if peer is None:
        return Denied(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    if peer.role is not tls.Role.NODE:
        return Denied(
            grpc.StatusCode.PERMISSION_DENIED, f"{peer.role.value} {peer.name} may not do this (needs node)"
        )
    current = await asyncio.to_thread(arbiter.current, vm)
    if current is None or current.node != peer.name:
        owner = current.node if current else "nobody"
        return Denied(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{peer.name} is not the primary of {vm} (the arbiter says {owner})",
        )
    return None


async def require_primary_of(context: Any, arbiter: Arbiter, vm: str) -> tls.Peer:
    denied = await primary_of(context, arbiter, vm)
    if denied is not None:
        log.warning("refused %s: %s", context.peer(), denied.why)
        await context.abort(denied.code, denied.why)
    return tls.peer_identity(context) or ANONYMOUS
