"""The one place a node turns a VmSpec into a Machine, for both kinds of guest (DESIGN.md "Two kinds of
guest"): built fresh, or restored from a checkpoint (a file chain or streamed records, eager or lazy).
Primary, backup, re-protection and restart after a guest fault all go through a `Guest`, so nothing else
in replica/ needs to know which kind it runs.

- vmft-platform: the image a node stored by sha256 in DATA_DIR/images (node.py), its disk, its arg.
- Linux (VmSpec.linux): an unmodified Linux program under the Linux personality (monitor/linux/). Its
  root is the host's filtered system view or a prepared tree DATA_DIR/roots/NAME named by the request
  (never a host path); its writable layer is a directory the node makes for this VM alone
  (DATA_DIR/layers/NAME.*), removed when the VM stops here. The root files the primary's program reads
  are events of the log (ROOT_FILE); a backup checks each against its own root before it replays it, and
  after restoring a checkpoint checks those the checkpoint's program read, so a backup whose root
  differs is refused, naming the file.

Console output (stdout/stderr of a Linux program, the console port of a platform guest) goes out under
the output rule like any output; what goes out is appended to DATA_DIR/console/NAME.out on the node
that serves the VM. A backup appends what its replay of the log produces (output its primary has
released, or will once acknowledged), so after a failover the new primary's file continues the old one's:
what a reader saw there is a prefix of what follows.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from monitor import builder
from monitor.checkpoint import Loading, RecordStream, RestoreStats
from monitor.checkpoint.restore import JournalArg
from monitor.config import MachineConfig
from monitor.errors import ConfigError
from monitor.journal import EventKind, OutputKind
from monitor.linux.fs import FileSystem
from monitor.linux.manifest import RootMismatch
from monitor.linux.mm import LinuxError
from monitor.linux.personality import DEFAULT_ENV, LinuxConfig, LinuxPersonality
from monitor.linux.vdso import ClockMode
from monitor.linux.process import file_sha256
from monitor.loader import GuestImage
from monitor.machine import Machine, MachineResult, StopReason
from monitor.record import BatchSource, ReplayJournal
from proto import vmft_pb2
from replica import confine
from replica.vm_common import ReplicationRefused, load_spec_image, machine_config

log = logging.getLogger(__name__)

LINUX_MEM_MIB = 512  # a Linux guest's memory when the spec gives none (as `vmft run --linux`)
LINUX_HANG_TIMEOUT_S = 60.0  # ... and its hang timeout
# A Linux program killed by one of these crashed (a guest fault: the primary restarts it); any other end
# (an exit, SIGTERM, SIGKILL) is the program's own.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})

RestoreSource = Path | RecordStream


class GuestKind(enum.Enum):
    PLATFORM = "vmft-platform"
    LINUX = "linux"


class GuestSpecError(ReplicationRefused):
    """This node cannot run the guest the spec asks for (a root it does not have, a bad option)."""


def kind_of(spec: vmft_pb2.VmSpec) -> GuestKind:
    return GuestKind.LINUX if spec.HasField("linux") else GuestKind.PLATFORM


def fill_defaults(spec: vmft_pb2.VmSpec) -> None:
    """Write a Linux spec's defaults into it when a node first takes it, so that what the node reserves
    (replica/node.py limits), what its backup builds and what it runs are the same RAM and hang timeout."""
    if kind_of(spec) is GuestKind.LINUX:
        spec.mem_mib = spec.mem_mib or LINUX_MEM_MIB
        spec.hang_timeout_s = spec.hang_timeout_s or LINUX_HANG_TIMEOUT_S


class ConsoleLog:
    """DATA_DIR/console/NAME.out: the console output this node let out (or, on a backup, replayed).
    Appended from the vCPU or acknowledgement thread; O_APPEND keeps each write whole, the lock keeps a
    write off a descriptor being closed (its number could be reused meanwhile)."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.out"
        fd = confine.open_inside(directory, self.path.name, "w")  # a link or FIFO planted there is refused
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd >= 0 and data:
                os.write(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class ConsoleReplayJournal(ReplayJournal):
    """A backup's replay journal that also hands the console output it replays to `on_console` (the
    personality tags Linux output with its stream number: `strip` removes the tag)."""

    def __init__(
        self,
        source: BatchSource,
        start_position: int,
        on_console: Callable[[bytes], None],
        strip: int,
    ) -> None:
        super().__init__(source, start_position=start_position)
        self._on_console = on_console
        self._strip = strip

    def output(self, kind: OutputKind, data: bytes) -> bool:
        delivered = super().output(kind, data)
        if not delivered and self.delegate is None and kind is OutputKind.CONSOLE:
            self._on_console(data[self._strip :])
        return delivered


class Guest:
    """How this node runs one VM's guest: one per VM on a node, kept across the roles the VM takes
    here (a backup that goes live, a primary that restarts its guest). `image` is what logs and
    checkpoints are tied to (for a Linux program, its identity: program, arguments, environment, root
    name, CPU model)."""

    def __init__(self, spec: vmft_pb2.VmSpec, data_dir: Path, disk: str | None) -> None:
        self.spec = spec
        self.kind = kind_of(spec)
        self.name = confine.validate_name(spec.name)
        self.disk = disk
        self.layer: Path | None = None
        self._root: str | None = None
        self._checked_roots: set[bytes] = set()  # ROOT_FILE events already found to match here
        if self.kind is GuestKind.LINUX:
            if disk is not None or spec.disk_size:
                raise GuestSpecError("a Linux guest has no disk (its files are its writable layer)")
            self._root = _root_dir(data_dir, spec.linux.root)
            layers = data_dir / "layers"
            layers.mkdir(parents=True, exist_ok=True)
            self.layer = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=layers))
            try:
                probe = LinuxPersonality(self.linux_config())  # finds the program and its interpreter
            except LinuxError as err:
                shutil.rmtree(self.layer, ignore_errors=True)
                raise GuestSpecError(f"{spec.linux.argv[0]}: {os.strerror(err.errno)}") from err
            except BaseException:
                shutil.rmtree(self.layer, ignore_errors=True)
                raise
            self.image: GuestImage = probe.image
            self._fs: FileSystem = probe.fs
            self.mem_size = self.linux_config().mem_mib << 20
            self.hang_timeout_s = self.linux_config().hang_timeout_s
        else:
            self.image = load_spec_image(spec)
            config = machine_config(spec, disk)
            self.mem_size = config.mem_size
            self.hang_timeout_s = config.hang_timeout_s
        self.console = ConsoleLog(data_dir / "console", self.name)

    # ----- what the spec says ----------------------------------------------------------------------

    def linux_config(self) -> LinuxConfig:
        assert self.layer is not None
        linux = self.spec.linux
        if not linux.argv:
            raise GuestSpecError("a Linux guest needs a program (LinuxSpec.argv)")
        try:
            clock = ClockMode.parse(linux.clock)
        except ConfigError as err:
            raise GuestSpecError(str(err)) from err
        return LinuxConfig(
            program=linux.argv[0],
            argv=list(linux.argv),
            layer=self.layer,
            root=self._root,
            root_name=linux.root or None,
            env=merge_env(list(linux.env)),
            cwd=linux.cwd or "/",
            mem_mib=self.spec.mem_mib or LINUX_MEM_MIB,
            hang_timeout_s=self.spec.hang_timeout_s or LINUX_HANG_TIMEOUT_S,
            clock=clock,
        )

    def _platform_config(self) -> MachineConfig:
        return machine_config(self.spec, self.disk)

    # ----- machines ---------------------------------------------------------------------------------

    def build_machine(self, journal: JournalArg = None) -> Machine:
        """A fresh machine, booted (platform) or with the program loaded (Linux), not started."""
        assert not callable(journal)
        on_console = self.console.write
        if self.kind is GuestKind.PLATFORM:
            return builder.build(
                self._platform_config(), journal=journal, image=self.image, on_console=on_console
            )
        personality = LinuxPersonality(self.linux_config())
        machine = builder.build(
            MachineConfig(personality.program_path, self.mem_size >> 20, None, 0, self.hang_timeout_s),
            journal=journal,
            image=self.image,
            on_console=on_console,
            boot=False,
            factory=personality.factory,
        )
        try:
            personality.load()
        except BaseException:
            close_machine(machine)
            raise
        return machine

    def restore_machine(
        self, source: RestoreSource, journal: JournalArg = None, loading: Loading = Loading.LAZY
    ) -> tuple[Machine, RestoreStats]:
        """A machine at a checkpoint's position (a file with its chain, or streamed records), not started.
        A Linux guest's writable layer is made afresh: the checkpoint carries its files."""
        factory: builder.MachineFactory = Machine
        if self.kind is GuestKind.LINUX:
            assert self.layer is not None
            shutil.rmtree(self.layer, ignore_errors=True)
            self.layer.mkdir(parents=True)
            factory = LinuxPersonality(self.linux_config()).factory
        machine, stats = builder.restore(
            source,
            journal=journal,
            on_console=self.console.write,
            image=self.image,
            mem_size=self.mem_size,
            disk=self.disk,
            hang_timeout_s=self.hang_timeout_s,
            factory=factory,
            loading=loading,
            confined=True,  # a node never takes a host path from a checkpoint (a peer may have sent it)
        )
        return machine, stats

    def replay_journal(self, source: BatchSource, position: int, keep_console: bool) -> ReplayJournal:
        """A journal replaying `source` from `position`; `keep_console`: the console output replayed is
        appended to this node's console log (a backup's, not a restarting primary's: that output is
        already there)."""
        if not keep_console:
            return ReplayJournal(source, start_position=position)
        strip = 1 if self.kind is GuestKind.LINUX else 0
        return ConsoleReplayJournal(source, position, self.console.write, strip)

    @property
    def console_is_output(self) -> bool:
        """A Linux program's stdout and stderr are its users' output (a restart replays up to the last of
        it that went out); a platform guest's console is diagnostics."""
        return self.kind is GuestKind.LINUX

    @property
    def framed_service(self) -> bool:
        """How the service address carries bytes: vmft-platform's NIC messages are length-framed; a Linux
        program's listening socket takes a raw TCP stream (monitor/netserver.py)."""
        return self.kind is GuestKind.PLATFORM

    # ----- the root a Linux program reads ------------------------------------------------------------

    def check_batch(self, batch: vmft_pb2.EventBatch) -> None:
        """RootMismatch if a root file the primary's program read is not the same here (before the batch
        is replayed)."""
        if self.kind is not GuestKind.LINUX or int(EventKind.ROOT_FILE) not in batch.kinds:
            return
        for kind, data in zip(batch.kinds, batch.data):
            if kind == int(EventKind.ROOT_FILE) and data not in self._checked_roots:
                path, _, digest = data.partition(b"\0")
                self._check_root_file(path.decode("utf-8", "surrogateescape"), digest.decode())
                self._checked_roots.add(data)

    def check_restored(self, machine: Machine) -> int:
        """RootMismatch unless every root file the checkpoint's program had read is the same here; how many
        were checked."""
        personality = linux_personality(machine)
        if personality is None:
            return 0
        files = {}
        for process in personality.processes.values():
            files.update(process.root_files)
        for data in sorted(files.values()):
            path, _, digest = data.partition(b"\0")
            self._check_root_file(path.decode("utf-8", "surrogateescape"), digest.decode())
            self._checked_roots.add(data)
        return len(files)

    def _check_root_file(self, guest: str, digest: str) -> None:
        try:
            node = self._fs.resolve(guest)
        except LinuxError as err:
            raise RootMismatch(
                f"root file {guest}: read by the primary's program, not in this node's root "
                f"({os.strerror(err.errno)})"
            ) from err
        if node.host is None or not os.path.isfile(node.host):
            raise RootMismatch(f"root file {guest}: read by the primary's program, not in this node's root")
        if file_sha256(node.host) != digest:
            raise RootMismatch(f"root file {guest}: differs from the primary's (sha256 {digest[:16]}...)")

    # ----- faults and the end ------------------------------------------------------------------------

    def fault_view(self, machine: Machine, result: MachineResult) -> MachineResult:
        """The result as the restart policy sees it: a Linux program killed by SIGSEGV, SIGBUS, SIGFPE,
        SIGILL or SIGABRT crashed (the platform's guests crash through the machine itself)."""
        personality = linux_personality(machine)
        if result.reason is not StopReason.EXITED or personality is None or personality.fatal is None:
            return result
        fatal = personality.fatal
        if fatal.signal not in CRASH_SIGNALS:
            return result
        return MachineResult(
            StopReason.CRASHED,
            result.position,
            result.exit_code,
            f"{personality.program_path} {fatal.message}",
        )

    def remove(self, close_console: bool) -> None:
        """The VM ended or stopped on this node: its writable layer goes. The console log stays to be read;
        `close_console`: nothing more is written to it (after the guest ended by itself, its last outputs
        still go out when the backup acknowledges them)."""
        if close_console:
            self.console.close()
        if self.layer is not None:
            shutil.rmtree(self.layer, ignore_errors=True)


