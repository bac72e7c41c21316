"""`vmft node --etcd`: the arbiter on a real etcd (under the cluster's CA: only certificates of the cluster
reach it) and the nodes registered in its membership; `vmft status --etcd --json` shows the cluster from
etcd. A pair protected on etcd fails over when its primary's node is SIGKILLed: the backup's node wins
generation 2 in etcd, and the dead node leaves the membership when its lease runs out.

Every wait is bounded; every process is stopped by its PID (LocalCluster, EtcdCluster)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from etcd_helpers import etcd_under_ca

from proto import vmft_pb2, vmft_pb2_grpc
from replica.cluster import LocalCluster

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"


def _status(cluster: LocalCluster, endpoints: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "replica.cli", "status", "--etcd", ",".join(endpoints), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **cluster.client_env()},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return view


def _until(what: str, check: Any, limit_s: float = 15.0) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {limit_s} s")


@contextlib.contextmanager
def _etcd_under_ca(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """The kv image built, and etcd_under_ca (tests/etcd_helpers.py)."""
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    with etcd_under_ca(tmp_path) as made:
        yield made


def test_a_pair_on_etcd_fails_over_and_the_cluster_shows_in_status(tmp_path: Path) -> None:
    with _etcd_under_ca(tmp_path) as (ca, endpoints):
        with LocalCluster(tmp_path / "cluster", ca_dir=ca, etcd=endpoints) as cluster:
            a, b = cluster.add_node(), cluster.add_node()
            vm = cluster.protect(KV, a, b)
            cluster.wait_for(b, vm.name, "backup", timeout=15)
            view = _status(cluster, endpoints)
            members = {m["name"]: m["address"] for m in view["members"]}
            assert members == {a.node_id: a.name, b.node_id: b.name}, view["members"]
            assert [(c["vm"], c["generation"], c["node"]) for c in view["claims"]] == [("vm1", 1, a.node_id)]
            roles = {n["address"]: [v["role"] for v in n.get("vms", [])] for n in view["nodes"]}
            assert roles == {a.name: ["ROLE_PRIMARY"], b.name: ["ROLE_BACKUP"]}, view["nodes"]
            assert not (cluster.workdir / "arbiter.sqlite").exists(), "the SQLite arbiter was not used"

            cluster.kill_node(a)
            promoted = cluster.wait_for(b, vm.name, "serving", timeout=15)
            assert promoted.generation == 2

            def one_member() -> dict[str, Any] | None:
                view = _status(cluster, endpoints)
                return view if len(view["members"]) == 1 else None

            after = _until("the dead node leaving the membership", one_member)
            assert [m["name"] for m in after["members"]] == [b.node_id]
            assert [(c["generation"], c["node"]) for c in after["claims"]] == [(2, b.node_id)]

            # Re-protection only onto a live member: an address that is not one is refused; a new
            # member's node is accepted (a live checkpoint streamed over mutual TLS).
            stranger = vmft_pb2.ReprotectRequest(
                name=vm.name, backup_node="127.0.0.1:1", backup_service="127.0.0.1:2"
            )
            with cluster.channel(b) as channel, pytest.raises(grpc.RpcError) as refused:
                vmft_pb2_grpc.NodeStub(channel).Reprotect(stranger, timeout=30)
            assert "not a live member" in (refused.value.details() or ""), refused.value.details()
            c = cluster.add_node()
            _until("the new node in the membership", lambda: len(_status(cluster, endpoints)["members"]) == 2)
            status = cluster.reprotect(vm, b, c)
            assert status.protected, status
            cluster.wait_for(c, vm.name, "backup", timeout=15)


def test_vmft_protect_places_the_backup_on_a_live_member(tmp_path: Path) -> None:
    with _etcd_under_ca(tmp_path) as (ca, endpoints):
        with LocalCluster(tmp_path / "cluster", ca_dir=ca, etcd=endpoints) as cluster:
            a, b = cluster.add_node(), cluster.add_node()
            _until("both nodes in the membership", lambda: len(_status(cluster, endpoints)["members"]) == 2)
            result = subprocess.run(
                [sys.executable, "-m", "replica.cli", "protect", str(KV), "--primary", a.name,
                 "--etcd", ",".join(endpoints), "--name", "placed"],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **cluster.client_env()},
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert f"backup placed on {b.node_id} ({b.name}" in result.stdout, result.stdout
            cluster.wait_for(b, "placed", "backup", timeout=15)
            primary = cluster.vm_status(a, "placed")
            assert primary is not None and primary.protected and primary.role == vmft_pb2.ROLE_PRIMARY
