"""A service address that moves (replica/service_address.py): two `vmft node` processes, each on its own
namespace host (replica/hosts.py), serve one kv VM at one address on the hosts' bridge. A client outside
both hosts uses only that address; the primary's node is SIGKILLed; the client reconnects to the same
address and reads what it wrote, from the backup's host, which now holds the address. The dead node's
address expires by itself (its lifetime), since nobody is left to remove it."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from monitor.loader import load_image_file
from proto import vmft_pb2, vmft_pb2_grpc
from replica import hosts, tls
from replica.hosts import HostNetwork
from replica.kv_client import KvClientSync
from replica.node_client import ClientAuth
from replica.service_address import AddressError, MovingAddress, arp_announcement

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"
NODE_PORT, SERVICE_PORT = 7000, 7100


def test_moving_addresses_parse_and_refuse_what_cannot_move() -> None:
    address = MovingAddress.parse("10.213.4.200/24")
    assert address.ip == ipaddress.IPv4Address("10.213.4.200") and address.prefix_len == 24
    assert str(address) == "10.213.4.200/24"
    for bad in ("10.213.4.200", "127.0.0.5/8", "0.0.0.0/0", "fe80::1/64", "host/24", "224.0.0.1/4"):
        with pytest.raises(AddressError):
            MovingAddress.parse(bad)


def test_the_announcement_is_a_gratuitous_arp_request() -> None:
    mac, ip = bytes.fromhex("020000aabbcc"), ipaddress.IPv4Address("10.213.4.200")
    frame = arp_announcement(mac, ip)
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert frame[22:28] == mac and frame[28:32] == ip.packed  # sender: this host's MAC, the address
    assert frame[38:42] == ip.packed  # target: the address itself (gratuitous)


def _has_address(net: HostNetwork, host: str, ip: str) -> bool:
    done = net.run(host, ["ip", "-4", "-o", "addr", "show"])
    return f" {ip}/" in done.stdout


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _status(auth: ClientAuth, address: str) -> vmft_pb2.NodeStatus | None:
    with auth.channel(address) as channel:
        try:
            status: vmft_pb2.NodeStatus = vmft_pb2_grpc.NodeStub(channel).Status(
                vmft_pb2.StatusRequest(), timeout=1.0
            )
            return status
        except grpc.RpcError:
            return None


def _role(auth: ClientAuth, address: str, vm: str) -> int | None:
    status = _status(auth, address)
    found = [v for v in status.vms if v.name == vm] if status is not None else []
    return found[0].role if found else None


@pytest.mark.kvm
@pytest.mark.timeout(180)
def test_a_client_keeps_one_address_across_a_failover(tmp_path: Path) -> None:
    reason = hosts.available()
    if reason is not None:
        pytest.skip(reason)
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    auth = ClientAuth(tls.issue(ca, tls.Role.ADMIN, "admin"))
    with HostNetwork(tmp_path / "hosts", root_address=True) as net:
        nodes: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        for name in ("a", "b"):
            host = net.add(name)
            identity = tls.issue(ca, tls.Role.NODE, f"node-{name}", addresses=[host.address])
            listen = f"{host.address}:{NODE_PORT}"
            with open(tmp_path / f"{name}.log", "wb") as log:
                proc = net.spawn(name, [
                    sys.executable, "-m", "replica.cli", "node", "--listen", listen,
                    "--data-dir", str(host.data_dir), "--arbiter", str(tmp_path / "arbiter.sqlite"),
                    "--cert", str(identity.directory), "--auto-reprotect", "0",
                ], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
            nodes[name] = (listen, proc)
        for name, (listen, proc) in nodes.items():
            def up(listen: str = listen, proc: subprocess.Popen[bytes] = proc) -> bool:
                return proc.poll() is None and _status(auth, listen) is not None

            _wait(up, 30, f"node {name} up")

        ip = str(net.subnet.network_address + 200)  # on the bridge's subnet, held by no host yet
        service = f"{ip}:{SERVICE_PORT}"
        image = load_image_file(KV)
        spec = vmft_pb2.VmSpec(
            name="vm1", image=image.data, image_sha256=image.sha256, mem_mib=64, hang_timeout_s=2.0,
            moving_address=f"{ip}/{net.subnet.prefixlen}",
        )  # fmt: skip
        (a_node, a_proc), (b_node, _) = nodes["a"], nodes["b"]
        request = vmft_pb2.ProtectRequest(
            spec=spec, backup_node=b_node, service=service, backup_service=service
        )
        with auth.channel(a_node) as channel:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=30)
        _wait(lambda: _role(auth, b_node, "vm1") == vmft_pb2.ROLE_BACKUP, 20, "backup replaying")
        assert _has_address(net, "a", ip) and not _has_address(net, "b", ip)

        with KvClientSync([service], "mover", timeout=2.0, total_timeout=30.0) as kv:
            kv.set("greeting", "hello")
            assert kv.incr("n", 5) == 5
            a_proc.kill()  # the primary's node dies outright: its host keeps the address, for now
            a_proc.wait(timeout=10)
            # The same address, now served from b: everything acknowledged is there.
            assert kv.get("greeting") == "hello"
            assert kv.incr("n", 1) == 6
            assert kv.client.reconnects >= 1
        assert _role(auth, b_node, "vm1") == vmft_pb2.ROLE_PRIMARY
        assert _has_address(net, "b", ip)
        # Nobody is left on a to remove the address: its lifetime ends it (3 s, renewed only by a live node).
        _wait(lambda: not _has_address(net, "a", ip), 10, "the dead node's address expiring")
        assert _has_address(net, "b", ip)  # renewed by the live one


@pytest.mark.kvm
def test_a_node_that_cannot_hold_the_address_refuses_the_vm(tmp_path: Path) -> None:
    from replica.cluster import ClusterError, LocalCluster

    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as cluster:
        node = cluster.add_node()
        image = load_image_file(KV)
        # A documentation subnet that no interface of this host is on (this machine's eth0 may use one).
        taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
        subnet = next(net for net in ("198.51.100", "203.0.113", "192.0.2") if f" {net}." not in taken)
        spec = vmft_pb2.VmSpec(
            name="vm1", image=image.data, image_sha256=image.sha256, mem_mib=64,
            moving_address=f"{subnet}.200/24",
        )  # fmt: skip
        request = vmft_pb2.ProtectRequest(spec=spec, service=f"{subnet}.200:7100")
        with cluster.channel(node) as channel, pytest.raises(grpc.RpcError) as refused:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"no interface of this host is in {subnet}.0/24" in str(refused.value.details())
        with pytest.raises(ClusterError):  # nothing runs, and the node still serves
            cluster.wait_for(node, "vm1", "primary", timeout=0.5)
