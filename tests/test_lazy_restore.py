"""Lazy restore (monitor/checkpoint/lazy.py): a guest restored with its memory loading on first touch runs
to the same state as one restored eagerly (files, chains, streams; the vCPU's own faults served through
userfaultfd), the monitor's reads and writes never stall on a missing page, a damaged chunk is refused
before anything runs, and the loader's threads and descriptors end with the machine."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from monitor import builder
from monitor.checkpoint import CheckpointError, Checkpointer, RecordStream, file_records, write_records
from monitor.checkpoint.format import CHUNK_HEADER, CHUNK_SIZE, FRAME, Chunk, RecordType, Region
from monitor.checkpoint.lazy import LazyMemory
from monitor.checkpoint.restore import Loading
from monitor.config import MachineConfig
from monitor.journal import LiveJournal, OutputKind
from monitor.loader import GuestImage, load_image_file
from monitor.machine import Machine, StopReason
from monitor.record import (
    IteratorSource,
    LogFileReader,
    LogFileWriter,
    RecordJournal,
    ReplayJournal,
    check_header,
    make_header,
    open_recording,
)
from monitor.memory import PAGE_SIZE, GuestMemory

GuestImagePath = Callable[[str], Path]
MEM_MIB = 64
TOUCHED_MIB = 24
BASE = 8 << 20
WAIT_S = 60.0
LAZY_MODES = [Loading.LAZY, Loading.ON_TOUCH]


class Console:
    """Collects a machine's console lines; waits for the next one, bounded."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        with self._cond:
            self._partial += data
            while b"\n" in self._partial:
                line, self._partial = self._partial.split(b"\n", 1)
                self.lines.append(line.decode())
            self._cond.notify_all()

    def wait_lines(self, count: int) -> list[str]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.lines) >= count, WAIT_S):
                raise AssertionError(f"no console line {count} within {WAIT_S} s (have {self.lines})")
            return list(self.lines)


