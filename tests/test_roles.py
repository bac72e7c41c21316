"""Roles as a state machine (replica/roles.py), without KVM: every move the table allows works, every
other move raises, and what status shows is derived from the one Standing object."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from monitor.journal import OutputKind
from proto import vmft_pb2
from replica.roles import (
    SERVING_WIRE,
    TRANSITIONS,
    IllegalTransition,
    Role,
    Standing,
    State,
    is_serving,
)
from replica.stream_sink import StreamSink

ALL_MOVES = [
    (role, source, target) for role in Role for source, target in itertools.product(TRANSITIONS[role], State)
]


def _at(role: Role, state: State) -> Standing:
    standing = Standing(role, generation=1)
    standing.state = state  # placed directly: each test checks one move from here
    return standing


@pytest.mark.parametrize("role,source,target", ALL_MOVES, ids=lambda v: getattr(v, "name", v))
def test_every_move_is_allowed_or_raises(role: Role, source: State, target: State) -> None:
    standing = _at(role, source)
    if target in TRANSITIONS[role][source]:
        standing.to(target, "why")
        assert standing.state is target and standing.message == "why"
    else:
        with pytest.raises(IllegalTransition):
            standing.to(target)
        assert standing.state is source, "a refused move changes nothing"


def test_every_role_knows_every_state_it_can_reach() -> None:
    for role, table in TRANSITIONS.items():
        reachable = set().union(*table.values())
        assert reachable <= set(table), f"{role}: {reachable - set(table)} reachable but not in the table"


def test_the_paths_a_primary_takes() -> None:
    standing = Standing(Role.PRIMARY, generation=1)
    path = [
        State.RUNNING,  # protected from the start
        State.RUNNING_UNPROTECTED,  # lost the backup, the arbiter said go on alone
        State.CONNECTING,
        State.REPROTECTING,
        State.RUNNING,  # re-protected
        State.RESTARTING,  # the guest faulted
        State.RUNNING_UNPROTECTED,
        State.CONNECTING,
        State.RUNNING_UNPROTECTED,  # the new backup refused
        State.RESTARTING,
        State.STOPPED,  # the restart failed
    ]
    for state in path:
        standing.to(state)
    with pytest.raises(IllegalTransition):
        standing.to(State.RUNNING)  # stopped for good


def test_a_backup_is_promoted_only_while_promoting() -> None:
    standing = Standing(Role.BACKUP, generation=3)
    standing.to(State.REPLAYING)
    with pytest.raises(IllegalTransition):
        standing.promote(4, "too early")
    standing.to(State.PROMOTING)
    standing.promote(4, "failover")
    assert (standing.role, standing.state, standing.generation) == (
        Role.PRIMARY,
        State.RUNNING_UNPROTECTED,
        4,
    )
    with pytest.raises(IllegalTransition):
        standing.promote(5, "twice")
    standing.to(State.CONNECTING)  # from now on it moves as a primary


def test_protection_is_derived_from_the_state() -> None:
    protected = {(Role.PRIMARY, State.RUNNING), (Role.BACKUP, State.REPLAYING)}
    for role in Role:
        for state in TRANSITIONS[role]:
            assert _at(role, state).protected == ((role, state) in protected), (role, state)


def test_every_state_has_a_wire_state_and_the_wire_role_says_stopped_at_the_end() -> None:
    assert {state.wire for state in State} <= set(vmft_pb2.VmState.values())
    assert State.CONNECTING.wire == vmft_pb2.VM_STATE_RUNNING_UNPROTECTED  # re-protecting once accepted
    assert _at(Role.PRIMARY, State.RUNNING).wire_role() == vmft_pb2.ROLE_PRIMARY
    assert _at(Role.BACKUP, State.REPLAYING).wire_role() == vmft_pb2.ROLE_BACKUP
    for state in (State.FENCED, State.STOPPED, State.FAILED):
        assert _at(Role.PRIMARY, state).wire_role() == vmft_pb2.ROLE_STOPPED
        assert _at(Role.BACKUP, state).wire_role() == vmft_pb2.ROLE_STOPPED


def test_serving_means_a_primary_running_protected_or_not() -> None:
    assert SERVING_WIRE == {vmft_pb2.VM_STATE_RUNNING, vmft_pb2.VM_STATE_RUNNING_UNPROTECTED}
    for role in (vmft_pb2.ROLE_PRIMARY, vmft_pb2.ROLE_BACKUP, vmft_pb2.ROLE_STOPPED):
        for state in [s.wire for s in State] + [vmft_pb2.VM_STATE_SUPERSEDED]:
            status = vmft_pb2.VmStatus(role=role, state=state)
            assert is_serving(status) == (role == vmft_pb2.ROLE_PRIMARY and state in SERVING_WIRE)


def test_acknowledgements_live_in_the_gate_and_a_new_gate_starts_from_zero() -> None:
    delivered: list[bytes] = []
    standing = Standing(Role.PRIMARY, generation=1)
    assert standing.acked == 0  # no gate yet
    gate = standing.new_gate(lambda kind, data: delivered.append(data))
    gate.hold(OutputKind.NET, b"reply", 10)
    standing.ack(12, replayed=9)
    assert (standing.acked, standing.replayed, delivered) == (12, 9, [b"reply"])
    assert gate.released_position == 10
    # A restart's new machine: acknowledgements start again (they never exceed the new position), but the
    # newest reply clients saw is still known (the next restart replays at least up to it).
    gate2 = standing.new_gate(lambda kind, data: None)
    assert standing.gate is gate2 and standing.acked == 0 and gate2.released_position == 10


def test_a_backup_reports_what_it_received() -> None:
    standing = Standing(Role.BACKUP, generation=1)
    standing.received = 77
    assert standing.acked == 77


async def test_running_alone_releases_the_gate_and_drops_the_log_for_the_peer() -> None:
    delivered: list[bytes] = []
    standing = Standing(Role.PRIMARY, generation=2)
    gate = standing.new_gate(lambda kind, data: delivered.append(data))
    gate.hold(OutputKind.NET, b"held", 5)
    sink = StreamSink(asyncio.get_running_loop())
    standing.run_alone(sink)
    assert delivered == [b"held"] and gate.unprotected and sink.discard
    gate.hold(OutputKind.NET, b"later", 6)
    assert delivered == [b"held", b"later"]
