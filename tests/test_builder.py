"""The one door for building a VM: config validation and defaults, hooks given at build time, every
resource closed when building fails (a bad disk used to leak the KVM fds), and components that save and
restore themselves (the parts of this file that need no KVM are marked so)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor import builder
from monitor.builder import MachineConfig, build
from monitor.component import replicated_state, restore_all, save_all
from monitor.devices.clock import Timer, VirtualClock
from monitor.devices.net import Net, NetBackend, NetMessage
from monitor.errors import CheckpointError, ConfigError, DiskError, HostError, ImageError
from monitor.guest_abi import NetKind, Vector
from monitor.interrupts import InterruptState
from monitor.kvm import VmFd
from monitor.machine import Machine, StopReason


def open_fds() -> set[str]:
    """This process's open file descriptors, by number and target (KVM fds read anon_inode:kvm-*). Not
    sockets: a machine opens none, and gRPC connections of earlier tests in this process close on gRPC's
    own threads whenever they do."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd of the listing itself
        if not target.startswith("socket:"):
            out.add(f"{fd} {target}")
    return out


def kvm_fds() -> list[str]:
    return sorted(f for f in open_fds() if "kvm" in f)


# ----- config: the one place for defaults ---------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = MachineConfig("x.elf")
    assert (config.mem_mib, config.disk, config.arg, config.hang_timeout_s) == (64, None, 0, 2.0)
    assert MachineConfig("x.elf", 0, None, 0, 0.0) == config  # unset protobuf fields: the defaults
    assert MachineConfig(Path("x.elf"), 128).mem_size == 128 << 20  # type: ignore[arg-type]
    for bad in (
        {"mem_mib": 3},
        {"mem_mib": -2},
        {"mem_mib": 8192},
        {"hang_timeout_s": -1.0},
        {"arg": -1},
        {"arg": 1 << 64},
    ):
        with pytest.raises(ConfigError) as err:
            MachineConfig("x.elf", **bad)  # type: ignore[arg-type]
        assert isinstance(err.value, ValueError), bad  # callers that catch ValueError still refuse it
    with pytest.raises(ConfigError, match="needs a guest image"):
        MachineConfig("")


# ----- building: resources closed on failure ------------------------------------------------------------


