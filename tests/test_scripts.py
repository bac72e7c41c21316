"""The scripts a user runs, as they run them: the main job (`scripts/demo`, shortened by its own options, its
output lines parsed and checked), `scripts/chaos-campaign` (two faults), `scripts/bench --list` and
`scripts/bench reprotect --quick`; and `vmft chaos` leaving no work directory behind unless --keep."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import benchlib
from replica.chaos import work_directory

ROOT = Path(__file__).resolve().parent.parent


def script(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [str(ROOT / "scripts" / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip


def lines_with(prefix: str, stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefix)]


@pytest.mark.kvm
def test_demo_short_run() -> None:
    """The main job with three clients and under a second of load on each side of the kill."""
    result = script("demo", "--clients", "3", "--before", "0.8", "--after", "0.8", timeout=180)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert not lines_with("demo: VIOLATION", out), out

    (workdir,) = re.findall(r"^demo: work directory (\S+)$", out, re.M)
    assert not Path(workdir).exists(), "the demo left its work directory behind"
    nodes = re.search(r"^demo: node A (\S+) \(pid (\d+)\), node B (\S+) \(pid (\d+)\)$", out, re.M)
    assert nodes, out
    node_a, pid_a, node_b, pid_b = nodes.group(1), int(nodes.group(2)), nodes.group(3), int(nodes.group(4))
    assert node_a != node_b and pid_a != pid_b
    for pid in (pid_a, pid_b):  # both node daemons stopped at the end
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    protected = re.search(r"^demo: protected kv guest: primary on A, backup on B; service (\S+), "
                          r"after failover (\S+)$", out, re.M)  # fmt: skip
    assert protected and protected.group(1) != protected.group(2), out
    before = re.search(r"^demo: before the fault: position (\d+), backup acknowledged (\d+), "
                       r"log ([\d.]+) KiB/s, (\d+) operations so far$", out, re.M)  # fmt: skip
    assert before, out
    position, acked, log_rate, ops_before = (int(before.group(1)), int(before.group(2)),
                                             float(before.group(3)), int(before.group(4)))  # fmt: skip
    assert position >= acked > 0 and log_rate > 0 and ops_before > 0, before.group(0)
    assert f"demo: SIGKILL node A (pid {pid_a}), the primary" in out
    assert re.search(r"^demo: node B is primary in generation 2 \(", out, re.M), out
    failover = re.search(r"^demo: failover seen by the controller within (\d+) ms of the kill$", out, re.M)
    assert failover and 0 < int(failover.group(1)) < 10_000, out
    recovery = re.search(r"^demo: recovery time seen by (\d+) clients \(last reply before the fault to first "
                         r"after\): median ([\d.]+) ms, max ([\d.]+) ms$", out, re.M)  # fmt: skip
    assert recovery, out
    clients, median_ms, max_ms = int(recovery.group(1)), float(recovery.group(2)), float(recovery.group(3))
    assert clients == 3 and 0 < median_ms <= max_ms < 5000, recovery.group(0)
    history = re.search(r"^demo: history checked: (\d+) operations, (\d+) acknowledged writes checked, "
                        r"lost (\d+), duplicated (\d+), inconsistent reads (\d+), two primaries (\d+), "
                        r"failed ops (\d+)$", out, re.M)  # fmt: skip
    assert history, out
    operations, writes, lost, duplicated, inconsistent, two_primaries, _failed = map(int, history.groups())
    assert operations > ops_before and 0 < writes <= operations, history.group(0)
    assert (lost, duplicated, inconsistent, two_primaries) == (0, 0, 0, 0), history.group(0)


@pytest.mark.kvm
def test_chaos_campaign_script_short(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = script("chaos-campaign", "2", "3", "--out", str(out), "--clients", "3", timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = lines_with("chaos: 2 faults in ", result.stdout)
    assert len(summary) == 1 and summary[0].endswith("verdict ok"), result.stdout[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and len(report["faults"]) == 2 and report["acknowledged_writes"] > 0, report
    (workdir,) = re.findall(r"^chaos: work directory (\S+), report into", result.stdout, re.M)
    assert not Path(workdir).exists(), "vmft chaos left its work directory (and its 512 MiB disk) behind"


def test_chaos_work_directory_is_removed_unless_kept() -> None:
    said: list[str] = []
    with work_directory(False, said.append) as path:
        assert path.is_dir() and path.name.startswith("vmft-chaos.")
        (path / "kv.disk").write_bytes(b"x")
    assert not path.exists() and not said
    with pytest.raises(RuntimeError), work_directory(False, said.append) as path:
        raise RuntimeError("a campaign that failed")
    assert not path.exists(), "removed after an error too"
    try:
        with work_directory(True, said.append) as path:
            pass
        assert path.is_dir() and said == [f"chaos: kept the work directory {path}"]
    finally:
        path.rmdir()


def test_bench_list() -> None:
    result = script("bench", "--list", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == benchlib.benchmark_names()
    assert {"checkpoint", "exits", "failover", "kv", "record", "replication", "reprotect", "spin"} <= set(
        result.stdout.split()
    )


@pytest.mark.kvm
def test_bench_reprotect_quick() -> None:
    result = script("bench", "reprotect", "--quick", "--json", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {f["name"]: f for f in map(json.loads, lines_with("{", result.stdout))}
    prefix = "reprotect 64 MiB, 8 MiB touched: "
    new_backup = figures[prefix + "time to a new backup"]
    paused = figures[prefix + "primary paused"]
    streamed = figures[prefix + "bytes streamed"]
    # A new backup really was seeded (and the local checkpoint, its reference, really taken); the stream
    # carries what the guest touched, not all of its RAM.
    assert 0 < new_backup["value"] < 60 and new_backup["reference"] > 0, new_backup
    assert 0 < paused["value"] < 5000 and paused["reference"] > 0, paused
    assert streamed["reference"] == 64 and 8 <= streamed["value"] < 32, streamed
