"""Lazy restore: guest memory that loads from the checkpoint on first touch.

Guest RAM is cut into slots of one chunk (256 KiB). The restore verifies every chunk up front (checksums,
bounds, sizes: a damaged checkpoint is still refused before anything runs), registers the still untouched
memory with userfaultfd (monitor/uffd.py) and lets the guest start at once. A missing page is then loaded
by whoever needs it first, one whole slot at a time (its chunks decompressed into a scratch buffer and
copied in with UFFDIO_COPY; a slot no chunk covers gets the zero page):

- the loader thread, for a fault report: a touch by the guest (KVM's own accesses from KVM_RUN included:
  they fault like any other, with the GIL released) or by any thread outside Python. Between reports it
  loads ahead every slot the checkpoint holds, in address order from the last fault on, so that faults
  stay rare; when all is in, the range is unregistered, the thread ends and the files are let go: the
  memory is plain anonymous memory again (untouched zero slots fault in as usual);
- a monitor thread that reads or writes guest memory through monitor/memory.py (`ensure`), which loads
  the range in its own thread first: a Python thread holding the GIL must never touch a missing page,
  since serving the fault needs the GIL. `GuestMemory.buffer()` (hashing, checkpoints) loads everything.

Every page a chunk covers is marked as a monitor write when the restore starts (as an eager restore marks
it), so state hashes and incremental checkpoints see the loaded contents whenever they are loaded.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import zstandard

from monitor.checkpoint.format import CHUNK_SIZE, Chunk, ParsedCheckpoint
from monitor.errors import CheckpointError
from monitor.memory import PAGE_SIZE, GuestMemory
from monitor.uffd import MSG, Userfaultfd

log = logging.getLogger(__name__)

_JOIN_S = 5.0
_LOADER_NICE = 19
# Loading ahead starts at the guest's first fault (it runs), or this long after the restore: not while the
# restoring thread still needs the CPU and the GIL to get the guest running.
_AHEAD_AFTER_MS = 50
_READ_AHEAD_MIN = 2  # slots loaded after a faulting one before the fault is answered ...
_READ_AHEAD_MAX = 16  # ... doubling up to this while the guest walks through memory
_THREADED_VERIFY_BYTES = 16 << 20  # crc32 runs at about 3.5 GB/s here: a few ms


@dataclass
class LazyStats:
    """Filled in as the memory loads (read it at any time)."""

    slots: int = 0  # slots the checkpoint holds data for
    faults: int = 0  # fault reports served by the loader thread
    by_fault: int = 0  # slots loaded because the guest touched them first
    by_monitor: int = 0  # slots loaded for the monitor's own access
    preloaded: int = 0  # slots loaded ahead by the loader thread
    zero_slots: int = 0  # slots without data that were touched before the end (zero page)
    present_pages: int = 0  # pages found already mapped when their slot loaded (kept as they were)
    complete_s: float | None = None  # from the start of loading until every slot was in
    error: str = ""
    started: float = field(default_factory=time.perf_counter)


def _lower_priority() -> None:
    """Nice 19 for the calling thread only (Linux: a thread id is a pid for setpriority). Loading ahead
    must not take CPU from the guest: with autogroup scheduling the process's threads share one slice of
    a busy machine, and a vCPU thread sharing it with the loader ran its work at half speed. While the
    vCPU waits on a fault it is not runnable, so the loader then has the process's whole share anyway."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOADER_NICE)
    except OSError as err:
        log.debug("lazy restore: loader priority unchanged: %s", err)


def verify_chunks(items: list[tuple[Chunk, str]], mem_size: int, threads: int) -> None:
    """Everything about memory chunks that can be checked without decompressing: bounds, the frame's
    declared size, checksums (on `threads` threads: zlib releases the GIL). Raises CheckpointError."""
    for chunk, what in items:
        if chunk.offset + chunk.raw_len > mem_size:
            raise CheckpointError(f"{what}: {chunk.describe()} lies outside guest RAM ({mem_size} bytes)")

    def check(part: list[tuple[Chunk, str]]) -> None:
        for chunk, what in part:
            chunk.verify(what)
            try:
                size = zstandard.frame_content_size(chunk.frame)
            except zstandard.ZstdError as err:
                raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
            if size != chunk.raw_len:
                raise CheckpointError(f"{what}: {chunk.describe()} holds {size} bytes")

    if threads < 2 or sum(len(chunk.body) for chunk, _what in items) < _THREADED_VERIFY_BYTES:
        check(items)  # starting threads would cost more than they save
        return
    step = (len(items) + threads - 1) // threads
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(check, items[i : i + step]) for i in range(0, len(items), step)]:
            future.result()