@pytest.mark.kvm
def test_a_bad_disk_leaks_nothing(
    kvm_required: None, guest_image: Callable[[str], Path], tmp_path: Path
) -> None:
    image = str(guest_image("hello"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    before = open_fds()
    bad_disks = ((tmp_path / "missing.img", "cannot open disk image"), (odd, "not a multiple of 512"))
    for disk, expected in bad_disks:
        with pytest.raises(DiskError, match=expected):
            build(MachineConfig(image, disk=str(disk)))
        assert open_fds() == before, disk
    assert not kvm_fds()


@pytest.mark.kvm
@pytest.mark.parametrize("stage", ["create_vcpu", "boot"])
def test_a_failure_after_kvm_is_open_closes_everything(
    kvm_required: None,
    guest_image: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    """KVM, the VM, the vCPU, guest memory and the disk are all acquired; the last step fails."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(str(guest_image("hello")), disk=str(disk))

    def fail(*args: object, **kwargs: object) -> None:
        raise HostError(f"injected failure at {stage}")

    if stage == "create_vcpu":
        monkeypatch.setattr(VmFd, "create_vcpu", fail)
    else:
        monkeypatch.setattr(Machine, "load", fail)
    before = open_fds()
    with pytest.raises(HostError, match="injected"):
        build(config)
    assert open_fds() == before
    assert not kvm_fds()
    monkeypatch.undo()
    machine = build(config)  # and the same config builds once nothing fails
    try:
        assert kvm_fds() and machine.block.sectors == (1 << 20) // 512
    finally:
        machine.close()
    assert open_fds() == before


@pytest.mark.kvm
def test_a_missing_image_is_refused_before_any_resource(
    kvm_required: None, tmp_path: Path
) -> None:
    before = open_fds()
    with pytest.raises(ImageError):
        build(MachineConfig(str(tmp_path / "none.elf")))
    assert open_fds() == before


@pytest.mark.kvm
def test_hooks_are_given_at_build_time(kvm_required: None, guest_image: Callable[[str], Path]) -> None:
    console = bytearray()
    outputs: list[int] = []

    def held(kind: object, data: bytes, position: int) -> None:
        outputs.append(position)

    machine = build(MachineConfig(str(guest_image("hello"))), on_console=console.extend)
    try:
        result = machine.run_blocking(30)
        assert result.reason is StopReason.EXITED, result.describe()
        assert b"hello" in bytes(console).lower()
    finally:
        machine.close()
    machine = build(MachineConfig(str(guest_image("hello"))), output_handler=held)
    try:
        machine.run_blocking(30)
        assert outputs and not machine.console_output  # held by the handler, not delivered
    finally:
        machine.close()


@pytest.mark.kvm
def test_restore_refuses_a_checkpoint_of_an_unknown_component(
    kvm_required: None, guest_image: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitor.checkpoint import Checkpointer

    machine = build(MachineConfig(str(guest_image("ticker")), arg=5))
    capture = machine.capture_state

    def with_stranger() -> object:
        state = capture()
        state.components["linux"] = b"\x08\x01"
        return state

    monkeypatch.setattr(machine, "capture_state", with_stranger)
    try:
        Checkpointer(machine).save(tmp_path / "s.vmck")
    finally:
        machine.close()
    before = open_fds()
    with pytest.raises(CheckpointError, match="components this vmft does not have: linux"):
        builder.restore(tmp_path / "s.vmck")
    assert open_fds() == before  # the half-built machine was closed


def test_the_cli_refuses_a_bad_disk_or_config_in_one_line(
    guest_image: Callable[[str], Path], tmp_path: Path
) -> None:
    """User errors at build time end with one line saying what is wrong, never a traceback (the disk is
    opened before KVM, so this needs no /dev/kvm)."""
    image = str(guest_image("hello"))
    root = Path(__file__).resolve().parent.parent
    for extra, expected in (
        (["--disk", str(tmp_path / "missing.img")], "cannot open disk image"),
        (["--mem", "3"], "guest RAM must be a positive multiple of 2 MiB"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "replica.cli", "run", image, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
        )
        assert run.returncode == 2, (extra, run.stderr)
        assert "Traceback" not in run.stderr and expected in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


# ----- components (no KVM) ------------------------------------------------------------------------------


def test_interrupts_and_timer_save_and_restore_themselves() -> None:
    irq = InterruptState()
    irq.raise_vector(Vector.TIMER)
    irq.raise_vector(Vector.NET_RX)
    irq.next_vector()
    timer = Timer(None, VirtualClock())  # type: ignore[arg-type]
    timer.deadline = 123456
    states = save_all([irq, timer])
    assert set(states) == {"interrupts", "timer"}
    irq2, timer2 = InterruptState(), Timer(None, VirtualClock())  # type: ignore[arg-type]
    assert replicated_state([irq2, timer2]) != replicated_state([irq, timer])
    restore_all([irq2, timer2], states, live=False)
    assert (irq2.pending, irq2.latched, irq2.injected) == (irq.pending, irq.latched, irq.injected)
    assert timer2.deadline == 123456
    assert replicated_state([irq2, timer2]) == replicated_state([irq, timer])
    with pytest.raises(CheckpointError, match="saved state of component 'timer' is corrupted"):
        timer2.restore(b"\xff\xff\xff", live=True)
    with pytest.raises(CheckpointError, match="does not have: linux"):
        restore_all([irq2], {"interrupts": states["interrupts"], "linux": b""}, live=True)


def test_net_restores_host_input_only_when_live() -> None:
    backend = NetBackend()
    net = Net(None, backend)  # type: ignore[arg-type]
    net.open_conns = {1, 2}
    net.max_conn = 3
    backend.push(NetMessage(3, NetKind.OPEN, b""))
    backend.push(NetMessage(3, NetKind.DATA, b"hi"))
    saved = net.save().SerializeToString()

    replay_backend = NetBackend()
    replay = Net(None, replay_backend)  # type: ignore[arg-type]
    replay.restore(saved, live=False)
    assert (replay.open_conns, replay.max_conn, replay_backend.queued()) == ({1, 2}, 3, [])
    assert replay.replicated() == net.replicated()

    live_backend = NetBackend()
    live = Net(None, live_backend)  # type: ignore[arg-type]
    live.restore(saved, live=True)
    queued = live_backend.queued()
    # The queued input again, then a CLOSE for every connection the guest knew, whose client is gone.
    assert queued[:2] == [NetMessage(3, NetKind.OPEN, b""), NetMessage(3, NetKind.DATA, b"hi")]
    assert sorted(m.conn for m in queued[2:] if m.kind is NetKind.CLOSE) == [1, 2, 3]