class IdleJournal(LiveJournal):
    """A live journal that tells when the guest blocks in WAIT: a state hash taken there is at the same
    position on every run (a pause at any other moment may land on either side of an exit)."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_event = threading.Event()

    def idle(self) -> None:
        self.idle_event.set()
        super().idle()


class ShowingReplay(ReplayJournal):
    """A replay that also delivers the outputs it verifies (to compare them with the recording's)."""

    def output(self, kind: OutputKind, data: bytes) -> bool:
        super().output(kind, data)
        return True


def memtouch(guest_image: GuestImagePath) -> GuestImage:
    return load_image_file(str(guest_image("memtouch")))


def booted(image: GuestImage) -> tuple[Machine, Console]:
    """memtouch with TOUCHED_MIB written, idle in WAIT."""
    console = Console()
    config = MachineConfig(image.path, MEM_MIB, None, TOUCHED_MIB, 5.0)
    machine = builder.build(config, on_console=console, journal=IdleJournal())
    machine.start()
    console.wait_lines(1)
    return machine, console


def finish(machine: Machine) -> None:
    machine.stop()
    machine.wait_blocking(10)
    machine.close()


def run_pass(machine: Machine, console: Console, mib: int) -> tuple[str, bytes]:
    """Input queued before the machine runs (so the guest takes the same path every time), then one pass
    over `mib` MiB: the pass's console line and the state hash once the guest idles again."""
    seen = len(console.lines)
    journal = machine.journal
    assert isinstance(journal, IdleJournal)
    machine.console.feed(str(mib).encode())
    if not machine.is_running():
        machine.start()
    line = console.wait_lines(seen + 1)[seen]
    journal.idle_event.clear()  # the line is written before the guest goes back to WAIT
    assert journal.idle_event.wait(WAIT_S), "the guest did not go back to WAIT"
    machine.pause()
    try:
        return line, machine.state_digest()
    finally:
        machine.resume()


def restored_pass(
    source: builder.CheckpointSource, image: GuestImage, loading: Loading, mib: int = 40
) -> tuple[str, bytes, builder.RestoreStats]:
    console = Console()
    machine, stats = builder.restore(
        source, image=image, loading=loading, on_console=console, journal=IdleJournal()
    )
    try:
        line, digest = run_pass(machine, console, mib)
    finally:
        finish(machine)
    return line, digest, stats


def loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vmft-lazy")]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.kvm
@pytest.mark.parametrize("loading", LAZY_MODES, ids=lambda m: m.value)
def test_lazy_restore_runs_to_the_eager_state(
    guest_image: GuestImagePath, tmp_path: Path, loading: Loading
) -> None:
    """The guest reads and rewrites 40 MiB (its touched memory and untouched zero memory beyond) right
    after a restore: the same pass hash and state hash as after an eager restore. On touch only, every
    slot the guest reached was loaded by its own faults (KVM_RUN touching guest memory through kvm_pvm)."""
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        Checkpointer(machine).save(tmp_path / "m.vmck")
    finally:
        finish(machine)
    eager = restored_pass(tmp_path / "m.vmck", image, Loading.EAGER)
    lazy = restored_pass(tmp_path / "m.vmck", image, loading)
    assert lazy[0] == eager[0] and lazy[0].startswith("memtouch: pass 1 over 40 MiB hash ")
    assert lazy[1] == eager[1]
    stats = lazy[2].lazy
    assert eager[2].lazy is None and stats is not None and not stats.error
    assert stats.complete_s is not None  # the state hash needed everything: all of it came in
    assert stats.by_fault + stats.by_monitor + stats.preloaded == stats.slots
    if loading is Loading.ON_TOUCH:
        # the pass covers slots 32..191 of which 32..127 hold data; the rest is zero memory
        assert stats.by_fault >= (TOUCHED_MIB << 20) // (256 << 10)
        assert stats.zero_slots > 0


@pytest.mark.kvm
def test_lazy_restore_of_a_chain_with_small_chunks(guest_image: GuestImagePath, tmp_path: Path) -> None:
    """A full checkpoint cut in 64 KiB chunks and an incremental one (runs of dirty pages, wherever they
    fall): slots put together from several chunks, later ones over earlier ones."""
    image = memtouch(guest_image)
    machine, console = booted(image)
    try:
        checkpointer = Checkpointer(machine, chunk_size=64 << 10)
        checkpointer.save(tmp_path / "full.vmck", full=True)
        run_pass(machine, console, 3)  # rewrites 3 MiB: the incremental's pages
        machine.memory.write(BASE + (20 << 20) + 100, b"monitor write")  # a monitor write, too
        stats = checkpointer.save(tmp_path / "incr.vmck")
        assert stats.incremental
    finally:
        finish(machine)
    chain = [tmp_path / "full.vmck", tmp_path / "incr.vmck"]
    eager = restored_pass(chain, image, Loading.EAGER, 12)
    lazy = restored_pass(chain, image, Loading.ON_TOUCH, 12)
    assert lazy[:2] == eager[:2]


@pytest.mark.kvm
def test_lazy_restore_from_a_stream(guest_image: GuestImagePath, tmp_path: Path) -> None:
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        records = list(Checkpointer(machine, name="stream").records(digest=True))
    finally:
        finish(machine)
    eager = restored_pass(RecordStream(records), image, Loading.EAGER)
    lazy = restored_pass(RecordStream(records), image, Loading.LAZY)
    assert lazy[:2] == eager[:2]


@pytest.mark.kvm
def test_monitor_access_and_checkpoints_while_loading(guest_image: GuestImagePath, tmp_path: Path) -> None:
    """Nothing loaded yet: the monitor reads a range (it loads in the reading thread: no stall behind the
    GIL), writes one, and takes a full and an incremental checkpoint of the restored guest; restored
    eagerly, that chain gives the lazy machine's state hash (the loader's writes are monitor writes)."""
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        expected = machine.memory.read(BASE + (5 << 20), 3 * PAGE_SIZE)
        Checkpointer(machine).save(tmp_path / "m.vmck")
    finally:
        finish(machine)
    console = Console()
    lazy, stats = builder.restore(
        tmp_path / "m.vmck", image=image, loading=Loading.ON_TOUCH, on_console=console, journal=IdleJournal()
    )
    try:
        assert stats.lazy is not None and stats.lazy.by_monitor == 0
        assert lazy.memory.read(BASE + (5 << 20), 3 * PAGE_SIZE) == expected
        assert stats.lazy.by_monitor == 1 and stats.lazy.complete_s is None
        lazy.memory.write(BASE + (30 << 20), b"written before the guest ran")
        checkpointer = Checkpointer(lazy)
        checkpointer.save(tmp_path / "l-full.vmck", full=True)
        assert stats.lazy.complete_s is not None
        _line, digest = run_pass(lazy, console, 16)  # the guest idles in WAIT after it
        checkpointer.save(tmp_path / "l-incr.vmck")
    finally:
        finish(lazy)
    chain = [tmp_path / "l-full.vmck", tmp_path / "l-incr.vmck"]
    again, _ = builder.restore(chain, image=image)
    try:
        assert again.state_digest() == digest
        assert again.memory.read(BASE + (30 << 20), 28) == b"written before the guest ran"
    finally:
        again.close()


@pytest.mark.kvm
def test_incremental_against_the_lazily_restored_checkpoint(
    guest_image: GuestImagePath, tmp_path: Path
) -> None:
    """As monitor/restart.py continues a restored guest's checkpoints: the next one is an incremental
    against the checkpoint restored from. Taken while memory still loads, the chain restores to the lazy
    machine's state (the loader's writes restore the checkpoint's own contents: nothing it needs)."""
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        Checkpointer(machine).save(tmp_path / "base.vmck")
    finally:
        finish(machine)
    console = Console()
    lazy, stats = builder.restore(
        tmp_path / "base.vmck",
        image=image,
        loading=Loading.ON_TOUCH,
        on_console=console,
        journal=IdleJournal(),
    )
    try:
        checkpointer = Checkpointer(lazy)
        checkpointer.continue_from(stats.checkpoint_id)
        _line, digest = run_pass(lazy, console, 6)
        assert stats.lazy is not None and stats.lazy.by_fault > 0
        incr = checkpointer.save(tmp_path / "next.vmck")
        assert incr.incremental and incr.parent_id == stats.checkpoint_id
    finally:
        finish(lazy)
    again, again_stats = builder.restore(tmp_path / "next.vmck", image=image)
    try:
        assert again_stats.chain_length == 2
        assert again.state_digest() == digest
    finally:
        again.close()


@pytest.mark.kvm
def test_a_log_replays_on_a_lazily_restored_checkpoint(guest_image: GuestImagePath, tmp_path: Path) -> None:
    """As a backup starts: ticker recorded, checkpointed mid-run with the log switched there; restored
    lazily, the checkpoint replays that log (state hashes checked every 50 exits, while memory loads) to
    the recording's final state hash and output."""
    image = load_image_file(str(guest_image("ticker")))
    mem = MEM_MIB << 20
    machine = builder.build(
        MachineConfig(image.path, MEM_MIB, None, 150),
        journal=open_recording(tmp_path / "boot.log", image, mem, hash_every=50),
        image=image,
    )
    after = tmp_path / "after.log"

    def switch_log(position: int) -> None:
        writer = LogFileWriter(after, make_header(image, mem, start_position=position, hash_every=50))
        machine.set_journal(RecordJournal(writer, start_position=position, hash_every=50))

    machine.start()
    try:
        Checkpointer(machine).save(tmp_path / "t.vmck", on_paused=switch_log)
        result = machine.wait_blocking(WAIT_S)
        assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
        final = machine.state_digest()
        output = bytes(machine.console_output)
    finally:
        machine.close()

    def replay(position: int) -> ReplayJournal:
        reader = LogFileReader(after)
        check_header(reader.header, image, mem)
        return ShowingReplay(IteratorSource(reader.batches()), start_position=position)

    restored, stats = builder.restore(tmp_path / "t.vmck", image=image, journal=replay, loading=Loading.LAZY)
    try:
        assert stats.lazy is not None
        result = restored.run_blocking(WAIT_S)
        assert result.reason is StopReason.EXITED, result.describe()  # DIVERGED at a hash that differed
        assert restored.state_digest() == final
        assert bytes(restored.console_output) == output
    finally:
        restored.close()


@pytest.mark.kvm
def test_without_userfaultfd_the_restore_loads_eagerly(
    guest_image: GuestImagePath, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """userfaultfd refused (an unprivileged host): a lazy restore falls back to loading everything first."""
    from monitor import uffd

    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        Checkpointer(machine).save(tmp_path / "m.vmck")
    finally:
        finish(machine)
    eager = restored_pass(tmp_path / "m.vmck", image, Loading.EAGER, 8)

    def refuse(self: uffd.Userfaultfd) -> None:
        raise uffd.UffdError("userfaultfd: Operation not permitted")

    monkeypatch.setattr(uffd.Userfaultfd, "__init__", refuse)
    fallback = restored_pass(tmp_path / "m.vmck", image, Loading.LAZY, 8)
    assert fallback[:2] == eager[:2]
    assert fallback[2].lazy is None and fallback[2].memory_chunks == eager[2].memory_chunks
    assert loader_threads() == []


def _damage_memory_chunk(records: list[bytes], nth: int) -> list[bytes]:
    """The records with one byte of the nth memory chunk's zstd frame flipped (its crc left as it was)."""
    out = list(records)
    seen = 0
    for i, rec in enumerate(out):
        rtype = FRAME.unpack_from(rec, 0)[0]
        if rtype != RecordType.CHUNK or rec[FRAME.size] != Region.MEMORY:
            continue
        if seen == nth:
            body = bytearray(rec)
            body[-3] ^= 0x40
            out[i] = bytes(body)
            return out
        seen += 1
    raise AssertionError("not enough memory chunks")


@pytest.mark.kvm
@pytest.mark.parametrize("loading", LAZY_MODES, ids=lambda m: m.value)
def test_a_damaged_chunk_is_refused_before_anything_runs(
    guest_image: GuestImagePath, tmp_path: Path, loading: Loading
) -> None:
    """The last memory chunk damaged: a lazy restore reads nothing of it before the guest would run, yet
    refuses the file and the stream at once, leaving no thread or descriptor behind."""
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        Checkpointer(machine).save(tmp_path / "m.vmck")
    finally:
        finish(machine)
    records = list(file_records(tmp_path / "m.vmck"))
    count = sum(
        1
        for r in records
        if FRAME.unpack_from(r, 0)[0] == RecordType.CHUNK and r[FRAME.size] == Region.MEMORY
    )
    damaged = _damage_memory_chunk(records, count - 1)
    write_records(damaged, tmp_path / "bad.vmck")
    fds = open_fds()
    for source in (tmp_path / "bad.vmck", RecordStream(damaged)):
        with pytest.raises(CheckpointError, match="fails its checksum"):
            builder.restore(source, image=image, loading=loading)
    assert loader_threads() == []
    assert open_fds() <= fds


@pytest.mark.kvm
def test_loader_threads_and_fds_end_with_the_machine(guest_image: GuestImagePath, tmp_path: Path) -> None:
    """On touch only, the fault thread lives as long as memory is missing; closing the machine ends it and
    releases the userfaultfd, its wake pipe and the mapped checkpoint file. A preloaded restore ends its
    threads by itself once everything is in."""
    image = memtouch(guest_image)
    machine, _console = booted(image)
    try:
        Checkpointer(machine).save(tmp_path / "m.vmck")
    finally:
        finish(machine)
    fds = open_fds()
    lazy, stats = builder.restore(tmp_path / "m.vmck", image=image, loading=Loading.ON_TOUCH)
    lazy.start()
    assert loader_threads() == ["vmft-lazy-loader"]
    assert len(open_fds()) > len(fds)
    finish(lazy)
    assert loader_threads() == []
    assert open_fds() <= fds
    assert stats.lazy is not None  # (a stop that hashes the final state may have loaded it all)

    preloaded, stats = builder.restore(tmp_path / "m.vmck", image=image, loading=Loading.LAZY)
    try:
        preloaded.start()
        assert stats.lazy is not None
        preloaded.memory.buffer()  # waits for the rest (loads it here if the preloader is behind)
        for thread in threading.enumerate():
            if thread.name.startswith("vmft-lazy"):
                thread.join(WAIT_S)
        assert loader_threads() == []
        assert preloaded.memory.filler is None and stats.lazy.complete_s is not None
    finally:
        finish(preloaded)
    assert open_fds() <= fds


def test_uffd_abi_numbers() -> None:
    """uffd_msg is 32 bytes and the ioctl numbers match the kernel header's (values printed from C)."""
    from monitor import uffd

    assert uffd.MSG.size == 32
    assert (uffd.UFFDIO_API, uffd.UFFDIO_REGISTER, uffd.UFFDIO_COPY, uffd.UFFDIO_ZEROPAGE) == (
        0xC018AA3F,
        0xC020AA00,
        0xC028AA03,
        0xC020AA04,
    )
    assert (uffd.UFFDIO_UNREGISTER, uffd.UFFDIO_WAKE) == (0x8010AA01, 0x8010AA02)


def _chunk(offset: int, data: bytes, index: int) -> Chunk:
    body = CHUNK_HEADER.pack(Region.MEMORY, offset, len(data)) + zstandard.ZstdCompressor().compress(data)
    return Chunk(Region.MEMORY, offset, len(data), memoryview(body), zlib.crc32(body), index)


def test_slots_from_partial_and_overlapping_chunks_without_kvm() -> None:
    """No KVM: slots put together from a whole chunk, a partial one and a later one over it; a page
    already present before loading (the kernel stops a copy there) is kept and the rest of its slot still
    loads; a slot without chunks reads as zeros; closing ends the thread and releases every descriptor."""
    fds = open_fds()
    memory = GuestMemory(2 << 20)
    whole = bytes(range(256)) * (CHUNK_SIZE // 256)
    chunks = [
        _chunk(0, whole, 0),
        _chunk(CHUNK_SIZE + 3 * PAGE_SIZE, b"\x11" * (CHUNK_SIZE - PAGE_SIZE), 1),  # crosses into slot 2
        _chunk(CHUNK_SIZE + 4 * PAGE_SIZE, b"\x22" * PAGE_SIZE, 2),  # applied after chunk 1
    ]
    memory.write(2 * PAGE_SIZE, b"present")  # before registering: already there when slot 0 loads
    lazy = LazyMemory(memory, [(c, "t") for c in chunks], preload=False)
    lazy.start()
    try:
        assert loader_threads() == ["vmft-lazy-loader"]
        assert memory.read(0, 2 * PAGE_SIZE) == whole[: 2 * PAGE_SIZE]
        assert memory.read(2 * PAGE_SIZE, 8) == b"present\x00"
        assert memory.read(3 * PAGE_SIZE, CHUNK_SIZE - 3 * PAGE_SIZE) == whole[3 * PAGE_SIZE :]
        slot1 = memory.read(CHUNK_SIZE, CHUNK_SIZE)
        assert slot1[: 3 * PAGE_SIZE] == bytes(3 * PAGE_SIZE)
        assert slot1[3 * PAGE_SIZE : 4 * PAGE_SIZE] == b"\x11" * PAGE_SIZE
        assert slot1[4 * PAGE_SIZE : 5 * PAGE_SIZE] == b"\x22" * PAGE_SIZE
        assert slot1[5 * PAGE_SIZE :] == b"\x11" * (CHUNK_SIZE - 5 * PAGE_SIZE)
        assert memory.read(2 * CHUNK_SIZE, 2 * PAGE_SIZE) == b"\x11" * (2 * PAGE_SIZE)
        assert memory.read(2 * CHUNK_SIZE + 2 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
        assert memory.read(5 * CHUNK_SIZE, 16) == bytes(16)
        assert lazy.stats.by_monitor == 3 and lazy.stats.zero_slots == 1 and not lazy.complete
        assert lazy.stats.present_pages == 1
        memory.write(6 * CHUNK_SIZE, b"monitor")  # a slot without chunks, written by the monitor
        assert memory.read(6 * CHUNK_SIZE, 7) == b"monitor"
        assert memory.monitor_dirty[(CHUNK_SIZE + 3 * PAGE_SIZE) // PAGE_SIZE]  # loader writes marked
        memory.buffer()  # everything in: unregistered, the thread ends, the filler detaches
        assert lazy.complete and memory.filler is None
    finally:
        memory.close()
    assert loader_threads() == []
    assert open_fds() <= fds