def linux_personality(machine: Machine) -> LinuxPersonality | None:
    for component in machine.components:
        if isinstance(component, LinuxPersonality):
            return component
    return None


def close_machine(machine: Machine) -> None:
    """Close a machine and what its guest kind holds (a Linux program's open files)."""
    personality = linux_personality(machine)
    machine.close()
    if personality is not None:
        personality.close()


def merge_env(extra: list[str]) -> list[str]:
    """The default environment with `extra` (NAME=VALUE) added, a later NAME replacing an earlier one."""
    env = list(DEFAULT_ENV)
    for item in extra:
        name = item.split("=", 1)[0]
        if "=" not in item or not name:
            raise GuestSpecError(f"bad environment entry {item!r}: NAME=VALUE")
        env = [e for e in env if not e.startswith(name + "=")] + [item]
    return env


def _root_dir(data_dir: Path, name: str) -> str | None:
    """The prepared root tree NAME inside DATA_DIR/roots (None: the host's filtered system view)."""
    if not name:
        return None
    confine.validate_name(name, "root")
    try:
        path = confine.resolve_inside(data_dir / "roots", name)
    except confine.ConfinementError as err:
        raise GuestSpecError(f"root {name}: {err}") from err
    if not path.is_dir():
        raise GuestSpecError(f"root {name}: no such prepared root in this node's {data_dir / 'roots'}")
    return str(path)
