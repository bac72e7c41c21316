"""The node API under mutual TLS (the default), against the audit's findings (docs/design.md): real
`vmft node` processes of a LocalCluster with its CA in its work directory.

- a client without a certificate (plaintext), or with one from another CA, is refused;
- a node certificate cannot do control operations (InjectFault, StopVm, Protect, Reprotect);
- a replication stream from a valid node certificate that is not the VM's primary per the arbiter is
  refused, and the real pair keeps going (no stopped backup, writes acknowledged, no failover);
- `vmft node` refuses to start without a certificate unless `--insecure`, and `--insecure` anywhere but
  loopback.

Every wait is bounded; every process is stopped by its PID (LocalCluster)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from monitor.loader import load_image_file
from monitor.record import make_header
from proto import vmft_pb2, vmft_pb2_grpc
from replica import tls
from replica.cluster import ClusterError, LocalCluster, NodeProcess, ProtectedVm
from replica.kv_client import KvClientSync
from replica.node_client import ClientAuth
from replica.vm_common import PROTOCOL_VERSION

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[LocalCluster, NodeProcess, NodeProcess, ProtectedVm]]:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        vm = cluster.protect(KV, a, b)
        cluster.wait_for(b, vm.name, "backup", timeout=10)
        yield cluster, a, b, vm


def _status(auth: ClientAuth, node: NodeProcess) -> vmft_pb2.NodeStatus:
    with auth.channel(node.name) as channel:
        status: vmft_pb2.NodeStatus = vmft_pb2_grpc.NodeStub(channel).Status(
            vmft_pb2.StatusRequest(), timeout=5
        )
        return status


def _writes_acknowledged(vm: ProtectedVm, count: int = 20) -> None:
    with KvClientSync(vm.addresses, timeout=5.0) as kv:
        for i in range(count):
            kv.set(f"k{i}", str(i))
        assert kv.get(f"k{count - 1}") == str(count - 1)


def test_an_unauthenticated_client_is_refused(
    pair: tuple[LocalCluster, NodeProcess, NodeProcess, ProtectedVm], tmp_path: Path
) -> None:
    cluster, a, b, vm = pair
    # Plaintext (what every client was before): the handshake fails, no method is reached.
    with grpc.insecure_channel(a.name) as channel:
        stub = vmft_pb2_grpc.NodeStub(channel)
        for call in (
            lambda: stub.Status(vmft_pb2.StatusRequest(), timeout=5),
            lambda: stub.InjectFault(
                vmft_pb2.FaultRequest(vm=vm.name, kind=vmft_pb2.FAULT_KILL_NODE), timeout=5
            ),
            lambda: stub.StopVm(vmft_pb2.StopVmRequest(name=vm.name), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # An admin certificate of another CA: refused by the handshake too.
    other = tls.init_ca(tmp_path / "other-ca")
    stranger = ClientAuth(tls.issue(other, tls.Role.ADMIN, "admin"))
    with pytest.raises(grpc.RpcError) as refused:
        _status(stranger, a)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The pair is untouched and the cluster's admin still reaches the node.
    assert a.alive() and b.alive()
    primary = cluster.vm_status(a, vm.name)
    assert primary is not None and primary.role == vmft_pb2.ROLE_PRIMARY and primary.protected, primary
    _writes_acknowledged(vm)


def test_a_node_certificate_cannot_do_control_operations(
    pair: tuple[LocalCluster, NodeProcess, NodeProcess, ProtectedVm],
) -> None:
    cluster, a, b, vm = pair
    node = ClientAuth(cluster.identity(tls.Role.NODE, "intruder"))
    assert _status(node, a).node == a.name, "status is open to any certificate of the cluster"
    with node.channel(a.name) as channel:
        stub = vmft_pb2_grpc.NodeStub(channel)
        for name, call in (
            ("kill", lambda: stub.InjectFault(
                vmft_pb2.FaultRequest(vm=vm.name, kind=vmft_pb2.FAULT_KILL_NODE), timeout=5)),
            ("stop", lambda: stub.InjectFault(
                vmft_pb2.FaultRequest(vm=vm.name, kind=vmft_pb2.FAULT_STOP_NODE, duration_s=5), timeout=5)),
            ("stop-vm", lambda: stub.StopVm(vmft_pb2.StopVmRequest(name=vm.name), timeout=5)),
            ("reprotect", lambda: stub.Reprotect(
                vmft_pb2.ReprotectRequest(name=vm.name, backup_node=b.name, backup_service="127.0.0.1:1"),
                timeout=5)),
            ("protect", lambda: stub.Protect(
                vmft_pb2.ProtectRequest(spec=vmft_pb2.VmSpec(name="vm2")), timeout=5)),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "admin" in (refused.value.details() or ""), refused.value.details()
    time.sleep(0.3)  # a kill or stop would have landed by now (the node acts 10 ms after answering)
    assert a.alive() and b.alive()
    primary = cluster.vm_status(a, vm.name)
    assert primary is not None and primary.role == vmft_pb2.ROLE_PRIMARY and primary.protected, primary
    _writes_acknowledged(vm)


def test_a_forged_replication_stream_is_refused_and_the_pair_goes_on(
    pair: tuple[LocalCluster, NodeProcess, NodeProcess, ProtectedVm],
) -> None:
    cluster, a, b, vm = pair
    before = cluster.vm_status(b, vm.name)
    assert before is not None and before.role == vmft_pb2.ROLE_BACKUP
    image = load_image_file(KV)
    spec = vmft_pb2.VmSpec(name=vm.name, image_sha256=image.sha256, mem_mib=64, hang_timeout_s=2.0)
    # A newer generation than the pair's: the audit's forged stream made the backup stop its VM for it.
    forged = vmft_pb2.Hello(
        protocol_version=PROTOCOL_VERSION, spec=spec, generation=before.generation + 1,
        header=make_header(image, 64 << 20), primary_node="forger", backup_service="127.0.0.1:1",
        heartbeat_interval_ms=5, failure_timeout_ms=300,
    )  # fmt: skip
    with cluster.auth.channel(b.name) as channel:  # the node API's port does not take streams at all
        call = vmft_pb2_grpc.ReplicationStub(channel).Stream(
            iter([vmft_pb2.PrimaryMessage(hello=forged)]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as unserved:
            next(call)
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
    replication = cluster.replication_address(b)
    for who in (ClientAuth(cluster.identity(tls.Role.NODE, "forger")), cluster.auth):  # a node; an admin
        with who.channel(replication) as channel:
            call = vmft_pb2_grpc.ReplicationStub(channel).Stream(
                iter([vmft_pb2.PrimaryMessage(hello=forged)]), timeout=10
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(call)
            assert refused.value.code() in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            )
    time.sleep(0.5)  # longer than the failure timeout: a disturbed pair would have failed over by now
    after = cluster.vm_status(b, vm.name)
    assert after is not None and after.role == vmft_pb2.ROLE_BACKUP, after
    assert after.generation == before.generation and after.state == before.state, after
    primary = cluster.vm_status(a, vm.name)
    assert primary is not None and primary.role == vmft_pb2.ROLE_PRIMARY and primary.protected, primary
    assert primary.generation == before.generation
    _writes_acknowledged(vm)
    acked = cluster.vm_status(a, vm.name)
    assert acked is not None and acked.acked_position > primary.acked_position, (
        "the backup still acknowledges"
    )


def _node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", "node", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


def test_a_node_serves_plaintext_only_when_told_and_only_on_loopback(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    arbiter = str(tmp_path / "arbiter.sqlite")
    untold = _node("--listen", "127.0.0.1:1", "--data-dir", data, "--arbiter", arbiter)
    assert untold.returncode != 0 and "--cert" in untold.stderr and "--insecure" in untold.stderr, (
        untold.stderr
    )
    for address in ("0.0.0.0:1", "10.1.2.3:1", "[::]:1"):
        wide = _node("--listen", address, "--data-dir", data, "--arbiter", arbiter, "--insecure")
        assert wide.returncode != 0 and "loopback" in wide.stderr, (address, wide.stderr)
    assert not Path(data).exists(), "a refused node made nothing"


# ----- confined input: no request names a host path ------------------------------------------------------


def _protect(cluster: LocalCluster, node: NodeProcess, spec: vmft_pb2.VmSpec) -> grpc.RpcError | None:
    request = vmft_pb2.ProtectRequest(spec=spec, service=cluster.service_address(spec.name or "x", node))
    with cluster.channel(node) as channel:
        try:
            vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=20)
        except grpc.RpcError as err:
            return err
    return None


def _outside(root: Path, inside: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under `root` but not under `inside`: (mode, size, content of regular files)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if inside in path.parents or path == inside:
            continue
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        out[str(path)] = (st.st_mode, st.st_size, data)
    return out


def test_requests_cannot_name_host_paths(tmp_path: Path) -> None:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = load_image_file(KV)
    other = b"\x7fELF not a real image"
    other_sha = hashlib.sha256(other).hexdigest()
    with LocalCluster(tmp_path / "cluster") as cluster:
        a = cluster.add_node()
        before = _outside(tmp_path, cluster.workdir)
        # Names that are paths: refused before anything is made.
        for bad in ("../../escape", "/tmp/escape", "..", "a/b", ""):
            err = _protect(cluster, a, vmft_pb2.VmSpec(name=bad, image=image.data, mem_mib=64))
            assert err is not None and "name" in (err.details() or ""), (bad, err)
        # A host file as the image (a FIFO: it used to block the node's loop), no image bytes: refused,
        # the FIFO never opened (the node answers at once).
        err = _protect(cluster, a, vmft_pb2.VmSpec(
            name="vm1", image_path=str(fifo), image_sha256=other_sha, mem_mib=64))  # fmt: skip
        assert err is not None and "no such file" in (err.details() or ""), err
        # A FIFO planted in the node's own image directory under an image's name: refused, no block.
        images = a.data_dir / "images"
        os.mkfifo(images / f"{other_sha}.elf")
        err = _protect(cluster, a, vmft_pb2.VmSpec(name="vm1", image_sha256=other_sha, mem_mib=64))
        assert err is not None and "FIFO" in (err.details() or ""), err
        # A symbolic link planted there to a host file: refused too.
        (images / f"{'ab' * 32}.elf").symlink_to(victim)
        err = _protect(cluster, a, vmft_pb2.VmSpec(name="vm1", image_sha256="ab" * 32, mem_mib=64))
        assert err is not None and "link" in (err.details() or ""), err
        # Host paths for the image and the disk are ignored: the image travels in the request, the disk
        # is made empty inside the data directory.
        spec = vmft_pb2.VmSpec(
            name="vm1", image=image.data, image_path=str(victim), disk_path=str(victim),
            disk_size=1 << 20, mem_mib=64, hang_timeout_s=2.0,
        )  # fmt: skip
        assert _protect(cluster, a, spec) is None
        status = cluster.wait_for(a, "vm1", "serving", timeout=10)
        assert status.role == vmft_pb2.ROLE_PRIMARY
        assert (a.data_dir / "disks" / "vm1.primary.img").stat().st_size == 1 << 20
        assert (images / f"{image.sha256}.elf").read_bytes() == image.data
        assert a.alive()
        after = _outside(tmp_path, cluster.workdir)
    assert after == before, "something outside the cluster's directory was written"
    assert victim.read_bytes() == b"precious"


def test_a_node_refuses_vms_beyond_its_limits(tmp_path: Path) -> None:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as cluster:
        a = cluster.add_node(["--max-vms", "1"])
        b = cluster.add_node(["--memory-mib", "100"])
        cluster.protect(KV, a, None, name="vm1")
        with pytest.raises(ClusterError, match="--max-vms"):
            cluster.protect(KV, a, None, name="vm2")
        with pytest.raises(ClusterError, match="memory budget"):
            cluster.protect(KV, b, None, name="vm3", mem_mib=128)
        with pytest.raises(ClusterError, match="--max-vms"):  # a full node refuses to be a backup too
            cluster.protect(KV, b, a, name="vm4")
        assert cluster.vm_status(a, "vm2") is None and cluster.vm_status(a, "vm4") is None
        first = cluster.vm_status(a, "vm1")
        assert first is not None and first.role == vmft_pb2.ROLE_PRIMARY
