"""etcd for tests: a one-member etcd serving mutual TLS under a cluster CA made in the test's directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from replica import tls
from replica.etcd_server import EtcdCluster, EtcdTls


@contextlib.contextmanager
def etcd_under_ca(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A cluster CA in tmp_path and a one-member etcd serving mutual TLS under it: (the CA directory,
    etcd's endpoints); etcd stopped at the end."""
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    member = tls.issue(ca, tls.Role.NODE, "etcd-m0")
    etcd = EtcdCluster(tmp_path / "etcd", 1, tls=[EtcdTls(ca=member.ca, cert=member.cert, key=member.key)])
    try:
        etcd.start(credentials=tls.channel_credentials(member))
        yield ca, etcd.endpoints
    finally:
        etcd.stop()
