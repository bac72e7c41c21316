"""Block device: a disk image file on the host, sector reads and writes straight into guest memory.

Disk contents are replicated state, not input: both sides hold the same image and apply the same
writes, so a request completes inside its own exit and its completion interrupt is a function of
guest state (raised directly, never logged).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable

from monitor.devices.base import DeviceContext, check_buffer, complete, read_request, set_arg64
from monitor.errors import DiskError
from monitor.journal import EventKind, JournalMode
from monitor.guest_abi import SECTOR_SIZE, BlockOp, Port, Status, Vector

log = logging.getLogger(__name__)

MAX_BLOCK_REQUEST = 4 << 20
WRITE_TRACK_BLOCK = 4096  # granularity of the written-ranges tracking for checkpoints (8 sectors)


class DiskImage:
    """An open disk image file: the block device's backing store. Opened by the VM builder before any
    KVM resource, so a bad disk fails the build with nothing else to undo."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DiskError(f"cannot open disk image {path}: {err.strerror}") from err
        size = os.fstat(fd).st_size
        if size % SECTOR_SIZE:
            os.close(fd)
            raise DiskError(f"disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")
        self.fd: int | None = fd
        self.sectors = size // SECTOR_SIZE

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Block:
    name = "block"

    def __init__(self, ctx: DeviceContext, disk: DiskImage | None) -> None:
        self._ctx = ctx
        self._disk = disk
        self.path = disk.path if disk is not None else None
        self._fd: int | None = disk.fd if disk is not None else None
        self.sectors = disk.sectors if disk is not None else 0
        self.fail_writes = False  # fault injection: writes return EIO
        # Checkpoints: per consumer, one byte per WRITE_TRACK_BLOCK of the disk the guest wrote.
        self._written: dict[str, bytearray] = {}

    def out_ports(self) -> dict[Port, Callable[[int], None]]:
        return {Port.BLOCK: self._request, Port.BLOCK_INFO: self._info}

    def in_ports(self) -> dict[Port, Callable[[], int]]:
        return {}

    def _info(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None:
            return
        set_arg64(self._ctx, req, self.sectors)
        complete(self._ctx, req, Status.OK if self._fd is not None else Status.ENODEV)

    def _request(self, block: int) -> None:
        req = read_request(self._ctx, block)
        if req is None:
            return
        if self._fd is None:
            complete(self._ctx, req, Status.ENODEV)
            return
        try:
            op = BlockOp(req.arg)
        except ValueError:
            self._ctx.guest_fault(f"block: unknown operation {req.arg}")
            complete(self._ctx, req, Status.EINVAL)
            return
        if op is BlockOp.FLUSH:
            os.fsync(self._fd)
            complete(self._ctx, req, Status.OK)
            self._ctx.interrupts.raise_irq(Vector.BLOCK)
            return
        if not check_buffer(self._ctx, req, f"block {op.name.lower()}"):
            return
        if req.len % SECTOR_SIZE or req.len > MAX_BLOCK_REQUEST:
            self._ctx.guest_fault(f"block: length {req.len} is not a multiple of {SECTOR_SIZE} up to 4 MiB")
            complete(self._ctx, req, Status.EINVAL)
            return
        if req.arg64 + req.len // SECTOR_SIZE > self.sectors:
            self._ctx.guest_fault(f"block: sectors {req.arg64}+{req.len // SECTOR_SIZE} past the disk end")
            complete(self._ctx, req, Status.EINVAL)
            return
        offset = req.arg64 * SECTOR_SIZE
        if op is BlockOp.READ:
            try:
                self._ctx.memory.write(req.addr, os.pread(self._fd, req.len, offset))
            except OSError as err:
                log.error("block read at sector %d failed: %s", req.arg64, err)
                complete(self._ctx, req, Status.EIO)
            else:
                complete(self._ctx, req, Status.OK, req.len)
        else:
            fd, addr, length = self._fd, req.addr, req.len

            def write() -> int:
                if self.fail_writes:
                    return errno.EIO
                if self._written:
                    self._mark_written(offset, length)
                try:
                    os.pwrite(fd, self._ctx.memory.view(addr, length), offset)
                except OSError as err:
                    log.error("block write at sector %d failed: %s", offset // SECTOR_SIZE, err)
                    return err.errno or errno.EIO
                return 0

            # A write's outcome is an input: a host disk can fail on one side only. The backup applies
            # the write itself when the primary's succeeded, and fails it when the primary's failed.
            journal = self._ctx.journal
            outcome = journal.value(EventKind.DISK_WRITE, write)
            if journal.mode is JournalMode.REPLAY and outcome == 0 and write() != 0:
                log.error("block write failed here but not on the primary: this disk now differs")
            if outcome:
                complete(self._ctx, req, Status.EIO)
            else:
                complete(self._ctx, req, Status.OK, req.len)
        self._ctx.interrupts.raise_irq(Vector.BLOCK)

    # ----- checkpoints: which parts of the disk the guest wrote --------------------------------

    @property
    def size(self) -> int:
        return self.sectors * SECTOR_SIZE

    def _mark_written(self, offset: int, length: int) -> None:
        first = offset // WRITE_TRACK_BLOCK
        last = (offset + length - 1) // WRITE_TRACK_BLOCK
        ones = b"\x01" * (last - first + 1)
        for written in self._written.values():
            written[first : last + 1] = ones

    def track_writes(self, name: str) -> None:
        """Start (or restart) a consumer of written ranges with nothing written so far."""
        blocks = (self.size + WRITE_TRACK_BLOCK - 1) // WRITE_TRACK_BLOCK
        self._written[name] = bytearray(blocks)

    def untrack_writes(self, name: str) -> None:
        self._written.pop(name, None)

    def take_written(self, name: str) -> list[tuple[int, int]]:
        """Byte ranges (offset, length) written since this consumer last took them, merged and sorted.
        Call with the vCPU paused (writes happen on the vCPU thread)."""
        written = self._written[name]
        self._written[name] = bytearray(len(written))
        ranges: list[tuple[int, int]] = []
        index = written.find(1)
        while index != -1:
            end = written.find(0, index)
            if end == -1:
                end = len(written)
            start = index * WRITE_TRACK_BLOCK
            ranges.append((start, min(end * WRITE_TRACK_BLOCK, self.size) - start))
            index = written.find(1, end)
        return ranges

    def close(self) -> None:
        self._fd = None
        if self._disk is not None:
            self._disk.close()
