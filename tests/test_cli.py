"""The `vmft` command line as a user runs it: node daemons started with `vmft node` and no --arbiter (the
default arbiter path /var/tmp/vmft/arbiter.sqlite, made private to the test by a mount namespace with a
tmpfs on /var/tmp), `vmft protect`, `vmft status` (its table parsed), `vmft kv`, a failover decided through
that default arbiter, `vmft reprotect`, automatic re-protection after a guest restart, and `vmft snapshot`.

Every process is started and stopped by this file (by PID); every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import readline_within

from proto import vmft_pb2, vmft_pb2_grpc
from replica.cli import DEFAULT_ARBITER
from replica.faults import Fault, inject
from replica.kv_client import KvClientSync
from replica.node_client import ClientAuth, find_identity

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"


# The nodes serve mutual TLS (the default): the test makes its CA with `vmft ca`, and client commands run
# as its admin through $VMFT_CA and $VMFT_IDENTITY.
CLIENT_ENV: dict[str, str] = {}


def vmft(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replica.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **CLIENT_ENV},
    )  # fmt: skip


def admin() -> ClientAuth:
    return ClientAuth(find_identity(CLIENT_ENV["VMFT_IDENTITY"], CLIENT_ENV["VMFT_CA"]))


class MountNamespace:
    """A process holding a private mount namespace with a tmpfs on /var/tmp: node daemons started in it
    use the default arbiter path without touching the machine's real one."""

    def __init__(self) -> None:
        script = "mount -t tmpfs vmft-test /var/tmp && echo ready && exec sleep 3600"
        try:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        except FileNotFoundError:
            pytest.skip("needs unshare (util-linux) for a private /var/tmp")
        assert self.holder.stdout is not None
        line = readline_within(self.holder.stdout, 10, "the namespace holder's ready line")
        if line.strip() != "ready":
            self.close()
            pytest.skip(f"cannot make a private /var/tmp (needs root or user namespaces): {line!r}")

    def command(self, *args: str) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", *args]

    def exists(self, path: str) -> bool:
        return subprocess.run(self.command("test", "-e", path), timeout=10).returncode == 0

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    """A `vmft node` process (its address is its name: it cannot listen on port 0 and report)."""

    address: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)


class Nodes:
    """`vmft node` daemons in a MountNamespace, with no --arbiter (the default path)."""

    def __init__(self, ns: MountNamespace, tmp: Path, auto_reprotect_s: float) -> None:
        self.ns = ns
        self.tmp = tmp
        self.auto_reprotect_s = auto_reprotect_s
        self.daemons: list[Daemon] = []
        self.ca = tmp / "ca"
        if not (self.ca / "ca.crt").exists():
            for command in (("init", str(self.ca)), ("issue", "admin", "tester", "--ca", str(self.ca))):
                made = vmft("ca", *command)
                assert made.returncode == 0, made.stderr
        CLIENT_ENV.update(VMFT_CA=str(self.ca), VMFT_IDENTITY="tester")

    def add(self) -> Daemon:
        index = len(self.daemons)
        if not (self.ca / "nodes" / f"node{index}").exists():
            issued = vmft("ca", "issue", "node", f"node{index}", "--ca", str(self.ca))
            assert issued.returncode == 0, issued.stderr
        for _attempt in range(3):  # a port taken between picking and binding: pick another
            address = f"127.0.0.1:{_free_port()}"
            daemon = Daemon(address, self.tmp / f"node{index}", self.tmp / f"node{index}.log")
            if self.start(daemon):
                self.daemons.append(daemon)
                return daemon
        raise AssertionError(f"no node could listen: {daemon.log.read_text()[-2000:]}")

    def start(self, daemon: Daemon, limit_s: float = 20.0) -> bool:
        command = self.ns.command(
            sys.executable, "-m", "replica.cli", "node", "--listen", daemon.address,
            "--data-dir", str(daemon.data_dir), "--auto-reprotect", str(self.auto_reprotect_s),
            "--ca", str(self.ca), "--cert", daemon.data_dir.name,
        )  # fmt: skip
        with open(daemon.log, "ab") as log:
            daemon.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if not daemon.alive():
                if "cannot listen" in daemon.log.read_text():
                    return False
                raise AssertionError(f"vmft node exited at start: {daemon.log.read_text()[-2000:]}")
            if node_status(daemon.address) is not None:
                return True
            time.sleep(0.05)
        raise AssertionError(f"vmft node {daemon.address} did not answer within {limit_s} s")

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()


