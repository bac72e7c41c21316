"""The root files a recording read, from its log: checked against this host's root before replay."""

from __future__ import annotations

import os
from pathlib import Path

from monitor.errors import LogError
from monitor.journal import EventKind
from monitor.linux.fs import FileSystem
from monitor.linux.mm import LinuxError
from monitor.linux.process import file_sha256
from monitor.record import LogFileReader


class RootMismatch(LogError):
    """The root here differs from the one the recording ran on."""

    hint = "replay with the same root files the recording read (the message names the first that differs)"


def recorded_root_files(log: str | Path) -> dict[str, str]:
    """guest path -> sha256 (hex) of every root file the recorded run read."""
    files: dict[str, str] = {}
    for batch in LogFileReader(log).batches():
        for kind, data in zip(batch.kinds, batch.data):
            if int(kind) == int(EventKind.ROOT_FILE):
                path, _, digest = data.partition(b"\0")
                files[path.decode("utf-8", "surrogateescape")] = digest.decode()
    return files


def check_root_files(log: str | Path, fs: FileSystem) -> int:
    """Refuse (RootMismatch, naming the file) unless every root file the recording read is here with
    the same contents. Returns how many files were checked."""
    files = recorded_root_files(log)
    for guest, digest in sorted(files.items()):
        try:
            node = fs.resolve(guest)
        except LinuxError as err:
            raise RootMismatch(
                f"{guest}: read by the recording, not in this root ({os.strerror(err.errno)})"
            ) from err
        if node.host is None or not os.path.isfile(node.host):
            raise RootMismatch(f"{guest}: read by the recording, not in this root")
        if file_sha256(node.host) != digest:
            raise RootMismatch(f"{guest}: differs from the file the recording read (sha256 {digest[:16]}...)")
    return len(files)
