"""The node daemon: one process hosting any number of VMs as primaries or backups, serving the node API
over gRPC (grpc.aio) and the replication streams on a port of their own (gRPC's C core,
replica/replication.py).

A node remembers, in its data directory, which VMs it ran and in which generation. Restarted after a
crash it runs none of them again on its own: the VM's memory died with the process, and if another
node has since claimed a newer generation, this node is fenced for that VM and says so in its status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import os
import signal
import subprocess
import logging
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Coroutine
from pathlib import Path

import grpc

from monitor.errors import VmftError
from monitor.loader import ImageError
from monitor.machine import install_kick_handler
from monitor.record import LogError
from proto import vmft_pb2, vmft_pb2_grpc
from replica import authz, confine, guest_kind, migration, tls
from replica import cgroups
from replica.arbiter import Arbiter, ArbiterUnavailable, SqliteArbiter, current_within
from replica.membership import Membership
from replica.placement import Placement
from replica.metrics import MetricsServer
from replica.backup import BackupVm
from replica.primary import PrimaryVm
from replica.native_stream import ServerStream
from replica.replication import ReplicationServer
from replica.roles import Role, State
from replica.service_address import AddressError, MovingAddress, ServiceAddresses, interface_for
from replica.vm_core import STATUS_ARBITER_WAIT_S, VmCore
from replica.vm_common import PROTOCOL_VERSION, NodeSettings, ReplicationRefused

MAX_IMAGE_BYTES = 3 << 20  # a guest image travels in one request, under gRPC's 4 MiB message limit
MAX_DISK_BYTES = 64 << 30  # sparse: costs only what the guest writes
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)

ReplicatedVm = PrimaryVm | BackupVm


@dataclass(frozen=True)
class NodeLimits:
    """What one node takes on: VMs (primaries and backups) and the guest memory they may use. A request
    beyond either is refused; membership publishes both (placement)."""

    max_vms: int = 16
    memory_mib: int = 0  # 0: the machine's memory
    # What a VM's monitor takes beyond guest RAM, reserved for a VM whose spec sets no memory limit: a
    # 64 MiB kv guest under load grew its primary node's RSS by 18 MiB (docs/design.md, resource limits).
    vm_overhead_mib: int = 32
    # Beyond the budget, what the node process itself needs (an idle node: 64 MiB RSS); the kernel limit
    # of a node given --memory-mib is the budget plus this.
    node_overhead_mib: int = 192
    cgroups: bool = True  # apply per-VM cpu limits and the node's memory limit where the kernel allows

    def budget_mib(self) -> int:
        return self.memory_mib or int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20)

    def reservation_mib(self, spec: vmft_pb2.VmSpec) -> int:
        """The memory a VM reserves against the budget: its memory limit, or guest RAM plus overhead."""
        return spec.memory_limit_mib or spec.mem_mib + self.vm_overhead_mib


class Node:
    def __init__(self, settings: NodeSettings, arbiter: Arbiter, limits: NodeLimits | None = None) -> None:
        self.settings = settings
        self.arbiter = arbiter
        self.limits = limits or NodeLimits()
        self.vms: dict[str, ReplicatedVm] = {}
        self.remembered: dict[str, dict[str, object]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.membership: Membership | None = None  # on etcd: placements only onto live members
        self.cgroups: cgroups.NodeCgroups | None = None  # per-VM cpu limits (serve() sets it up)
        self.metrics_address = ""  # the Prometheus endpoint, "" when off
        self.replication_address = ""  # where this node takes replication streams (serve() starts it)
        self._taking: set[str] = set()  # VMs whose primary is starting here with a moving address
        settings.metrics.attach(self)
        (settings.data_dir / "vms").mkdir(parents=True, exist_ok=True)
        self._load_remembered()

    # ----- persistence (for fencing after a restart) -------------------------------------------

    def _vm_file(self, name: str) -> Path:
        return self.settings.data_dir / "vms" / f"{name}.json"

    def _remember(self, vm: ReplicatedVm, role: str) -> None:
        record = {"name": vm.name, "generation": vm.standing.generation, "role": role, "time": time.time()}
        self._vm_file(vm.name).write_text(json.dumps(record))

    def _load_remembered(self) -> None:
        for path in (self.settings.data_dir / "vms").glob("*.json"):
            try:
                self.remembered[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable VM record %s: %s", path, err)

    # ----- confined input: images by content hash, disks made here (replica/confine.py) ----------------

    @property
    def images_dir(self) -> Path:
        return self.settings.data_dir / "images"

    def _install_image(self, spec: vmft_pb2.VmSpec) -> None:
        """Store the image the request carries in this node's image directory, named by its sha256 (or
        find the one named by `image_sha256` there), and point `spec.image_path` at it. The request's own
        image_path is never used: no request names a host file. Runs on a worker thread."""
        if spec.HasField("linux"):
            return  # a Linux program: no image, its files come from a root (replica/guest_kind.py)
        if spec.image:
            if len(spec.image) > MAX_IMAGE_BYTES:
                raise ReplicationRefused(f"image of {len(spec.image)} bytes: at most {MAX_IMAGE_BYTES}")
            digest = hashlib.sha256(spec.image).hexdigest()
            if spec.image_sha256 and spec.image_sha256 != digest:
                raise ReplicationRefused(
                    f"the image's sha256 is {digest[:16]}..., not {spec.image_sha256[:16]}..."
                )
            spec.image_sha256 = digest
        elif not _SHA256.fullmatch(spec.image_sha256):
            raise ReplicationRefused("the request carries no image and no image sha256")
        name = f"{spec.image_sha256}.elf"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if spec.image:
            try:
                fd = confine.open_inside(self.images_dir, name, "r")
                os.close(fd)  # a regular file of that name is there: by its name, the same content
            except confine.ConfinementError:
                staged = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
                with confine.open_file_inside(self.images_dir, staged, "x") as f:
                    f.write(spec.image)
                os.replace(self.images_dir / staged, self.images_dir / name)  # replaces a FIFO or link too
        spec.image_path = str(self.images_dir / name)  # load_spec_image opens it confined, and checks it

    def _make_disk(self, spec: vmft_pb2.VmSpec, role: str) -> str | None:
        """An empty disk of `spec.disk_size` bytes inside the data directory (None: no disk). The request's
        disk_path is ignored: a disk is never a host file named by a request."""
        if not spec.disk_size:
            return None
        if spec.disk_size > MAX_DISK_BYTES or spec.disk_size % 512:
            raise ReplicationRefused(
                f"disk size {spec.disk_size}: a multiple of 512, at most {MAX_DISK_BYTES}"
            )
        disks = self.settings.data_dir / "disks"
        disks.mkdir(parents=True, exist_ok=True)
        name = f"{confine.validate_name(spec.name)}.{role}.img"
        with confine.open_file_inside(disks, name, "w") as f:  # a FIFO, device or link there is refused
            os.ftruncate(f.fileno(), spec.disk_size)
        return str(disks / name)

    def _adopt(self, backup: BackupVm) -> None:
        """A backup went live: from now on it is this node's primary of that VM."""
        primary = self._placed(PrimaryVm.adopt(backup))
        self.vms[backup.name] = primary
        self._remember(primary, "primary")
        times = backup.core.times
        self.settings.metrics.recovered(backup.name, "failover", times.serving_at - times.suspected_at)

    async def reprotect(self, request: vmft_pb2.ReprotectRequest) -> PrimaryVm:
        vm = self.vms.get(request.name)
        if not isinstance(vm, PrimaryVm):
            raise ReplicationRefused(f"this node is not the primary of {request.name}")
        await self._check_member(request.backup_node)
        await vm.reprotect(request.backup_node, request.backup_service)
        return vm

    def _placed(self, vm: PrimaryVm) -> PrimaryVm:
        """On etcd, automatic re-protection places the backup on a live member (replica/placement.py)."""
        if self.membership is not None:
            vm.choose_backup = Placement(self.membership, self.settings.name).backup_for
        return vm

    async def _check_member(self, address: str) -> None:
        """On etcd, a VM's memory and disk go only to a live member of the cluster (by its address)."""
        if self.membership is None or not address:
            return
        if address not in {m.address for m in await self.membership.members()}:
            raise ReplicationRefused(f"{address} is not a live member of the cluster")

    # ----- node API ----------------------------------------------------------------------------------

    async def protect(self, request: vmft_pb2.ProtectRequest) -> PrimaryVm:
        spec = request.spec
        confine.validate_name(spec.name)
        if spec.name in self.vms and self.vms[spec.name].core.running():
            raise ReplicationRefused(f"VM {spec.name} already runs on this node")
        guest_kind.fill_defaults(spec)
        self._check_limits(spec)
        self._check_address(spec)
        await self._check_member(request.backup_node)
        current = await asyncio.to_thread(self.arbiter.current, spec.name)
        generation = (current.generation if current else 0) + 1
        await asyncio.to_thread(self._install_image, spec)
        disk = await asyncio.to_thread(self._make_disk, spec, "primary")
        if not await asyncio.to_thread(self.arbiter.claim, spec.name, generation, self.settings.node_id):
            raise ReplicationRefused(f"another node claimed generation {generation} of {spec.name} first")
        vm = PrimaryVm.new(
            self.settings,
            self.arbiter,
            spec,
            generation,
            request.backup_node,
            request.service,
            request.backup_service,
            disk,
        )
        self._placed(vm)
        self._taking.add(spec.name)  # its address is kept while it starts (it is not in self.vms yet)
        try:
            await self._take_address(spec)  # before the VM binds its service there
            await vm.start()
        except BaseException:
            await vm.stop()
            if self.settings.addresses is not None:
                await self.settings.addresses.release(spec.name)
            raise
        finally:
            self._taking.discard(spec.name)
        self.vms[spec.name] = vm
        self._remember(vm, "primary")
        self.apply_limits()
        return vm

    def _check_limits(self, spec: vmft_pb2.VmSpec) -> None:
        """Refuse a VM beyond this node's limits (a stale VM of the same name does not count)."""
        running = [vm for name, vm in self.vms.items() if vm.core.running() and name != spec.name]
        if len(running) >= self.limits.max_vms:
            raise ReplicationRefused(f"this node runs {len(running)} VMs, its limit (--max-vms)")
        if spec.memory_limit_mib and spec.memory_limit_mib < spec.mem_mib:
            raise ReplicationRefused(
                f"memory limit {spec.memory_limit_mib} MiB is below the guest's {spec.mem_mib} MiB of RAM"
            )
        if spec.cpu_quota and not cgroups.MIN_CPU_QUOTA <= spec.cpu_quota <= (os.cpu_count() or 1):
            raise ReplicationRefused(
                f"cpu quota {spec.cpu_quota}: from {cgroups.MIN_CPU_QUOTA} to {os.cpu_count()} CPUs (0: none)"
            )
        used = sum(self.limits.reservation_mib(vm.core.spec) for vm in running)
        wanted = self.limits.reservation_mib(spec)
        if used + wanted > self.limits.budget_mib():
            raise ReplicationRefused(
                f"{wanted} MiB more (guest RAM and monitor overhead) would pass this node's memory budget "
                f"({used} of {self.limits.budget_mib()} MiB reserved, --memory-mib)"
            )

    def usage(self) -> tuple[int, int]:
        """(VMs running here, the memory they reserve in MiB): what membership publishes."""
        running = [vm for vm in self.vms.values() if vm.core.running()]
        return len(running), sum(self.limits.reservation_mib(vm.core.spec) for vm in running)

    # ----- resource limits and metrics (replica/cgroups.py, replica/metrics.py) ----------------------

    def apply_limits(self) -> None:
        """Put each running VM's vCPU thread in its cpu cgroup (a restart or a go-live may have made a new
        thread) and drop the cgroups of VMs gone. Cheap: called after a VM starts and every half second."""
        if self.cgroups is None:
            return
        live: set[str] = set()
        for name, vm in list(self.vms.items()):
            machine = vm.core.machine
            thread_id = machine.vcpu_thread_id if machine is not None and machine.result is None else None
            if thread_id is None or not vm.core.running():
                continue
            live.add(name)
            try:
                self.cgroups.place(name, thread_id, vm.core.spec.cpu_quota)
            except cgroups.CgroupError as err:
                log.warning("%s: %s", name, err)  # the thread ended meanwhile: the next round sees it
        for name in self.cgroups.placed() - live:
            self.cgroups.forget(name)

    def _check_address(self, spec: vmft_pb2.VmSpec) -> None:
        """A VM with a moving address runs only on a node that can hold it (an interface in its subnet)."""
        if not spec.moving_address:
            return
        if self.settings.addresses is None:
            raise ReplicationRefused("this node does not hold moving service addresses")
        interface_for(MovingAddress.parse(spec.moving_address))

    async def _take_address(self, spec: vmft_pb2.VmSpec) -> None:
        if not spec.moving_address:
            return
        if self.settings.addresses is None:
            raise ReplicationRefused("this node does not hold moving service addresses")
        await self.settings.addresses.take_over(spec.name, spec.moving_address)

    async def keep_addresses(self) -> None:
        """Renew the moving addresses of this node's running primaries and drop the others'. One that
        expired (the node stalled past its lifetime) is taken again only if the arbiter still names this
        node in the VM's generation: a superseded primary never takes it back from its successor."""
        addresses = self.settings.addresses
        if addresses is None:
            return
        # A primary here, or a backup going live (it takes the address before it serves and is promoted).
        wanted = {
            name for name, vm in self.vms.items()
            if vm.core.spec.moving_address and vm.core.running()
            and (vm.standing.role is Role.PRIMARY or vm.standing.is_(State.PROMOTING))
        } | self._taking  # fmt: skip
        await addresses.keep(wanted)
        for name in wanted - set(addresses.held) - self._taking:
            current = await asyncio.to_thread(self.arbiter.current, name)
            vm = self.vms.get(name)
            if (
                vm is not None
                and current is not None
                and current.node == self.settings.node_id
                and (current.generation == vm.standing.generation)
            ):
                await addresses.take_over(name, vm.core.spec.moving_address)

    async def _upkeep_loop(self, interval_s: float = 0.5) -> None:
        """Resource limits and moving addresses follow the VMs (failovers, restarts, stops)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.apply_limits()
                await self.keep_addresses()
            except (VmftError, OSError) as err:  # the next round tries again
                log.error("resource limits or moving addresses: %s", err)

    def metric_cores(self) -> list[VmCore]:
        return [vm.core for vm in self.vms.values()]

    def metric_memory(self) -> tuple[int, int, int]:
        running, reserved = self.usage()
        return self.limits.budget_mib(), reserved, running

    def metric_limits(self, core: VmCore) -> tuple[int, int]:
        throttled = self.cgroups.throttled(core.name) if self.cgroups is not None else 0
        return self.limits.reservation_mib(core.spec), throttled

    async def status(self, node_only: bool = False) -> vmft_pb2.NodeStatus:
        out = vmft_pb2.NodeStatus(node=self.settings.name, protocol_version=PROTOCOL_VERSION, pid=os.getpid())
        out.replication = self.replication_address
        if node_only:
            return out
        vms = list(self.vms.values())
        await asyncio.gather(*(vm.core.check_superseded() for vm in vms))
        out.memory_budget_mib = self.limits.budget_mib()
        out.memory_reserved_mib = self.usage()[1]
        out.max_vms = self.limits.max_vms
        out.resource_limits = self.cgroups.describe() if self.cgroups is not None else "none (off)"
        out.metrics = self.metrics_address
        for vm in vms:
            out.vms.append(vm.status())
        for name, record in self.remembered.items():
            if name not in self.vms:
                out.vms.append(await self._remembered_status(name, record))
        return out

    async def _remembered_status(self, name: str, record: dict[str, object]) -> vmft_pb2.VmStatus:
        generation = int(str(record.get("generation", 0)))
        unanswered = ""
        try:
            current = await current_within(self.arbiter, name, STATUS_ARBITER_WAIT_S)
        except ArbiterUnavailable as err:
            current, unanswered = None, f" ({err})"
        if current is not None and (current.generation > generation or current.node != self.settings.node_id):
            message = f"fenced: generation {current.generation} belongs to {current.node}"
        else:
            message = f"not running: the node restarted and the VM's memory is gone{unanswered}"
        return vmft_pb2.VmStatus(
            name=name,
            role=vmft_pb2.ROLE_STOPPED,
            state=vmft_pb2.VM_STATE_FENCED,
            generation=generation,
            message=message,
        )

    # ----- fault injection ------------------------------------------------------------------------

    async def inject_fault(self, request: vmft_pb2.FaultRequest) -> str:
        kind = request.kind
        if kind == vmft_pb2.FAULT_KILL_NODE:
            asyncio.get_running_loop().call_later(0.01, os.kill, os.getpid(), signal.SIGKILL)
            return f"node {self.settings.name} (pid {os.getpid()}) will be killed"
        if kind == vmft_pb2.FAULT_STOP_NODE:
            duration = request.duration_s or 1.0
            # A stopped process cannot wake itself: a detached helper sends SIGCONT after the duration.
            await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"sleep {duration:.3f}; kill -CONT {os.getpid()}",
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            asyncio.get_running_loop().call_later(0.01, os.kill, os.getpid(), signal.SIGSTOP)
            return f"node {self.settings.name} stopped for {duration:.2f} s"
        vm = self.vms.get(request.vm)
        if vm is None:
            raise KeyError(request.vm)
        if kind in _LINK_FAULTS or kind == vmft_pb2.FAULT_HEAL:
            return self._link_fault(vm, request)
        machine = vm.core.machine
        if kind == vmft_pb2.FAULT_FAIL_DISK_WRITES:
            if machine is None or machine.block.path is None:
                raise ReplicationRefused(f"{vm.name} has no disk on this node")
            block = machine.block
            block.fail_writes = True
            asyncio.get_running_loop().call_later(
                request.duration_s or 1.0, setattr, block, "fail_writes", False
            )
            return f"{vm.name}: disk writes fail for {request.duration_s or 1.0:.2f} s"
        command = _GUEST_FAULT_COMMANDS.get(kind)
        if command is not None:
            if vm.core.nic is None:
                raise ReplicationRefused(f"{vm.name} does not serve clients on this node (not its primary)")
            personality = guest_kind.linux_personality(machine) if machine is not None else None
            if personality is not None and kind == vmft_pb2.FAULT_CRASH_GUEST:
                personality.crash_requested = True  # a Linux program crashes by signal, not by a request
                return f"{vm.name}: SIGSEGV for the Linux program at its next system call"
            conn = vm.core.nic.inject(command)
            return f"sent {command.decode()} to {vm.name} on connection {conn}"
        raise ReplicationRefused(f"fault {vmft_pb2.FaultKind.Name(kind)} is not supported by this node")

    def _link_fault(self, vm: ReplicatedVm, request: vmft_pb2.FaultRequest) -> str:
        relay = getattr(vm, "relay", None)
        if not isinstance(vm, PrimaryVm) or relay is None:
            raise ReplicationRefused(
                f"{vm.name} has no replication link through a relay on this node "
                "(start the primary's node with --link-relay, and the VM must be protected)"
            )
        loop = asyncio.get_running_loop()
        duration = request.duration_s or 1.0
        kind = request.kind
        if kind == vmft_pb2.FAULT_HEAL:
            relay.heal()
            relay.set_delay(0)
            relay.set_loss(0)
            if vm.core.machine is not None:
                vm.core.machine.block.fail_writes = False
            return f"{vm.name}: link healed, disk writes work"
        if kind == vmft_pb2.FAULT_CUT_LINK:
            relay.cut()
            loop.call_later(duration, relay.heal)
            return f"{vm.name}: replication link cut for {duration:.2f} s"
        if kind == vmft_pb2.FAULT_DELAY_LINK:
            relay.set_delay(request.delay_ms / 1000)
            loop.call_later(duration, relay.set_delay, 0)
            return (
                f"{vm.name}: replication link delayed {request.delay_ms:.0f} ms each way for {duration:.2f} s"
            )
        relay.set_loss(request.fraction)
        loop.call_later(duration, relay.set_loss, 0)
        return (
            f"{vm.name}: replication link loses {request.fraction:.0%} of its segments for {duration:.2f} s"
        )

    async def stop_vm(self, name: str, grace_s: float = 0.0) -> vmft_pb2.VmStatus:
        vm = self.vms.get(name)
        if vm is None:
            raise KeyError(name)
        if grace_s > 0:
            await self._ask_to_exit(vm, grace_s)
        await vm.stop()
        return vm.status()

    async def _ask_to_exit(self, vm: ReplicatedVm, grace_s: float) -> None:
        """A Linux program's primary: SIGTERM to the program through its log (the backup replays the same
        shutdown), then up to grace_s for it to exit by itself (its status then shows its exit)."""
        machine = vm.core.machine
        personality = guest_kind.linux_personality(machine) if machine is not None else None
        if personality is None or not isinstance(vm, PrimaryVm) or not vm.core.running():
            return
        personality.request_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        # Polled: the end is the primary's watcher having finished the log for the backup (a restart in
        # between swaps the machine), not one machine's end.
        while vm.core.running() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if vm.core.running():
            log.warning("%s: no exit within %g s of SIGTERM: stopped from outside", vm.name, grace_s)

    async def close(self) -> None:
        for vm in list(self.vms.values()):
            await vm.stop()

    # ----- the replication stream (backup side; the protocol itself is in replication.py) ---------------

    async def _refusal(self, hello: vmft_pb2.Hello) -> str | None:
        if hello.protocol_version != PROTOCOL_VERSION:
            return _version_refusal(hello)
        current = await asyncio.to_thread(self.arbiter.current, hello.spec.name)  # etcd: a round trip
        if current is not None and current.generation > hello.generation:
            return (
                f"stale generation {hello.generation}: {current.node} holds generation {current.generation}"
            )
        existing = self.vms.get(hello.spec.name)
        if (
            existing is not None
            and existing.core.running()
            and existing.standing.generation >= hello.generation
        ):
            return f"this node already runs {hello.spec.name} in generation {existing.standing.generation}"
        return None

    async def accept_backup(self, hello: vmft_pb2.Hello) -> BackupVm | str:
        """The backup VM for a primary's Hello, running (or waiting for its checkpoint); or why not."""
        try:
            confine.validate_name(hello.spec.name)
        except confine.BadName as err:
            return str(err)
        refusal = await self._refusal(hello)
        if refusal is not None:
            return refusal
        try:
            self._check_limits(hello.spec)
            self._check_address(hello.spec)  # it must be able to take the address over at failover
        except (ReplicationRefused, AddressError) as err:
            return str(err)
        stale = self.vms.get(hello.spec.name)
        if stale is not None and stale.core.running():
            # A machine of an older generation of this VM still runs here (a backup that has not yet
            # noticed its primary is gone): it is stale; stop it before starting the new backup.
            log.warning(
                "%s: stopping generation %d here for generation %d",
                stale.name, stale.standing.generation, hello.generation,
            )  # fmt: skip
            await stale.stop()
        vm: BackupVm | None = None
        try:
            await asyncio.to_thread(self._install_image, hello.spec)
            disk = await asyncio.to_thread(self._make_disk, hello.spec, "backup")  # a restore writes it
            vm = BackupVm(self.settings, self.arbiter, hello, disk)
            vm.on_promoted = self._adopt
            if hello.checkpoint_follows:
                vm.check()
                vm.standing.to(State.SEEDING)
            else:
                vm.start()
        except (ImageError, LogError, ReplicationRefused, OSError, ValueError,
                confine.ConfinementError) as err:  # fmt: skip
            if vm is not None:
                await vm.stop()
            return str(err) or "unknown"
        self.vms[vm.name] = vm
        self._remember(vm, "backup")
        self.apply_limits()
        return vm

    async def accept_stream(
        self, hello: vmft_pb2.Hello, caller: ServerStream
    ) -> BackupVm | str | authz.Denied:
        """A primary's Hello on the replication port: the backup VM, a refusal, or a denied caller."""
        if hello.protocol_version != PROTOCOL_VERSION:
            return _version_refusal(hello)  # changes nothing here: told to anyone, so they can tell
        # Only the VM's current primary per the arbiter, proven by its node certificate, may touch the
        # backup: a forged stream (any other node, or an admin) ends here, before a stale VM is stopped or
        # anything is built.
        denied = await authz.primary_of(caller, self.arbiter, hello.spec.name)
        if denied is not None:
            return denied
        return await self.accept_backup(hello)

    def detach(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _version_refusal(hello: vmft_pb2.Hello) -> str:
    return f"protocol version {hello.protocol_version} is not this node's {PROTOCOL_VERSION}"


_LINK_FAULTS = (vmft_pb2.FAULT_CUT_LINK, vmft_pb2.FAULT_DELAY_LINK, vmft_pb2.FAULT_DROP_LINK)
_GUEST_FAULT_COMMANDS = {
    vmft_pb2.FAULT_CRASH_GUEST: b"CRASH",
    vmft_pb2.FAULT_PANIC_GUEST: b"PANIC",
    vmft_pb2.FAULT_HANG_GUEST: b"HANG",
    vmft_pb2.FAULT_SCRIBBLE_GUEST: b"SCRIBBLE",
}


async def _valid_name(context: grpc.aio.ServicerContext, name: str) -> None:
    try:
        confine.validate_name(name)
    except confine.BadName as err:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


class NodeServicer(vmft_pb2_grpc.NodeServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def Protect(  # noqa: N802 - gRPC method name
        self, request: vmft_pb2.ProtectRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.VmStatus:
        await authz.require_admin(context)
        try:
            vm = await self.node.protect(request)
        except (VmftError, OSError, ValueError) as err:  # the image, disk, peer, arbiter, a checkpoint
            log.warning("protect %s refused: %s", request.spec.name, err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return vm.status()

    async def Status(  # noqa: N802
        self, request: vmft_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.NodeStatus:
        return await self.node.status(node_only=request.node_only)

    async def StopVm(  # noqa: N802
        self, request: vmft_pb2.StopVmRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.VmStatus:
        await authz.require_admin(context)
        await _valid_name(context, request.name)
        try:
            return await self.node.stop_vm(request.name, max(0.0, min(request.grace_s, 600.0)))
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no VM {request.name} on this node")
            raise

    async def Reprotect(  # noqa: N802
        self, request: vmft_pb2.ReprotectRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.VmStatus:
        await authz.require_admin(context)
        await _valid_name(context, request.name)
        try:
            vm = await self.node.reprotect(request)
        except VmftError as err:  # the peer refused, or the arbiter is unreachable
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise
        return vm.status()

    async def Migrate(  # noqa: N802
        self, request: vmft_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.MigrateReply:
        await authz.require_admin(context)
        await _valid_name(context, request.name)
        try:
            return await migration.migrate(self.node, request)
        except VmftError as err:
            log.warning("migration of %s failed: %s", request.name, err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise

    async def Handover(  # noqa: N802
        self, request: vmft_pb2.HandoverRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.HandoverReply:
        await _valid_name(context, request.name)
        # Only the VM's current primary (its node certificate, per the arbiter) may hand it over.
        await authz.require_primary_of(context, self.node.arbiter, request.name)
        try:
            return await migration.take_over(self.node, request)
        except migration.HandoverRefused as err:  # nothing claimed: the primary may go on
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise
        except VmftError as err:  # after the claim: the arbiter settles who serves
            await context.abort(grpc.StatusCode.ABORTED, str(err))
            raise

    async def InjectFault(  # noqa: N802
        self, request: vmft_pb2.FaultRequest, context: grpc.aio.ServicerContext
    ) -> vmft_pb2.FaultReply:
        await authz.require_admin(context)
        injected_at = time.time()
        try:
            detail = await self.node.inject_fault(request)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no VM {request.vm} on this node")
            raise
        except ReplicationRefused as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            raise
        log.warning("fault injected: %s", detail)
        return vmft_pb2.FaultReply(detail=detail, injected_at=injected_at)


class _NodeExtras:
    """What a node runs beside its gRPC services (issue 12): the metrics endpoint, the loop that keeps
    VMs' vCPU threads in their cpu cgroups, and the kernel memory limit of a node given a budget."""

    def __init__(self, node: Node, metrics: str | None) -> None:
        self.node = node
        self.metrics_server = MetricsServer(node.settings.metrics, metrics) if metrics else None
        self._tasks: list[asyncio.Task[None]] = []
        if node.settings.addresses is None:
            node.settings.addresses = ServiceAddresses()

    async def start(self) -> None:
        node, limits = self.node, self.node.limits
        if limits.cgroups:
            node.cgroups = cgroups.NodeCgroups()
            if limits.memory_mib:
                try:
                    node.cgroups.limit_node_memory(limits.memory_mib + limits.node_overhead_mib)
                except cgroups.CgroupError as err:
                    log.warning("no node memory limit: %s", err)
            log.warning("resource limits: %s", node.cgroups.describe())
        self._tasks.append(asyncio.create_task(node._upkeep_loop(), name="upkeep"))
        if self.metrics_server is not None:
            await self.metrics_server.start()
            node.metrics_address = self.metrics_server.address

    async def close_before_vms(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.metrics_server is not None:
            await self.metrics_server.close()

    async def close(self) -> None:
        """After the VMs stopped: their addresses and cgroups, and the node's, go."""
        if self.node.settings.addresses is not None:
            await self.node.settings.addresses.close()
        if self.node.cgroups is not None:
            self.node.cgroups.close()


async def serve(
    settings: NodeSettings,
    arbiter_path: Path,
    ready: asyncio.Event | None = None,
    etcd: list[str] | None = None,
    limits: NodeLimits | None = None,
    metrics: str | None = None,
) -> None:
    """Run a node until cancelled (SIGINT/SIGTERM in the command line). With `etcd` endpoints the arbiter
    is etcd and the node registers in its membership table (replica/node_etcd.py); else the SQLite file.
    With `metrics` (HOST:PORT) it serves Prometheus metrics there (replica/metrics.py)."""
    from replica import node_etcd

    install_kick_handler()  # VMs may be built on worker threads (restores); signals need the main thread
    arbiter: Arbiter = node_etcd.open_arbiter(settings, etcd) if etcd else SqliteArbiter(arbiter_path)
    node = Node(settings, arbiter, limits)
    membership = node_etcd.NodeMembership(settings, etcd, node.usage, node.limits) if etcd else None
    node.membership = membership.membership if membership is not None else None
    server = grpc.aio.server()
    vmft_pb2_grpc.add_NodeServicer_to_server(NodeServicer(node), server)
    # Mutual TLS with the node's certificate; plaintext only with --insecure on loopback (tls.bind).
    tls.bind(server, settings.name, settings.identity, insecure=settings.insecure)
    await server.start()
    # The replication streams come in on a port of their own, through gRPC's C core (same credentials).
    replication = ReplicationServer(settings, node.accept_stream, node.detach)
    node.replication_address = replication.start()
    log.warning(
        "node %s (%s) serving %s, replication streams on %s (data dir %s, arbiter %s)",
        settings.node_id, settings.name, "mutual TLS" if settings.identity else "PLAINTEXT",
        node.replication_address, settings.data_dir, f"etcd {','.join(etcd)}" if etcd else arbiter_path,
    )  # fmt: skip
    extras = _NodeExtras(node, metrics)
    try:
        await extras.start()
        if membership is not None:
            await membership.start()
        if ready is not None:
            ready.set()
        await server.wait_for_termination()
    finally:
        if membership is not None:
            await membership.close()
        await extras.close_before_vms()
        await node.close()
        await extras.close()
        await replication.close()
        await server.stop(grace=0.5)
        if isinstance(arbiter, node_etcd.EtcdArbiter):
            await asyncio.to_thread(arbiter.close)
