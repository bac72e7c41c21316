"""Confined input: names that cannot name host paths, files that cannot be FIFOs or devices, and
decompression that cannot be told to allocate without bound.

The audit (docs/design.md) found requests naming host paths (`../` in a VM name, `disk_path`,
`image_path`), a checkpoint naming the file it restores into, FIFOs and /dev/zero blocking the event loop
or growing memory, and zstd frames whose declared size was trusted. The rules here:

- A VM (or image, disk, checkpoint) **name** is 1-63 of [A-Za-z0-9._-], starting with a letter or digit:
  never a path, never `.` or `..`.
- A file is opened **inside a root directory** of the node (its image or data directory) by a relative
  name, one component at a time from the root's own descriptor (openat), every component with
  O_NOFOLLOW: no absolute names, no `..`, and no symbolic link anywhere below the root (a link is refused
  even if it points inside: nothing in a node's directories needs one). The root itself may be a link.
- Only **regular files** are opened: the entry is checked with lstat before opening (a FIFO is never
  opened, so it cannot block), opened with O_NONBLOCK (a FIFO swapped in between cannot block either),
  and checked again with fstat on the descriptor; a file with more than one hard link is refused (a hard
  link inside the directory to a host file is an escape no path check sees).
- **Decompression** is bounded: a zstd frame whose declared size exceeds the bound is refused before
  anything is allocated, and output is produced in slices, so a frame that declares nothing (or lies)
  is refused as soon as it passes the bound.

This module depends on nothing in vmft but the error classes, so the decompression helper can move to
`monitor/` (which reads checkpoints and logs and must not import `replica`).
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from pathlib import Path

import zstandard

from monitor.errors import CheckpointError, ConfigError, VmftError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SLICE = 1 << 20  # decompression output per step


class ConfinementError(VmftError):
    """A name or file that would reach outside the node's own directories, or is not a regular file."""

    hint = "name images, disks and checkpoints by name inside the node's directories; no paths"


class BadName(ConfinementError, ConfigError):
    """A VM, image, disk or checkpoint name that is not a plain name."""


class DecompressionBomb(CheckpointError):
    """A compressed frame that declares or produces more than allowed, or is not zstd at all."""


def validate_name(name: str, what: str = "VM") -> str:
    """`name` if it is a plain name (see the module doc); BadName otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadName(
            f"bad {what} name {name!r}: 1-63 of letters, digits, . _ -, starting with a letter or digit"
        )
    return name


def _components(relpath: str) -> list[str]:
    if not relpath or "\0" in relpath:
        raise ConfinementError(f"bad file name {relpath!r}")
    if relpath.startswith("/"):
        raise ConfinementError(f"{relpath!r}: an absolute path; give a name inside the node's directory")
    parts = relpath.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfinementError(f"{relpath!r}: empty, '.' or '..' components are refused")
    return parts


def resolve_inside(root: str | Path, relpath: str) -> Path:
    """The path of `relpath` inside `root`, checked lexically and against symbolic links as it is now.
    For handing a path to code that opens it itself; `open_inside` is the race-free way to open."""
    parts = _components(relpath)
    base = Path(os.path.realpath(root))
    path = base
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ConfinementError(f"{relpath!r}: {part} is a symbolic link")
    if os.path.commonpath([base, os.path.realpath(path)]) != str(base):
        raise ConfinementError(f"{relpath!r} leads outside {base}")
    return path


def open_inside(
    root: str | Path, relpath: str, mode: str = "r", *, create_mode: int = 0o600, allow_links: bool = False
) -> int:
    """Open `relpath` inside `root` (module doc) and return the descriptor. `mode`: "r" read, "r+" read
    and write an existing file, "w" create or truncate for writing, "x" create a new file (never an
    existing one). Raises ConfinementError for anything but a regular file inside `root`."""
    flags = {
        "r": os.O_RDONLY,
        "r+": os.O_RDWR,
        "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "x": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    }.get(mode)
    if flags is None:
        raise ValueError(f"bad mode {mode!r}")
    parts = _components(relpath)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dir_fd)
            except OSError as e:
                raise ConfinementError(
                    f"{relpath!r}: {part} is not a directory inside {root} ({e.strerror})"
                ) from e
            os.close(dir_fd)
            dir_fd = next_fd
        leaf = parts[-1]
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise ConfinementError(f"{relpath!r}: no such file in {root}") from None
        else:
            _check_regular(relpath, st, allow_links)
        try:
            confined = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(leaf, confined, create_mode, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise ConfinementError(f"{relpath!r}: not a regular file ({e.strerror})") from e
            raise ConfinementError(f"{relpath!r}: {e.strerror}") from e
    finally:
        os.close(dir_fd)
    try:
        _check_regular(relpath, os.fstat(fd), allow_links)
        os.set_blocking(fd, True)  # no effect on a regular file's I/O; keep the descriptor ordinary
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(relpath: str, st: os.stat_result, allow_links: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise ConfinementError(f"{relpath!r} is {kind}")
    if st.st_nlink > 1 and not allow_links:
        raise ConfinementError(f"{relpath!r} has {st.st_nlink} hard links (refused: it may be a host file)")


def open_file_inside(root: str | Path, relpath: str, mode: str = "r") -> io.FileIO:
    """`open_inside` as an unbuffered Python file object."""
    return io.FileIO(open_inside(root, relpath, mode), {"r": "rb", "r+": "r+b", "w": "wb", "x": "r+b"}[mode])


def declared_size(frame: bytes) -> int | None:
    """The content size a zstd frame declares, None if it declares none; DecompressionBomb if `frame`
    is not zstd."""
    try:
        size = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as e:
        raise DecompressionBomb(f"not a zstd frame: {e}") from e
    return None if size == zstandard.CONTENTSIZE_UNKNOWN else int(size)


def decompress_bounded(data: bytes, limit: int, *, expect: int | None = None) -> bytes:
    """Decompress `data` (one or more zstd frames), refusing more than `limit` bytes of output: a frame
    declaring more is refused before decompressing; otherwise output grows one slice at a time and is
    refused as soon as it passes `limit`. With `expect`, the output must be exactly that long; without it,
    truncation is detected only for a frame that declares its size."""
    if limit < 0:
        raise ValueError("limit must be >= 0")
    declared = declared_size(data)
    if declared is not None and declared > limit:
        raise DecompressionBomb(f"a zstd frame declares {declared} bytes, more than the {limit} allowed")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            while True:
                piece = reader.read(min(SLICE, limit - len(out) + 1))
                if not piece:
                    break
                out += piece
                if len(out) > limit:
                    raise DecompressionBomb(f"zstd data decompresses to more than the {limit} bytes allowed")
    except zstandard.ZstdError as e:
        raise DecompressionBomb(f"damaged zstd data: {e}") from e
    # The reader ends quietly at the end of its input: a first frame that produced less than it declared
    # was cut short (or lies). A frame that declares nothing and is cut short is caught only by `expect`
    # (a checkpoint knows each chunk's size) or a frame checksum.
    if declared is not None and len(out) < declared:
        raise DecompressionBomb(f"zstd data produced {len(out)} bytes but declares {declared}: truncated")
    if expect is not None and len(out) != expect:
        raise DecompressionBomb(f"zstd data decompressed to {len(out)} bytes, expected {expect}")
    return bytes(out)
