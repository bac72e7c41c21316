"""`vmft ca`: the cluster CA and its certificates (replica/tls.py).

    vmft ca init DIR                                  a new cluster CA in DIR
    vmft ca issue node NAME --address A[,B] [--ca DIR]  a node certificate (DIR/nodes/NAME/)
    vmft ca issue admin NAME [--ca DIR]                an admin certificate (DIR/admins/NAME/)
    vmft ca show PATH                                  who a certificate (or identity directory) names

The CA directory defaults to $VMFT_CA or ./vmft-ca.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from replica import tls

DEFAULT_CA = "vmft-ca"


def _default_ca() -> str:
    return os.environ.get("VMFT_CA", DEFAULT_CA)


def add_commands(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the cluster CA: init, issue node/admin certificates, show")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    init = ca_sub.add_parser("init", help="create a new cluster CA in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--cluster", default="vmft", help="the cluster's name in the CA certificate")
    init.set_defaults(func=cmd_init)

    issue = ca_sub.add_parser("issue", help="issue a node or admin certificate")
    issue.add_argument("role", choices=[r.value for r in tls.Role])
    issue.add_argument("name", metavar="NAME")
    issue.add_argument("--ca", default=None, metavar="DIR", help="the CA directory ($VMFT_CA or ./vmft-ca)")
    issue.add_argument(
        "--address", default="", metavar="A[,B]",
        help="a node's IP addresses or DNS names for its certificate (loopback is always included)",
    )
    issue.add_argument("--days", type=int, default=tls.CERT_DAYS, help="validity in days")
    issue.set_defaults(func=cmd_issue)

    show = ca_sub.add_parser("show", help="show the name and role of a certificate or identity directory")
    show.add_argument("path", metavar="PATH")
    show.set_defaults(func=cmd_show)


def cmd_init(args: argparse.Namespace) -> int:
    d = tls.init_ca(args.dir, args.cluster)
    print(f"ca: cluster CA in {d} (keep {d / tls.CA_KEY} private)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    role = tls.Role(args.role)
    addresses = [a for a in args.address.split(",") if a]
    if role is tls.Role.ADMIN and addresses:
        print("ca: --address is for node certificates", file=sys.stderr)
        return 2
    ident = tls.issue(args.ca or _default_ca(), role, args.name, addresses, days=args.days)
    print(f"ca: {role.value} {ident.name}: {ident.directory} (cert.pem, key.pem, ca.crt)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.path)
    ident = tls.Identity.load(path if path.is_dir() else path.parent)
    print(f"{ident.role.value} {ident.name}")
    return 0
