"""A vDSO for Linux guests run with `--clock vdso`: clock reads without an exit, deterministically.

The image (monitor/linux/vdso.c, built by scripts/setup into build/vdso.so) is mapped read-only at
VDSO_BASE in every address space, with the time page one page below it, and AT_SYSINFO_EHDR names it, so
glibc and musl call its __vdso_clock_gettime & co. instead of making a system call (an exit, 26-40 µs).

Determinism: the time page changes only at synchronous exits. At the end of every system call the monitor
rewrites it if host time moved by at least `resolution_ns` since the last rewrite, and that rewrite is one
VDSO_TIME event at that exit: replay writes the logged values at the same position (Journal.data_if), never
asks the host. A clock read that is itself a system call (clock_gettime of a page clock, a sleep's or a
futex's deadline) rewrites the page unconditionally and answers from it, so the syscall clocks and the
vDSO clocks are one clock, monotonic across both. The cost: a guest sees time advance only at its exits;
a loop that spins on the clock without system calls never sees it move (and is reported hung).

The page is guest memory: checkpoints carry it and the state hash covers it; after a restore the clock
values are read back from it.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from monitor.errors import ConfigError
from monitor.journal import EventKind, Journal
from monitor.linux.mm import PAGE, PROT_EXEC, PROT_READ, AddressSpace, LinuxError, page_up

# Between the mmap area's top (mm.MMAP_TOP) and the stack: mmap(NULL) never lands here.
VVAR_BASE = 0x7FFF_F800_0000
VDSO_BASE = VVAR_BASE + PAGE
DEFAULT_RESOLUTION_NS = 100_000  # docs/linux.md: chosen from scripts/bench redis
COARSE_RES_NS = 4_000_000  # what Linux reports for the *_COARSE clocks (a jiffy at HZ=250)
IMAGE = Path(__file__).resolve().parents[2] / "build" / "vdso.so"

# The time page (vdso.c struct vmft_time_page): version, realtime sec/nsec, monotonic sec/nsec, coarse res.
TIME_PAGE_LAYOUT = struct.Struct("<Qqqqqq")
_EVENT = struct.Struct("<qq")  # a VDSO_TIME event's data: realtime ns, monotonic ns
PAGE_VERSION = 1

# Linux clock ids the page answers (vdso.c on_page): REALTIME, MONOTONIC, MONOTONIC_RAW, the COARSE ones,
# BOOTTIME. The host clocks process.py's now_ns is asked for are CLOCK_REALTIME or one of the others.
_PAGE_CLOCKS = {
    time.CLOCK_REALTIME: True,
    time.CLOCK_MONOTONIC: False,
    time.CLOCK_MONOTONIC_RAW: False,
    time.CLOCK_BOOTTIME: False,
}


class ClockMode(enum.Enum):
    SYSCALL = "syscall"  # every clock read is a system call (an exit and a CLOCK event)
    VDSO = "vdso"  # clock reads answered by the vDSO from the time page

    @classmethod
    def parse(cls, text: str) -> ClockMode:
        try:
            return cls(text or "syscall")
        except ValueError:
            raise ConfigError(f"--clock {text}: give syscall or vdso") from None


class VdsoMissing(ConfigError):
    hint = "run scripts/setup (it builds build/vdso.so with gcc)"


@dataclass(frozen=True)
class VdsoImage:
    """The vDSO as it lies in guest memory: its PT_LOAD segments at their addresses from the base."""

    memory_image: bytes
    sha256: str


_CACHE: dict[tuple[str, int], VdsoImage] = {}


def load_image(path: Path = IMAGE) -> VdsoImage:
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns)
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        data = path.read_bytes()
    except OSError as err:
        raise VdsoMissing(f"the vDSO image {path} is missing ({err.strerror})") from err
    ehdr = struct.unpack_from("<16sHHIQQQIHHHHHH", data)
    phoff, phentsize, phnum = ehdr[5], ehdr[9], ehdr[10]
    span = 0
    segments = []
    for i in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            segments.append((vaddr, data[offset : offset + filesz]))
            span = max(span, vaddr + memsz)
    image = bytearray(page_up(span))
    for vaddr, contents in segments:
        image[vaddr : vaddr + len(contents)] = contents
    loaded = _CACHE[key] = VdsoImage(bytes(image), hashlib.sha256(data).hexdigest())
    return loaded


class VdsoClock:
    """The time page of one VM: what it holds, when it changes, and the vDSO's mappings."""

    def __init__(
        self,
        journal: Callable[[], Journal],
        spaces: Callable[[], Iterable[AddressSpace]],
        resolution_ns: int = DEFAULT_RESOLUTION_NS,
    ) -> None:
        self.image = load_image()
        self._journal = journal
        self._spaces = spaces
        self.resolution_ns = resolution_ns
        self.realtime_ns = 0
        self.monotonic_ns = 0
        self.updates = 0  # page rewrites (each one VDSO_TIME event when recorded)

    # ----- mapping ----------------------------------------------------------------------------------

    def install(self, space: AddressSpace) -> int:
        """Map the time page and the image into an address space (execve); returns AT_SYSINFO_EHDR."""
        space.map(VVAR_BASE, PAGE, PROT_READ, contents=self._page_bytes(), name="[vvar]")
        space.map(VDSO_BASE, len(self.image.memory_image), PROT_READ | PROT_EXEC,
                  contents=self.image.memory_image, name="[vdso]")  # fmt: skip
        return VDSO_BASE

    def _page_bytes(self) -> bytes:
        if not self.monotonic_ns:
            return bytes(TIME_PAGE_LAYOUT.size)  # version 0: the vDSO makes the system call
        rt, mono = self.realtime_ns, self.monotonic_ns
        return TIME_PAGE_LAYOUT.pack(
            PAGE_VERSION, rt // 1_000_000_000, rt % 1_000_000_000, mono // 1_000_000_000,
            mono % 1_000_000_000, COARSE_RES_NS,
        )  # fmt: skip

    def _write_page(self) -> None:
        data = self._page_bytes()
        for space in self._spaces():
            try:
                space.write(VVAR_BASE, data, force=True)
            except LinuxError:
                pass  # a process whose program unmapped it: it reads no clock from it

    def restored(self, space: AddressSpace) -> None:
        """After a restore: the clock values are what the page in guest memory says."""
        try:
            raw = space.read(VVAR_BASE, TIME_PAGE_LAYOUT.size)
        except LinuxError:
            return
        version, rt_s, rt_ns, mono_s, mono_ns, _res = TIME_PAGE_LAYOUT.unpack(raw)
        if version:
            self.realtime_ns = rt_s * 1_000_000_000 + rt_ns
            self.monotonic_ns = mono_s * 1_000_000_000 + mono_ns

    # ----- at exits --------------------------------------------------------------------------------

    def _take(self, force: bool) -> bytes | None:
        """Recording or live: the host clocks, if they moved enough (or `force`)."""
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if not force and mono - self.monotonic_ns < self.resolution_ns:
            return None
        rt = time.clock_gettime_ns(time.CLOCK_REALTIME)
        # Never backwards, whatever the host's wall clock does (an NTP step): the page is one clock.
        return _EVENT.pack(max(rt, self.realtime_ns), max(mono, self.monotonic_ns))

    def _take_now(self) -> bytes:
        data = self._take(True)
        assert data is not None
        return data

    def _apply(self, data: bytes) -> None:
        self.realtime_ns, self.monotonic_ns = _EVENT.unpack(data)
        self.updates += 1
        self._write_page()

    def at_exit(self) -> None:
        """End of a system call: rewrite the page if host time moved by a resolution (an event)."""
        data = self._journal().data_if(EventKind.VDSO_TIME, lambda: self._take(False))
        if data is not None:
            self._apply(data)

    def now_ns(self, clock: int) -> int | None:
        """A system call reads a page clock: rewrite the page now (an event) and answer from it, so the
        system call and the vDSO never disagree. None for clocks the page does not hold."""
        realtime = _PAGE_CLOCKS.get(clock)
        if realtime is None:
            return None
        self._apply(self._journal().data(EventKind.VDSO_TIME, self._take_now))
        return self.realtime_ns if realtime else self.monotonic_ns


def identity_tag(mode: ClockMode) -> list[str]:
    """What the run's identity says of the clock (nothing for the default, so older identities hold)."""
    if mode is ClockMode.SYSCALL:
        return []
    return [f"clock:vdso:{load_image().sha256}"]
