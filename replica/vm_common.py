"""What primary and backup share: node settings, VM specs and images, disk copies, failover timings, the
log meter, and how a VM's background tasks are started and stopped (its status: vm_core.py)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Coroutine

from monitor.loader import GuestImage, ImageError, parse_image
from monitor.config import MachineConfig
from monitor.errors import PeerError
from monitor.machine import Machine
from proto import vmft_pb2
from replica import confine
from replica.metrics import NodeMetrics
from replica.tls import Identity

if TYPE_CHECKING:
    from replica.service_address import ServiceAddresses

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_IMAGE_FILE = 16 << 20  # a guest image read from a node's image directory


@dataclass
class NodeSettings:
    name: str  # the node's gRPC address, HOST:PORT
    data_dir: Path
    heartbeat_interval_s: float = 0.005
    failure_timeout_s: float = 0.3
    # A backup that noticed its primary's silence (not a broken connection) waits this long before it claims
    # the next generation: in a partition both sides notice at the failure timeout, and the primary, if it
    # still reaches the arbiter, must win (its clients can still reach it). Kept well under 50 ms, so a
    # primary that is really gone is replaced within the failure timeout plus 50 ms.
    silent_claim_delay_s: float = 0.03
    connect_timeout_s: float = 5.0
    hash_every: int = 20000
    checkpoint_every_s: float = 1.0  # the primary's periodic checkpoints (restart after a guest fault)
    auto_reprotect_s: float = 1.0  # retry re-protection onto the pair's other node this often (0: never)
    # Input moderation (replica/input_hold.py): a protected guest's input waits at most this long while
    # its replies wait for the backup (0: off).
    input_hold_ms: float = 1.0
    # The port of the --listen host this node takes replication streams on (0: a free one).
    replication_port: int = 0
    replication_advertise: str = ""  # what primaries are told instead of that port ("": the port itself)
    link_relay: bool = False  # route each replication link through a fault-injecting relay (cut/delay/drop)
    # BROKEN ON PURPOSE, for tests only: release outputs without waiting for the backup's acknowledgement
    # (breaks the output rule; the history checker must then find lost writes after a failover).
    unsafe_release_outputs: bool = False
    # Mutual TLS: the node's own certificate (it serves and calls its peers with it). None only with
    # `insecure` (plaintext, loopback only). With a certificate, the node is known to the arbiter and its
    # peers by the certificate's name, not by its address.
    identity: Identity | None = None
    insecure: bool = False
    # The node's Prometheus metrics (replica/metrics.py): primary and node call its hooks.
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    # The service addresses that move with primaries (replica/service_address.py); None: none here.
    addresses: ServiceAddresses | None = None

    @property
    def node_id(self) -> str:
        """The name this node claims generations under: its certificate's name, or its address."""
        return self.identity.name if self.identity is not None else self.name


class ReplicationRefused(PeerError):
    """The peer refused the pair (other version, image, memory size, CPUID, or a stale generation)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_sparse(source: str | Path, target: str | Path) -> None:
    """Copy a disk image keeping its holes (a mostly empty image copies in no time and takes no space)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # no data after offset
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            src.seek(data)
            dst.seek(data)
            remaining = hole - data
            while remaining > 0:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
            offset = hole


def load_spec_image(spec: vmft_pb2.VmSpec) -> GuestImage:
    """The image a node stored for `spec` (node.py sets image_path inside its image directory), opened
    confined: a regular file, no link, never a FIFO or device (replica/confine.py)."""
    path = Path(spec.image_path)
    with confine.open_file_inside(path.parent, path.name, "r") as f:
        image = parse_image(f.read(MAX_IMAGE_FILE + 1), str(path))
    if len(image.data) > MAX_IMAGE_FILE:
        raise ImageError(f"{path}: larger than {MAX_IMAGE_FILE} bytes")
    if spec.image_sha256 and image.sha256 != spec.image_sha256:
        raise ImageError(
            f"{spec.image_path} has sha256 {image.sha256[:16]}..., the pair runs {spec.image_sha256[:16]}..."
        )
    return image


def machine_config(spec: vmft_pb2.VmSpec, disk: str | None) -> MachineConfig:
    return MachineConfig(spec.image_path, spec.mem_mib, disk, spec.arg, spec.hang_timeout_s)  # 0: default


@dataclass
class FailoverTimes:
    suspected_at: float = 0.0  # monotonic
    claimed_at: float = 0.0
    live_at: float = 0.0  # the VM switched from replay to record
    serving_at: float = 0.0  # the service address accepts clients
    suspected_wall: float = 0.0  # unix time, comparable across processes
    serving_wall: float = 0.0

    def suspect(self) -> None:
        self.suspected_at = time.monotonic()
        self.suspected_wall = time.time()
        self.claimed_at = self.live_at = self.serving_at = self.serving_wall = 0.0

    def serving(self) -> None:
        self.serving_at = time.monotonic()
        self.serving_wall = time.time()

    def describe(self) -> str:
        if not self.suspected_at:
            return ""
        parts = [f"claimed +{(self.claimed_at - self.suspected_at) * 1000:.1f} ms"]
        if self.live_at:
            parts.append(f"live +{(self.live_at - self.suspected_at) * 1000:.1f} ms")
        if self.serving_at:
            parts.append(f"serving +{(self.serving_at - self.suspected_at) * 1000:.1f} ms")
        return "failover: " + ", ".join(parts)


@dataclass
class Meter:
    """Bytes per second over a sliding second (a deque and a running total: O(1) per message). Any thread:
    a backup's stream thread counts while the loop reads the rate."""

    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    total: int = 0
    bytes_total: int = 0  # every byte ever counted (the metrics' log byte counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.samples.append((now, nbytes))
            self.total += nbytes
            self.bytes_total += nbytes
            self._expire(now)

    def _expire(self, now: float) -> None:
        samples = self.samples
        while samples and samples[0][0] < now - 1.0:
            self.total -= samples.popleft()[1]

    def rate(self) -> float:
        with self._lock:
            self._expire(time.monotonic())
            return float(self.total)


def spawn(tasks: list[asyncio.Task[None]], coro: Coroutine[Any, Any, None], what: str) -> None:
    """Start a background task of a VM; an unexpected exception in it is logged, never lost."""
    task = asyncio.create_task(coro, name=what)
    tasks.append(task)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


async def stop_machine(machine: Machine | None, name: str, within_s: float = 5.0) -> None:
    """Stop a VM's machine at its next synchronous exit and wait (bounded) until it has."""
    if machine is None:
        return
    machine.stop()
    try:
        await asyncio.wait_for(machine.wait(), within_s)
    except TimeoutError:
        log.error("%s: the vCPU did not stop within %.0f s", name, within_s)


def cancel_other_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel a VM's background tasks, except the one running this (it may be one of them)."""
    current = asyncio.current_task()
    for task in tasks:
        if task is not current:
            task.cancel()
