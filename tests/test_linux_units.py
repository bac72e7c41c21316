"""Pieces of the Linux personality that need no KVM: path resolution, the address space, signal frames,
the initial stack, ELF checks."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from monitor.linux import elf, signals
from monitor.linux.fs import FileSystem
from monitor.linux.mm import PAGE, PROT_READ, PROT_WRITE, AddressSpace, LinuxError
from monitor.linux.stack import AuxInfo, build
from monitor.memory import GuestMemory


@pytest.fixture
def tree(tmp_path: Path) -> tuple[FileSystem, Path]:
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (root / "usr" / "bin" / "tool").write_text("x")
    (root / "usr" / "bin" / "up").symlink_to("../../..")  # tries to climb out of the root
    (root / "usr" / "bin" / "abs").symlink_to("/etc/passwd")  # absolute: inside the guest's tree
    (root / "loop").symlink_to("loop")
    (tmp_path / "secret").write_text("host only")
    return FileSystem(tmp_path / "layer", str(root)), tmp_path


def test_paths_cannot_leave_the_root(tree: tuple[FileSystem, Path]) -> None:
    fs, host = tree
    assert fs.resolve("/../../secret").host == os.path.join(fs.root, "secret")
    assert not fs.resolve("/../../secret").exists
    assert not fs.resolve("/usr/bin/up/secret").exists  # the symlink stops at the guest's /
    assert fs.resolve("/usr/bin/up/etc/passwd").exists
    node = fs.resolve("/usr/bin/abs")
    assert node.host == os.path.join(fs.root, "etc", "passwd")
    with pytest.raises(LinuxError) as err:
        fs.resolve("/loop/x")
    assert err.value.errno == errno.ELOOP
    with pytest.raises(LinuxError) as err:
        fs.resolve("/etc/passwd/x")
    assert err.value.errno == errno.ENOTDIR
    assert fs.resolve("tool", cwd="/usr/bin").guest == "/usr/bin/tool"


def test_only_the_layer_is_writable(tree: tuple[FileSystem, Path]) -> None:
    fs, _host = tree
    with pytest.raises(LinuxError) as err:
        fs.writable_host(fs.resolve("/etc/passwd"))
    assert err.value.errno == errno.EROFS
    assert fs.writable_host(fs.resolve("/tmp/new")).startswith(str(fs.layer))
    assert fs.writable_host(fs.resolve("/home/guest/x")).startswith(str(fs.layer))
    (fs.layer / "tmp" / "out").symlink_to("/etc/passwd")  # a layer symlink resolves in the guest's tree
    assert fs.resolve("/tmp/out").host == os.path.join(fs.root, "etc", "passwd")


def test_host_view_hides_secrets(tmp_path: Path) -> None:
    fs = FileSystem(tmp_path / "layer", None)
    for hidden in ("/etc/shadow", "/root", "/var", "/srv", "/etc/ssh"):
        assert not fs.resolve(hidden).exists, hidden
    assert "shadow" not in fs.listing(fs.resolve("/etc"))
    assert fs.resolve("/etc/passwd").exists
    assert fs.resolve("/proc").synthetic is None  # no process attached: /proc is empty
    assert fs.resolve("/dev/null").synthetic is not None


def _space() -> AddressSpace:
    return AddressSpace(GuestMemory(16 << 20), lambda: None)


def test_address_space_bookkeeping() -> None:
    space = _space()
    base = space.map(0x400000, 3 * PAGE, PROT_READ | PROT_WRITE, b"abc")
    assert space.read(base, 3) == b"abc"
    space.write(base + PAGE, b"middle")
    space.protect(base + PAGE, PAGE, PROT_READ)
    with pytest.raises(LinuxError):
        space.write(base + PAGE, b"x")
    assert [(v.start, v.end, v.prot) for v in space.vmas] == [
        (base, base + PAGE, 3), (base + PAGE, base + 2 * PAGE, 1), (base + 2 * PAGE, base + 3 * PAGE, 3)
    ]  # fmt: skip
    moved = space.remap(base + 2 * PAGE, PAGE, 4 * PAGE, True, None)
    space.write(moved + 3 * PAGE, b"grown")
    space.unmap(base, PAGE)
    with pytest.raises(LinuxError):
        space.read(base, 1)
    assert space.read(base + PAGE, 6) == b"middle"
    child = space.fork_copy()
    child.write(moved + 3 * PAGE, b"CHILD")
    assert space.read(moved + 3 * PAGE, 5) == b"grown"  # the copy is its own
    free_before = len(space.phys.free)
    child.release()
    assert len(space.phys.free) > free_before


def test_signal_frame_round_trip() -> None:
    regs = list(range(1, 19))
    regs[6] = 0x7FFF_FFF0_0000  # rsp
    action = signals.Action(0x401000, signals.SA_SIGINFO | signals.SA_RESTORER, 0x402000, 0)
    frame = signals.build_frame(
        10, action, tuple(regs), b"F" * 512, 0x5, bytes(24), signals.SI_TKILL, pid=100
    )
    assert frame.regs[16] == 0x401000 and frame.regs[5] == 10
    assert (frame.regs[6] + 8) % 16 == 0 and frame.regs[6] < regs[6] - 128
    assert struct.unpack_from("<Q", frame.data)[0] == 0x402000  # the handler returns to the restorer
    uc = frame.data[frame.regs[3] - frame.address :]
    restored, mask, fpstate = signals.parse_frame(uc)
    assert restored == tuple(regs) and mask == 0x5
    assert frame.data[fpstate - frame.address : fpstate - frame.address + 512] == b"F" * 512


def test_initial_stack_layout() -> None:
    space = _space()
    space.mmap_top = 0x7FFF_F7FF_F000
    rsp, random_at = build(space, ["prog", "-x"], ["A=1"], AuxInfo(0x400040, 9, 0x401000, 0, "/bin/prog"))
    assert rsp % 16 == 0
    argc, argv0, argv1, end, env0, env_end = struct.unpack("<6Q", space.read(rsp, 48))
    assert argc == 2 and end == 0 and env_end == 0
    assert space.read_cstring(argv0) == b"prog" and space.read_cstring(argv1) == b"-x"
    assert space.read_cstring(env0) == b"A=1"
    assert space.read(random_at, 16) == bytes(16)  # filled at the first exit, as an event


def test_elf_checks() -> None:
    true = Path("/usr/bin/true").read_bytes()
    assert elf.parse(true, "/usr/bin/true").interpreter == "/lib64/ld-linux-x86-64.so.2"
    with pytest.raises(elf.LinuxImageError, match="not an ELF"):
        elf.parse(b"hello", "x")
    with pytest.raises(elf.LinuxImageError, match="32-bit"):
        elf.parse(true[:4] + b"\x01" + true[5:], "x")