class LazyMemory:
    """Loads `chunks` (verified, in the order they apply) into `memory` on first touch. Owns the loader
    thread, the userfaultfd and `owners` (the mapped checkpoint files the chunks point into) until
    everything is loaded or `close()`. Attach with `start()`."""

    def __init__(
        self,
        memory: GuestMemory,
        chunks: list[tuple[Chunk, str]],
        owners: list[ParsedCheckpoint] | None = None,
        on_error: Callable[[str], None] | None = None,
        preload: bool = True,
    ) -> None:
        self.memory = memory
        self.base = memory.host_address
        self.size = memory.size
        self.stats = LazyStats()
        self.on_error = on_error
        self._preload_enabled = preload
        self._owners = owners or []
        nslots = (self.size + CHUNK_SIZE - 1) // CHUNK_SIZE
        # slot -> the chunks over it, in order (only slots with data: a list per slot of a large guest
        # costs more than the restore's other steps together)
        self._covering: dict[int, list[tuple[Chunk, str]]] = {}
        for chunk, what in chunks:
            first = chunk.offset // CHUNK_SIZE
            last = (chunk.offset + chunk.raw_len - 1) // CHUNK_SIZE
            for slot in range(first, last + 1):
                self._covering.setdefault(slot, []).append((chunk, what))
        self._present = sorted(self._covering)
        self.stats.slots = len(self._present)
        self._loaded = bytearray(nslots)
        self._lock = threading.Lock()  # one slot loads at a time: its check, decompression and copy
        self._dctx = zstandard.ZstdDecompressor()
        self._scratch = ctypes.create_string_buffer(CHUNK_SIZE)
        self._scratch_view = memoryview(self._scratch).cast("B")
        self._cached: tuple[int, bytes] | None = None  # (id of a chunk, its contents): a chunk spans 2 slots
        self._window = _READ_AHEAD_MIN  # reading ahead of faults: see _read_ahead
        self._window_end = -1
        self._hint = 0  # the preloader goes on from the last fault: a guest scanning memory finds it loaded
        self._complete = False
        self._stopping = False
        self._uffd: Userfaultfd | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        for chunk, _what in chunks:  # monitor writes, as an eager restore marks them
            memory.mark_dirty(chunk.offset, chunk.raw_len)

    # ----- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Register the (untouched) memory, attach to it and start the loader thread. Raises UffdError
        when userfaultfd is unavailable (nothing is attached then)."""
        uffd = Userfaultfd()
        try:
            uffd.register(self.base, self.size)
        except BaseException:
            uffd.close()
            raise
        self._uffd = uffd
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self.memory.attach_filler(self)
            self._thread = threading.Thread(target=self._run, name="vmft-lazy-loader", daemon=True)
            self._thread.start()
        except BaseException:
            self._shutdown()  # closing the userfaultfd unregisters the range
            raise

    def close(self) -> None:
        """Stop loading (the machine is closing): the thread joined, userfaultfd and files released.
        Idempotent; pages never loaded read as zero afterwards."""
        self._shutdown()

    @property
    def complete(self) -> bool:
        return self._complete

    # ----- GuestMemory's filler interface --------------------------------------------------------

    def ensure(self, addr: int, length: int) -> None:
        """Load the slots of [addr, addr+length) that are not in yet (a monitor access, in its thread)."""
        if length <= 0 or self._complete:
            return
        loaded = self._loaded
        for slot in range(addr // CHUNK_SIZE, (addr + length - 1) // CHUNK_SIZE + 1):
            if not loaded[slot]:
                self._load(slot, "monitor")

    def ensure_all(self) -> None:
        """Load everything now (whoever needs all of memory: hashing, taking a checkpoint)."""
        if self._complete:
            return
        for slot in self._present:
            if not self._loaded[slot]:
                self._load(slot, "monitor")
        self._finish()

    # ----- loading -------------------------------------------------------------------------------

    def _load(self, slot: int, by: str) -> None:
        with self._lock:
            uffd = self._uffd
            if self._loaded[slot] or self._complete or self._stopping or uffd is None:
                return
            start = slot * CHUNK_SIZE
            length = min(CHUNK_SIZE, self.size - start)
            items = self._covering.get(slot)
            dst = self.base + start
            if not items:
                self.stats.present_pages += uffd.zeropage(dst, length)
                self.stats.zero_slots += 1
            else:
                self._fill_scratch(start, length, items)
                # a page already there is kept (not expected: a slot's pages all arrive here at once)
                self.stats.present_pages += uffd.copy(dst, ctypes.addressof(self._scratch), length)
                if by == "fault":
                    self.stats.by_fault += 1
                elif by == "monitor":
                    self.stats.by_monitor += 1
                else:
                    self.stats.preloaded += 1
            self._loaded[slot] = 1

    def _fill_scratch(self, start: int, length: int, items: list[tuple[Chunk, str]]) -> None:
        """The slot's contents: its chunks applied in order over zeros (a full checkpoint's chunk is the
        whole slot; pre-copy deltas and a chain's increments overwrite parts of it)."""
        view = self._scratch_view
        whole = items[0][0]
        if len(items) == 1 and whole.offset == start and whole.raw_len == length:
            self._decompress_into(view, whole, items[0][1])
            return
        ctypes.memset(self._scratch, 0, length)
        end = start + length
        for chunk, what in items:
            data = self._contents(chunk, what)
            lo = max(start, chunk.offset)
            hi = min(end, chunk.offset + chunk.raw_len)
            view[lo - start : hi - start] = data[lo - chunk.offset : hi - chunk.offset]

    def _decompress_into(self, view: memoryview, chunk: Chunk, what: str) -> None:
        """A chunk that is the whole slot, straight into the scratch buffer (no bytes object, no copy)."""
        got = 0
        try:
            with self._dctx.stream_reader(chunk.frame) as reader:
                while got < chunk.raw_len:
                    n = reader.readinto(view[got : chunk.raw_len])
                    if not n:
                        break
                    got += n
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        if got != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} decompresses to {got} bytes")

    def _contents(self, chunk: Chunk, what: str) -> bytes:
        cached = self._cached
        if cached is not None and cached[0] == id(chunk):
            return cached[1]
        try:
            data = self._dctx.decompress(chunk.frame, max_output_size=chunk.raw_len)
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{what}: {chunk.describe()} corrupted: {err}") from err
        if len(data) != chunk.raw_len:
            raise CheckpointError(f"{what}: {chunk.describe()} decompresses to {len(data)} bytes")
        self._cached = (id(chunk), data)
        return data

    def _finish(self) -> None:
        """Everything the checkpoint holds is in: unregister (untouched slots fault as plain zero pages
        from now on), detach, let the threads end and the files go."""
        with self._lock:
            if self._complete or self._uffd is None:
                return
            if any(not self._loaded[slot] for slot in self._present):
                return
            self._uffd.unregister(self.base, self.size)
            self._complete = True
            self.stats.complete_s = time.perf_counter() - self.stats.started
        log.debug("lazy restore complete after %.1f ms: %s", self.stats.complete_s * 1e3, self.stats)
        self._shutdown()

    # ----- the loader thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """Serve fault reports first; between them, load the next slot ahead (unless on touch only). One
        thread for both: a fault waits for at most the slot being loaded (a fraction of a millisecond)."""
        uffd = self._uffd
        assert uffd is not None
        _lower_priority()
        buffer = bytearray(MSG.size * 64)
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ahead = self._preload_enabled
        try:
            if ahead:  # loading ahead waits for the guest to run (its first fault), within a bound
                poller.poll(_AHEAD_AFTER_MS)
            while not self._stopping and not self._complete:
                if poller.poll(0 if ahead else None):
                    self._serve(uffd, buffer)
                    continue
                slot = self._next_missing(self._present)
                if slot is None:
                    self._finish()
                    return
                self._load(slot, "preload")
        except Exception as err:
            self._fail(err)

    def _serve(self, uffd: Userfaultfd, buffer: bytearray) -> None:
        for address in uffd.read_faults(buffer):
            self.stats.faults += 1
            offset = address - self.base
            if not 0 <= offset < self.size:
                continue
            slot = offset // CHUNK_SIZE
            self._hint = slot + 1
            if self._loaded[slot]:  # loaded between the fault and now: the copy woke it already
                uffd.wake(address & ~(PAGE_SIZE - 1), PAGE_SIZE)
                continue
            if self._preload_enabled:
                self._read_ahead(slot)
            self._load(slot, "fault")

    def _read_ahead(self, slot: int) -> None:
        """Before answering a fault, the slots after it (while the guest still waits: once it runs again
        it takes the CPU from this nice thread on a busy machine). The window doubles while the guest
        walks memory (each fault just past the last window), up to a bound, and starts small again at
        a fault elsewhere, so that a guest touching memory here and there does not wait for reading
        ahead it cannot use."""
        if self._window_end <= slot <= self._window_end + self._window:
            self._window = min(self._window * 2, _READ_AHEAD_MAX)
        else:
            self._window = _READ_AHEAD_MIN
        self._window_end = slot + self._window + 1
        present = self._present
        at = bisect.bisect_right(present, slot)
        for ahead in present[at : at + self._window]:
            if ahead > slot + self._window:
                break
            self._load(ahead, "preload")

    def _next_missing(self, present: list[int]) -> int | None:
        loaded = self._loaded
        at = bisect.bisect_left(present, self._hint)
        for i in range(at, len(present)):
            if not loaded[present[i]]:
                self._hint = present[i] + 1
                return present[i]
        for i in range(at):
            if not loaded[present[i]]:
                self._hint = present[i] + 1
                return present[i]
        return None

    def _fail(self, err: BaseException) -> None:
        """A slot that cannot load (it passed its checksum, so this is a bug or a host failure): the guest
        must not run on memory that is not the checkpoint's. Stop it, then let go of the range so nothing
        waits forever on a fault that nobody will serve."""
        message = f"lazy restore failed: {err}"
        log.error("%s", message)
        self.stats.error = message
        if self.on_error is not None:
            try:
                self.on_error(message)
            except Exception:
                log.exception("lazy restore: on_error")
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._covering = {}
            self._cached = None
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(_JOIN_S)
        with self._lock:
            self.memory.detach_filler(self)
            if self._uffd is not None:
                self._uffd.close()  # releases the registration: anyone still waiting faults normally
                self._uffd = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            owners, self._owners = self._owners, []
        for owner in owners:
            owner.close()
