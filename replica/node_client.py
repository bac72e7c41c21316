"""How a client reaches the node API: its credentials (replica/tls.py) and a channel per call.

Every node serves mutual TLS unless it was started with `--insecure` (loopback only), so a client needs a
certificate of the cluster CA: an **admin** one for control operations (protect, stop, fault, reprotect),
any one for status. The command line takes `--ca DIR --identity NAME` (the identity DIR/admins/NAME or
DIR/nodes/NAME), or `--identity DIR` (an identity directory), defaulting to $VMFT_CA and $VMFT_IDENTITY;
`--insecure` talks plaintext to a loopback node.

In-process users that start their own nodes (replica/cluster.py) `remember` which credentials reach which
node address, so code that is only handed addresses (the fault catalogue, campaigns) finds them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from replica import tls


@dataclass(frozen=True)
class ClientAuth:
    """A client's credentials: an identity (mutual TLS), or none with `insecure` (plaintext, loopback)."""

    identity: tls.Identity | None
    insecure: bool = False

    def channel(self, address: str) -> grpc.Channel:
        """A synchronous channel to `address` (use it as a context manager)."""
        if self.identity is not None:
            return grpc.secure_channel(address, tls.channel_credentials(self.identity))
        tls.check_plaintext(address, self.insecure)
        return grpc.insecure_channel(address)

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        return tls.open_channel(address, self.identity, insecure=self.insecure)


def find_identity(identity: str | Path, ca: str | Path | None = None) -> tls.Identity:
    """An identity directory, or the identity NAME issued by the CA in `ca` (an admin before a node)."""
    path = Path(identity)
    if (path / tls.CERT).exists():
        return tls.Identity.load(path)
    if ca is not None:
        for kind in ("admins", "nodes"):
            candidate = Path(ca) / kind / str(identity)
            if (candidate / tls.CERT).exists():
                return tls.Identity.load(candidate)
    where = f" in the CA directory {ca}" if ca is not None else ""
    raise tls.TlsError(f"no identity {identity!r}{where} (an identity directory, or --ca DIR with a NAME)")


_known: dict[str, ClientAuth] = {}


def remember(address: str, auth: ClientAuth) -> None:
    """Credentials that reach the node at `address` (for callers that know only addresses)."""
    _known[address] = auth


def forget(address: str) -> None:
    _known.pop(address, None)


def for_address(address: str) -> ClientAuth:
    """The remembered credentials for `address`, else those of the environment."""
    return _known.get(address) or from_environment()


def from_environment() -> ClientAuth:
    """$VMFT_IDENTITY (a directory, or a NAME under $VMFT_CA); $VMFT_INSECURE=1 for plaintext."""
    identity = os.environ.get("VMFT_IDENTITY")
    if identity:
        return ClientAuth(find_identity(identity, os.environ.get("VMFT_CA")))
    if os.environ.get("VMFT_INSECURE") == "1":
        return ClientAuth(None, insecure=True)
    raise tls.TlsError(
        "no client certificate: give --identity (with --ca DIR) or set $VMFT_IDENTITY; "
        "--insecure only for a loopback node started with --insecure"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", default=None, metavar="DIR", help="the cluster CA directory ($VMFT_CA)")
    parser.add_argument(
        "--identity", default=None, metavar="NAME|DIR",
        help="the client certificate: NAME issued under --ca, or an identity directory ($VMFT_IDENTITY); "
        "control operations need an admin certificate",
    )  # fmt: skip
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, to a loopback node started with --insecure"
    )


def from_args(args: argparse.Namespace) -> ClientAuth:
    if args.insecure:
        return ClientAuth(None, insecure=True)
    identity = args.identity or os.environ.get("VMFT_IDENTITY")
    if identity:
        return ClientAuth(find_identity(identity, args.ca or os.environ.get("VMFT_CA")))
    return from_environment()