def node_status(address: str, timeout: float = 1.0) -> vmft_pb2.NodeStatus | None:
    with admin().channel(address) as channel:
        try:
            status: vmft_pb2.NodeStatus = vmft_pb2_grpc.NodeStub(channel).Status(
                vmft_pb2.StatusRequest(), timeout=timeout
            )
            return status
        except grpc.RpcError:
            return None


def vm_status(address: str, name: str = "vm1") -> vmft_pb2.VmStatus | None:
    node = node_status(address)
    return next((vm for vm in node.vms if vm.name == name), None) if node is not None else None


@dataclass
class Row:
    """One line of `vmft status`."""

    node: str
    vm: str
    role: str
    generation: int
    position: int
    acked: int
    held: int
    protected: bool
    rest: str  # the state, then (message), log rate, progress


def status_table(*addresses: str) -> tuple[int, dict[str, Row | str]]:
    """`vmft status --node A --node B`: its exit status and, per node, its row (or what it said)."""
    result = vmft("status", *(arg for a in addresses for arg in ("--node", a)), timeout=30)
    lines = result.stdout.splitlines()
    assert lines and lines[0].split() == ["node", "vm", "role", "gen", "position", "acked", "held", "prot",
                                          "state"], result.stdout  # fmt: skip
    rows: dict[str, Row | str] = {}
    for line in lines[1:]:
        words = line.split(maxsplit=8)
        if len(words) == 9 and words[3].isdigit():
            rows[words[0]] = Row(words[0], words[1], words[2], int(words[3]), int(words[4]), int(words[5]),
                                 int(words[6]), words[7] == "yes", words[8])  # fmt: skip
        else:
            rows[words[0]] = line.split(maxsplit=1)[1]
    return result.returncode, rows


def until(what: str, predicate: Callable[[], object], limit_s: float = 30.0) -> object:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {limit_s} s")


@pytest.fixture
def nodes_factory(tmp_path: Path) -> Iterator[Callable[[float], Nodes]]:
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    made: list[tuple[MountNamespace, Nodes]] = []

    def make(auto_reprotect_s: float) -> Nodes:
        ns = MountNamespace()
        nodes = Nodes(ns, tmp_path, auto_reprotect_s)
        made.append((ns, nodes))
        return nodes

    try:
        yield make
    finally:
        for ns, nodes in made:
            nodes.close()
            ns.close()
        CLIENT_ENV.clear()


def protect(a: Daemon, b: Daemon, *options: str) -> tuple[str, str]:
    """`vmft protect` kv on A (backup on B); the service addresses it printed."""
    result = vmft("protect", str(KV), "--primary", a.address, "--backup", b.address, *options)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"protected vm1: generation 1, primary {a.address}, backup {b.address}", lines
    match = re.fullmatch(r"service: (127\.0\.0\.1:\d+) \(after failover: (127\.0\.0\.1:\d+)\)", lines[1])
    assert match, lines
    return match.group(1), match.group(2)


