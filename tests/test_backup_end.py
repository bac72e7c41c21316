"""The backup's end of the replication stream (replica/replication.py: ReplicationServer, _BackupEnd) in
the test's event loop, driven by real ClientStreams (in asyncio.to_thread) over loopback, plaintext and mTLS.
`accept` answers with a fake backup VM (recording what the stream's thread gave it), a refusal or a denial;
`detach` runs the failover coroutine on the loop and records it. Every wait is bounded; "no failover" is
asserted once `server.close()` joined the stream threads and the loop ran what they scheduled."""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from monitor.checkpoint import RecordType
from monitor.kvm import KvmError
from replica.arbiter import ArbiterUnavailable
from proto import vmft_pb2
from replica import authz, native_stream, replication, tls
from replica.arbiter import SqliteArbiter
from replica.native_stream import ClientStream, ServerStream
from replica.replication import STREAM_METHOD, ReplicationServer
from replica.vm_common import PROTOCOL_VERSION, NodeSettings

pytestmark = pytest.mark.skipif(
    not native_stream.LIBRARY.exists(), reason=f"{native_stream.LIBRARY} not built (scripts/setup)"
)

WAIT = 10.0  # the bound on any one wait that should succeed at once
SEEDED_AT = 1000  # the fake checkpoint's position
HEADER, CHUNK, MANIFEST = (bytes([kind]) + b"record" for kind in RecordType)
DROPPED = ("the primary's connection dropped", False)


