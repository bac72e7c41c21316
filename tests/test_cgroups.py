"""Resource limits (replica/cgroups.py): a real `vmft node` puts a VM's vCPU thread, alone, in a cpu cgroup
with the VM's quota (read back from the cgroup files, and the kernel throttles it), moves itself into a
memory cgroup limited to its budget plus its own base, shows both in its status, and refuses a VM over
its memory budget with a clear error."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from monitor.loader import load_image_file
from proto import vmft_pb2, vmft_pb2_grpc
from replica import cgroups
from replica.cluster import LocalCluster, NodeProcess, free_port
from test_metrics import scrape, value

ROOT = Path(__file__).resolve().parent.parent
SPIN = ROOT / "guests" / "build" / "spin.elf"
KV = ROOT / "guests" / "build" / "kv.elf"
TICK = os.sysconf("SC_CLK_TCK")


def test_own_cgroup_paths_are_read_per_controller() -> None:
    text = "12:cpu,cpuacct:/a/b\n4:memory:/process_api/x\n1:name=systemd:/\n0::/user.slice\n"
    paths = cgroups._own_paths(text)
    assert paths["cpu"] == "/a/b" and paths["cpuacct"] == "/a/b"
    assert paths["memory"] == "/process_api/x" and paths[""] == "/user.slice"


def _support() -> cgroups.Support:
    support = cgroups.detect()
    if support.cpu is None or support.memory is None:
        pytest.skip(f"needs root and cgroup v1 cpu and memory controllers ({support.describe()})")
    return support


def test_a_quota_below_the_kernels_smallest_is_refused() -> None:
    groups = cgroups.NodeCgroups(_support())
    with pytest.raises(cgroups.CgroupError, match="at least"):
        groups.place("vm1", os.getpid(), 0.01)
    groups.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    _support()
    for image in (SPIN, KV):
        if not image.exists():
            pytest.fail(f"{image} is not built: run scripts/setup", pytrace=False)
    with LocalCluster(tmp_path / "cluster") as c:
        yield c


def _protect(cluster: LocalCluster, node: NodeProcess, spec: vmft_pb2.VmSpec) -> vmft_pb2.VmStatus:
    request = vmft_pb2.ProtectRequest(spec=spec, service=cluster.service_address(spec.name, node))
    with cluster.channel(node) as channel:
        status: vmft_pb2.VmStatus = vmft_pb2_grpc.NodeStub(channel).Protect(request, timeout=30)
        return status


def _spec(image: Path, name: str, mem_mib: int, **fields: float) -> vmft_pb2.VmSpec:
    loaded = load_image_file(image)
    return vmft_pb2.VmSpec(
        name=name, image=loaded.data, image_sha256=loaded.sha256, mem_mib=mem_mib, **fields
    )


def _controller_dir(pid: int, controller: str, tid: int | None = None) -> Path:
    """Where the kernel says `pid` (or its thread `tid`) is, in the v1 hierarchy of `controller`."""
    where = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    path = cgroups._own_paths(Path(where).read_text())[controller]
    return cgroups.CGROUP_ROOT / controller / path.lstrip("/")


def _cpu_seconds(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


@pytest.mark.kvm
def test_cpu_quota_per_vcpu_thread_node_memory_limit_and_budget(cluster: LocalCluster) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    node = cluster.add_node(["--memory-mib", "200", "--metrics", metrics])
    # A guest spinning in ring 3 without exits (6e8 rounds of 1.5 ns natively): it would take a whole CPU.
    # The smallest quota, so that the kernel throttles it even when other work leaves it little CPU.
    spin = _spec(SPIN, "spin", 32, cpu_quota=0.1, hang_timeout_s=600.0, arg=6 * 10**8)
    _protect(cluster, node, spin)
    vm_dir = _controller_dir(node.pid, "cpu") / f"{cgroups.PREFIX}{node.pid}" / "vm-spin"
    _wait_for(lambda: vm_dir.is_dir() and (vm_dir / "tasks").read_text().split())

    # The cgroup holds exactly one thread of the node: its vCPU (the node's main thread stays outside).
    tids = [int(t) for t in (vm_dir / "tasks").read_text().split()]
    assert len(tids) == 1 and tids[0] != node.pid
    vcpu = tids[0]
    assert Path(f"/proc/{node.pid}/task/{vcpu}").exists()
    assert _controller_dir(node.pid, "cpu", vcpu) == vm_dir
    assert _controller_dir(node.pid, "cpu") != vm_dir
    assert int((vm_dir / "cpu.cfs_period_us").read_text()) == cgroups.CFS_PERIOD_US
    assert int((vm_dir / "cpu.cfs_quota_us").read_text()) == int(0.1 * cgroups.CFS_PERIOD_US)

    # The kernel holds the spinning vCPU to its quota: throttled, and never above 0.1 CPU (plus slack).
    throttled_before = int(dict(
        line.split() for line in (vm_dir / "cpu.stat").read_text().splitlines()
    )["nr_throttled"])  # fmt: skip
    used_before, started = _cpu_seconds(node.pid, vcpu), time.monotonic()
    time.sleep(1.0)
    share = (_cpu_seconds(node.pid, vcpu) - used_before) / (time.monotonic() - started)
    stat = dict(line.split() for line in (vm_dir / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > throttled_before
    assert share < 0.1 + 0.1, f"the vCPU used {share:.2f} CPU under a 0.1 quota"
    # The node's metrics say the same.
    samples = scrape(metrics)
    assert value(samples, "vmft_vm_cpu_quota", vm="spin") == pytest.approx(0.1)
    assert value(samples, "vmft_vm_cpu_throttled_periods_total", vm="spin") >= int(stat["nr_throttled"])
    assert value(samples, "vmft_vm_memory_reserved_mib", vm="spin") == 64
    assert value(samples, "process_resident_memory_bytes") > 0

    # The whole node is in its own memory cgroup: budget plus the node's own base.
    memory_dir = _controller_dir(node.pid, "memory")
    assert memory_dir.name == f"{cgroups.PREFIX}{node.pid}"
    assert int((memory_dir / "memory.limit_in_bytes").read_text()) == (200 + 192) << 20
    assert str(node.pid) in (memory_dir / "cgroup.procs").read_text().split()

    # The status shows the budget: 32 MiB of guest RAM + 32 MiB of monitor overhead reserved of 200.
    status = cluster.status(node)
    assert (status.memory_budget_mib, status.memory_reserved_mib) == (200, 64)
    assert "per-VM cpu" in status.resource_limits and "200" not in status.metrics

    # Over the budget: 64 + 32 + 64 reserved > 200 MiB: refused, saying why.
    with pytest.raises(grpc.RpcError) as refused:
        _protect(cluster, node, _spec(KV, "big", 64, memory_limit_mib=150))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "memory budget" in str(refused.value.details()) and "150 MiB more" in str(refused.value.details())
    assert cluster.vm_status(node, "big") is None
    # A memory limit below the guest's RAM is no limit at all: refused too.
    with pytest.raises(grpc.RpcError, match="below the guest"):
        _protect(cluster, node, _spec(KV, "small", 64, memory_limit_mib=16))
    # One that fits is taken.
    _protect(cluster, node, _spec(KV, "fits", 64, memory_limit_mib=100))
    assert cluster.status(node).memory_reserved_mib == 164

    fits_dir = vm_dir.parent / "vm-fits"
    _wait_for(fits_dir.is_dir)

    # A VM that ended goes with its cgroup and its reservation. (The spinning guest's loop is bounded:
    # at 0.1 CPU it takes about 9 s. It cannot be stopped before: a vCPU stops at its next synchronous
    # exit, and that guest makes none.)
    cluster.wait_for(node, "spin", "stopped", timeout=120)
    _wait_for(lambda: not vm_dir.exists())
    assert cluster.status(node).memory_reserved_mib == 100 and fits_dir.is_dir()
