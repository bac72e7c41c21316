"""The system-call table: number -> (name, handler), and the dispatch every `syscall` exit goes through.

A handler is the process's `sys_NAME` method: six integer arguments in, a result out (a LinuxError
becomes -errno). A number without a handler returns ENOSYS and is logged once, with its name.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable

from monitor.linux.mm import LinuxError
from monitor.linux.syscall_names import NAMES

log = logging.getLogger(__name__)

Handler = Callable[..., int]
TABLE_SIZE = 512


class SyscallTable:
    def __init__(self, process: object) -> None:
        self.process = process
        self.handlers: list[Handler | None] = [None] * TABLE_SIZE
        for number, name in NAMES.items():
            if number < TABLE_SIZE:
                self.handlers[number] = getattr(process, f"sys_{name}", None)
        self._reported: set[int] = set()
        self.counts: dict[int, int] = {}

    def implemented(self) -> list[str]:
        return sorted(NAMES[n] for n, h in enumerate(self.handlers) if h is not None and n in NAMES)

    def call(self, number: int, a0: int, a1: int, a2: int, a3: int, a4: int, a5: int) -> int:
        handler = self.handlers[number] if number < TABLE_SIZE else None
        if handler is None:
            if number not in self._reported:
                self._reported.add(number)
                log.warning(
                    "system call %s (%d) is not implemented: ENOSYS", NAMES.get(number, "unknown"), number
                )
            return -errno.ENOSYS
        try:
            return int(handler(a0, a1, a2, a3, a4, a5))
        except LinuxError as err:
            return -err.errno
        except OSError as err:  # a host operation on the guest's behalf failed: its errno is the answer
            return -(err.errno or errno.EIO)
