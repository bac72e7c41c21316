"""A cluster of `vmft node` processes on namespace hosts (replica/hosts.py), each node its own host with
its own address on the bridge and its own data directory, etcd (the arbiter and the membership) on a host
of its own, and the caller (clients, the admin) outside every host in the root namespace. For partition
tests and benchmarks: a host's link taken down cuts it off from everyone, etcd included.

Mutual TLS under a CA made in the work directory (node certificates name their host's address). Every
process is stopped by its PID: the nodes by the host network, etcd by its EtcdCluster; every wait is
bounded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from monitor.errors import HostError
from monitor.loader import load_image_file
from proto import vmft_pb2, vmft_pb2_grpc
from replica import hosts, node_client, tls
from replica.etcd_server import EtcdCluster, EtcdTls

NODE_PORT, SERVICE_PORT = 7400, 7411
ROOT = Path(__file__).resolve().parent.parent


class HostClusterError(HostError):
    """A node on a namespace host could not be started or driven."""


@dataclass
class HostNode:
    name: str  # the host's name
    host: hosts.Host
    identity: tls.Identity
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host.address}:{NODE_PORT}"

    @property
    def service(self) -> str:
        """Where this node serves a VM (one VM per cluster: the port is the same on every host)."""
        return f"{self.host.address}:{SERVICE_PORT}"

    @property
    def log_path(self) -> Path:
        return self.host.data_dir / "node.log"


class HostCluster:
    """etcd on host `etcd`, one `vmft node` per added host, an admin client in the root namespace. The
    caller owns `net` (a HostNetwork made with root_address=True) and calls `close()` for etcd."""

    def __init__(self, net: hosts.HostNetwork, workdir: Path, failure_timeout_ms: float = 300.0) -> None:
        if net.root_address is None:
            raise HostClusterError("the host network needs root_address=True (the caller is outside)")
        self.net = net
        self.failure_timeout_ms = failure_timeout_ms
        self.ca = workdir / "ca"
        tls.init_ca(self.ca)
        self.auth = node_client.ClientAuth(tls.issue(self.ca, tls.Role.ADMIN, "admin"))
        e = net.add("etcd")
        member = tls.issue(self.ca, tls.Role.NODE, "etcd-m0", [e.address])
        self.etcd = EtcdCluster(workdir / "etcd", 1, hosts=[e.address], argv_prefix=[e.argv([])],
                                tls=[EtcdTls(ca=member.ca, cert=member.cert, key=member.key)])  # fmt: skip
        self.etcd.start(credentials=tls.channel_credentials(member))
        self.nodes: dict[str, HostNode] = {}

    def close(self) -> None:
        self.etcd.stop()  # the nodes are stopped by the host network (by PID)

    # ----- nodes -------------------------------------------------------------------------------------

    def add_node(self, name: str, extra_args: list[str] | None = None) -> HostNode:
        host = self.net.add(name)
        identity = tls.issue(self.ca, tls.Role.NODE, f"node-{name}", [host.address])
        argv = [
            sys.executable, "-m", "replica.cli", "node",
            "--listen", f"{host.address}:{NODE_PORT}", "--data-dir", str(host.data_dir / "node"),
            "--cert", str(identity.directory), "--etcd", ",".join(self.etcd.endpoints),
            "--heartbeat-ms", "5", "--failure-timeout-ms", str(self.failure_timeout_ms),
            "--auto-reprotect", "0", *(extra_args or []),
        ]  # fmt: skip
        node = HostNode(name, host, identity, argv)
        self.nodes[name] = node
        self.start_node(node)
        return node

    def start_node(self, node: HostNode, timeout_s: float = 30.0) -> None:
        log = open(node.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            node.process = self.net.spawn(
                node.name, node.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if node.process.poll() is not None:
                raise HostClusterError(f"node {node.name} exited: {node.log_path.read_text()[-2000:]}")
            try:
                self.status(node, timeout=0.5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise HostClusterError(f"node {node.name} did not serve within {timeout_s} s") from None
                time.sleep(0.1)

    def kill_node(self, node: HostNode) -> None:
        """SIGKILL the node's process (by its PID) and reap it."""
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)

    # ----- the node API ----------------------------------------------------------------------------------

    def status(self, node: HostNode, timeout: float = 5.0) -> vmft_pb2.NodeStatus:
        with self.auth.channel(node.address) as channel:
            status: vmft_pb2.NodeStatus = vmft_pb2_grpc.NodeStub(channel).Status(
                vmft_pb2.StatusRequest(), timeout=timeout
            )
            return status

    def vm(self, node: HostNode, name: str = "vm1", timeout: float = 2.0) -> vmft_pb2.VmStatus | None:
        return next((vm for vm in self.status(node, timeout).vms if vm.name == name), None)

    def moving_address(self, index: int = 200) -> str:
        """An address on the bridge's subnet that no host holds: a VM's moving service address
        (replica/service_address.py), as IP/PREFIX."""
        net = self.net
        return f"{net.subnet.network_address + index}/{net.subnet.prefixlen}"

    def service(self, node: HostNode, moving: str = "") -> str:
        """Where `node` serves the VM: its own address, or the moving one (the same on every node)."""
        return f"{moving.split('/')[0]}:{SERVICE_PORT}" if moving else node.service

    def protect(self, image: Path, primary: HostNode, backup: HostNode, name: str = "vm1",
                mem_mib: int = 64, moving: str = "") -> None:  # fmt: skip
        """Protect `name` (primary on `primary`); with `moving` (IP/PREFIX) its service address moves with
        its primary, else each node serves it on its own address."""
        loaded = load_image_file(image)
        spec = vmft_pb2.VmSpec(name=name, image=loaded.data, image_sha256=loaded.sha256, mem_mib=mem_mib,
                               hang_timeout_s=2.0, moving_address=moving)  # fmt: skip
        request = vmft_pb2.ProtectRequest(
            spec=spec, backup_node=backup.address, service=self.service(primary, moving),
            backup_service=self.service(backup, moving),
        )  # fmt: skip
        # A node just started may not have registered in etcd yet: the primary then refuses a backup that
        # is "not a live member"; wait (bounded) for the registration rather than fail the setup.
        deadline = time.monotonic() + 15.0
        while True:
            try:
                self._call(primary, "Protect", request)
                return
            except HostClusterError as err:
                if "not a live member" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def reprotect(self, primary: HostNode, backup: HostNode, name: str = "vm1", moving: str = ""
                  ) -> vmft_pb2.VmStatus:  # fmt: skip
        request = vmft_pb2.ReprotectRequest(
            name=name, backup_node=backup.address, backup_service=self.service(backup, moving)
        )
        status: vmft_pb2.VmStatus = self._call(primary, "Reprotect", request)
        return status

    def _call(self, node: HostNode, method: str, request: object, timeout: float = 60.0) -> Any:
        with self.auth.channel(node.address) as channel:
            try:
                return getattr(vmft_pb2_grpc.NodeStub(channel), method)(request, timeout=timeout)
            except grpc.RpcError as err:
                raise HostClusterError(f"{method} on {node.name}: {err.details()}") from err

    def wait(self, node: HostNode, what: str, check: Callable[[vmft_pb2.VmStatus], bool],
             limit_s: float = 20.0, name: str = "vm1") -> vmft_pb2.VmStatus:  # fmt: skip
        deadline = time.monotonic() + limit_s
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.vm(node, name)
            except grpc.RpcError:
                last = None
            if last is not None and check(last):
                return last
            time.sleep(0.05)
        raise HostClusterError(f"{what}: not within {limit_s} s (last: {last})")
