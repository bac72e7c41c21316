"""A service address that moves with a VM's primary: one IP on the hosts' network for the VM's clients.

The node running a VM's primary holds the VM's `moving_address` (VmSpec, "IP/PREFIX") on its interface
in that subnet; the VM's service listens on it. When a backup goes live (vm_core.GoLive), its node adds
the address first and announces it with gratuitous ARP, so the bridge and every neighbour's ARP cache
send the address's packets to the new primary's host at once; clients reconnect to the same address.

An address is added with a lifetime (`valid_lft`) and renewed while this node's VM is a running primary,
so a node that dies outright (SIGKILL, a hung process: nobody left to remove it) loses the address on its
own within `lifetime_s` and cannot keep answering ARP for it beside the new primary. A node whose VM is
fenced, stopped or handed over drops it at the next renewal round. Needs CAP_NET_ADMIN (root) and `ip`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import struct
from dataclasses import dataclass

from monitor.errors import HostError

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
IP_TIMEOUT_S = 5.0


class AddressError(HostError):
    """A service address could not be parsed, added, announced or removed."""

    hint = "a moving address needs root (CAP_NET_ADMIN), the ip tool, and an interface in its subnet"


@dataclass(frozen=True)
class MovingAddress:
    ip: ipaddress.IPv4Address
    prefix_len: int

    @classmethod
    def parse(cls, text: str) -> MovingAddress:
        try:
            iface = ipaddress.IPv4Interface(text)
        except ValueError as err:
            raise AddressError(f"bad moving address {text!r}: give IPv4/PREFIX ({err})") from None
        if "/" not in text:
            raise AddressError(f"bad moving address {text!r}: give IPv4/PREFIX")
        if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified:
            raise AddressError(f"moving address {text}: not a unicast address")
        return cls(iface.ip, iface.network.prefixlen)

    def __str__(self) -> str:
        return f"{self.ip}/{self.prefix_len}"


async def _ip(*args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as err:
        raise AddressError(f"ip {' '.join(args)}: {err}") from err
    try:
        out, errors = await asyncio.wait_for(proc.communicate(), IP_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AddressError(f"ip {' '.join(args)}: no answer in {IP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise AddressError(f"ip {' '.join(args)}: {errors.decode(errors='replace').strip()}")
    return out.decode()


async def interface_for(address: MovingAddress) -> str:
    """The interface of this network namespace with its own (other) address in `address`'s subnet."""
    network = ipaddress.IPv4Network(f"{address.ip}/{address.prefix_len}", strict=False)
    for link in json.loads(await _ip("-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            local = ipaddress.IPv4Address(info.get("local", "0.0.0.0"))
            if local != address.ip and local in network and not info.get("secondary"):
                return str(link["ifname"])
    raise AddressError(f"no interface of this host is in {network} (for the moving address {address})")


def arp_announcement(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request (what `arping -U` sends): sender and target are both `ip`, broadcast, so
    every neighbour that knows `ip` updates its cache to `mac`, and the bridge learns where `mac` is."""
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def announce(interface: str, ip: ipaddress.IPv4Address, count: int = 2) -> None:
    """Send `count` gratuitous ARPs for `ip` on `interface` (a raw packet socket: needs CAP_NET_RAW)."""
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((interface, ETH_P_ARP))
            mac = sock.getsockname()[4]  # the interface's own hardware address
            frame = arp_announcement(bytes(mac), ip)
            for _ in range(count):
                sock.send(frame)
    except OSError as err:
        raise AddressError(f"gratuitous ARP for {ip} on {interface}: {err}") from err


class ServiceAddresses:
    """The moving addresses this node holds, by VM name."""

    def __init__(self, lifetime_s: float = 3.0) -> None:
        self.lifetime_s = lifetime_s
        self.held: dict[str, tuple[MovingAddress, str]] = {}  # vm -> (address, interface)
        self._lock = asyncio.Lock()  # one change of the host's addresses at a time

    async def take_over(self, vm: str, text: str) -> None:
        """Hold `text` ("IP/PREFIX") for `vm` on this host and announce it (before the VM binds it)."""
        address = MovingAddress.parse(text)
        async with self._lock:
            interface = await interface_for(address)
            await self._add(address, interface)
            announce(interface, address.ip)
            self.held[vm] = (address, interface)
        log.warning("%s: service address %s taken on %s", vm, address, interface)

    async def _add(self, address: MovingAddress, interface: str, renew: bool = False) -> None:
        """Add the address with its lifetime; `renew`: only extend the lifetime of one still there (an
        expired address is not brought back silently: a node that lost it takes it over again, with the
        arbiter's word and an announcement, or not at all)."""
        life = str(max(1, round(self.lifetime_s)))
        verb = "change" if renew else "replace"
        await _ip("addr", verb, str(address), "dev", interface, "valid_lft", life, "preferred_lft", life)

    async def release(self, vm: str) -> None:
        async with self._lock:
            held = self.held.pop(vm, None)
            if held is None:
                return
            address, interface = held
            try:
                await _ip("addr", "del", str(address), "dev", interface)
            except AddressError as err:
                log.info("%s: %s (it may have expired)", vm, err)
        log.warning("%s: service address %s released", vm, address)

    async def keep(self, wanted: set[str]) -> None:
        """Renew the addresses of the VMs in `wanted` (this node runs their primaries); release the rest.
        An address that expired meanwhile (the node was stopped, or stalled, longer than its lifetime)
        is forgotten: the caller decides whether to take it over again."""
        for vm in [vm for vm in self.held if vm not in wanted]:
            await self.release(vm)
        async with self._lock:
            for vm, (address, interface) in list(self.held.items()):
                try:
                    await self._add(address, interface, renew=True)
                except AddressError as err:
                    log.error("%s: service address %s lost: %s", vm, address, err)
                    del self.held[vm]

    async def close(self) -> None:
        for vm in list(self.held):
            await self.release(vm)
