"""A local cluster of real node processes on loopback, for the demo, tests, benchmarks and users' fault
tests: start `vmft node` daemons on free ports, protect a VM on them, kill, stop and restart nodes by
PID, read their status. Every process it starts is stopped by its PID; every wait is bounded.

Secure by default, like a real cluster: the cluster makes its CA in its work directory (`ca/`, or shares
one given), issues each node a node certificate and itself an admin certificate, and every link (its
calls, node to node) is mutual TLS. `insecure=True` starts plaintext loopback nodes instead."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from monitor.loader import load_image_file
from proto import vmft_pb2, vmft_pb2_grpc
from replica import node_client, tls
from replica.roles import is_serving
from monitor.errors import VmftError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ClusterError(VmftError):
    """Local test cluster could not be brought up or driven."""


@dataclass
class NodeProcess:
    name: str  # HOST:PORT
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    identity: tls.Identity | None = None  # its node certificate (None: an insecure cluster)

    @property
    def node_id(self) -> str:
        """What the arbiter and the other nodes know it by: its certificate's name (else its address)."""
        return self.identity.name if self.identity is not None else self.name

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else -1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class ProtectedVm:
    name: str
    primary: NodeProcess
    backup: NodeProcess | None
    service: str
    backup_service: str

    @property
    def addresses(self) -> list[str]:
        return [self.service] + ([self.backup_service] if self.backup_service else [])


