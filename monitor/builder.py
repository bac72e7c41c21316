"""The one door for building a VM: from a validated config (fresh boot) or from a checkpoint.

`MachineConfig` (monitor/config.py) is the one place for a VM's defaults and their validation. `build`
acquires every resource a machine holds in an order where the cheap, user-caused failures come first
(image, config, disk file) and closes whatever it acquired if a later step fails (KVM fds, guest memory,
the disk).
`restore` builds a machine from a checkpoint file (with its chain of parents), an explicit chain, or a
stream of records, through the one restore path in monitor/checkpoint/restore.py. Hooks (journal,
output handler, console) are given at build time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from monitor import cpuid
from monitor.checkpoint import restore as checkpoint_restore
from monitor.checkpoint.restore import JournalArg, Loading, RecordStream, RestoreStats
from monitor.devices.block import DiskImage
from monitor.config import MachineConfig
from monitor.journal import Journal, LiveJournal
from monitor.kvm import Kvm
from monitor.loader import GuestImage, load_image_file
from monitor.machine import MEMORY_SLOT, Machine, MachineParts, OutputHandler, install_kick_handler
from monitor.memory import GuestMemory

MachineFactory = Callable[[MachineParts, Journal], Machine]


@dataclass
class Hooks:
    """What the caller attaches to a machine at build time."""

    journal: Journal | None = None  # default: live (no log)
    output_handler: OutputHandler | None = None  # replication holds outputs through this
    on_console: Callable[[bytes], None] | None = None


def build(
    config: MachineConfig,
    *,
    journal: Journal | None = None,
    output_handler: OutputHandler | None = None,
    on_console: Callable[[bytes], None] | None = None,
    image: GuestImage | None = None,
    kvm: Kvm | None = None,
    boot: bool = True,
    factory: MachineFactory = Machine,
) -> Machine:
    """A machine for `config`, booted (`Machine.load()`) unless `boot=False` (a checkpoint restore
    writes memory itself). `image`: the already loaded image of config.image. `kvm`: a shared /dev/kvm
    handle (the machine then does not close it). `factory`: makes the machine from its acquired parts
    (a Machine subclass for a guest personality, e.g. `lambda parts, journal: LinuxMachine(parts,
    journal, ...)`); if it or the boot raises, every part is closed."""
    return _build(config, Hooks(journal, output_handler, on_console), image, kvm, boot, factory)


def _build(
    config: MachineConfig,
    hooks: Hooks,
    image: GuestImage | None,
    kvm: Kvm | None,
    boot: bool,
    factory: MachineFactory = Machine,
) -> Machine:
    image = image or load_image_file(config.image)
    image.check_fits(config.mem_size)
    install_kick_handler()
    with contextlib.ExitStack() as undo:  # closes what was acquired if a later step raises
        disk = DiskImage(config.disk) if config.disk is not None else None
        if disk is not None:
            undo.callback(disk.close)
        own_kvm = kvm is None
        if kvm is None:
            kvm = Kvm()
            undo.callback(kvm.close)
        cpuid.check_host_supports(kvm.supported_cpuid())
        memory = GuestMemory(config.mem_size)
        undo.callback(memory.close)
        vm = kvm.create_vm()
        undo.callback(vm.close)
        vm.set_memory_region(MEMORY_SLOT, 0, memory.size, memory.host_address, log_dirty=True)
        vcpu = vm.create_vcpu(0)
        undo.callback(vcpu.close)
        vcpu.set_cpuid(cpuid.kvm_entries())
        vcpu.enable_sync_regs()
        parts = MachineParts(config, image, kvm, own_kvm, memory, vm, vcpu, disk)
        machine = factory(parts, hooks.journal or LiveJournal())
        machine.output_handler = hooks.output_handler
        machine.on_console = hooks.on_console
        if boot:
            machine.load()
        undo.pop_all()
    return machine


CheckpointSource = str | Path | Sequence[str | Path] | RecordStream


def restore(
    source: CheckpointSource,
    *,
    journal: JournalArg = None,
    output_handler: OutputHandler | None = None,
    on_console: Callable[[bytes], None] | None = None,
    image: GuestImage | None = None,
    mem_size: int | None = None,
    disk: str | None = None,
    hang_timeout_s: float | None = None,
    kvm: Kvm | None = None,
    verify_digest: bool = False,
    factory: MachineFactory = Machine,
    loading: Loading = Loading.EAGER,
    confined: bool = False,
) -> tuple[Machine, RestoreStats]:
    """A machine at a checkpoint's position, not started. `source`: a checkpoint file (its parents are
    found in the same directory), an explicit chain of files (full first), or a `RecordStream` (a full
    checkpoint's records, e.g. received over gRPC). `journal`: a journal, or a function of the
    checkpoint's position that makes one (default: live). `image`, `mem_size`: what the checkpoint
    must match. `disk`: where its disk goes (default: the path it records); rewritten to its contents.
    `factory`: as for `build`. `loading`: Loading.LAZY returns the machine before its memory is loaded
    (pages load on first touch, a thread loads the rest ahead; monitor/checkpoint/lazy.py). `confined`: no
    host path is taken from the checkpoint (give `image`, and `disk` if it has one). Refuses a
    damaged or mismatched checkpoint with a CheckpointError before anything is loaded."""

    def make(config: MachineConfig, loaded: GuestImage) -> Machine:
        return _build(config, Hooks(None, output_handler, on_console), loaded, kvm, False, factory)

    options = checkpoint_restore.Options(
        journal=journal,
        image=image,
        mem_size=mem_size,
        disk=disk,
        hang_timeout_s=hang_timeout_s,
        verify_digest=verify_digest,
        make_machine=make,
        loading=loading,
        confined=confined,
    )
    if isinstance(source, RecordStream):
        return checkpoint_restore.restore_records(source, options)
    if isinstance(source, (str, Path)):
        return checkpoint_restore.restore_chain(checkpoint_restore.find_chain(source), options)
    return checkpoint_restore.restore_chain([Path(p) for p in source], options)
