"""Restoring a machine from a checkpoint: ONE path for a file, a chain of files and a stream of records.

A damaged or mismatched checkpoint is refused with a CheckpointError that names the problem before
anything is loaded: the header (format, compatibility) first; for files the whole structure, chain links
and disk chunk checksums before the machine is built; memory chunks are verified as they are
decompressed into the new machine, which is discarded unstarted on any error; the disk is written only
after everything else has passed. Machines are made by the caller's `make_machine` (monitor/builder.py,
the one door for building a VM, passes its own).

Memory loads in one of three ways (`Loading`): EAGER decompresses every chunk before the machine is
returned; LAZY verifies every chunk up front (checksums, bounds, sizes: cheap) and returns a machine whose
pages load on first touch while a thread loads the rest ahead (monitor/checkpoint/lazy.py); ON_TOUCH is
LAZY without the thread ahead (every slot loads on its first touch: for tests and diagnostics).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import zstandard

from monitor.checkpoint.compat import Provenance, check_link, check_provenance
from monitor.checkpoint.format import (
    SUFFIX,
    Chunk,
    ParsedCheckpoint,
    RecordReader,
    Region,
    open_checkpoint,
    read_header,
)
from monitor.checkpoint.lazy import LazyMemory, LazyStats, verify_chunks
from monitor.checkpoint.memops import Prefaulter, coalesce
from monitor.config import MachineConfig
from monitor.errors import CheckpointError
from monitor.journal import Journal, JournalMode, LiveJournal
from monitor.loader import GuestImage, load_image_file
from monitor.machine import Machine
from monitor.uffd import UffdError
from proto import vmft_pb2

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2


class Loading(enum.Enum):
    """How a restore loads guest memory (see the module's docstring)."""

    EAGER = "eager"
    LAZY = "lazy"
    ON_TOUCH = "on-touch"

JournalArg = Journal | Callable[[int], Journal] | None


@dataclass
class RecordStream:
    """A full checkpoint's records in order, one record per item (as `Checkpointer.records()` yields
    them, or as received over gRPC)."""

    records: Iterable[bytes]
    what: str = "checkpoint stream"


@dataclass
class RestoreStats:
    checkpoint_id: str = ""
    position: int = 0
    chain_length: int = 0
    memory_chunks: int = 0
    disk_chunks: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0
    lazy: LazyStats | None = None  # a lazy restore's loading, filled in as it goes


@dataclass
class Options:
    """How to restore: what the checkpoint must match, where its disk goes, how to make the machine."""

    make_machine: Callable[[MachineConfig, GuestImage], Machine]
    journal: JournalArg = None
    image: GuestImage | None = None
    mem_size: int | None = None
    disk: str | None = None
    hang_timeout_s: float | None = None
    verify_digest: bool = False
    threads: int = DEFAULT_THREADS
    loading: Loading = Loading.EAGER
    # Never take a host path from the checkpoint (its image's, its disk's): a node restoring what a peer
    # sent gives both itself, and a checkpoint that has a disk where the VM has none is refused.
    confined: bool = False
    started: float = field(default_factory=time.perf_counter)


# ----- compatibility and chains -------------------------------------------------------------------


def check_compatible(
    header: vmft_pb2.CheckpointHeader, image: GuestImage | None, mem_size: int | None, what: str
) -> None:
    """Refuse a checkpoint made for another ABI, CPUID table, image or memory size (the format version
    was checked when the header was read)."""
    config = header.config
    found = Provenance(header.abi_version, header.cpuid_hash, config.image_sha256, config.mem_size)
    check_provenance(found, image, mem_size, what)


def find_chain(path: str | Path) -> list[Path]:
    """The files to restore `path`: its full ancestor first, then each incremental checkpoint, found by
    checkpoint id among the checkpoint files in the same directory."""
    path = Path(path)
    chain = [path]
    header = read_header(path)
    seen = {header.checkpoint_id}
    index: dict[str, Path] | None = None
    while header.incremental:
        if index is None:
            index = {}
            for candidate in path.parent.glob(f"*{SUFFIX}"):
                try:
                    index[read_header(candidate).checkpoint_id] = candidate
                except (CheckpointError, OSError):
                    continue
        parent = index.get(header.parent_id)
        if parent is None:
            raise CheckpointError(
                f"{chain[0]}: incremental checkpoint whose parent {header.parent_id[:12]} is missing "
                f"(not in {path.parent})"
            )
        header = read_header(parent)
        if header.checkpoint_id in seen:
            raise CheckpointError(f"{parent}: the checkpoint chain loops")
        seen.add(header.checkpoint_id)
        chain.insert(0, parent)
    return chain


def open_chain(paths: list[Path], image: GuestImage | None, mem_size: int | None) -> list[ParsedCheckpoint]:
    """Open and verify a chain (full first): structure, compatibility, links, disk chunk checksums."""
    parsed: list[ParsedCheckpoint] = []
    try:
        for p in paths:
            ckpt = open_checkpoint(p)
            parsed.append(ckpt)
            check_compatible(ckpt.header, image, mem_size, ckpt.what)
        _require_full(parsed[0].header, parsed[0].what)
        for parent, child in zip(parsed, parsed[1:]):
            pc, cc = parent.header.config, child.header.config
            same_vm = (pc.image_sha256, pc.mem_size, pc.disk_size) == (
                cc.image_sha256,
                cc.mem_size,
                cc.disk_size,
            )
            check_link(parent.header, parent.what, child.header, child.what, same_vm)
        for ckpt in parsed:  # disk chunks are verified before anything is written
            for chunk in ckpt.chunks:
                if chunk.region is Region.DISK:
                    chunk.verify(ckpt.what)
    except BaseException:
        for ckpt in parsed:
            ckpt.close()
        raise
    return parsed


def _require_full(header: vmft_pb2.CheckpointHeader, what: str, hint: str = "") -> None:
    if header.incremental:
        raise CheckpointError(
            f"{what}: incremental checkpoint whose parent {header.parent_id[:12]} is missing{hint}"
        )


# ----- the one restore path -----------------------------------------------------------------------


def restore_chain(paths: list[Path], options: Options) -> tuple[Machine, RestoreStats]:
    """Restore from checkpoint files (full first): everything but memory chunks verified up front, memory
    loaded on several threads."""
    chain = open_chain(paths, options.image, options.mem_size)
    handed_over = False
    try:
        last = chain[-1]
        items = [(c, ckpt.what) for ckpt in chain for c in ckpt.chunks]
        if options.loading is not Loading.EAGER:
            memory = [item for item in items if item[0].region is Region.MEMORY]
            verify_chunks(memory, last.header.config.mem_size, options.threads)
        restore = _Restore(last.header, last.what, options)
        with restore.cleanup():
            loader = restore.loader()
            if options.loading is Loading.EAGER:
                loader.chunks(items, options.threads)
            else:
                handed_over = loader.lazy(items, options.loading, owners=chain)
            return restore.finish(last.manifest, chain_length=len(chain))
    finally:
        if not handed_over:  # else the lazy loader lets the files go when it is done (or closed)
            for ckpt in chain:
                ckpt.close()


def restore_records(stream: RecordStream, options: Options) -> tuple[Machine, RestoreStats]:
    """Restore from a full checkpoint's records: the header is checked before the machine is built;
    memory chunks are decompressed into it as they arrive; the disk is written only after the manifest
    has verified every chunk."""
    what = stream.what
    reader = RecordReader(what)
    records = iter(stream.records)
    first = next(records, None)
    if first is None:
        raise CheckpointError(f"{what}: truncated: empty")
    reader.feed_record(first)
    header = reader.require_header()
    check_compatible(header, options.image, options.mem_size, what)
    _require_full(header, what, " (a stream must carry a full checkpoint)")
    restore = _Restore(header, what, options)
    with restore.cleanup():
        if options.loading is Loading.EAGER:
            for rec in records:
                chunk = reader.feed_record(rec)
                if chunk is not None:
                    restore.loader().chunk(chunk, what)
            return restore.finish(reader.finish(), chain_length=1)
        # Lazy: the compressed records are kept (the chunks point into them), each checked as it comes;
        # memory loads once the manifest has vouched for the whole list.
        items: list[tuple[Chunk, str]] = []
        for rec in records:
            chunk = reader.feed_record(rec)
            if chunk is not None:
                if chunk.region is Region.MEMORY:  # a disk chunk is bounded by the disk (lazy() checks it)
                    verify_chunks([(chunk, what)], header.config.mem_size, 1)
                items.append((chunk, what))
        manifest = reader.finish()
        restore.loader().lazy(items, options.loading, owners=[])
        return restore.finish(manifest, chain_length=1)


class _Restore:
    """One restore: the image and config from the header, the machine (made on first use), finishing."""

    def __init__(self, header: vmft_pb2.CheckpointHeader, what: str, options: Options) -> None:
        self.header = header
        self.what = what
        self.options = options
        if options.confined:
            _check_confined(header, options, what)
        self.image = _image_for(header, options.image, what)
        self.config = _config_for(header, self.image, options.disk, options.hang_timeout_s)
        self._machine: Machine | None = None
        self._loader: _Loader | None = None

    def loader(self) -> _Loader:
        if self._loader is None:
            _prepare_disk(self.header, self.config.disk)
            self._machine = self.options.make_machine(self.config, self.image)
            self._loader = _Loader(self._machine, self.what)
        return self._loader

    def cleanup(self) -> _CloseOnError:
        return _CloseOnError(self)

    def finish(
        self, manifest: vmft_pb2.CheckpointManifest, chain_length: int
    ) -> tuple[Machine, RestoreStats]:
        options = self.options
        loader = self.loader()
        machine = loader.machine
        journal = _journal_for(options.journal, manifest.position)
        machine.set_journal(journal)
        loader.write_disk(self.config.disk, self.header.config.disk_size)
        machine.restore_state(manifest.machine, live=journal.mode is not JournalMode.REPLAY)
        if options.verify_digest and manifest.state_digest:
            found = machine.state_digest()
            if found != manifest.state_digest:
                raise CheckpointError(
                    f"{self.what}: the restored state hash {found.hex()} differs from the checkpoint's "
                    f"{manifest.state_digest.hex()}"
                )
        stats = loader.stats
        stats.checkpoint_id = manifest.header.checkpoint_id
        stats.position = manifest.position
        stats.chain_length = chain_length
        stats.seconds = time.perf_counter() - options.started
        return machine, stats


class _CloseOnError:
    """Closes the restore's machine (unstarted) if restoring fails."""

    def __init__(self, restore: _Restore) -> None:
        self.restore = restore

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        machine = self.restore._machine
        if exc_type is not None and machine is not None:
            machine.close()


def _journal_for(journal: JournalArg, position: int) -> Journal:
    if journal is None:
        return LiveJournal()
    if callable(journal):
        return journal(position)
    return journal


def _config_for(
    header: vmft_pb2.CheckpointHeader, image: GuestImage, disk: str | None, hang_timeout_s: float | None
) -> MachineConfig:
    config = header.config
    disk_path = disk if disk is not None else (config.disk_path or None)
    if config.disk_path and disk_path is None:
        raise CheckpointError("the checkpoint has a disk: a disk path is needed to restore it")
    return MachineConfig(
        image=image.path,
        mem_mib=config.mem_size >> 20,
        disk=disk_path if config.disk_path else None,
        arg=config.arg,
        hang_timeout_s=hang_timeout_s if hang_timeout_s is not None else config.hang_timeout_s,
    )


def _check_confined(header: vmft_pb2.CheckpointHeader, options: Options, what: str) -> None:
    if options.image is None:
        raise CheckpointError(f"{what}: a confined restore is given its image, never the checkpoint's path")
    if header.config.disk_path and options.disk is None:
        raise CheckpointError(f"{what}: it has a disk, and this VM has none here (its path is not taken)")


def _image_for(header: vmft_pb2.CheckpointHeader, image: GuestImage | None, what: str) -> GuestImage:
    if image is not None:
        return image
    try:
        loaded = load_image_file(header.config.image_path)
    except Exception as err:
        raise CheckpointError(f"{what}: cannot load its image {header.config.image_path}: {err}") from err
    if loaded.sha256 != header.config.image_sha256:
        raise CheckpointError(
            f"{what}: made for another image: {header.config.image_path} has changed since "
            f"(sha256 {loaded.sha256[:16]}..., the checkpoint has {header.config.image_sha256[:16]}...)"
        )
    return loaded


def _prepare_disk(header: vmft_pb2.CheckpointHeader, disk_path: str | None) -> None:
    """A checkpoint with a disk restored where that disk does not exist yet: create it (empty)."""
    if disk_path is not None and not os.path.exists(disk_path):
        with open(disk_path, "wb") as f:
            f.truncate(header.config.disk_size)


class _Loader:
    """Decompresses verified chunks into a machine's memory, collecting disk chunks for later."""

    def __init__(self, machine: Machine, what: str) -> None:
        self.machine = machine
        self.mem = machine.memory.buffer()
        self.size = machine.memory.size
        self.dctx = zstandard.ZstdDecompressor()
        self.disk: list[tuple[Chunk, str]] = []
        self.stats = RestoreStats()
        self.prefault = Prefaulter()
        self._stats_lock = threading.Lock()
        self.what = what

    def chunk(self, chunk: Chunk, what: str) -> None:
        """One chunk, in stream order: a memory chunk is verified and decompressed into memory now, a disk
        chunk verified and kept for `write_disk`."""
        if chunk.region is Region.DISK:
            chunk.verify(what)
            self.disk.append((chunk, what))
            return
        self._check_bounds(chunk, what)
        self.prefault.populate(self.machine.memory.host_address + chunk.offset, chunk.raw_len)
        self._load(chunk, what, self.dctx)

    def lazy(self, items: list[tuple[Chunk, str]], loading: Loading, owners: list[ParsedCheckpoint]) -> bool:
        """Memory chunks (all verified) to load on first touch; disk chunks kept for `write_disk`.
        Whether the lazy loader took `owners` (the files the chunks point into). Without userfaultfd
        the memory is loaded eagerly instead."""
        memory: list[tuple[Chunk, str]] = []
        for chunk, what in items:
            if chunk.region is Region.DISK:
                self.chunk(chunk, what)
            else:
                memory.append((chunk, what))
        machine = self.machine
        lazy = LazyMemory(
            machine.memory,
            memory,
            owners,
            on_error=lambda message: machine.stop(),
            preload=loading is Loading.LAZY,
        )
        try:
            lazy.start()
        except UffdError as err:
            log.warning("%s; loading guest memory eagerly", err)
            self.chunks(memory, DEFAULT_THREADS)
            return False
        self.stats.lazy = lazy.stats
        self.stats.memory_chunks = len(memory)
        self.stats.raw_bytes += sum(chunk.raw_len for chunk, _what in memory)
        return True

    def chunks(self, items: list[tuple[Chunk, str]], threads: int) -> None:
        """Many chunks (a whole file), on `threads` threads, each pre-faulting its part of memory in one
        call per run of chunks, then decompressing into it. Order is kept where it matters: the list is
        cut where a chunk overlaps one before it (pre-copy, then its delta; a chain's files), and each
        piece is loaded before the next."""
        memory: list[tuple[Chunk, str]] = []
        for chunk, what in items:
            if chunk.region is Region.DISK:
                self.chunk(chunk, what)
            else:
                self._check_bounds(chunk, what)
                memory.append((chunk, what))
        if threads < 2 or len(memory) < 8:
            self._load_part(memory, self.dctx)
            return
        with ThreadPoolExecutor(threads) as pool:
            for piece in _ordered_pieces(memory):
                step = (len(piece) + threads - 1) // threads
                parts = [piece[i : i + step] for i in range(0, len(piece), step)]
                for future in [pool.submit(self._load_part, part) for part in parts]:
                    future.result()

    def _load_part(
        self, part: list[tuple[Chunk, str]], dctx: zstandard.ZstdDecompressor | None = None
    ) -> None:
        """Pre-fault a part's memory, then load its chunks (each thread with its own decompressor)."""
        base = self.machine.memory.host_address
        for start, length in coalesce([(c.offset, c.raw_len) for c, _w in part]):
            self.prefault.populate(base + start, length)
        dctx = dctx or zstandard.ZstdDecompressor()
        for chunk, what in part:
            self._load(chunk, what, dctx)

    def _check_bounds(self, chunk: Chunk, what: str) -> None:
        if chunk.offset + chunk.raw_len > self.size:
            raise CheckpointError(f"{what}: {chunk.describe()} lies outside guest RAM ({self.size} bytes)")

    def _load(self, chunk: Chunk, what: str, dctx: zstandard.ZstdDecompressor) -> None:
        """Verify one memory chunk and decompress it straight into guest memory."""
        chunk.verify(what)
        frame = chunk.frame
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        if size != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} holds {size} bytes")
        view = self.mem[chunk.offset : chunk.offset + chunk.raw_len]
        self.machine.memory.mark_dirty(chunk.offset, chunk.raw_len)  # a monitor write: hashes and logs see it
        got = 0
        try:
            with dctx.stream_reader(frame) as reader:
                while got < chunk.raw_len:
                    n = reader.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        finally:
            view.release()
        if got != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} decompresses to {got} bytes")
        with self._stats_lock:
            self.stats.memory_chunks += 1
            self.stats.raw_bytes += chunk.raw_len

    def write_disk(self, disk_path: str | None, disk_size: int) -> None:
        """Rewrite the disk to the checkpoint's contents (every disk chunk is already verified)."""
        if disk_path is None:
            return
        fd = os.open(disk_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, 0)  # every restore is from a full checkpoint (plus its increments)
            os.ftruncate(fd, disk_size)
            for chunk, what in self.disk:
                if chunk.offset + chunk.raw_len > disk_size:
                    raise CheckpointError(f"{what}: {chunk.describe()} lies past the disk end")
                try:
                    data = self.dctx.decompress(chunk.frame, max_output_size=chunk.raw_len)
                except zstandard.ZstdError as err:
                    raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
                os.pwrite(fd, data, chunk.offset)
                self.stats.disk_chunks += 1
                self.stats.raw_bytes += len(data)
        finally:
            os.close(fd)
        self.machine.block.sectors = disk_size // 512


def _ordered_pieces(memory: list[tuple[Chunk, str]]) -> list[list[tuple[Chunk, str]]]:
    """Cut the chunk list where a chunk overlaps one before it: pieces load one after the other."""
    pieces: list[list[tuple[Chunk, str]]] = [[]]
    end = -1
    for chunk, what in memory:
        if chunk.offset < end:
            pieces.append([])
        pieces[-1].append((chunk, what))
        end = chunk.offset + chunk.raw_len
    return pieces
