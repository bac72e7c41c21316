"""The guest's address space: physical pages, the page tables the monitor owns, and the mappings.

Everything is mapped eagerly (a page fault through the guest IDT costs ~55 µs against ~8 µs for a page
mapped ahead, docs/design.md). kvm_pvm's shadow MMU does not notice the monitor's page-table writes, so when a
PTE the guest has used (Accessed bit set) loses its mapping or a permission, the address space asks for a
flush (`flush_tlb`, a memslot delete and re-add); adding mappings needs none.

`pages` mirrors the leaf PTEs (virtual page -> (physical page, prot)) so copying to and from the guest
does not walk tables in guest memory. Pages with PROT_NONE keep their frame (and contents) but are not
present in the tables.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import struct
from dataclasses import dataclass, field, replace
from typing import Callable

from monitor.linux.boot import LOW_END
from monitor.memory import GuestMemory

log = logging.getLogger(__name__)

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
_P, _RW, _US, _A = 1, 2, 4, 0x20
_NX = 1 << 63
_ZERO_PAGE = bytes(PAGE)
USER_TOP = 0x7FFF_FFFF_F000  # Linux's TASK_SIZE: user addresses lie below
MMAP_TOP = 0x7FFF_F7FF_F000  # mmap(NULL) searches down from here (below the stack and its gap)
MIN_ADDR = LOW_END  # like vm.mmap_min_addr: nothing below 64 KiB


class LinuxError(Exception):
    """A system call's failure: carries the errno the guest sees."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or errno.errorcode.get(err, str(err)))
        self.errno = err


def page_down(addr: int) -> int:
    return addr & ~(PAGE - 1)


def page_up(addr: int) -> int:
    return (addr + PAGE - 1) & ~(PAGE - 1)


@dataclass
class Vma:
    start: int
    end: int
    prot: int
    name: str = ""  # file path, [heap], [stack] or "" (anonymous): /proc/self/maps
    offset: int = 0  # file offset of `start`
    shared: bool = False


@dataclass
class PhysicalPages:
    """Guest-physical pages above LOW_END: a bump pointer over never-used (zero) pages plus a free list
    of used ones (zeroed again when handed out)."""

    memory: GuestMemory
    next_free: int = LOW_END
    free: list[int] = field(default_factory=list)

    def alloc(self, zero: bool = True) -> int:
        if self.free:
            addr = self.free.pop()
            if zero:
                self.memory.write(addr, _ZERO_PAGE)
            return addr
        addr = self.next_free
        if addr + PAGE > self.memory.size:
            raise LinuxError(errno.ENOMEM, "guest RAM exhausted (raise --mem)")
        self.next_free = addr + PAGE
        return addr

    def release(self, addr: int) -> None:
        self.free.append(addr)

    @property
    def used_bytes(self) -> int:
        return self.next_free - LOW_END - len(self.free) * PAGE


