"""`vmft chaos --hosts N`: fault campaigns where each node and each etcd member is its own namespace host
(replica/chaos_hosts.py) and partition faults take real links down (replica/faults.py), with the history
checker's "never two primaries releasing output" (replica/workload.py: judged from the replies the clients
saw on a counter they all share).

The checker's rule is tested on made-up histories (no hosts needed). The campaign runs for real: three node
hosts, three etcd hosts, clients outside them, one fault of each partition kind and a node kill; the JSON
report must show each partition's client-seen outage, who served after it, and verdict ok. A campaign
interrupted with Ctrl-C leaves no namespace, link or record behind. Needs root (network namespaces),
etcd and KVM; skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from replica import hosts
from replica.workload import Op, check_shared

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"
PARTITION_KINDS = ["isolate-primary", "split-pair", "isolate-backup", "isolate-etcd"]



# ----- the two-primaries rule on made-up histories ---------------------------------------------------------


def shared(client: int, start: float, end: float, value: int, server: str) -> Op:
    return Op(client, "shared", "s", "1", start, end, True, str(value), server=server)


def test_one_primary_passes() -> None:
    history = [shared(i % 3, i, i + 0.5, i + 1, "a:1") for i in range(20)]
    # Concurrent increments may finish in any order: only real-time order binds.
    history += [shared(0, 30.0, 31.0, 22, "b:1"), shared(1, 30.1, 30.9, 21, "b:1")]
    assert check_shared(history) == []


def test_two_diverged_copies_answering_the_same_value_are_two_primaries() -> None:
    history = [shared(0, 0, 1, 1, "a:1"), shared(0, 2, 3, 2, "a:1"), shared(1, 2.1, 2.9, 2, "b:1")]
    violations = check_shared(history)
    assert [v.kind for v in violations] == ["two-primaries"], violations
    assert "value 2 was returned twice" in violations[0].detail
    assert "a:1" in violations[0].detail and "b:1" in violations[0].detail


def test_a_copy_that_missed_an_acknowledged_increment_is_a_second_primary() -> None:
    # 5 was acknowledged (by b) before client 0 sent its increment; a stale copy (a) then answered 4.
    history = [shared(1, 0, 1, 5, "b:1"), shared(0, 2, 3, 4, "a:1")]
    violations = check_shared(history)
    assert len(violations) == 1 and violations[0].kind == "two-primaries", violations
    assert "gave 4" in violations[0].detail and "after 5 was acknowledged" in violations[0].detail
    # Failed (unacknowledged) increments say nothing: their outcome is unknown.
    failed = Op(0, "shared", "s", "1", 2, 3, False, error="timeout")
    assert check_shared([shared(1, 0, 1, 5, "b:1"), failed]) == []


# ----- campaigns across hosts ------------------------------------------------------------------------------


def vmft_chaos(*args: str, **popen: Any) -> subprocess.Popen[str]:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    return subprocess.Popen(
        [sys.executable, "-m", "replica.cli", "chaos", "--hosts", "3", "--etcd-members", "3", *args],
        cwd=ROOT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen,
    )  # fmt: skip


def records_of(pid: int) -> list[dict[str, Any]]:
    """The host networks that process `pid` has open (hosts.py's records under /run/vmft-hosts)."""
    out = []
    for path in hosts.STATE_DIR.glob("*.json") if hosts.STATE_DIR.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("pid") == pid:
            out.append(data)
    return out


def namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.kvm
@pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))
@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_every_partition_kind_on_three_hosts(tmp_path: Path) -> None:
    faults = ",".join([*PARTITION_KINDS, "kill-primary"])
    proc = vmft_chaos("--faults", faults, "--seed", "5", "--out", str(tmp_path / "out"), "--json",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out)
    assert report["verdict"] == "ok" and report["ok"], (report["violations"], err[-3000:])
    assert report["hosts"] == 3 and report["etcd_members"] == 3
    outcomes = {f["fault"]: f for f in report["faults"]}
    assert [f["fault"] for f in report["faults"]] == [*PARTITION_KINDS, "kill-primary"], err[-3000:]
    node_hosts = {"n0", "n1", "n2"}
    for kind in PARTITION_KINDS:
        f = outcomes[kind]
        assert not f["error"], f
        # Availability, not only safety: the clients got through again, and the report says how long
        # they waited and who answered them afterwards.
        assert f["recovery_ms"] is not None and f["outage_p50_ms"] is not None, f
        assert f["partition"] and f["served_by"], f
        assert set(f["served_by"]) <= node_hosts, f
        assert report["kinds"][kind]["n"] == 1 and report["kinds"][kind]["recovery_p50_ms"] is not None
    # Whose host was cut decides who serves after it.
    isolated = outcomes["isolate-primary"]["partition"].split()[1]  # "host nX cut off for ..."
    assert isolated in node_hosts and isolated not in outcomes["isolate-primary"]["served_by"]
    assert outcomes["isolate-primary"]["failover_ms"] is not None  # the backup took over
    backup = outcomes["isolate-backup"]["partition"].split()[1]
    assert backup not in outcomes["isolate-backup"]["served_by"]
    assert outcomes["isolate-etcd"]["partition"].split()[1] in {"e0", "e1", "e2"}
    assert outcomes["isolate-etcd"]["failover_ms"] is None  # one etcd member down: no failover
    # Each fault that broke the pair was repaired (re-protection measured).
    for kind in ["isolate-primary", "split-pair", "isolate-backup", "kill-primary"]:
        assert outcomes[kind]["reprotect_ms"] is not None, outcomes[kind]
    assert report["shared_increments"] > 0 and report["acknowledged_writes"] > 0
    assert "verdict ok" in report["summary"]
    assert (tmp_path / "out" / "report.txt").read_text().count("cut") >= 4
    assert records_of(proc.pid) == [], "the campaign's host network is removed"


@pytest.mark.kvm
@pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))
@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_ctrl_c_removes_every_host(tmp_path: Path) -> None:
    before = namespaces()
    proc = vmft_chaos("--faults", "isolate-backup,isolate-primary,split-pair", "--out", str(tmp_path / "out"),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert proc.stdout is not None
        made: set[str] = set()
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # until the first fault is done: nodes, etcd and the load are all up
            made |= {ns for rec in records_of(proc.pid) for ns in rec.get("netns", [])}
            if "[1/3]" in line or time.monotonic() > deadline:
                break
        assert len(made) == 6, made  # three node hosts, three etcd hosts
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert records_of(proc.pid) == []
    assert not (made & namespaces()), "a namespace of the interrupted campaign is left"
    assert not (made & before)
