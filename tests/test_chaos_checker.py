"""The campaign's split-brain check without nodes: which serving primaries could release output."""

from __future__ import annotations

import pytest

from proto import vmft_pb2
from replica.chaos import PairController

RUNNING = vmft_pb2.VM_STATE_RUNNING
ALONE = vmft_pb2.VM_STATE_RUNNING_UNPROTECTED


def primary(generation: int, state: int, protected: bool) -> vmft_pb2.VmStatus:
    return vmft_pb2.VmStatus(
        name="vm1", role=vmft_pb2.ROLE_PRIMARY, generation=generation, state=state, protected=protected
    )


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        # The old primary, still protected in generation 2, read before the takeover reached it: it holds
        # every output (its backup acknowledges nothing more), so only the new primary counts.
        ({"a": primary(2, RUNNING, True), "b": primary(3, ALONE, False)}, ["b"]),
        # Two primaries of one generation: split brain.
        ({"a": primary(3, ALONE, False), "b": primary(3, ALONE, False)}, ["a", "b"]),
        # An unprotected primary releases on its own claim: an older one beside a newer is split brain.
        ({"a": primary(2, ALONE, False), "b": primary(3, RUNNING, True)}, ["a", "b"]),
        # A backup is not a primary; a stopped primary does not serve.
        (
            {
                "a": vmft_pb2.VmStatus(name="vm1", role=vmft_pb2.ROLE_BACKUP, generation=3),
                "b": primary(3, RUNNING, True),
                "c": vmft_pb2.VmStatus(name="vm1", role=vmft_pb2.ROLE_STOPPED, generation=2),
            },
            ["b"],
        ),
    ],
)
def test_primaries_that_could_release_output(
    monkeypatch: pytest.MonkeyPatch, statuses: dict[str, vmft_pb2.VmStatus], expected: list[str]
) -> None:
    controller = object.__new__(PairController)
    monkeypatch.setattr(controller, "statuses", lambda timeout=0.5: statuses)
    assert sorted(controller.serving_primaries()) == expected
