"""The arbiter (replica/arbiter.py), without KVM: one winner per generation, generations in order, the
newest claim visible to everyone, across threads and processes sharing one file."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from pathlib import Path

import pytest

from monitor.errors import ArbiterError
from replica.arbiter import ArbiterUnavailable, SqliteArbiter, claim_or_owner


def test_generations_are_claimed_in_order_and_once(tmp_path: Path) -> None:
    arbiter = SqliteArbiter(tmp_path / "arbiter.sqlite")
    assert arbiter.current("vm1") is None
    assert not arbiter.claim("vm1", 2, "a"), "a generation may not be skipped"
    assert arbiter.claim("vm1", 1, "a")
    assert not arbiter.claim("vm1", 1, "b"), "each generation has exactly one owner"
    assert not arbiter.claim("vm1", 1, "a"), "not even its owner claims it twice"
    assert arbiter.claim("vm1", 2, "b")
    current = arbiter.current("vm1")
    assert current is not None and (current.vm, current.generation, current.node) == ("vm1", 2, "b")
    assert arbiter.current("vm2") is None and arbiter.claim("vm2", 1, "a"), "VMs are independent"


def test_the_file_outlives_the_object(tmp_path: Path) -> None:
    SqliteArbiter(tmp_path / "arbiter.sqlite").claim("vm1", 1, "a")
    current = SqliteArbiter(tmp_path / "arbiter.sqlite").current("vm1")
    assert current is not None and current.node == "a"


def test_one_winner_among_threads(tmp_path: Path) -> None:
    path = tmp_path / "arbiter.sqlite"
    SqliteArbiter(path).claim("vm1", 1, "first")
    start = threading.Barrier(8)
    won: list[str] = []

    def contend(node: str) -> None:
        arbiter = SqliteArbiter(path)
        start.wait()
        if arbiter.claim("vm1", 2, node):
            won.append(node)

    threads = [threading.Thread(target=contend, args=(f"n{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1
    current = SqliteArbiter(path).current("vm1")
    assert current is not None and current.node == won[0] and current.generation == 2


def _open_and_claim(path: str, node: str, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    SqliteArbiter(path).claim("vm1", 1, node)  # raises (exit code 1) if the fresh file cannot be opened


def test_processes_open_a_fresh_file_at_once(tmp_path: Path) -> None:
    for round_ in range(10):  # the race is narrow: several fresh files
        path = str(tmp_path / f"arbiter{round_}.sqlite")
        context = multiprocessing.get_context("fork")
        start = context.Barrier(4)
        processes = [context.Process(target=_open_and_claim, args=(path, f"n{i}", start)) for i in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert [p.exitcode for p in processes] == [0, 0, 0, 0], f"round {round_}"
        current = SqliteArbiter(path).current("vm1")
        assert current is not None and current.generation == 1


async def test_claim_or_owner_says_who_holds_it(tmp_path: Path) -> None:
    arbiter = SqliteArbiter(tmp_path / "arbiter.sqlite")
    assert await claim_or_owner(arbiter, "vm1", 1, "a") is None
    assert await claim_or_owner(arbiter, "vm1", 1, "b") == "a"
    assert await asyncio.to_thread(arbiter.claim, "vm1", 2, "b")


def test_an_unusable_file_is_an_arbiter_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-database").write_bytes(b"this is no SQLite file" * 100)
    with pytest.raises(ArbiterUnavailable) as caught:
        SqliteArbiter(tmp_path / "not-a-database")
    assert isinstance(caught.value, ArbiterError) and "not-a-database" in str(caught.value)