def test_protect_status_kv_failover_and_reprotect_with_the_default_arbiter(
    nodes_factory: Callable[[float], Nodes],
) -> None:
    nodes = nodes_factory(0)  # no automatic re-protection: `vmft reprotect` does it
    a, b = nodes.add(), nodes.add()
    service, backup_service = protect(a, b)
    both = f"{service},{backup_service}"

    def pair_up() -> dict[str, Row | str] | None:
        _rc, rows = status_table(a.address, b.address)
        row_b = rows.get(b.address)
        return rows if isinstance(row_b, Row) and row_b.rest.startswith("replaying") else None

    rows = until("B replaying as the backup", pair_up)
    assert isinstance(rows, dict)
    row_a, row_b = rows[a.address], rows[b.address]
    assert isinstance(row_a, Row) and isinstance(row_b, Row)
    assert (row_a.vm, row_a.role, row_a.generation, row_a.protected) == ("vm1", "primary", 1, True), row_a
    assert row_a.rest.startswith("running"), row_a
    assert (row_b.vm, row_b.role, row_b.generation) == ("vm1", "backup", 1), row_b
    assert row_a.position >= row_a.acked > 0, row_a
    # The arbiter database is where the default says, in this test's private /var/tmp only.
    assert nodes.ns.exists(DEFAULT_ARBITER), f"no {DEFAULT_ARBITER} in the nodes' namespace"

    # vmft kv against both service addresses.
    assert vmft("kv", both, "set", "greeting", "hello").returncode == 0
    got = vmft("kv", both, "get", "greeting")
    assert (got.returncode, got.stdout) == (0, "hello\n"), got
    assert vmft("kv", both, "incr", "n", "5").stdout == "5\n"
    assert vmft("kv", both, "incr", "n").stdout == "6\n"
    assert vmft("kv", both, "del", "greeting").stdout == "deleted\n"
    missing = vmft("kv", both, "get", "greeting")
    assert (missing.returncode, missing.stdout) == (1, "(not found)\n"), missing
    assert vmft("kv", both, "set", "greeting", "again").returncode == 0

    # SIGKILL of A: B claims generation 2 through the default arbiter and serves alone.
    a.kill()

    def b_primary() -> Row | None:
        rc, rows = status_table(a.address, b.address)
        row = rows.get(b.address)
        assert rc == 0, "one node answering is not a failure of `vmft status`"
        ok = isinstance(row, Row) and row.role == "primary" and row.rest.startswith("running")
        return row if ok and isinstance(row, Row) else None

    row = until("B primary after the kill", b_primary)
    assert isinstance(row, Row) and row.generation == 2 and not row.protected, row
    _rc, rows = status_table(a.address, b.address)
    assert isinstance(rows[a.address], str) and "unreachable" in str(rows[a.address]), rows
    assert vmft("kv", both, "get", "greeting").stdout == "again\n"
    assert vmft("kv", both, "incr", "n").stdout == "7\n"

    # A back (same address, same data directory): `vmft reprotect` seeds a new backup there.
    assert nodes.start(a)
    result = vmft("reprotect", "vm1", "--primary", b.address, "--backup", a.address, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vm1: "), lines
    after = r"\(after failover: 127\.0\.0\.1:\d+\)"
    assert re.fullmatch(rf"service: {re.escape(backup_service)} {after}", lines[1]), lines

    def protected_again() -> bool:
        _rc, rows = status_table(a.address, b.address)
        row_a, row_b = rows.get(a.address), rows.get(b.address)
        primary = isinstance(row_b, Row) and row_b.role == "primary" and row_b.protected
        backup = isinstance(row_a, Row) and row_a.role == "backup" and row_a.rest.startswith("replaying")
        return primary and backup

    until("B protected by a new backup on A", protected_again)
    assert vmft("kv", both, "get", "n").stdout == "7\n"


def test_the_pair_reprotects_itself_after_a_guest_restart(nodes_factory: Callable[[float], Nodes]) -> None:
    """A guest crash: the primary restarts its guest from a checkpoint (dropping its backup, whose replay
    cannot follow a restart), then re-protects itself onto the other node with no command."""
    nodes = nodes_factory(0.2)
    a, b = nodes.add(), nodes.add()
    # A short hang timeout (a checkpoint is trusted 0.6 s after it is taken, within the 1 s between
    # periodic checkpoints): see test_a_guest_crash_keeps_acknowledged_writes_with_the_defaults for the
    # default of 2 s.
    service, backup_service = protect(a, b, "--hang-timeout", "0.5")
    until("A protected", lambda: (s := vm_status(a.address)) is not None and s.protected)
    assert vmft("kv", f"{service},{backup_service}", "set", "k", "before").returncode == 0
    before = vm_status(a.address)
    assert before is not None and before.faults_recovered == 0 and before.protected
    crash = vmft("fault", "vm1", "crash", "--node", a.address, "--node", b.address)
    assert crash.returncode == 0 and "CRASH" in crash.stdout, crash

    def restarted_and_protected() -> vmft_pb2.VmStatus | None:
        status = vm_status(a.address)
        backup = vm_status(b.address)
        done = (status is not None and status.faults_recovered == 1 and status.protected
                and backup is not None and backup.role == vmft_pb2.ROLE_BACKUP
                and backup.generation == status.generation)  # fmt: skip
        return status if done else None

    status = until("the guest restarted and the pair protected again", restarted_and_protected)
    assert isinstance(status, vmft_pb2.VmStatus)
    assert status.role == vmft_pb2.ROLE_PRIMARY and status.generation > before.generation, status
    assert "re-protected" in status.message, status.message
    got = vmft("kv", f"{service},{backup_service}", "get", "k")
    assert (got.returncode, got.stdout) == (0, "before\n"), got


def test_a_guest_crash_keeps_acknowledged_writes_with_the_defaults(
    nodes_factory: Callable[[float], Nodes],
) -> None:
    """Defaults everywhere (hang timeout 2 s, a checkpoint a second): in steady state (several periodic
    checkpoints taken), a write acknowledged just before a guest crash is still there after the restart."""
    nodes = nodes_factory(0)
    a, b = nodes.add(), nodes.add()
    service, backup_service = protect(a, b)
    checkpoints = a.data_dir / "checkpoints" / "vm1"

    def newest() -> int:  # the periodic checkpoints' files are numbered: 000001-full.vmck, 000002-incr.vmck
        return max((int(path.name.split("-")[0]) for path in checkpoints.glob("*.vmck")), default=0)

    until("four periodic checkpoints", lambda: newest() >= 4, 30)
    # Right after a periodic checkpoint: the write, then the crash at once (in this process: no CLI start-up
    # between them), so that the checkpoint the restart trusts (2.1 s old) is older than the write.
    taken = newest()
    until("the next periodic checkpoint", lambda: newest() > taken, 10)
    with KvClientSync([service, backup_service], timeout=2.0) as kv:
        kv.set("k", "acknowledged")
    inject([a.address, b.address], "vm1", Fault.CRASH, 0.5, 30.0, 0.2, auth=admin())
    until("the guest restarted", lambda: (s := vm_status(a.address)) is not None and s.faults_recovered == 1)
    got = vmft("kv", f"{service},{backup_service}", "get", "k")
    assert (got.returncode, got.stdout) == (0, "acknowledged\n"), f"an acknowledged write was lost: {got}"


def test_vmft_snapshot_and_restore(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    run = subprocess.Popen(
        [sys.executable, "-m", "replica.cli", "run", str(KV), "--listen", "127.0.0.1:0",
         "--control-socket", str(sock)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    restore: subprocess.Popen[str] | None = None
    try:
        address = listening(run)
        assert vmft("kv", address, "set", "a", "1").returncode == 0
        until("the control socket", sock.exists, 10)
        snap = vmft("snapshot", str(sock), str(tmp_path / "snap.vmck"))
        assert snap.returncode == 0, snap.stderr
        assert re.match(r"position=\d+ ", snap.stdout), snap.stdout
        assert (tmp_path / "snap.vmck").stat().st_size > 0
        assert vmft("kv", address, "set", "a", "2").returncode == 0  # after the snapshot
        restore = subprocess.Popen(
            [sys.executable, "-m", "replica.cli", "restore", str(tmp_path / "snap.vmck"), "--listen",
             "127.0.0.1:0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert vmft("kv", listening(restore), "get", "a").stdout == "1\n"
    finally:
        for proc in (run, restore):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(10)
    nowhere = vmft("snapshot", str(tmp_path / "nothing.sock"), str(tmp_path / "x.vmck"))
    assert nowhere.returncode != 0 and "vmft snapshot: cannot reach" in nowhere.stderr, nowhere
    assert not (tmp_path / "x.vmck").exists()


def listening(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    for _ in range(50):
        line = readline_within(proc.stderr, 20, "vmft: listening on ...")
        assert line, "vmft ended before listening"
        if line.startswith("vmft: listening on "):
            return line.split()[-1]
    raise AssertionError("no listening line")


def test_node_refuses_timings_out_of_range(tmp_path: Path) -> None:
    base = ("node", "--listen", "127.0.0.1:0", "--insecure", "--data-dir", str(tmp_path / "d"))
    for flags, says in (
        (("--input-hold-ms", "-1"), "-1 ms is outside 0 to 5 ms"),
        (("--heartbeat-ms", "nan"), "outside 0.1 to 1000 ms"),
        (("--failure-timeout-ms", "soon"), "'soon' is not a number of milliseconds"),
        (("--heartbeat-ms", "50", "--failure-timeout-ms", "20"), "must be longer than --heartbeat-ms"),
        (("--replication-port", "70000"), "'70000' is not a port"),
        (("--replication-advertise", "nowhere"), "expected HOST:PORT"),
    ):
        done = vmft(*base, *flags, timeout=30)
        assert done.returncode != 0 and says in done.stderr, (flags, done.returncode, done.stderr)
    assert not (tmp_path / "d").exists()  # refused before it made anything