class AddressSpace:
    def __init__(
        self, memory: GuestMemory, flush_tlb: Callable[[], None], phys: PhysicalPages | None = None
    ) -> None:
        self.memory = memory
        self.phys = phys or PhysicalPages(memory)  # one allocator for every address space of the VM
        self._flush_tlb = flush_tlb
        self.root = self.phys.alloc()
        self._tables: dict[tuple[int, ...], int] = {(): self.root}
        self.pages: dict[int, tuple[int, int]] = {}  # virtual page number -> (physical address, prot)
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.brk_start = 0
        self.brk = 0
        self.mmap_top = MMAP_TOP
        self.flushes = 0
        self._needs_flush = False
        self._low: tuple[int, int, dict[int, int]] | None = None

    # ----- page tables ---------------------------------------------------------------------------

    def map_identity_low(self, start: int, end: int, user_pages: dict[int, int]) -> None:
        """The kernel structures below LOW_END: supervisor pages, identity-mapped; `user_pages` maps a
        page address to its prot for the few the program may use (the system-call page)."""
        self._low = (start, end, user_pages)
        for addr in range(start, end, PAGE):
            prot = user_pages.get(addr)
            pte = addr | _P | _RW if prot is None else addr | _P | _US | (_NX if not prot & PROT_EXEC else 0)
            self._write_pte(addr >> 12, pte)

    def _table_for(self, vpn: int) -> int:
        """Physical address of the page table holding vpn's PTE (made on demand)."""
        indices = ((vpn >> 27) & 511, (vpn >> 18) & 511, (vpn >> 9) & 511)
        parent = self.root
        for depth in range(1, 4):
            key = indices[:depth]
            table = self._tables.get(key)
            if table is None:
                table = self.phys.alloc()
                self._tables[key] = table
                self.memory.write(parent + indices[depth - 1] * 8, struct.pack("<Q", table | _P | _RW | _US))
            parent = table
        return parent

    def _write_pte(self, vpn: int, pte: int) -> None:
        self.memory.write(self._table_for(vpn) + (vpn & 511) * 8, struct.pack("<Q", pte))

    def _write_ptes(self, first_vpn: int, ptes: list[int]) -> None:
        """Consecutive PTEs, one write per page table."""
        at = 0
        while at < len(ptes):
            vpn = first_vpn + at
            count = min(len(ptes) - at, 512 - (vpn & 511))
            table = self._table_for(vpn)
            self.memory.write(table + (vpn & 511) * 8, struct.pack(f"<{count}Q", *ptes[at : at + count]))
            at += count

    def _read_pte(self, vpn: int) -> int:
        table = self._tables.get(((vpn >> 27) & 511, (vpn >> 18) & 511, (vpn >> 9) & 511))
        if table is None:
            return 0
        return int(struct.unpack_from("<Q", self.memory.view(table + (vpn & 511) * 8, 8))[0])

    @staticmethod
    def _pte(phys: int, prot: int) -> int:
        if not prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
            return 0
        pte = phys | _P | _US
        if prot & PROT_WRITE:
            pte |= _RW
        if not prot & PROT_EXEC:
            pte |= _NX
        return pte

    def _note_reduced(self, vpn: int) -> None:
        if not self._needs_flush and self._read_pte(vpn) & _A:
            self._needs_flush = True

    def commit(self) -> None:
        """End of a system call: make removals and permission reductions visible to the guest."""
        if self._needs_flush:
            self._needs_flush = False
            self.flushes += 1
            self._flush_tlb()

    # ----- pages ----------------------------------------------------------------------------------

    def _install(self, start: int, prot: int, contents: bytes | None, length: int) -> None:
        """Fresh frames for [start, start+length) (page-aligned), filled from `contents` (zero past it)."""
        first = start >> 12
        count = length >> 12
        ptes: list[int] = []
        pages = self.pages
        for i in range(count):
            vpn = first + i
            old = pages.get(vpn)
            if old is not None:
                self._note_reduced(vpn)
                self.phys.release(old[0])
            chunk = contents[i * PAGE : (i + 1) * PAGE] if contents is not None else b""
            phys = self.phys.alloc(zero=len(chunk) < PAGE)
            if chunk:
                self.memory.write(phys, chunk)
            pages[vpn] = (phys, prot)
            ptes.append(self._pte(phys, prot))
        self._write_ptes(first, ptes)

    def _drop(self, start: int, end: int) -> None:
        first, last = start >> 12, end >> 12
        pages = self.pages
        run_start = None
        for vpn in range(first, last):
            old = pages.pop(vpn, None)
            if old is not None:
                self._note_reduced(vpn)
                self.phys.release(old[0])
                if run_start is None:
                    run_start = vpn
            elif run_start is not None:
                self._write_ptes(run_start, [0] * (vpn - run_start))
                run_start = None
        if run_start is not None:
            self._write_ptes(run_start, [0] * (last - run_start))

    def _protect_pages(self, start: int, end: int, prot: int) -> None:
        first, last = start >> 12, end >> 12
        pages = self.pages
        vpn = first
        while vpn < last:
            if vpn not in pages:
                vpn += 1
                continue
            run = vpn
            ptes = []
            while vpn < last and vpn in pages:
                phys, old = pages[vpn]
                if old & ~prot:
                    self._note_reduced(vpn)
                pages[vpn] = (phys, prot)
                ptes.append(self._pte(phys, prot))
                vpn += 1
            self._write_ptes(run, ptes)

    def _populate(self, start: int, end: int, prot: int) -> None:
        """Zero frames for the pages of [start, end) that have none (a reservation being opened)."""
        vpn, last = start >> 12, end >> 12
        while vpn < last:
            if vpn in self.pages:
                vpn += 1
                continue
            run = vpn
            while vpn < last and vpn not in self.pages:
                vpn += 1
            self._install(run << 12, prot, None, (vpn - run) << 12)

    # ----- mappings (VMAs) --------------------------------------------------------------------------

    def _split_out(self, start: int, end: int) -> list[Vma]:
        """Remove [start, end) from the VMA list, splitting VMAs at its edges; returns the pieces removed."""
        removed: list[Vma] = []
        kept: list[Vma] = []
        for vma in self.vmas:
            if vma.end <= start or vma.start >= end:
                kept.append(vma)
                continue
            if vma.start < start:
                kept.append(replace(vma, end=start))
            if vma.end > end:
                kept.append(replace(vma, start=end, offset=vma.offset + (end - vma.start)))
            lo, hi = max(vma.start, start), min(vma.end, end)
            removed.append(replace(vma, start=lo, end=hi, offset=vma.offset + (lo - vma.start)))
        self._set_vmas(kept)
        return removed

    def _set_vmas(self, vmas: list[Vma]) -> None:
        vmas.sort(key=lambda v: v.start)
        self.vmas = vmas
        self._starts = [v.start for v in vmas]

    def _add_vma(self, vma: Vma) -> None:
        at = bisect.bisect(self._starts, vma.start)
        self.vmas.insert(at, vma)
        self._starts.insert(at, vma.start)

    def vma_at(self, addr: int) -> Vma | None:
        at = bisect.bisect(self._starts, addr) - 1
        if at >= 0 and self.vmas[at].end > addr:
            return self.vmas[at]
        return None

    def is_free(self, start: int, end: int) -> bool:
        if start < MIN_ADDR or end > USER_TOP or start >= end:
            return False
        at = bisect.bisect(self._starts, start) - 1
        if at >= 0 and self.vmas[at].end > start:
            return False
        return at + 1 >= len(self.vmas) or self.vmas[at + 1].start >= end

    def find_free(self, length: int, top: int | None = None) -> int:
        """Highest free range of `length` below `top` (as Linux's top-down mmap)."""
        limit = self.mmap_top if top is None else top
        for vma in reversed(self.vmas):
            if vma.start >= limit:
                continue
            if vma.end <= limit - length:
                candidate = limit - length
                return candidate
            limit = vma.start
        if limit - length >= max(MIN_ADDR, self.brk + (64 << 20)):
            return limit - length
        raise LinuxError(errno.ENOMEM, "no free virtual range")

    def map(
        self,
        start: int,
        length: int,
        prot: int,
        contents: bytes | None = None,
        name: str = "",
        offset: int = 0,
        shared: bool = False,
    ) -> int:
        """A new mapping at [start, start+length), replacing whatever was there (MAP_FIXED semantics)."""
        length = page_up(length)
        if start % PAGE or start < MIN_ADDR or start + length > USER_TOP:
            raise LinuxError(errno.EINVAL, f"mapping at {start:#x}+{length:#x}")
        self._split_out(start, start + length)
        if prot or contents is not None:
            self._install(start, prot, contents, length)
        else:  # a reservation (PROT_NONE, anonymous): frames come when mprotect opens it
            self._drop(start, start + length)
        self._add_vma(Vma(start, start + length, prot, name, offset, shared))
        self._merge()
        return start

    def unmap(self, start: int, length: int) -> None:
        length = page_up(length)
        if start % PAGE or length == 0:
            raise LinuxError(errno.EINVAL)
        self._split_out(start, start + length)
        self._drop(start, start + length)
        self._merge()

    def protect(self, start: int, length: int, prot: int) -> None:
        length = page_up(length)
        if start % PAGE:
            raise LinuxError(errno.EINVAL)
        end = start + length
        addr = start
        for vma in self.vmas:  # Linux: ENOMEM if any part of the range is unmapped
            if vma.end <= addr or vma.start >= end:
                continue
            if vma.start > addr:
                raise LinuxError(errno.ENOMEM)
            addr = vma.end
        if addr < end:
            raise LinuxError(errno.ENOMEM)
        for piece in self._split_out(start, end):
            piece.prot = prot
            self._add_vma(piece)
        self._protect_pages(start, end, prot)
        if prot:
            self._populate(start, end, prot)
        self._merge()

    def remap(self, old: int, old_len: int, new_len: int, may_move: bool, fixed: int | None) -> int:
        old_len, new_len = page_up(old_len), page_up(new_len)
        if old % PAGE or new_len == 0:
            raise LinuxError(errno.EINVAL)
        vma = self.vma_at(old)
        if vma is None or vma.end < old + old_len:
            raise LinuxError(errno.EFAULT)
        if fixed is None and new_len <= old_len:
            if new_len < old_len:
                self.unmap(old + new_len, old_len - new_len)
            return old
        if fixed is None and self.is_free(old + old_len, old + new_len) and vma.end == old + old_len:
            grown = replace(vma, start=old + old_len, end=old + new_len, offset=vma.offset + old_len)
            self._install(grown.start, vma.prot, None, new_len - old_len)
            self._add_vma(grown)
            self._merge()
            return old
        if not may_move:
            raise LinuxError(errno.ENOMEM)
        new = fixed if fixed is not None else self.find_free(new_len)
        if fixed is not None:
            self.unmap(new, new_len)
        keep = min(old_len, new_len)
        # Move the frames themselves: no copy.
        moved = []
        for i in range(keep >> 12):
            entry = self.pages.pop((old >> 12) + i, None)
            moved.append(entry)
            if entry is not None:
                self._note_reduced((old >> 12) + i)
        self._write_ptes(old >> 12, [0] * (keep >> 12))
        pieces = self._split_out(old, old + old_len)
        self._drop(old + keep, old + old_len)
        ptes = []
        for i, entry in enumerate(moved):
            if entry is None:
                phys, prot = self.phys.alloc(), vma.prot
            else:
                phys, prot = entry
            self.pages[(new >> 12) + i] = (phys, prot)
            ptes.append(self._pte(phys, prot))
        self._write_ptes(new >> 12, ptes)
        if new_len > keep:
            self._install(new + keep, vma.prot, None, new_len - keep)
        base = pieces[0] if pieces else vma
        self._add_vma(replace(base, start=new, end=new + new_len))
        self._merge()
        return new

    def _merge(self) -> None:
        merged: list[Vma] = []
        for vma in self.vmas:
            last = merged[-1] if merged else None
            if (
                last is not None
                and last.end == vma.start
                and last.prot == vma.prot
                and last.name == vma.name
                and last.shared == vma.shared
                and (not vma.name or last.offset + (last.end - last.start) == vma.offset)
            ):
                last.end = vma.end
            else:
                merged.append(vma)
        self._set_vmas(merged)

    # ----- brk -------------------------------------------------------------------------------------

    def set_brk_start(self, addr: int) -> None:
        self.brk_start = self.brk = page_up(addr)

    def set_brk(self, addr: int) -> int:
        if addr < self.brk_start:
            return self.brk
        new_end, old_end = page_up(addr), page_up(self.brk)
        if new_end > old_end:
            if not self.is_free(old_end, new_end):
                return self.brk
            self._install(old_end, PROT_READ | PROT_WRITE, None, new_end - old_end)
            self._add_vma(Vma(old_end, new_end, PROT_READ | PROT_WRITE, "[heap]"))
            self._merge()
        elif new_end < old_end:
            self.unmap(new_end, old_end - new_end)
        self.brk = addr
        return addr

    # ----- access from the monitor ---------------------------------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        """Bytes the guest could read at [addr, addr+length), else EFAULT."""
        if length <= 0:
            return b""
        pages = self.pages
        memory = self.memory
        out = []
        end = addr + length
        while addr < end:
            entry = pages.get(addr >> 12)
            if entry is None or not entry[1] & (PROT_READ | PROT_WRITE | PROT_EXEC):
                raise LinuxError(errno.EFAULT, f"read at {addr:#x}")
            off = addr & (PAGE - 1)
            n = min(PAGE - off, end - addr)
            out.append(memory.read(entry[0] + off, n))
            addr += n
        return b"".join(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview, force: bool = False) -> None:
        """Write into guest pages the guest could write (or any mapped page, with `force`)."""
        pages = self.pages
        memory = self.memory
        view = memoryview(data)
        at = 0
        total = len(view)
        while at < total:
            entry = pages.get(addr >> 12)
            if entry is None or not (force or entry[1] & PROT_WRITE):
                raise LinuxError(errno.EFAULT, f"write at {addr:#x}")
            off = addr & (PAGE - 1)
            n = min(PAGE - off, total - at)
            memory.write(entry[0] + off, view[at : at + n])
            addr += n
            at += n

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit:
            off = addr & (PAGE - 1)
            chunk = self.read(addr, min(PAGE - off, limit - len(out)))
            nul = chunk.find(0)
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            addr += len(chunk)
        raise LinuxError(errno.ENAMETOOLONG)

    def fork_copy(self) -> AddressSpace:
        """fork: a new address space with a copy of every page (eagerly, like everything here)."""
        child = AddressSpace(self.memory, self._flush_tlb, self.phys)
        if self._low is not None:
            child.map_identity_low(*self._low)
        ptes: dict[int, int] = {}
        for vpn, (phys, prot) in self.pages.items():
            frame = self.phys.alloc(zero=False)
            self.memory.write(frame, self.memory.view(phys, PAGE))
            child.pages[vpn] = (frame, prot)
            ptes[vpn] = self._pte(frame, prot)
        for vpn in sorted(ptes):
            child._write_pte(vpn, ptes[vpn])
        child._set_vmas([replace(v) for v in self.vmas])
        child.brk_start, child.brk, child.mmap_top = self.brk_start, self.brk, self.mmap_top
        return child

    def release(self) -> None:
        """exec or exit: every frame of this address space goes back to the allocator."""
        for phys, _prot in self.pages.values():
            self.phys.release(phys)
        for table in self._tables.values():
            self.phys.release(table)
        self.pages = {}
        self._tables = {}
        self._set_vmas([])

    def digest(self) -> bytes:
        """The mapping table (not the contents: guest memory is hashed separately)."""
        h = hashlib.blake2b(digest_size=16)
        for vma in self.vmas:
            h.update(repr((vma.start, vma.end, vma.prot, vma.name, vma.offset, vma.shared)).encode())
        h.update(repr((self.brk_start, self.brk)).encode())
        return h.digest()

    def maps_text(self) -> str:
        """/proc/self/maps."""
        lines = []
        for vma in self.vmas:
            perms = (
                ("r" if vma.prot & PROT_READ else "-")
                + ("w" if vma.prot & PROT_WRITE else "-")
                + ("x" if vma.prot & PROT_EXEC else "-")
                + ("s" if vma.shared else "p")
            )
            name = vma.name
            lines.append(
                f"{vma.start:08x}-{vma.end:08x} {perms} {vma.offset:08x} 00:00 0{' ' * 10}{name}".rstrip()
            )
        return "\n".join(lines) + "\n"
