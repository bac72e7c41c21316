"""Start and stop real etcd members (Debian's etcd-server) for tests, the demo and campaigns.

`EtcdCluster(workdir, members=3).start()` runs each member as its own process on free loopback ports
(or, given `argv_prefix` and addresses, inside test hosts), each with its own data directory and log file
under `workdir`, with short raft timers (heartbeat 10 ms, election 100 ms: a member starts in about 0.05 s
and a lost leader is replaced in a few hundred milliseconds). Members are stopped by their PIDs; `kill(i)`
and `restart(i)` are the faults a campaign needs. With `tls` the members require client certificates
from the cluster CA (replica/tls.py), on the client and the peer side.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from monitor.errors import ArbiterError
from proto import etcd_pb2, etcd_pb2_grpc
from replica.cluster import free_port

log = logging.getLogger(__name__)

ETCD = "etcd"


class EtcdServerError(ArbiterError):
    """An etcd member could not be started or did not come up."""

    hint = "install Debian's etcd-server (scripts/setup does)"


@dataclass(frozen=True)
class EtcdTls:
    """Files for an etcd member's TLS: its certificate and key (a node certificate of the cluster CA
    naming the member's address) and the CA that client and peer certificates must chain to."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


class EtcdCluster:
    def __init__(
        self,
        workdir: str | Path,
        members: int = 1,
        *,
        hosts: Sequence[str] | None = None,
        argv_prefix: Sequence[Sequence[str]] | None = None,
        tls: Sequence[EtcdTls] | None = None,
    ) -> None:
        """`hosts[i]`: the address member i listens on (default 127.0.0.1); `argv_prefix[i]`: how to run
        a command there (Host.argv of replica/hosts.py), default none; `tls[i]`: member i's TLS files."""
        self.workdir = Path(workdir)
        self.tls = list(tls) if tls else None
        self.scheme = "https" if tls else "http"
        self._prefix = [list(p) for p in argv_prefix] if argv_prefix else [[] for _ in range(members)]
        self._in_hosts = argv_prefix is not None
        addrs = list(hosts) if hosts else ["127.0.0.1"] * members
        self.members = [
            EtcdMember(
                name=f"m{i}",
                host=addrs[i],
                # Inside a namespace host every port is free; on loopback ask the kernel for free ones.
                client_port=free_port(addrs[i]) if not argv_prefix else 2379,
                peer_port=free_port(addrs[i]) if not argv_prefix else 2380,
                data_dir=self.workdir / f"etcd-m{i}",
            )
            for i in range(members)
        ]
        self.token = f"vmft-{time.time_ns():x}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _argv(self, i: int) -> list[str]:
        m = self.members[i]
        cluster = ",".join(f"{p.name}={self.scheme}://{p.host}:{p.peer_port}" for p in self.members)
        argv = [
            *self._prefix[i], ETCD,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"{self.scheme}://{m.host}:{m.client_port}",
            "--advertise-client-urls", f"{self.scheme}://{m.host}:{m.client_port}",
            "--listen-peer-urls", f"{self.scheme}://{m.host}:{m.peer_port}",
            "--initial-advertise-peer-urls", f"{self.scheme}://{m.host}:{m.peer_port}",
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.tls:
            t = self.tls[i]
            argv += [
                "--cert-file", str(t.cert), "--key-file", str(t.key),
                "--client-cert-auth", "--trusted-ca-file", str(t.ca),
                "--peer-cert-file", str(t.cert), "--peer-key-file", str(t.key),
                "--peer-client-cert-auth", "--peer-trusted-ca-file", str(t.ca),
            ]
        return argv

    def launch(self, i: int) -> None:
        """Start member i's process (its data directory is kept across restarts)."""
        if shutil.which(ETCD) is None:
            raise EtcdServerError("etcd is not installed")
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            return
        m.data_dir.mkdir(parents=True, exist_ok=True)
        m.log_file = open(self.workdir / f"etcd-{m.name}.log", "ab")  # noqa: SIM115 - closed in stop()
        m.proc = subprocess.Popen(self._argv(i), stdout=m.log_file, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        log.info("etcd %s: pid %d at %s", m.name, m.proc.pid, m.endpoint)

    def start(
        self, timeout_s: float = 15.0, credentials: grpc.ChannelCredentials | None = None
    ) -> EtcdCluster:
        """Start every member and wait until the cluster serves a linearizable read. A free port can be
        taken by someone else between picking it and etcd binding it: then every member starts again on
        new ports (a few times) with fresh data directories."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                for i in range(len(self.members)):
                    self.launch(i)
                self.wait_ready(timeout_s, credentials)
                return self
            except EtcdServerError as e:
                self.stop()
                if "address already in use" not in str(e) or attempt == 2 or self._in_hosts:
                    raise
                log.warning("etcd: a port was taken meanwhile, starting again on new ports")
                self.token = f"vmft-{time.time_ns():x}"
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    m.client_port, m.peer_port = free_port(m.host), free_port(m.host)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def wait_ready(self, timeout_s: float = 15.0, credentials: grpc.ChannelCredentials | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise EtcdServerError(
                        f"etcd {m.name} exited with {m.proc.returncode}: {self.log_tail(m)}"
                    )
            for m in self.members:
                if m.proc is None:
                    continue
                chan = (grpc.secure_channel(m.endpoint, credentials) if credentials is not None
                        else grpc.insecure_channel(m.endpoint))
                with chan:
                    try:
                        etcd_pb2_grpc.KVStub(chan).Range(etcd_pb2.RangeRequest(key=b"/"), timeout=0.5)
                        return
                    except grpc.RpcError as e:
                        last = f"{m.name}: {e.code().name}"
            time.sleep(0.05)
        raise EtcdServerError(f"etcd did not serve within {timeout_s} s ({last})")

    def log_tail(self, m: EtcdMember, n: int = 5) -> str:
        try:
            return " | ".join((self.workdir / f"etcd-{m.name}.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, i: int) -> None:
        """SIGKILL member i (by its PID)."""
        self._stop_member(self.members[i], signal.SIGKILL)

    def pause(self, i: int) -> None:
        """SIGSTOP member i: it holds its connections and answers nothing (a hung or cut-off member)."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGCONT)

    def restart(self, i: int) -> None:
        self.launch(i)

    def stop(self) -> None:
        for m in self.members:
            self._stop_member(m, signal.SIGTERM)

    def _stop_member(self, m: EtcdMember, sig: signal.Signals) -> None:
        proc = m.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused member cannot act on SIGTERM
            proc.send_signal(sig)
            try:
                # A member without a quorum may take seconds to shut down cleanly: do not wait for it.
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        m.proc = None
        if m.log_file is not None:
            m.log_file.close()
            m.log_file = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def __aenter__(self) -> EtcdCluster:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.stop)
