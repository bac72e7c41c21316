"""HOST:PORT addresses: the one parser every command, server and client uses."""

from __future__ import annotations

from typing import NamedTuple

from monitor.errors import ConfigError


class AddressError(ConfigError, ValueError):
    """Text that is not HOST:PORT (a ValueError too, so argparse `type=` reports it as usage)."""

    hint = "write addresses as HOST:PORT, IPv6 hosts in brackets: [::1]:7000"


class Address(NamedTuple):
    host: str  # without brackets, also for IPv6
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_host: str | None = None) -> Address:
    """`HOST:PORT` or `[V6HOST]:PORT` (port 0..65535). An empty host is `default_host` where one is given."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"IPv6 hosts go in brackets ([::1]:7000), got {text!r}")
    if not host and default_host is not None:
        host = default_host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AddressError(f"expected HOST:PORT, got {text!r}")
    return Address(host, int(port))
