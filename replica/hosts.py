"""Test hosts on one machine: network namespaces on a Linux bridge.

Each `Host` is a network namespace with one veth link to a bridge that exists only for this run, its own
IPv4 address on that bridge (a /24 picked per run, no default route: nothing it sends leaves the machine),
its loopback up, and its own data directory. The namespaces share nothing but the bridge, so a node run in
one is a separate machine as far as the network is concerned.

Link faults are real and silent: `cut(host)` takes the host's bridge-side interface down, so its packets
vanish without an error on either side (a connection attempt across it times out); `heal(host)` brings it
back. `cut_between(a, b)` cuts one pair only (blackhole routes in both namespaces), which is how a primary
is isolated from its backup while both still reach everyone else. Delay and loss stay the relay's job
(replica/relay.py): this kernel has no netem.

Everything a `HostNetwork` makes (namespaces, veth pairs, the bridge, processes it spawned) is removed by
`close()`: on leaving the `with` block, also after an exception or Ctrl-C (KeyboardInterrupt unwinds it),
at interpreter exit (atexit), and on SIGTERM (turned into SystemExit while a network is open in the main
thread). A run killed outright (SIGKILL) leaves a record under /run/vmft-hosts naming what it made;
`sweep_stale()` (called by every new network) removes what dead runs left. Names carry a per-run token, so
parallel runs never collide; interface names stay within the kernel's 15 characters.

Needs root (CAP_NET_ADMIN) and the `ip` tool.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from monitor.errors import HostError

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/vmft-hosts")
NETNS_PREFIX = "vmft-"
# Bridge subnets are drawn from 10.213.0.0/16 (one /24 per run), away from anything this machine routes.
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
IP_TIMEOUT_S = 10.0


class HostsError(HostError):
    """A test host could not be created, changed or removed."""

    hint = "test hosts need root (CAP_NET_ADMIN) and the ip tool (iproute2)"


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostsError(f"{' '.join(argv)}: {e}") from e
    if check and done.returncode != 0:
        raise HostsError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Host:
    """One test host: a namespace, its address on the run's bridge and its data directory."""

    name: str
    netns: str
    address: str
    prefix_len: int
    outer_if: str  # the veth end in the root namespace, enslaved to the bridge (cut/heal act on it)
    inner_if: str  # the veth end inside the namespace, carrying `address`
    data_dir: Path

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host (for any spawner: subprocess, asyncio, ...)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class _Record:
    """What one run made, written to STATE_DIR so a later run can remove it if this one is SIGKILLed."""

    pid: int
    bridge: str
    subnet: str = ""
    outer_ifs: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)


