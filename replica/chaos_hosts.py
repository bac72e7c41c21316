"""Where `vmft chaos --hosts N` runs: a cluster whose every node and every etcd member is its own test host
(replica/hosts.py: a network namespace with its own address on a per-run bridge and its own data
directory); nothing shared but etcd, the arbiter. The campaign and its clients stay in the root namespace,
outside every host, and reach them over the bridge, as clients on another machine would.

`NamespaceCluster` is a `LocalCluster` (the same node API and the same kill/stop/restart by PID that the
campaign's repair uses) whose nodes run inside hosts: each listens on its host's address, serves its VMs
there, and carries a node certificate naming that address (mutual TLS checks it). `host_topology()` builds
the whole thing (the bridge, etcd hosts with a TLS etcd under the cluster CA, node hosts) and removes all of
it on leaving, also after an error or Ctrl-C; a SIGKILLed run is swept by the next one (hosts.sweep_stale).
(replica/host_nodes.py is a smaller helper of the same kind for the partition tests and benchmarks.)
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from replica import node_client, tls
from replica.cluster import ClusterError, LocalCluster, NodeProcess
from replica.etcd_server import EtcdCluster, EtcdTls
from replica.hosts import Host, HostNetwork

# Inside its own namespace every port is free: fixed ports keep logs and addresses readable.
NODE_PORT = 7100
SERVICE_PORT = 7200
REPO_ROOT = Path(__file__).resolve().parent.parent  # nodes run `python -m replica.cli` from this tree


class NamespaceCluster(LocalCluster):
    """Node processes each inside its own host of `net`, on etcd (`etcd`: client endpoints)."""

    def __init__(self, workdir: str | Path, net: HostNetwork, etcd: list[str], **options: object) -> None:
        super().__init__(workdir, etcd=etcd, **options)  # type: ignore[arg-type]
        self.net = net
        self.host_of: dict[str, Host] = {}  # node name (HOST:PORT) -> its host
        self._service_ports: dict[str, int] = {}  # VM -> its service port on every host

    def add_host_node(self, host_name: str, extra_args: list[str] | None = None) -> NodeProcess:
        """A new host `host_name` with a node in it."""
        host = self.net.add(host_name)
        identity = None
        if self.ca_dir is not None:
            identity = tls.issue(self.ca_dir, tls.Role.NODE, f"node-{host_name}", [host.address])
        node = NodeProcess(
            name=f"{host.address}:{NODE_PORT}",
            data_dir=host.data_dir / "node",
            log_path=self.workdir / f"node-{host_name}.log",
            extra_args=extra_args or [],
            identity=identity,
        )
        self.host_of[node.name] = host
        self.nodes.append(node)
        node_client.remember(node.name, self.auth)
        self.start_node(node)
        return node

    def add_node(self, extra_args: list[str] | None = None) -> NodeProcess:
        return self.add_host_node(f"n{len(self.nodes)}", extra_args)

    def start_node(self, node: NodeProcess, timeout: float = 20.0) -> None:
        """Start (or restart) `node` inside its host and wait until it answers over the bridge."""
        host = self.host_of[node.name]
        command = [
            self.python, "-m", "replica.cli", "node",
            "--listen", node.name,
            "--data-dir", str(node.data_dir),
            "--arbiter", str(node.data_dir / "unused-arbiter.sqlite"),  # etcd decides (--etcd below)
            "--heartbeat-ms", str(self.heartbeat_ms),
            "--failure-timeout-ms", str(self.failure_timeout_ms),
            "--auto-reprotect", str(self.auto_reprotect_s),
            "--etcd", ",".join(self.etcd or []),
            *(["--cert", str(node.identity.directory)] if node.identity is not None else ["--insecure"]),
            *node.extra_args,
        ]  # fmt: skip
        with open(node.log_path, "ab") as log_file:
            node.process = self.net.spawn(
                host.name, command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        self.wait_serving(node, timeout)

    def service_address(self, vm: str, node: NodeProcess) -> str:
        """The VM is served on the same port of every host, at that host's address."""
        port = self._service_ports.setdefault(vm, SERVICE_PORT + len(self._service_ports))
        address = f"{self.host_of[node.name].address}:{port}"
        self._services[(vm, node.name)] = address
        return address

    def service_map(self) -> dict[tuple[str, str], str]:
        """(VM, node name) -> the address the node serves the VM on."""
        return dict(self._services)

    def host_name(self, node_name: str) -> str | None:
        host = self.host_of.get(node_name)
        return host.name if host is not None else None


@dataclass
class HostTopology:
    """What `host_topology()` built: the network, etcd on its hosts, and the cluster of node hosts."""

    net: HostNetwork
    etcd: EtcdCluster
    etcd_hosts: list[str]
    cluster: NamespaceCluster
    nodes: list[NodeProcess] = field(default_factory=list)


@contextlib.contextmanager
def host_topology(
    workdir: str | Path,
    nodes: int,
    etcd_members: int = 3,
    node_args: Sequence[str] = (),
    **cluster_options: object,
) -> Iterator[HostTopology]:
    """`nodes` node hosts (n0, n1, ...) and `etcd_members` etcd hosts (e0, ...) on one bridge, the bridge
    reachable from the root namespace (clients outside every host), etcd and every link mutual TLS under
    one CA in `workdir`. Everything is stopped and removed on leaving, whatever the reason."""
    if nodes < 2:
        raise ClusterError("a cluster of hosts needs at least two nodes (a primary and a backup)")
    if etcd_members < 1:
        raise ClusterError("a cluster of hosts needs etcd (at least one member)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = workdir / "ca"
    tls.init_ca(ca_dir)
    with HostNetwork(workdir / "hosts", root_address=True) as net:
        members = [net.add(f"e{i}") for i in range(etcd_members)]
        certs = [tls.issue(ca_dir, tls.Role.NODE, f"etcd-{h.name}", [h.address]) for h in members]
        etcd = EtcdCluster(
            workdir / "etcd",
            etcd_members,
            hosts=[h.address for h in members],
            argv_prefix=[h.argv([]) for h in members],
            tls=[EtcdTls(ca=c.ca, cert=c.cert, key=c.key) for c in certs],
        )
        etcd.start(credentials=tls.channel_credentials(certs[0]))
        try:
            cluster = NamespaceCluster(
                workdir / "cluster", net, etcd.endpoints, ca_dir=ca_dir, **cluster_options
            )
            with cluster:
                topology = HostTopology(net, etcd, [h.name for h in members], cluster)
                for _ in range(nodes):
                    topology.nodes.append(cluster.add_node(list(node_args)))
                yield topology
        finally:
            etcd.stop()
