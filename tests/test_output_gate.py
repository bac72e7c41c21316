"""The output rule's gate (replica/output_gate.py), without KVM: an output becomes visible only once the
backup holds the log up to its position, in order, and at once when the primary runs alone."""

from __future__ import annotations

import threading

from monitor.journal import OutputKind
from replica.output_gate import OutputGate


def _gate() -> tuple[OutputGate, list[tuple[OutputKind, bytes]]]:
    seen: list[tuple[OutputKind, bytes]] = []
    return OutputGate(lambda kind, data: seen.append((kind, data))), seen


def test_outputs_wait_for_the_acknowledgement_that_covers_them() -> None:
    gate, seen = _gate()
    gate.hold(OutputKind.NET, b"a", 5)
    gate.hold(OutputKind.NET, b"b", 9)
    assert seen == [] and gate.held == 2
    gate.ack(4)
    assert seen == []
    gate.ack(5)
    assert seen == [(OutputKind.NET, b"a")] and gate.held == 1
    gate.ack(20)
    assert [data for _, data in seen] == [b"a", b"b"] and gate.held == 0
    assert gate.released == 2 and gate.released_position == 9


def test_an_output_already_covered_goes_out_at_once_but_never_before_older_held_ones() -> None:
    gate, seen = _gate()
    gate.ack(10)
    gate.hold(OutputKind.NET, b"covered", 8)
    assert seen == [(OutputKind.NET, b"covered")]
    gate.hold(OutputKind.NET, b"later", 15)
    gate.hold(OutputKind.NET, b"also covered", 9)  # positions only grow in practice; order still holds
    assert [data for _, data in seen] == [b"covered"], "nothing overtakes a held output"


def test_acknowledgements_never_go_backwards() -> None:
    gate, seen = _gate()
    gate.ack(10)
    gate.ack(3)
    assert gate.acked == 10
    gate.hold(OutputKind.NET, b"x", 7)
    assert seen == [(OutputKind.NET, b"x")]


def test_alone_releases_everything_held_and_everything_later() -> None:
    gate, seen = _gate()
    gate.hold(OutputKind.NET, b"a", 5)
    gate.hold(OutputKind.CONSOLE, b"log line", 6)
    gate.release_unprotected()
    assert [data for _, data in seen] == [b"a", b"log line"]
    gate.hold(OutputKind.NET, b"b", 100)
    assert seen[-1] == (OutputKind.NET, b"b") and gate.held == 0


def test_protected_again_from_the_checkpoint_position() -> None:
    gate, seen = _gate()
    gate.release_unprotected()
    gate.protect_again(50)
    gate.hold(OutputKind.NET, b"before", 50)  # the new backup holds everything up to its checkpoint
    gate.hold(OutputKind.NET, b"after", 51)
    assert [data for _, data in seen] == [b"before"]
    gate.ack(51)
    assert [data for _, data in seen] == [b"before", b"after"]


def test_only_network_outputs_count_as_seen_by_clients() -> None:
    gate, _ = _gate()
    gate.release_unprotected()
    gate.hold(OutputKind.NET, b"reply", 10)
    gate.hold(OutputKind.CONSOLE, b"diagnostic", 30)
    assert gate.released_position == 10


def test_outputs_from_one_thread_and_acks_from_another_stay_in_order() -> None:
    gate, seen = _gate()
    count = 2000

    def vcpu() -> None:
        for position in range(1, count + 1):
            gate.hold(OutputKind.NET, str(position).encode(), position)

    thread = threading.Thread(target=vcpu)
    thread.start()
    for position in range(0, count + 1, 7):
        gate.ack(position)
    thread.join(10)
    gate.ack(count)
    assert [int(data) for _, data in seen] == list(range(1, count + 1))