class HostNetwork:
    """A bridge and the hosts on it. Use as a context manager; `close()` is idempotent."""

    def __init__(self, base_dir: str | Path, *, root_address: bool = False) -> None:
        """`base_dir` holds one data directory per host. With `root_address` the bridge itself gets the
        subnet's .1, so processes in the root namespace (clients "outside every host") reach the hosts; the
        root namespace does not forward (ip_forward is left alone), so hosts still have no route out."""
        self.base_dir = Path(base_dir)
        self.token = secrets.token_hex(3)  # 6 hex digits: names unique per run
        self.bridge = f"vb{self.token}"
        self.hosts: dict[str, Host] = {}
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._cut_pairs: set[tuple[str, str]] = set()
        self._next_index = 1
        self._closed = False
        self._lock = threading.Lock()
        self._old_sigterm: Any = None
        self._record = _Record(pid=os.getpid(), bridge=self.bridge)
        sweep_stale()
        self.subnet = self._pick_subnet()
        self.root_address = str(self.subnet.network_address + 1) if root_address else None
        self._save_record()
        _live.add(self)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            if self.root_address:
                _ip("addr", "add", f"{self.root_address}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        log.info("host network %s on %s (bridge %s)", self.token, self.subnet, self.bridge)

    # --- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> HostNetwork:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_exit)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the processes this network spawned, then remove every host, veth and the bridge."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _, proc in self._procs:
            _stop(proc)
        for host in list(self.hosts.values()):
            self._remove_links(host)
        _ip("link", "del", self.bridge, check=False)
        # Anything recorded but not in self.hosts (a failure half-way through add()) goes too.
        _remove_recorded(self._record)
        _record_path(self.token).unlink(missing_ok=True)
        self.hosts.clear()
        _live.discard(self)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        log.info("host network %s removed", self.token)

    # --- hosts ------------------------------------------------------------------------------------------
    def add(self, name: str) -> Host:
        """Create host `name`: namespace, veth pair on the bridge, address, loopback, data directory."""
        if self._closed:
            raise HostsError("the host network is closed")
        if name in self.hosts:
            raise HostsError(f"host {name} exists")
        if not name or not name.replace("-", "").replace("_", "").isalnum() or len(name) > 32:
            raise HostsError(f"bad host name {name!r} (letters, digits, - and _, at most 32)")
        index = self._next_index
        if index >= self.subnet.num_addresses - 2:
            raise HostsError(f"no address left in {self.subnet}")
        self._next_index += 1
        netns = f"{NETNS_PREFIX}{self.token}-{name}"
        outer, inner = f"vh{self.token}{index}", f"vi{self.token}{index}"
        address = str(self.subnet.network_address + 1 + index)
        data_dir = self.base_dir / name
        host = Host(name, netns, address, self.subnet.prefixlen, outer, inner, data_dir)
        self._record.netns.append(netns)
        self._record.outer_ifs.append(outer)
        self._save_record()
        try:
            _ip("netns", "add", netns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", netns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", "lo", "up", netns=netns)
            _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner, netns=netns)
            _ip("link", "set", inner, "up", netns=netns)
            data_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self._remove_links(host)
            raise
        self.hosts[name] = host
        log.info("host %s: %s in %s", name, address, netns)
        return host

    def remove(self, name: str) -> None:
        """Remove host `name` (its namespace and link; processes spawned in it are stopped first)."""
        host = self.hosts.pop(name)
        for owner, proc in self._procs:
            if owner == name:
                _stop(proc)
        self._remove_links(host)

    def _remove_links(self, host: Host) -> None:
        _stop_netns_processes(host.netns)
        _ip("link", "del", host.outer_if, check=False)  # deletes the pair, the inner end too
        _ip("netns", "del", host.netns, check=False)
        if host.netns in self._record.netns:
            self._record.netns.remove(host.netns)
        if host.outer_if in self._record.outer_ifs:
            self._record.outer_ifs.remove(host.outer_if)
        if not self._closed:
            self._save_record()

    # --- faults -----------------------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        """Cut host `name` off the bridge silently: its link goes down, packets vanish both ways."""
        _ip("link", "set", self.hosts[name].outer_if, "down")
        log.info("host %s cut off", name)

    def heal(self, name: str) -> None:
        """Bring host `name`'s link back up."""
        _ip("link", "set", self.hosts[name].outer_if, "up")
        log.info("host %s healed", name)

    def cut_between(self, a: str, b: str) -> None:
        """Cut the pair a<->b only: each side drops what it sends to the other (a blackhole route);
        both still reach every other host."""
        ha, hb = self.hosts[a], self.hosts[b]
        _ip("route", "add", "blackhole", f"{hb.address}/32", netns=ha.netns)
        _ip("route", "add", "blackhole", f"{ha.address}/32", netns=hb.netns)
        self._cut_pairs.add((a, b))
        log.info("hosts %s and %s cut from each other", a, b)

    def heal_between(self, a: str, b: str) -> None:
        ha, hb = self.hosts[a], self.hosts[b]
        _ip("route", "del", "blackhole", f"{hb.address}/32", netns=ha.netns, check=False)
        _ip("route", "del", "blackhole", f"{ha.address}/32", netns=hb.netns, check=False)
        self._cut_pairs.discard((a, b))

    # --- processes --------------------------------------------------------------------------------------
    def spawn(self, name: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside host `name` (working directory: its data directory unless `cwd` is given).
        The process is stopped by its PID when the host or the network is removed. `ip netns exec` execs
        the command, so the returned PID is the command's own."""
        host = self.hosts[name]
        popen.setdefault("cwd", host.data_dir)
        proc: subprocess.Popen[Any] = subprocess.Popen(host.argv(argv), **popen)
        self._procs.append((name, proc))
        return proc

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 10.0, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside host `name` to completion (bounded by `timeout`), capturing its output; in
        the host's data directory unless `cwd` is given."""
        host = self.hosts[name]
        return subprocess.run(
            host.argv(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd or host.data_dir
        )

    # --- bookkeeping ------------------------------------------------------------------------------------
    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of the pool that nothing in the root namespace uses (another run's bridge with a root
        address, any route) and no live run has recorded, so parallel runs never share a subnet."""
        text = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
        used = {ipaddress.IPv4Address(a) for a in re.findall(r"\b(\d+\.\d+\.\d+\.\d+)\b", text)}
        taken = {ipaddress.IPv4Network(r["subnet"]) for r in _records() if r.get("subnet")}
        subnets = list(SUBNET_POOL.subnets(new_prefix=24))
        random.shuffle(subnets)
        for net in subnets:
            if net not in taken and not any(a in net for a in used):
                self._record.subnet = str(net)
                return net
        raise HostsError(f"no free /24 left in {SUBNET_POOL}")

    def _save_record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        data = dict(self._record.__dict__)
        tmp = _record_path(self.token).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(_record_path(self.token))


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=3)


def _record_path(token: str) -> Path:
    return STATE_DIR / f"{token}.json"


def _records() -> list[dict[str, Any]]:
    out = []
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            try:
                out.append({**json.loads(path.read_text()), "_path": str(path)})
            except (OSError, ValueError):
                continue
    return out


def _stop_netns_processes(netns: str) -> None:
    """Stop every process still inside `netns` (started through Host.argv by any spawner, or left by a
    dead run): SIGTERM, a bounded grace period, then SIGKILL. The PIDs come from the namespace itself."""
    done = _ip("netns", "pids", netns, check=False)
    pids = [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_recorded(rec: _Record) -> None:
    for ns in rec.netns:
        _stop_netns_processes(ns)
    for outer in rec.outer_ifs:
        _ip("link", "del", outer, check=False)
    for ns in rec.netns:
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", rec.bridge, check=False)


def sweep_stale() -> int:
    """Remove what runs that died without cleaning up (SIGKILL) left behind; the number of runs swept."""
    swept = 0
    for data in _records():
        if _pid_alive(int(data.get("pid", 0))):
            continue
        rec = _Record(
            pid=int(data["pid"]),
            bridge=str(data.get("bridge", "")),
            outer_ifs=list(data.get("outer_ifs", [])),
            netns=list(data.get("netns", [])),
        )
        log.warning("removing test hosts left by dead run %d: %s", rec.pid, rec.netns)
        _remove_recorded(rec)
        Path(data["_path"]).unlink(missing_ok=True)
        swept += 1
    return swept


# Every open network, closed at interpreter exit (an exception outside a `with`, sys.exit, SIGTERM).
_live: set[HostNetwork] = set()


@atexit.register
def _close_all() -> None:
    for net in list(_live):
        try:
            net.close()
        except Exception:  # noqa: BLE001 - best effort at exit: report and go on with the others
            log.exception("closing host network %s", net.token)


def _sigterm_to_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def available() -> str | None:
    """None when test hosts can be made here; otherwise why not (for a test's skip reason)."""
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    return None