class LocalCluster:
    def __init__(
        self,
        workdir: str | Path,
        heartbeat_ms: float = 5.0,
        failure_timeout_ms: float = 300.0,
        python: str = sys.executable,
        auto_reprotect_s: float = 0.0,
        insecure: bool = False,
        ca_dir: str | Path | None = None,
        etcd: list[str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.insecure = insecure
        self.etcd = etcd  # client endpoints: the nodes' arbiter and membership (else the SQLite file)
        self.ca_dir: Path | None = None
        self.admin: tls.Identity | None = None
        if insecure:
            self.auth = node_client.ClientAuth(None, insecure=True)
        else:
            self.ca_dir = Path(ca_dir) if ca_dir is not None else self.workdir / "ca"
            if not (self.ca_dir / tls.CA_CERT).exists():
                tls.init_ca(self.ca_dir)
            self.admin = self.identity(tls.Role.ADMIN, "admin")
            self.auth = node_client.ClientAuth(self.admin)
        self.arbiter_path = self.workdir / "arbiter.sqlite"
        self.heartbeat_ms = heartbeat_ms
        self.failure_timeout_ms = failure_timeout_ms
        # Off by default here: tests and campaigns re-protect explicitly (PairController) to measure it.
        self.auto_reprotect_s = auto_reprotect_s
        self.python = python
        self.nodes: list[NodeProcess] = []
        # Each node serves a given VM on one fixed address, whatever its role, so clients that know every
        # node's address for the VM find the primary after any number of failovers.
        self._services: dict[tuple[str, str], str] = {}

    # ----- credentials ---------------------------------------------------------------------------

    def identity(self, role: tls.Role, name: str) -> tls.Identity:
        """The certificate `name` of `role` from the cluster's CA (issued on first use)."""
        assert self.ca_dir is not None, "an insecure cluster has no CA"
        directory = self.ca_dir / ("nodes" if role is tls.Role.NODE else "admins") / name
        if (directory / tls.CERT).exists():
            return tls.Identity.load(directory)
        return tls.issue(self.ca_dir, role, name)

    def client_env(self) -> dict[str, str]:
        """Environment for `vmft` client commands run as this cluster's admin ($VMFT_CA, $VMFT_IDENTITY)."""
        if self.admin is None:
            return {"VMFT_INSECURE": "1"}
        return {"VMFT_CA": str(self.ca_dir), "VMFT_IDENTITY": str(self.admin.directory)}

    def channel(self, node: NodeProcess) -> grpc.Channel:
        """A channel to the node API as this cluster's admin."""
        return self.auth.channel(node.name)

    # ----- nodes ---------------------------------------------------------------------------------

    def add_node(self, extra_args: list[str] | None = None) -> NodeProcess:
        index = len(self.nodes)
        port = free_port()
        node = NodeProcess(
            name=f"127.0.0.1:{port}",
            data_dir=self.workdir / f"node{index}",
            log_path=self.workdir / f"node{index}.log",
            extra_args=extra_args or [],
            # Named by port: unique on this machine, also when clusters share a CA.
            identity=None if self.insecure else self.identity(tls.Role.NODE, f"node-{port}"),
        )
        self.nodes.append(node)
        node_client.remember(node.name, self.auth)
        self.start_node(node)
        return node

    def start_node(self, node: NodeProcess, timeout: float = 20.0) -> None:
        command = [
            self.python, "-m", "replica.cli", "node",
            "--listen", node.name,
            "--data-dir", str(node.data_dir),
            "--arbiter", str(self.arbiter_path),
            "--heartbeat-ms", str(self.heartbeat_ms),
            "--failure-timeout-ms", str(self.failure_timeout_ms),
            "--auto-reprotect", str(self.auto_reprotect_s),
            *(["--etcd", ",".join(self.etcd)] if self.etcd else []),
            *(["--cert", str(node.identity.directory)] if node.identity is not None else ["--insecure"]),
            *node.extra_args,
        ]  # fmt: skip
        log_file = open(node.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            node.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, cwd=_repo_root()
            )
        finally:
            log_file.close()
        self.wait_serving(node, timeout)

    def wait_serving(self, node: NodeProcess, timeout: float) -> None:
        """Until a node just started answers Status (ClusterError if it exits or stays silent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise ClusterError(f"node {node.name} exited at start: {node.log_path.read_text()[-2000:]}")
            try:
                self.status(node, timeout=0.5)
                return
            except grpc.RpcError:
                time.sleep(0.05)
        raise ClusterError(f"node {node.name} did not start serving within {timeout} s")

    def signal_node(self, node: NodeProcess, sig: signal.Signals) -> None:
        if node.process is not None and node.alive():
            os.kill(node.process.pid, sig)

    def kill_node(self, node: NodeProcess) -> None:
        """SIGKILL, and reap it (bounded)."""
        if node.process is None:
            return
        self.signal_node(node, signal.SIGKILL)
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired as err:
            raise ClusterError(f"node {node.name} (pid {node.pid}) survived SIGKILL for 10 s") from err

    def stop_node(self, node: NodeProcess, timeout: float = 10.0) -> None:
        """SIGTERM (the node stops its VMs), then SIGKILL if it lingers; SIGCONT first in case it is
        stopped."""
        if node.process is None or not node.alive():
            return
        self.signal_node(node, signal.SIGCONT)
        self.signal_node(node, signal.SIGTERM)
        try:
            node.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_node(node)

    def close(self) -> None:
        for node in self.nodes:
            try:
                self.stop_node(node, timeout=5)
            except ClusterError:
                pass
            node_client.forget(node.name)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the node API ---------------------------------------------------------------------------

    def status(self, node: NodeProcess, timeout: float = 5.0) -> vmft_pb2.NodeStatus:
        with self.channel(node) as channel:
            result: vmft_pb2.NodeStatus = vmft_pb2_grpc.NodeStub(channel).Status(
                vmft_pb2.StatusRequest(), timeout=timeout
            )
            return result

    def replication_address(self, node: NodeProcess, timeout: float = 5.0) -> str:
        """Where `node` takes replication streams (a port of its own, beside the node API)."""
        with self.channel(node) as channel:
            request = vmft_pb2.StatusRequest(node_only=True)
            return str(vmft_pb2_grpc.NodeStub(channel).Status(request, timeout=timeout).replication)

    def vm_status(self, node: NodeProcess, name: str, timeout: float = 5.0) -> vmft_pb2.VmStatus | None:
        for vm in self.status(node, timeout).vms:
            if vm.name == name:
                return vm
        return None

    def protect(
        self,
        image: str | Path,
        primary: NodeProcess,
        backup: NodeProcess | None,
        name: str = "vm1",
        mem_mib: int = 64,
        arg: int = 0,
        disk: str | Path | None = None,
        hang_timeout_s: float = 2.0,
        backup_address: str | None = None,
    ) -> ProtectedVm:
        """Protect a VM: primary on `primary`, backup on `backup` (None: unprotected). `backup_address`
        overrides the address the primary streams to (a fault-injecting relay in front of `backup`)."""
        loaded = load_image_file(image)
        spec = vmft_pb2.VmSpec(
            name=name,
            image=loaded.data,  # the nodes store it in their image directories (no host paths)
            image_sha256=loaded.sha256,
            mem_mib=mem_mib,
            disk_size=empty_disk_size(disk) if disk else 0,
            arg=arg,
            hang_timeout_s=hang_timeout_s,
        )
        service = self.service_address(name, primary)
        backup_service = self.service_address(name, backup) if backup else ""
        request = vmft_pb2.ProtectRequest(
            spec=spec,
            backup_node=(backup_address or backup.name) if backup else "",
            service=service,
            backup_service=backup_service,
        )
        with self.channel(primary) as channel:
            try:
                vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=30)
            except grpc.RpcError as err:
                raise ClusterError(f"protect failed: {err.details()}") from err
        return ProtectedVm(name, primary, backup, service, backup_service)

    def service_address(self, vm: str, node: NodeProcess) -> str:
        key = (vm, node.name)
        if key not in self._services:
            self._services[key] = f"127.0.0.1:{free_port()}"
        return self._services[key]

    def service_addresses(self, vm: str) -> list[str]:
        """Every address the VM is or may be served on (give them all to clients)."""
        return [address for (name, _node), address in self._services.items() if name == vm]

    def reprotect(self, vm: ProtectedVm, primary: NodeProcess, backup: NodeProcess) -> vmft_pb2.VmStatus:
        """Seed a new backup on `backup` from a live checkpoint of the primary running on `primary`."""
        backup_service = self.service_address(vm.name, backup)
        request = vmft_pb2.ReprotectRequest(
            name=vm.name, backup_node=backup.name, backup_service=backup_service
        )
        with self.channel(primary) as channel:
            try:
                status: vmft_pb2.VmStatus = vmft_pb2_grpc.NodeStub(channel).Reprotect(request, timeout=60)
            except grpc.RpcError as err:
                raise ClusterError(f"re-protection failed: {err.details()}") from err
        vm.primary, vm.backup = primary, backup
        vm.service, vm.backup_service = status.service, backup_service
        return status

    def wait_for(
        self, node: NodeProcess, name: str, predicate: str, timeout: float = 10.0
    ) -> vmft_pb2.VmStatus:
        """Wait until the VM's status satisfies `predicate`: 'primary', 'backup', 'stopped' or 'serving'."""
        deadline = time.monotonic() + timeout
        last: vmft_pb2.VmStatus | None = None
        while time.monotonic() < deadline:
            try:
                last = self.vm_status(node, name, timeout=1.0)
            except grpc.RpcError:
                last = None
            if last is not None and _matches(last, predicate):
                return last
            time.sleep(0.02)
        raise ClusterError(f"{name} on {node.name} is not {predicate} after {timeout} s (last: {last})")


def empty_disk_size(path: str | Path) -> int:
    """The size of an empty (all holes) disk file: the nodes make such a disk inside their data
    directories; a request never names a host file, so a disk with content cannot be handed over."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError:
            return size  # no data anywhere: all holes
    if any(Path(path).read_bytes()):
        raise ClusterError(f"{path} holds data: protect makes empty disks on the nodes (give an empty file)")
    return size


def _matches(vm: vmft_pb2.VmStatus, predicate: str) -> bool:
    if predicate == "primary":
        return vm.role == vmft_pb2.ROLE_PRIMARY
    if predicate == "backup":
        return vm.role == vmft_pb2.ROLE_BACKUP
    if predicate == "stopped":
        return vm.role == vmft_pb2.ROLE_STOPPED
    if predicate == "serving":
        return is_serving(vm)
    raise ValueError(f"unknown predicate {predicate!r}")


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
