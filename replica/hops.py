"""Per-hop timestamps of the replication path, for benchmarks only (off unless VMFT_HOPS names a directory).

Each process appends `name key ns` lines to `$VMFT_HOPS/<pid>.hops`: `key` is a log position (an output's,
or a batch's horizon, or an acknowledged position) and `ns` is CLOCK_MONOTONIC, which all processes on one
host share, so that the primary's and the backup's records can be joined by position
(scripts/bench_replication.py --hops). Off, `hop` is one global test.
"""

from __future__ import annotations

import os
import threading
import time

_DIR = os.environ.get("VMFT_HOPS", "")
ENABLED = bool(_DIR)
_lock = threading.Lock()
_buffer: list[str] = []


def hop(name: str, key: int) -> None:
    """Note that `name` happened for position `key` now (any thread)."""
    if not ENABLED:
        return
    line = f"{name} {key} {time.monotonic_ns()}\n"
    with _lock:
        _buffer.append(line)
        if len(_buffer) < 256:
            return
        lines = "".join(_buffer)
        _buffer.clear()
        # Written under the lock: one writer at a time keeps lines whole.
        with open(os.path.join(_DIR, f"{os.getpid()}.hops"), "a") as out:
            out.write(lines)


def flush() -> None:
    if not ENABLED:
        return
    with _lock:
        lines = "".join(_buffer)
        _buffer.clear()
        if lines:
            with open(os.path.join(_DIR, f"{os.getpid()}.hops"), "a") as out:
                out.write(lines)
