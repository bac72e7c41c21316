"""System calls on the address space."""

from __future__ import annotations

import errno
import os

from monitor.linux import fdtable as fdt
from monitor.linux.mm import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, LinuxError, page_up
from monitor.linux.process import ProcessState

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED, MADV_FREE = 4, 8
_PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC


class MemoryCalls(ProcessState):
    def sys_brk(self, addr: int, *_: int) -> int:
        return self.space.set_brk(addr) if addr else self.space.brk

    def sys_mmap(self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        if not length or offset % PAGE or prot & ~_PROT_MASK:
            raise LinuxError(errno.EINVAL)
        length = page_up(length)
        if length > 1 << 40:
            raise LinuxError(errno.ENOMEM)
        contents: bytes | None = None
        name = ""
        if not flags & MAP_ANONYMOUS:
            file = self.fds.get(fd & 0xFFFFFFFF)
            if isinstance(file, fdt.DeviceFile) and file.device == "zero":
                pass
            elif not isinstance(file, fdt.HostFile):
                raise LinuxError(errno.ENODEV)
            elif not file.readable or (flags & MAP_SHARED and prot & PROT_WRITE and not file.writable):
                raise LinuxError(errno.EACCES)
            else:
                # Copied in at map time: a private mapping as Linux makes it. A shared writable mapping
                # of a layer file does not write back yet (docs/linux.md).
                contents = os.pread(file.fd, length, offset)
                name = file.path
                if prot & PROT_EXEC and contents:
                    fd = file.fd
                    whole = lambda: os.pread(fd, os.fstat(fd).st_size, 0)  # noqa: E731 - read only on a miss
                    contents = self.filter_code(file.path, file.host, whole, contents, offset)
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            if addr % PAGE:
                raise LinuxError(errno.EINVAL)
            if (
                flags & MAP_FIXED_NOREPLACE
                and not flags & MAP_FIXED
                and not self.space.is_free(addr, addr + length)
            ):
                raise LinuxError(errno.EEXIST)
            start = addr
        elif addr and addr % PAGE == 0 and self.space.is_free(addr, addr + length):
            start = addr
        else:
            start = self.space.find_free(length)
        return self.space.map(
            start, length, prot, contents, name, offset if name else 0, bool(flags & MAP_SHARED)
        )

    def sys_munmap(self, addr: int, length: int, *_: int) -> int:
        self.space.unmap(addr, length)
        return 0

    def sys_mprotect(self, addr: int, length: int, prot: int, *_: int) -> int:
        if prot & ~(_PROT_MASK | 0x03000000):  # PROT_GROWSDOWN/UP accepted and ignored
            raise LinuxError(errno.EINVAL)
        self.space.protect(addr, length, prot & _PROT_MASK)
        return 0

    def sys_mremap(self, old: int, old_len: int, new_len: int, flags: int, new_addr: int, *_: int) -> int:
        fixed = new_addr if flags & MREMAP_FIXED else None
        if fixed is not None and (not flags & MREMAP_MAYMOVE or fixed % PAGE):
            raise LinuxError(errno.EINVAL)
        return self.space.remap(old, old_len, new_len, bool(flags & MREMAP_MAYMOVE), fixed)

    def sys_madvise(self, addr: int, length: int, advice: int, *_: int) -> int:
        if addr % PAGE:
            raise LinuxError(errno.EINVAL)
        if advice in (MADV_DONTNEED, MADV_FREE):
            # Private anonymous memory reads back as zero after DONTNEED (what allocators rely on).
            zero = bytes(PAGE)
            for vpn in range(addr >> 12, page_up(addr + length) >> 12):
                entry = self.space.pages.get(vpn)
                vma = self.space.vma_at(vpn << 12)
                if entry is not None and vma is not None and not vma.name.startswith("/"):
                    self.space.memory.write(entry[0], zero)
        return 0

    def sys_msync(self, addr: int, *_: int) -> int:
        if addr % PAGE:
            raise LinuxError(errno.EINVAL)
        return 0

    def sys_mlock(self, *_: int) -> int:
        return 0

    sys_munlock = sys_mlock
    sys_mlockall = sys_mlock
    sys_munlockall = sys_mlock
