"""The event log without a VM: golden log files (tests/data/ticker-log-formatN.vmlog, written by the
format-N writer: `vmft run --record F --arg 3 guests/build/ticker.elf`) read by this version exactly as
they were recorded, refused clearly by a reader of another format version; the queue a live replay reads
from.

tests/data/ticker-log-formatN.json is the golden log's contents as the reader decoded them when the file was
made (header, then each batch with its events as [position, rip, kind, value, data hex]). A reader that
changes how it reads old logs fails here even if the writer changed with it. Format 2 changed what a
state hash covers (every component's state, not only memory and registers), so a format-1 log cannot be
verified any more and is refused."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import guest_image_path

from monitor import record
from monitor.checkpoint.compat import check_format
from monitor.errors import LogError
from monitor.journal import EventKind, JournalStop
from monitor.loader import load_image_file
from monitor.record import LogFileReader, QueueSource
from proto import vmft_pb2

DATA = Path(__file__).resolve().parent / "data"
GOLDEN_LOG = DATA / "ticker-log-format2.vmlog"  # the current format
GOLDEN_FORMATS = (1, 2)


def decode(path: Path) -> dict[str, Any]:
    reader = LogFileReader(path)
    h = reader.header
    batches = []
    for batch in reader.batches():
        position = batch.first_position
        events = []
        for i, delta in enumerate(batch.position_deltas):
            position += delta
            kind = EventKind(batch.kinds[i]).name
            events.append([position, batch.rips[i], kind, batch.values[i], batch.data[i].hex()])
        batches.append({
            "first_position": batch.first_position, "horizon": batch.horizon, "ended": batch.ended,
            "end_position": batch.end_position, "end_reason": batch.end_reason, "events": events,
        })  # fmt: skip
    header = {
        "format_version": h.format_version, "abi_version": h.abi_version, "image_sha256": h.image_sha256,
        "mem_size": h.mem_size, "cpuid_hash": h.cpuid_hash, "start_position": h.start_position,
        "hash_every": h.hash_every, "started_at": h.started_at,
    }  # fmt: skip
    return {"header": header, "batches": batches}


@pytest.mark.parametrize("version", GOLDEN_FORMATS)
def test_golden_log_reads_as_it_was_recorded(version: int) -> None:
    expected = json.loads((DATA / f"ticker-log-format{version}.json").read_text())
    got = decode(DATA / f"ticker-log-format{version}.vmlog")
    assert got["header"]["format_version"] == version
    assert got["header"] == expected["header"]
    assert len(got["batches"]) == len(expected["batches"])
    for i, (ours, theirs) in enumerate(zip(got["batches"], expected["batches"])):
        assert ours == theirs, f"batch {i}"
    # What the recording was: ticker's three ticks (a CLOCK read, then per tick an IRQ, an EVENTS read
    # and a CLOCK read), its console output and exit code, and the final state hash.
    kinds = [e[2] for b in got["batches"] for e in b["events"]]
    assert kinds.count("IRQ") == 3 and kinds.count("OUTPUT") == 2 and kinds[-1] == "STATE_HASH"
    assert got["batches"][-1]["ended"] and got["batches"][-1]["end_reason"] == "exited"


def test_golden_log_is_refused_once_the_format_moves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = LogFileReader(GOLDEN_LOG)
    image = load_image_file(str(guest_image_path("ticker")))
    mem_size = reader.header.mem_size
    assert reader.header.format_version == record.LOG_FORMAT_VERSION == 2
    # This version reads its format (its provenance, the image and CPUID table it was recorded with, is
    # checked against the machine replaying it, which need not be the one that recorded it: not here).
    check_format(reader.header.format_version, record.LOG_FORMAT_VERSION, str(GOLDEN_LOG), "log", LogError)
    monkeypatch.setattr(record, "LOG_FORMAT_VERSION", 3)
    with pytest.raises(LogError) as err:
        record.check_header(reader.header, image, mem_size, what=str(GOLDEN_LOG))
    assert re.search(r"format version 2\b.*reads 3\b", str(err.value)), err.value


def test_format1_log_is_refused_by_this_version() -> None:
    old = DATA / "ticker-log-format1.vmlog"
    reader = LogFileReader(old)
    image = load_image_file(str(guest_image_path("ticker")))
    with pytest.raises(LogError) as err:
        record.check_header(reader.header, image, reader.header.mem_size, what=str(old))
    assert re.search(r"format version 1\b.*reads 2\b", str(err.value)), err.value


def test_damaged_golden_log_is_refused(tmp_path: Path) -> None:
    data = GOLDEN_LOG.read_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside the last frame
    (tmp_path / "flipped.vmlog").write_bytes(bytes(flipped))
    with pytest.raises(LogError, match="fails its checksum"):
        list(LogFileReader(tmp_path / "flipped.vmlog").batches())
    (tmp_path / "short.vmlog").write_bytes(data[:-3])
    with pytest.raises(LogError, match="truncated"):
        list(LogFileReader(tmp_path / "short.vmlog").batches())
    (tmp_path / "magic.vmlog").write_bytes(b"NOTALOG!" + data[8:])
    with pytest.raises(LogError, match="not a vmft event log"):
        LogFileReader(tmp_path / "magic.vmlog")


def test_queue_source_drains_then_stops() -> None:
    source = QueueSource()
    assert source.next_batch(0.01) is None
    first, second = vmft_pb2.EventBatch(horizon=1), vmft_pb2.EventBatch(horizon=2)

    def feed() -> None:  # another thread, as the replication stream's reader would be
        source.put(first)
        time.sleep(0.05)
        source.put(second)
        source.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    got = []
    with pytest.raises(JournalStop):
        while True:
            batch = source.next_batch(1.0)
            if batch is not None:
                got.append(batch.horizon)
    feeder.join(10)
    assert got == [1, 2]
    with pytest.raises(JournalStop):  # and stays closed
        source.next_batch(0.01)


def test_a_frame_declaring_a_huge_size_is_refused_before_decompressing(tmp_path: Path) -> None:
    """An 8 KB frame of zeros declares 256 MiB: zstandard ignores max_output_size for a frame that declares
    its size, so the reader must refuse it before decompressing. In a fresh process whose address space may
    grow by only 128 MiB more, so that decompressing it anyway fails there (ru_maxrss would be inherited
    from this process across the fork)."""
    import subprocess
    import sys
    import zlib

    import zstandard

    frame = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    assert len(frame) < 64 << 10
    header = vmft_pb2.LogHeader(format_version=record.LOG_FORMAT_VERSION).SerializeToString()
    bomb = tmp_path / "bomb.vmlog"
    bomb.write_bytes(
        record.LOG_MAGIC + len(header).to_bytes(4, "little") + header
        + len(frame).to_bytes(4, "little") + zlib.crc32(frame).to_bytes(4, "little") + frame
    )  # fmt: skip
    probe = (
        "import re, resource, sys\n"
        "from monitor.record import LogFileReader\n"
        "from monitor.errors import LogError\n"
        "size = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    list(LogFileReader(sys.argv[1]).batches())\n"
        "    print('read')\n"
        "except LogError as err:\n"
        "    print('refused', err)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)], cwd=Path(__file__).resolve().parent.parent,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    verdict = run.stdout.strip()
    assert verdict.startswith("refused") and "declares 268435456 bytes" in verdict, verdict