@dataclass
class FakeVm:
    """What _BackupEnd calls on a BackupVm; records the batches, seeding, failure and failovers."""

    name: str
    primary_node: str
    refuse_log: bool = False  # on_batch returns False
    seed_error: Exception | None = None  # start_from_checkpoint raises it
    batch_error: Exception | None = None  # on_batch raises it
    standing: Any = field(default_factory=lambda: SimpleNamespace(received=0))
    checkpoint_records: list[bytes] = field(default_factory=list)
    batches: list[vmft_pb2.EventBatch] = field(default_factory=list)
    seeded: list[list[bytes]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lost: list[tuple[str, bool]] = field(default_factory=list)

    def ack(self) -> vmft_pb2.BackupMessage:
        return vmft_pb2.BackupMessage(ack=vmft_pb2.Ack(received=self.standing.received))

    def following(self) -> bool:
        return not self.failed

    def on_batch(self, batch: vmft_pb2.EventBatch, size: int) -> bool:
        self.batches.append(batch)
        if self.batch_error is not None:
            raise self.batch_error
        self.standing.received = max(self.standing.received, batch.horizon, batch.end_position)
        return not self.refuse_log

    async def start_from_checkpoint(self) -> SimpleNamespace:
        if self.seed_error is not None:
            raise self.seed_error
        self.seeded.append(self.checkpoint_records)
        self.checkpoint_records, self.standing.received = [], SEEDED_AT
        return SimpleNamespace(raw_bytes=3 << 20, seconds=0.01)

    async def fail(self, message: str) -> None:
        self.failed.append(message)

    async def primary_lost(self, reason: str, silent: bool = False) -> None:
        self.lost.append((reason, silent))


class Primary:
    """A primary's end: a ClientStream driven from worker threads."""

    def __init__(self, stream: ClientStream) -> None:
        self.stream = stream

    async def send(self, message: vmft_pb2.PrimaryMessage | bytes) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        write = lambda: self.stream.send_done(WAIT) == 1 and self.stream.start_send(data)  # noqa: E731
        assert await asyncio.to_thread(write), "the stream refused a write"

    async def recv(self) -> vmft_pb2.BackupMessage | None:
        data = await asyncio.to_thread(self.stream.recv, WAIT)
        return None if data is None else vmft_pb2.BackupMessage.FromString(data)

    async def ack(self) -> int:
        message = await self.recv()
        assert message is not None and message.HasField("ack"), message
        return message.ack.received

    async def hello(self, name: str = "vm1", **fields: Any) -> vmft_pb2.HelloReply:
        await self.send(vmft_pb2.PrimaryMessage(hello=hello(name, **fields)))
        message = await self.recv()
        assert message is not None and message.HasField("hello_reply"), message
        return message.hello_reply

    async def ended(self) -> str:
        """The call's status, once no more messages come."""
        assert await self.recv() is None
        return await asyncio.to_thread(self.stream.status, WAIT)


class Node:
    """A ReplicationServer with the doubles: by default each Hello gets a FakeVm(**vm_fields)."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.server = ReplicationServer(settings, self.accept, self.detach)
        self.answer: Callable[[vmft_pb2.Hello, ServerStream], Awaitable[Any]] | None = None
        self.vm_fields: dict[str, Any] = {}
        self.vms: dict[str, FakeVm] = {}
        self.callers: list[ServerStream] = []
        self.detached: list[asyncio.Task[None]] = []
        self.clients: list[Primary] = []

    async def accept(self, hello: vmft_pb2.Hello, caller: ServerStream) -> Any:
        self.callers.append(caller)
        return await self.answer(hello, caller) if self.answer is not None else self.new_vm(hello)

    def new_vm(self, hello: vmft_pb2.Hello) -> FakeVm:
        vm = self.vms[hello.spec.name] = FakeVm(hello.spec.name, hello.primary_node, **self.vm_fields)
        return vm

    def detach(self, coro: Any) -> None:
        self.detached.append(asyncio.get_running_loop().create_task(coro))

    async def connect(self, identity: tls.Identity | None = None, target: str = "") -> Primary:
        stream = await asyncio.to_thread(
            ClientStream, target or self.server.address, STREAM_METHOD, identity,
            insecure=identity is None, timeout=WAIT,
        )  # fmt: skip
        self.clients.append(Primary(stream))
        return self.clients[-1]

    async def failovers(self, count: int = 1) -> list[tuple[str, bool]]:
        """Wait (bounded) until `count` failovers were detached and ran; what the VMs were told."""
        deadline = time.monotonic() + WAIT
        while len(self.detached) < count or not all(task.done() for task in self.detached):
            assert time.monotonic() < deadline, f"{len(self.detached)} of {count} failovers detached"
            await asyncio.sleep(0.005)
        return [lost for vm in self.vms.values() for lost in vm.lost]

    async def close(self) -> None:
        await asyncio.wait_for(self.server.close(), WAIT)
        await asyncio.sleep(0.01)  # what the stream threads scheduled on the loop runs


Serve = Callable[..., Node]


def hello(name: str = "vm1", **fields: Any) -> vmft_pb2.Hello:
    spec = vmft_pb2.VmSpec(name=name)
    return vmft_pb2.Hello(protocol_version=PROTOCOL_VERSION, spec=spec, primary_node="p:1", **fields)


def batch(horizon: int, end: int = 0, ended: bool = False) -> vmft_pb2.PrimaryMessage:
    body = vmft_pb2.EventBatch(first_position=horizon, horizon=horizon, end_position=end, ended=ended)
    return vmft_pb2.PrimaryMessage(batch=body)


def heartbeat(position: int) -> vmft_pb2.PrimaryMessage:
    return vmft_pb2.PrimaryMessage(heartbeat=vmft_pb2.Heartbeat(position=position))


@pytest.fixture
async def serve(tmp_path: Path, free_port: Callable[[], int]) -> AsyncIterator[Serve]:
    """serve(**NodeSettings fields): a started node; on exit its server closed, its clients cancelled."""
    nodes: list[Node] = []

    def start(**fields: Any) -> Node:
        fields.setdefault("insecure", fields.get("identity") is None)
        nodes.append(Node(NodeSettings(name=f"127.0.0.1:{free_port()}", data_dir=tmp_path, **fields)))
        nodes[-1].server.start()
        return nodes[-1]

    yield start
    for node in nodes:
        await node.close()
        for client in node.clients:
            client.stream.cancel()


async def test_a_stream_must_begin_with_hello_in_time(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "_HELLO_WAIT_S", 0.2)
    node = serve()
    primary, mute = await node.connect(), await node.connect()
    await primary.send(heartbeat(5))
    message = await primary.recv()
    assert message is not None and not message.hello_reply.accepted
    assert message.hello_reply.reason == "the first message of a stream must be Hello"
    assert await primary.ended() == "OK"
    assert await mute.ended() == "DEADLINE_EXCEEDED: no Hello"
    assert node.callers == []


@pytest.mark.parametrize(
    "answer, status",
    [("no room", "OK"), (authz.Denied(grpc.StatusCode.PERMISSION_DENIED, "why"), "PERMISSION_DENIED: why")],
)  # fmt: skip
async def test_a_refusal_is_told_in_the_reply_a_denial_in_the_status(
    serve: Serve, answer: str | authz.Denied, status: str
) -> None:
    node = serve()

    async def refuse(hello: vmft_pb2.Hello, caller: ServerStream) -> str | authz.Denied:
        return answer

    node.answer = refuse
    primary = await node.connect()
    await primary.send(vmft_pb2.PrimaryMessage(hello=hello()))
    if isinstance(answer, str):
        reply = await primary.recv()
        expected = vmft_pb2.HelloReply(accepted=False, reason=answer, protocol_version=PROTOCOL_VERSION)
        assert reply == vmft_pb2.BackupMessage(hello_reply=expected)
    assert await primary.ended() == status  # (a denied caller gets no reply at all)
    await node.close()
    assert node.detached == []


async def test_an_accept_that_fails_tells_the_primary_why(serve: Serve) -> None:
    node = serve()

    async def broken(hello: vmft_pb2.Hello, caller: ServerStream) -> FakeVm:
        raise ArbiterUnavailable("etcd did not answer within 2 s")

    node.answer = broken
    primary = await node.connect()
    await primary.send(vmft_pb2.PrimaryMessage(hello=hello()))
    status = await primary.ended()
    assert status.startswith("UNAVAILABLE: the backup node could not take the pair: etcd did not"), status
    await node.close()
    assert node.detached == []


async def test_each_message_is_acknowledged_and_each_batch_replayed_in_order_to_the_last(
    serve: Serve,
) -> None:
    node = serve()
    primary = await node.connect()
    reply = await primary.hello(failure_timeout_ms=5000)
    assert (reply.accepted, reply.backup_node) == (True, node.settings.name)
    acks = []
    for horizon, end in [(10, 0), (20, 0), (30, 35), (40, 0)]:
        await primary.send(batch(horizon, end))
        acks.append(await primary.ack())
    await primary.send(heartbeat(40))
    acks.append(await primary.ack())
    assert acks == [10, 20, 35, 40, 40]  # `received` covers each batch, its end position included
    vm = node.vms["vm1"]
    assert [b.horizon for b in vm.batches] == [10, 20, 30, 40]  # (handed over before the next read)
    await primary.send(batch(50, 50, ended=True))  # the guest's last: the call ends OK, no failover
    assert await primary.ack() == 50
    assert await primary.ended() == "OK"
    await node.close()
    assert [b.ended for b in vm.batches] == [False] * 4 + [True]
    assert vm.lost == [] and node.detached == []


@pytest.mark.parametrize(
    "how, reason",
    [
        ("cancel", DROPPED[0]),
        ("half-close", "the primary closed the stream"),
        ("refuse", "the backup refused the log"),  # on_batch returned False
        ("garbage", "the primary sent a message that does not parse"),
    ],
)
async def test_a_stream_that_ends_mid_log_fails_over_once(serve: Serve, how: str, reason: str) -> None:
    node = serve()
    node.vm_fields = {"refuse_log": how == "refuse"}
    primary = await node.connect()
    assert (await primary.hello(failure_timeout_ms=5000)).accepted
    await primary.send(batch(10))
    assert await primary.ack() == 10  # (acknowledged on receipt, before the replay may refuse it)
    if how == "cancel":
        primary.stream.cancel()
    elif how == "half-close":
        assert await asyncio.to_thread(primary.stream.done_writing)
    elif how == "garbage":
        await primary.send(b"\xff\xff\xff\xff")
    if how != "cancel":
        assert await primary.ended() != "OK"  # the backup ends the call
    assert await node.failovers() == [(reason, False)]
    await node.close()
    assert len(node.detached) == 1


async def test_a_silent_primary_fails_over_after_the_hellos_failure_timeout(serve: Serve) -> None:
    node = serve(failure_timeout_s=0.05)
    primary = await node.connect()
    started = time.monotonic()
    assert (await primary.hello(failure_timeout_ms=200)).accepted
    await primary.send(heartbeat(0))  # (a primary that never sent a thing after Hello: the next test)
    assert await primary.ack() == 0
    [(reason, silent)] = await node.failovers()
    assert silent and reason.startswith("no word from the primary for ")
    assert time.monotonic() - started >= 0.2  # the longer timeout (the Hello's) counted
    assert await primary.ended() != "OK"


async def test_a_primary_never_heard_after_the_hello_reply_fails_the_vm_without_failover(
    serve: Serve,
) -> None:
    """Only a primary that sent something after the HelloReply depends on this backup (a primary that gave
    up before the reply runs on without it): silence or a drop before that fails the VM, never goes live."""
    node = serve(failure_timeout_s=0.05)
    quiet, dropped = await node.connect(), await node.connect()
    assert (await quiet.hello("quiet", failure_timeout_ms=100)).accepted
    assert (await dropped.hello("dropped", failure_timeout_ms=5000)).accepted
    dropped.stream.cancel()
    assert await quiet.ended() != "OK"  # the backup gave up on the silence
    await node.close()
    assert node.detached == []
    assert len(node.vms["quiet"].failed) == 1 and len(node.vms["dropped"].failed) == 1


async def test_a_huge_failure_timeout_in_the_hello_is_no_instant_silence(serve: Serve) -> None:
    node = serve()
    primary = await node.connect()
    assert (await primary.hello(failure_timeout_ms=1 << 63)).accepted
    await primary.send(heartbeat(0))
    assert await primary.ack() == 0
    for _ in range(100):  # a second without a word: nothing near the Hello's timeout
        if node.detached:
            break
        await asyncio.sleep(0.01)
    assert node.detached == []
    await node.close()
    assert node.vms["vm1"].lost == [DROPPED]  # only close ended it


@pytest.mark.parametrize(
    "records",
    [[HEADER, CHUNK, CHUNK + b"2", MANIFEST], [HEADER, MANIFEST + bytes(5 << 20)]],
)  # fmt: skip
async def test_a_checkpoint_seeds_the_vm_then_the_log_follows(serve: Serve, records: list[bytes]) -> None:
    node = serve()
    primary = await node.connect()
    assert (await primary.hello(checkpoint_follows=True)).accepted
    for data in records:
        await primary.send(vmft_pb2.PrimaryMessage(checkpoint_record=data))
    assert await primary.ack() == SEEDED_AT  # after the restore, not before
    vm = node.vms["vm1"]
    assert vm.seeded == [records] and vm.failed == []
    await primary.send(batch(SEEDED_AT + 10))
    assert await primary.ack() == SEEDED_AT + 10


@pytest.mark.parametrize("seed_error", [None, KvmError("KVM_SET_MSRS set 3 of 5")])
async def test_a_seeding_that_fails_fails_the_vm_and_aborts_without_failover(
    serve: Serve, seed_error: Exception | None
) -> None:
    node = serve()
    node.vm_fields = {"seed_error": seed_error}
    primary = await node.connect()
    assert (await primary.hello(checkpoint_follows=True)).accepted
    await primary.send(vmft_pb2.PrimaryMessage(checkpoint_record=HEADER))
    await primary.send(
        heartbeat(1) if seed_error is None else vmft_pb2.PrimaryMessage(checkpoint_record=MANIFEST)
    )
    status = await primary.ended()
    assert status.startswith("ABORTED: seeding failed: "), status
    await node.close()
    vm = node.vms["vm1"]
    assert len(vm.failed) == 1 and vm.failed[0].startswith("seeding failed: ")
    assert node.detached == [] and vm.seeded == []


async def test_an_error_handing_a_batch_over_still_fails_over(serve: Serve) -> None:
    node = serve()
    node.vm_fields = {"batch_error": OSError(errno.EACCES, "a root file is unreadable")}
    primary = await node.connect()
    assert (await primary.hello(failure_timeout_ms=5000)).accepted
    await primary.send(batch(10))
    assert await primary.ack() == 10
    assert await primary.ended() != "OK"
    await node.close()
    assert len(node.detached) == 1 and node.vms["vm1"].lost[0][0]


async def test_a_primary_gone_before_the_hello_reply_fails_the_vm_without_failover(serve: Serve) -> None:
    node = serve()
    accepting, answer = asyncio.Event(), asyncio.Event()

    async def slow(hello: vmft_pb2.Hello, caller: ServerStream) -> FakeVm:
        accepting.set()
        await answer.wait()
        return node.new_vm(hello)

    node.answer = slow
    primary = await node.connect()
    await primary.send(vmft_pb2.PrimaryMessage(hello=hello()))
    await asyncio.wait_for(accepting.wait(), WAIT)
    primary.stream.cancel()
    deadline = time.monotonic() + WAIT
    while not node.callers[0].cancelled():  # the backup knows the call ended before it answers
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    answer.set()
    await node.close()
    assert node.detached == [] and len(node.vms["vm1"].failed) == 1


async def test_two_streams_are_served_apart_and_close_ends_both(serve: Serve) -> None:
    node = serve()
    one, two = await node.connect(), await node.connect()
    assert (await one.hello("one", failure_timeout_ms=5000)).accepted
    assert (await two.hello("two", failure_timeout_ms=5000)).accepted
    for horizon in (10, 20, 30):
        await one.send(batch(horizon))
        await two.send(batch(horizon * 100))
        assert (await one.ack(), await two.ack()) == (horizon, horizon * 100)
    await two.send(heartbeat(3000))
    await one.send(heartbeat(30))
    assert (await two.ack(), await one.ack()) == (3000, 30)
    assert [b.horizon for b in node.vms["one"].batches] == [10, 20, 30]
    assert [b.horizon for b in node.vms["two"].batches] == [1000, 2000, 3000]
    await node.close()  # bounded (WAIT); it joined the stream threads, which handed the VMs over
    assert len(node.detached) == 2
    assert await one.ended() != "OK" and await two.ended() != "OK"
    assert await node.failovers(2) == [DROPPED, DROPPED]


@pytest.mark.parametrize("advertise", ["", "backup.example:7000"])
async def test_the_address_primaries_are_told(
    serve: Serve, free_port: Callable[[], int], advertise: str
) -> None:
    port = free_port()
    node = serve(replication_port=port, replication_advertise=advertise)
    assert node.server.address == (advertise or f"127.0.0.1:{port}")
    auto = serve()  # port 0: a free one
    assert re.fullmatch(r"127\.0\.0\.1:[1-9]\d*", auto.server.address)
    primary = await node.connect(target=f"127.0.0.1:{port}")  # it listens on its real port either way
    assert (await primary.hello()).accepted


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    ca = tls.init_ca(tmp_path_factory.mktemp("ca"))
    return {name: tls.issue(ca, tls.Role.NODE, name) for name in ("backup", "primary", "intruder")}


async def test_over_mutual_tls_only_the_vms_primary_per_the_arbiter_is_accepted(
    serve: Serve, ids: dict[str, tls.Identity], tmp_path: Path
) -> None:
    arbiter = SqliteArbiter(tmp_path / "arbiter.db")
    assert arbiter.claim("vm1", 1, "primary")
    node = serve(identity=ids["backup"])

    async def checked(hello: vmft_pb2.Hello, caller: ServerStream) -> Any:
        return await authz.primary_of(caller, arbiter, hello.spec.name) or node.new_vm(hello)

    node.answer = checked
    intruder = await node.connect(ids["intruder"])
    await intruder.send(vmft_pb2.PrimaryMessage(hello=hello()))
    status = await intruder.ended()
    assert status == "PERMISSION_DENIED: intruder is not the primary of vm1 (the arbiter says primary)"
    assert node.vms == {}
    primary = await node.connect(ids["primary"])
    assert (await primary.hello()).accepted
    await primary.send(batch(10))
    assert await primary.ack() == 10
    assert tls.peer_identity(node.callers[-1]) == tls.Peer("primary", tls.Role.NODE)
