"""Confined input (replica/confine.py): names, files inside a root, regular files only, bounded zstd."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
import zstandard

from replica.confine import (
    BadName,
    ConfinementError,
    DecompressionBomb,
    decompress_bounded,
    declared_size,
    open_file_inside,
    open_inside,
    resolve_inside,
    validate_name,
)


@pytest.mark.parametrize("name", ["kv", "vm-1", "a.b_c", "0", "x" * 63, "Web01"])
def test_plain_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/etc", "-x", ".hidden", "x" * 64, "a b", "a\0b", "é", "a\nb"]
)
def test_names_that_could_be_paths_are_refused(name: str) -> None:
    with pytest.raises(BadName):
        validate_name(name)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/ with images/a.img, and outside/secret beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "a.img").write_bytes(b"image")
    (outside / "secret").write_bytes(b"secret")
    return root, outside


def read_inside(root: Path, name: str) -> bytes:
    with open_file_inside(root, name) as f:
        return f.read()


def test_a_file_inside_opens(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert read_inside(root, "images/a.img") == b"image"
    assert resolve_inside(root, "images/a.img") == root.resolve() / "images" / "a.img"
    with open_file_inside(root, "disk.raw", "x") as f:
        f.write(b"new")
    assert (root / "disk.raw").read_bytes() == b"new"
    with pytest.raises(ConfinementError):
        open_inside(root, "disk.raw", "x")  # "x" never reuses an existing file
    with open_file_inside(root, "disk.raw", "r+") as f:
        f.write(b"N")
    assert (root / "disk.raw").read_bytes() == b"New"


@pytest.mark.parametrize("name", ["../outside/secret", "images/../../outside/secret", "/etc/passwd", "",
                                  "images//a.img", "./images/a.img", "images/missing"])
def test_names_leading_outside_or_nowhere_are_refused(tree: tuple[Path, Path], name: str) -> None:
    root, _ = tree
    with pytest.raises(ConfinementError):
        open_inside(root, name)


def test_symbolic_links_are_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "leak.img").symlink_to(outside / "secret")
    (root / "linkdir").symlink_to(outside)
    (root / "inner.img").symlink_to(root / "images" / "a.img")  # even one that stays inside
    for name in ("leak.img", "linkdir/secret", "inner.img"):
        with pytest.raises(ConfinementError):
            open_inside(root, name)
        with pytest.raises(ConfinementError):
            resolve_inside(root, name)
    # Writing through a link would overwrite the host file: refused, and the file is untouched.
    with pytest.raises(ConfinementError):
        open_inside(root, "leak.img", "w")
    assert (outside / "secret").read_bytes() == b"secret"


def test_a_hard_link_to_a_host_file_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.link(outside / "secret", root / "hard.img")
    with pytest.raises(ConfinementError):
        open_inside(root, "hard.img", "w")
    assert (outside / "secret").read_bytes() == b"secret"


@pytest.mark.timeout(20)
def test_fifos_and_devices_are_refused_without_blocking(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.mkfifo(root / "fifo.img")
    for mode in ("r", "r+", "w"):
        with pytest.raises(ConfinementError, match="FIFO"):
            open_inside(root, "fifo.img", mode)  # a blocking open would hang here (no writer/reader)
    try:
        os.mknod(root / "zero.img", 0o600 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero
    except PermissionError:
        pytest.skip("cannot make device nodes here")
    with pytest.raises(ConfinementError, match="device"):
        open_inside(root, "zero.img")
    with pytest.raises(ConfinementError, match="directory"):
        open_inside(root, "images")


def test_declared_sizes_over_the_bound_are_refused_before_decompressing() -> None:
    # 256 MiB of zeros, a few KB compressed: made a MiB at a time, so this test never holds 256 MiB itself.
    cobj = zstandard.ZstdCompressor().compressobj(size=256 << 20)
    bomb = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(256)) + cobj.flush()
    assert len(bomb) < 64 << 10 and declared_size(bomb) == 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecompressionBomb, match="declares"):
        decompress_bounded(bomb, 1 << 20)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10, "nothing near the declared size was allocated"


def test_undeclared_sizes_are_bounded_while_decompressing() -> None:
    comp = zstandard.ZstdCompressor(write_content_size=False)
    bomb = comp.compress(bytes(64 << 20))
    assert declared_size(bomb) is None
    with pytest.raises(DecompressionBomb, match="more than"):
        decompress_bounded(bomb, 1 << 20)
    # Several frames, each small and honest, together over the bound: refused as well.
    frames = b"".join(zstandard.ZstdCompressor().compress(bytes(512 << 10)) for _ in range(4))
    with pytest.raises(DecompressionBomb):
        decompress_bounded(frames, 1 << 20)
    assert decompress_bounded(frames, 2 << 20) == bytes(2 << 20)


def test_honest_data_within_the_bound() -> None:
    data = os.urandom(1000) + bytes(100_000)
    frame = zstandard.ZstdCompressor().compress(data)
    assert decompress_bounded(frame, len(data)) == data
    assert decompress_bounded(frame, len(data), expect=len(data)) == data
    with pytest.raises(DecompressionBomb):
        decompress_bounded(frame, len(data) - 1)
    with pytest.raises(DecompressionBomb, match="expected"):
        decompress_bounded(frame, len(data), expect=len(data) + 1)
    with pytest.raises(DecompressionBomb):
        decompress_bounded(b"not zstd at all", 100)
    with pytest.raises(DecompressionBomb):
        decompress_bounded(frame[:-10], len(data))  # truncated
