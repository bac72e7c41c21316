"""A directory of periodic checkpoints of one VM, and its retention: a full checkpoint, then incrementals
against the one before, a new full one every `full_every`; older chains pruned."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monitor.checkpoint.format import SUFFIX
from monitor.checkpoint.take import Checkpointer, CheckpointStats


@dataclass
class SavedCheckpoint:
    path: Path
    checkpoint_id: str
    incremental: bool
    saved_at: float  # time.monotonic() when it was complete
    position: int


class CheckpointStore:
    """Periodic checkpoints of one VM in a directory: a full one, then incrementals against the one
    before, a new full one every `full_every`; older chains pruned (the last `keep_chains` kept)."""

    def __init__(self, directory: str | Path, full_every: int = 10, keep_chains: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.full_every = full_every
        self.keep_chains = keep_chains
        self._seq = max((self._seq_of(p) for p in self.directory.glob(f"*{SUFFIX}")), default=0)
        self._since_full = 0
        self.bad: set[str] = set()  # checkpoint ids a restart found faulty (restart.py)
        self.saved: list[SavedCheckpoint] = []  # oldest first

    @staticmethod
    def _seq_of(path: Path) -> int:
        head = path.name.split("-", 1)[0]
        return int(head) if head.isdigit() else 0

    def save(
        self, checkpointer: Checkpointer, on_paused: Callable[[int], None] | None = None
    ) -> CheckpointStats:
        full = not checkpointer.last_id or self._since_full + 1 >= self.full_every
        self._seq += 1
        kind = "full" if full else "incr"
        path = self.directory / f"{self._seq:06d}-{kind}{SUFFIX}"
        stats = checkpointer.save(path, full=full, on_paused=on_paused)
        self._since_full = 0 if not stats.incremental else self._since_full + 1
        self.saved.append(
            SavedCheckpoint(path, stats.checkpoint_id, stats.incremental, time.monotonic(), stats.position)
        )
        self._prune()
        return stats

    def _prune(self) -> None:
        fulls = [i for i, saved in enumerate(self.saved) if not saved.incremental]
        if len(fulls) <= self.keep_chains:
            return
        cut = fulls[-self.keep_chains]
        for saved in self.saved[:cut]:
            saved.path.unlink(missing_ok=True)
        self.saved = self.saved[cut:]

    def find(self, checkpoint_id: str) -> SavedCheckpoint | None:
        for saved in self.saved:
            if saved.checkpoint_id == checkpoint_id:
                return saved
        return None

    def latest(self) -> Path | None:
        """The newest checkpoint not marked bad."""
        entry = self.latest_entry()
        return entry.path if entry is not None else None

    def latest_entry(self, before: float | None = None) -> SavedCheckpoint | None:
        """The newest checkpoint not marked bad, complete by time.monotonic() `before` if given."""
        for saved in reversed(self.saved):
            if saved.checkpoint_id in self.bad or not saved.path.exists():
                continue
            if before is None or saved.saved_at <= before:
                return saved
        return None

    def mark_bad(self, checkpoint_id: str) -> None:
        self.bad.add(checkpoint_id)

    def rewind_to(self, checkpoint_id: str) -> None:
        """The VM was restored from `checkpoint_id`: later checkpoints belong to a timeline that no
        longer exists; forget them (and remove their files)."""
        for index, saved in enumerate(self.saved):
            if saved.checkpoint_id == checkpoint_id:
                for dead in self.saved[index + 1 :]:
                    dead.path.unlink(missing_ok=True)
                del self.saved[index + 1 :]
                return
