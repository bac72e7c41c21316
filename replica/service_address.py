"""A service address that moves with a VM's primary: one IP on the hosts' network for the VM's clients.

The node running a VM's primary holds the VM's `moving_address` (VmSpec, "IP/PREFIX") on its interface
in that subnet; the VM's service listens on it. When a backup goes live (vm_core.GoLive), its node adds
the address first and announces it with gratuitous ARP, so the bridge and every neighbour's ARP cache
send the address's packets to the new primary's host at once; clients reconnect to the same address.

An address is added with a lifetime (`valid_lft`) and renewed while this node's VM is a running primary,
so a node that dies outright (SIGKILL, a hung process: nobody left to remove it) loses the address on its
own within `lifetime_s` and cannot keep answering ARP for it beside the new primary. A node whose VM is
fenced, stopped or handed over drops it at the next renewal round. Needs CAP_NET_ADMIN and CAP_NET_RAW
(root).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
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

    hint = "a moving address needs root (CAP_NET_ADMIN, CAP_NET_RAW) and an interface in its subnet"


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


# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h): addresses are added, renewed, listed
# and removed with one netlink request each, in well under a millisecond; spawning `ip` took about 30 ms
# of a failover here.
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x100, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO = 1, 2, 6
IFA_F_SECONDARY = 0x01
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTA = struct.Struct("=HH")  # length, type
_CACHEINFO = struct.Struct("=IIII")  # preferred, valid (seconds), created, updated


@dataclass(frozen=True)
class HostAddress:
    """One IPv4 address of this network namespace, as the kernel lists it."""

    ip: ipaddress.IPv4Address
    prefix_len: int
    index: int  # the interface's index
    secondary: bool


def _attr(kind: int, payload: bytes) -> bytes:
    data = _RTA.pack(_RTA.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while len(data) >= _RTA.size:
        length, kind = _RTA.unpack_from(data)
        if length < _RTA.size:
            break
        out[kind] = data[_RTA.size : length]
        data = data[(length + 3) & ~3 :]
    return out


def _netlink(kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
    """One rtnetlink request; the messages of its answer (a dump's, or none for an acknowledged change).
    AddressError with the kernel's reason if it refused, or if the socket failed."""
    try:
        return _netlink_exchange(kind, flags, body)
    except OSError as err:
        raise AddressError(f"netlink request {kind}: {err}") from err


def _netlink_exchange(kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(IP_TIMEOUT_S)
        sock.bind((0, 0))
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(65536)
            while len(data) >= _NLMSG.size:
                length, reply, _, _, _ = _NLMSG.unpack_from(data)
                payload, data = data[_NLMSG.size : length], data[(length + 3) & ~3 :]
                if reply == NLMSG_DONE:
                    return out
                if reply == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", payload)[0]
                    if errno:
                        raise AddressError(f"netlink request {kind}: {os.strerror(errno)}")
                    return out  # the acknowledgement of a change
                out.append((reply, payload))


def host_addresses() -> list[HostAddress]:
    """Every IPv4 address of this network namespace."""
    out = []
    for kind, payload in _netlink(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
        if kind != RTM_NEWADDR or len(payload) < _IFADDRMSG.size:
            continue
        family, prefix_len, flags, _, index = _IFADDRMSG.unpack_from(payload)
        attrs = _attrs(payload[_IFADDRMSG.size :])
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if family == socket.AF_INET and raw is not None and len(raw) == 4:
            ip = ipaddress.IPv4Address(raw)
            out.append(HostAddress(ip, prefix_len, index, bool(flags & IFA_F_SECONDARY)))
    return out


def _address_message(address: MovingAddress, index: int, lifetime_s: int | None = None) -> bytes:
    body = _IFADDRMSG.pack(socket.AF_INET, address.prefix_len, 0, 0, index)
    body += _attr(IFA_LOCAL, address.ip.packed) + _attr(IFA_ADDRESS, address.ip.packed)
    if lifetime_s is not None:
        body += _attr(IFA_CACHEINFO, _CACHEINFO.pack(lifetime_s, lifetime_s, 0, 0))
    return body


def add_address(address: MovingAddress, index: int, lifetime_s: int) -> None:
    """Add `address` on interface `index` valid for `lifetime_s`, or give it that lifetime again."""
    message = _address_message(address, index, lifetime_s)
    _netlink(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, message)


def remove_address(address: MovingAddress, index: int) -> None:
    _netlink(RTM_DELADDR, NLM_F_ACK, _address_message(address, index))


def interface_for(address: MovingAddress) -> tuple[int, str]:
    """The interface (index, name) of this network namespace that has its own, other, address in
    `address`'s subnet."""
    network = ipaddress.IPv4Network(f"{address.ip}/{address.prefix_len}", strict=False)
    for held in host_addresses():
        if held.ip != address.ip and held.ip in network and not held.secondary:
            return held.index, socket.if_indextoname(held.index)
    raise AddressError(f"no interface of this host is in {network} (for the moving address {address})")


def arp_announcement(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request (what `arping -U` sends): sender and target are both `ip`, broadcast, so
    every neighbour that knows `ip` updates its cache to `mac`, and the bridge learns where `mac` is."""
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def packet_socket(interface: str) -> socket.socket:
    """A raw packet socket on `interface` for sending only (protocol 0: it receives nothing). Keep it:
    closing a packet socket waits for the kernel's network RCU grace period (8 ms here; one opened for ARP
    and closed per announcement cost 27 ms of a failover)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((interface, 0))
    except OSError as err:
        sock.close()
        raise AddressError(f"raw socket on {interface}: {err}") from err
    return sock


def announce(sock: socket.socket, ip: ipaddress.IPv4Address, count: int = 2) -> None:
    """Send `count` gratuitous ARPs for `ip` through `sock` (packet_socket), from its interface's MAC."""
    frame = arp_announcement(bytes(sock.getsockname()[4]), ip)
    try:
        for _ in range(count):
            sock.send(frame)
    except OSError as err:
        raise AddressError(f"gratuitous ARP for {ip}: {err}") from err


class ServiceAddresses:
    """The moving addresses this node holds, by VM name. Calls are netlink requests, each well under a
    millisecond: they run on the event loop."""

    def __init__(self, lifetime_s: int = 3, repeat_after_s: float = 0.05) -> None:
        self.lifetime_s = lifetime_s
        self.repeat_after_s = repeat_after_s  # one more announcement then, in case a frame was lost
        self.held: dict[str, tuple[MovingAddress, int]] = {}  # vm -> (address, interface index)
        self._sockets: dict[str, socket.socket] = {}  # interface -> its packet socket (kept open)

    async def take_over(self, vm: str, text: str) -> None:
        """Hold `text` ("IP/PREFIX") for `vm` on this host and announce it (before the VM binds it)."""
        address = MovingAddress.parse(text)
        index, interface = interface_for(address)
        add_address(address, index, self.lifetime_s)
        self.held[vm] = (address, index)
        sock = self._sockets.get(interface)
        if sock is None:
            sock = self._sockets[interface] = packet_socket(interface)
        announce(sock, address.ip)
        asyncio.get_running_loop().call_later(self.repeat_after_s, self._announce_again, sock, address.ip)
        log.warning("%s: service address %s taken on %s", vm, address, interface)

    async def release(self, vm: str) -> None:
        held = self.held.pop(vm, None)
        if held is None:
            return
        address, index = held
        try:
            remove_address(address, index)
        except AddressError as err:
            log.info("%s: removing %s: %s (it may have expired)", vm, address, err)
        log.warning("%s: service address %s released", vm, address)

    async def keep(self, wanted: set[str]) -> None:
        """Renew the addresses of the VMs in `wanted` (this node runs their primaries); release the rest.
        An address that expired meanwhile (the node was stopped, or stalled, past its lifetime) is not
        brought back silently: it is forgotten, and the caller decides whether to take it over again
        (with the arbiter's word and an announcement)."""
        for vm in [vm for vm in self.held if vm not in wanted]:
            await self.release(vm)
        if not self.held:
            return
        present = {(a.ip, a.index) for a in host_addresses()}
        for vm, (address, index) in list(self.held.items()):
            if (address.ip, index) not in present:
                log.error("%s: service address %s expired on this host", vm, address)
                del self.held[vm]
                continue
            try:
                add_address(address, index, self.lifetime_s)
            except AddressError as err:
                log.error("%s: cannot renew the service address %s: %s", vm, address, err)

    def _announce_again(self, sock: socket.socket, ip: ipaddress.IPv4Address) -> None:
        if sock.fileno() >= 0:
            try:
                announce(sock, ip, count=1)
            except AddressError as err:
                log.warning("%s", err)

    async def close(self) -> None:
        for vm in list(self.held):
            await self.release(vm)
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
