"""Input moderation (replica/input_hold.py, monitor/machine.py `input_hold`): a protected guest's input
gathers while its replies wait for the backup, a lone client is never held, and the real kv guest in a
Machine takes held input only once the hold ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.devices.net import NetBackend, NetMessage, deliver_tx, pack_messages
from monitor.guest_abi import NetKind
from monitor.journal import OutputKind
from replica.input_hold import InputHold
from replica.kv_client import KvClient
from replica.output_gate import OutputGate
from tests.test_nic import serve_kv, shutdown


def _pair() -> tuple[OutputGate, NetBackend, InputHold]:
    backend = NetBackend()
    gate = OutputGate(lambda kind, data: deliver_tx(backend, data))
    hold = InputHold(gate, backend, held_max_s=0.001, settle_max_s=10.0)
    gate.before_release, gate.after_release = hold.releasing, hold.released
    return gate, backend, hold


def _replies(*conns: int) -> bytes:
    return pack_messages([NetMessage(conn, NetKind.DATA, b"OK") for conn in conns])


def _request(conn: int) -> NetMessage:
    return NetMessage(conn, NetKind.DATA, b"GET k")


def test_input_waits_while_replies_are_held_then_until_their_clients_are_back() -> None:
    gate, backend, hold = _pair()
    assert hold() == 0.0  # nothing held, nothing released: input goes to the guest at once
    gate.hold(OutputKind.NET, _replies(1, 2, 3), position=10)
    backend.push(_request(4))  # another client's request, while three replies wait for the backup
    assert hold() == pytest.approx(0.001)
    gate.ack(10)  # the backup holds the log: three replies go out, their clients will come back
    assert backend.tx_messages == 3
    for conn in (1, 2):
        assert hold() > 0
        backend.push(_request(conn))
    assert hold() > 0, "two of the three released clients are back"
    backend.push(_request(3))
    assert hold() == 0.0


def test_a_client_that_answers_while_the_release_is_still_going_out_counts() -> None:
    gate, backend, hold = _pair()
    deliver = gate._deliver

    def deliver_and_answer(kind: OutputKind, data: bytes) -> None:
        deliver(kind, data)
        backend.push(_request(1))  # its client answers before the gate's release has ended

    gate._deliver = deliver_and_answer
    gate.hold(OutputKind.NET, _replies(1), position=3)
    gate.ack(3)
    assert hold() == 0.0, "the one released client is back: nothing to wait for"


def test_a_lone_client_is_never_held() -> None:
    gate, backend, hold = _pair()
    for _ in range(3):
        gate.hold(OutputKind.NET, _replies(1), position=backend.tx_messages + 1)
        gate.ack(backend.tx_messages + 1)
        backend.push(_request(1))  # its next request, after its reply
        assert hold() == 0.0


def test_the_settling_wait_is_bounded_and_an_unprotected_primary_holds_nothing() -> None:
    gate, backend, hold = _pair()
    hold.settle_max_s = 0.02
    gate.hold(OutputKind.NET, _replies(1, 2), position=5)
    gate.ack(5)
    assert hold() > 0  # no client back yet
    time.sleep(0.03)
    assert hold() == 0.0  # they may never come: the guest is not kept waiting for them
    gate.hold(OutputKind.NET, _replies(1), position=6)
    assert hold() > 0
    gate.release_unprotected()  # the arbiter confirmed this primary alone: no backup to wait for
    assert hold() == 0.0


@pytest.mark.kvm
async def test_the_guest_takes_held_input_only_when_the_hold_ends(guest_image: Callable[[str], Path]) -> None:
    machine, server, address = await serve_kv(guest_image("kv"))
    holding = True
    machine.input_hold = lambda: 10.0 if holding else 0.0  # (the machine bounds each hold: 5 ms)
    try:
        async with KvClient([address], client_id="held", timeout=5) as kv:
            for _ in range(3):
                began = time.monotonic()
                await kv.set("k", "v")  # the guest's WAIT held the request back for the machine's bound
                assert time.monotonic() - began >= 0.004
            holding = False
            machine.recheck_input_hold()
            for n in range(20):
                await kv.set("k", str(n))
            assert await kv.get("k") == "19"
        assert machine.guest_faults == []
    finally:
        machine.input_hold = None
        await shutdown(machine, server)
