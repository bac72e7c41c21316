"""A checkpoint whose disk holds data beyond the size of guest RAM restores from a stream, eagerly and lazily
(monitor/checkpoint/restore.py). The lazy path of a streamed restore (re-protection seeds a backup that
way) once checked every chunk against guest RAM, disk chunks included: a kv guest whose write log had grown
past 64 MiB could no longer be re-protected (`vmft chaos --hosts 3`, fault 73 of 100)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor import builder
from monitor.checkpoint import Checkpointer, RecordStream
from monitor.checkpoint.restore import Loading
from monitor.config import MachineConfig
from monitor.loader import load_image_file

MEM_MIB = 64
DATA_AT = 96 << 20  # beyond guest RAM
DATA = b"written beyond guest RAM" * 64


@pytest.mark.kvm
@pytest.mark.parametrize("loading", [Loading.EAGER, Loading.LAZY], ids=["eager", "lazy"])
def test_disk_data_beyond_guest_ram_restores_from_a_stream(
    guest_image: Callable[[str], Path], tmp_path: Path, loading: Loading
) -> None:
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(2 * MEM_MIB << 20)
        f.seek(DATA_AT)
        f.write(DATA)
    image = load_image_file(str(guest_image("memtouch")))
    printed = threading.Event()
    machine = builder.build(
        MachineConfig(image.path, MEM_MIB, str(disk), 8, 5.0), on_console=lambda _data: printed.set()
    )
    machine.start()
    try:
        assert printed.wait(30), "memtouch did not start"
        records = list(Checkpointer(machine, name="stream").records())
    finally:
        machine.stop()
        machine.wait_blocking(10)
        machine.close()
    target = tmp_path / "restored-disk"
    restored, _stats = builder.restore(RecordStream(records), image=image, disk=str(target), loading=loading)
    try:
        with open(target, "rb") as f:
            f.seek(DATA_AT)
            assert f.read(len(DATA)) == DATA
    finally:
        restored.close()
