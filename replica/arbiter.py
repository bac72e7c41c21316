"""The arbiter: the only authority on who is primary.

Its one operation is an atomic test-and-set of (vm, generation) -> node: `claim(vm, g, node)` succeeds
for exactly one node, and only if g is the next generation (the highest claimed so far plus one, or 1).
A backup that suspects its primary claims g+1; a primary that loses its backup claims g+1 for itself
before it releases output unprotected. Whoever loses stops its VM. A node that comes back with an old
generation sees that someone holds a newer one and stays fenced.

`SqliteArbiter` is the default for one machine: a SQLite database file that every node of the machine
opens. SQLite's write lock (BEGIN IMMEDIATE) makes read-max-then-insert atomic across processes, and the
file outlives any node's crash. A cross-machine arbiter (etcd) implements the same interface.

Opening a fresh file from several processes at once: switching it to WAL needs an exclusive lock, and
SQLite answers "database is locked" there at once, without its busy handler (which would deadlock two
readers upgrading). So the switch is retried, after a short random back-off, until `timeout_s`. WAL is a
property of the file: once switched, later connections need no pragma for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from monitor.errors import ArbiterError

log = logging.getLogger(__name__)


class ArbiterUnavailable(ArbiterError):
    """The arbiter's database could not be opened, or failed a query."""

    hint = "check that the --arbiter file is on a local, writable file system"


@dataclass(frozen=True)
class Claim:
    vm: str
    generation: int
    node: str
    claimed_at: float


class Arbiter(Protocol):
    def claim(self, vm: str, generation: int, node: str) -> bool:
        """Atomically make `node` the primary of `vm` in `generation`; False if anyone (including this
        node) already holds that generation or a newer one, or if `generation` skips one."""
        ...

    def current(self, vm: str) -> Claim | None:
        """The newest claim for `vm`."""
        ...


def _busy(err: sqlite3.OperationalError) -> bool:
    text = str(err)
    return "locked" in text or "busy" in text


class SqliteArbiter:
    def __init__(self, path: str | Path, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout_s
        self._initialise()

    def _initialise(self) -> None:
        """WAL mode and the table, retried while other processes do the same (see the module's doc)."""
        deadline = time.monotonic() + self._timeout
        while True:
            db = self._connect()
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS claims ("
                    " vm TEXT NOT NULL, generation INTEGER NOT NULL, node TEXT NOT NULL,"
                    " claimed_at REAL NOT NULL,"
                    " PRIMARY KEY (vm, generation))"
                )
                return
            except sqlite3.OperationalError as err:
                if not _busy(err) or time.monotonic() > deadline:
                    raise ArbiterUnavailable(f"arbiter {self.path}: {err}") from err
                log.debug("arbiter %s busy while opening (%s): retrying", self.path, err)
            finally:
                db.close()
            time.sleep(random.uniform(0.001, 0.02))

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as err:
            raise ArbiterUnavailable(f"arbiter {self.path}: {err}") from err
        return db

    def claim(self, vm: str, generation: int, node: str) -> bool:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT MAX(generation) FROM claims WHERE vm = ?", (vm,)).fetchone()
            newest = row[0] if row and row[0] is not None else 0
            if generation != newest + 1:
                db.execute("ROLLBACK")
                return False
            db.execute(
                "INSERT INTO claims (vm, generation, node, claimed_at) VALUES (?, ?, ?, ?)",
                (vm, generation, node, time.time()),
            )
            db.execute("COMMIT")
            return True
        except sqlite3.Error as err:
            raise ArbiterUnavailable(f"arbiter {self.path}: claim of {vm} failed: {err}") from err
        finally:
            db.close()

    def current(self, vm: str) -> Claim | None:
        db = self._connect()
        try:
            row = db.execute(
                "SELECT vm, generation, node, claimed_at FROM claims WHERE vm = ?"
                " ORDER BY generation DESC LIMIT 1",
                (vm,),
            ).fetchone()
        except sqlite3.Error as err:
            raise ArbiterUnavailable(f"arbiter {self.path}: {err}") from err
        finally:
            db.close()
        return Claim(row[0], int(row[1]), row[2], float(row[3])) if row else None


async def claim_or_owner(arbiter: Arbiter, vm: str, generation: int, node: str) -> str | None:
    """Claim `generation` of `vm` for `node` (off the event loop): None if this node won it, else the node
    that holds it now."""
    if await asyncio.to_thread(arbiter.claim, vm, generation, node):
        return None
    current = await asyncio.to_thread(arbiter.current, vm)
    return current.node if current else "?"


async def current_within(arbiter: Arbiter, vm: str, within_s: float) -> Claim | None:
    """The newest claim of `vm`, asked without blocking the event loop (the arbiter's own coroutine where
    it has one, else a worker thread) and waited for at most `within_s`; ArbiterUnavailable after that.
    For a status, which must answer while etcd is slow (a member cut off stalls a read for its attempt
    timeout)."""
    ask = getattr(arbiter, "current_async", None)
    pending = ask(vm) if ask is not None else _on_own_thread(arbiter.current, vm)
    try:
        return await asyncio.wait_for(pending, within_s)
    except TimeoutError as err:
        raise ArbiterUnavailable(f"the arbiter did not answer within {within_s * 1000:.0f} ms") from err


def _on_own_thread(query: Callable[[str], Claim | None], vm: str) -> asyncio.Future[Claim | None]:
    """`query(vm)` on a thread of its own: not queued behind the default executor's workers, which other
    calls may hold for seconds (a link opening to an unreachable backup waits there)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Claim | None] = loop.create_future()

    def settle(result: Claim | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = query(vm), None
        except Exception as err:  # handed to the waiting coroutine
            result, error = None, err
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="arbiter-query", daemon=True).start()
    return future
