"""The arbiter on a real etcd (replica/etcd_arbiter.py): the SqliteArbiter's semantics, one winner per
generation under races from many tasks and processes, and claims that keep working when a member of a
three-member cluster dies or hangs."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replica.arbiter import ArbiterUnavailable, SqliteArbiter, claim_or_owner
from replica.etcd_arbiter import EtcdArbiter
from replica.etcd_client import EtcdClient, EtcdError
from replica.etcd_server import EtcdCluster, EtcdTls

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd1"), 1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path, 3) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def arbiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteArbiter | EtcdArbiter]:
    if request.param == "sqlite":
        yield SqliteArbiter(tmp_path / "arbiter.sqlite")
        return
    cluster: EtcdCluster = request.getfixturevalue("etcd1")
    arb = EtcdArbiter(cluster.endpoints, prefix=f"/t/{tmp_path.name}")
    yield arb
    arb.close()


def test_same_semantics_as_the_sqlite_arbiter(arbiter: SqliteArbiter | EtcdArbiter) -> None:
    assert arbiter.current("vm") is None
    assert not arbiter.claim("vm", 0, "n1"), "generation 0 is never claimable"
    assert not arbiter.claim("vm", 2, "n1"), "a claim may not skip a generation"
    assert arbiter.claim("vm", 1, "n1")
    assert not arbiter.claim("vm", 1, "n2"), "a generation has one owner"
    assert not arbiter.claim("vm", 1, "n1"), "not even its owner wins it twice"
    assert arbiter.claim("vm", 2, "n2")
    current = arbiter.current("vm")
    assert current is not None and (current.vm, current.generation, current.node) == ("vm", 2, "n2")
    assert not arbiter.claim("vm", 2, "n1"), "old generations stay fenced"
    assert not arbiter.claim("vm", 1, "n1"), "old generations stay fenced"
    assert arbiter.current("other") is None and arbiter.claim("other", 1, "n1")


async def test_claim_or_owner_through_either_arbiter(arbiter: SqliteArbiter | EtcdArbiter) -> None:
    """The nodes' helper (a claim off the event loop, then the owner) works the same on both."""
    assert await claim_or_owner(arbiter, "vm", 1, "n1") is None
    assert await claim_or_owner(arbiter, "vm", 2, "n2") is None
    assert await claim_or_owner(arbiter, "vm", 2, "n1") == "n2"


async def test_every_vms_claim_for_a_cluster_status(etcd1: EtcdCluster, tmp_path: Path) -> None:
    arb = EtcdArbiter(etcd1.endpoints, prefix=f"/t/{tmp_path.name}")
    try:
        assert await arb.claims_async() == []
        for vm, node in (("b", "n1"), ("a", "n2"), ("b", "n3")):
            current = await arb.current_async(vm)
            assert await arb.claim_async(vm, (current.generation if current else 0) + 1, node)
        claims = await arb.claims_async()
        assert [(c.vm, c.generation, c.node) for c in claims] == [("a", 1, "n2"), ("b", 2, "n3")]
    finally:
        await arb.aclose()


async def test_claims_race_from_many_tasks(etcd1: EtcdCluster, tmp_path: Path) -> None:
    """Twenty tasks (ten nodes, two tasks each: a node racing itself too) claim every generation at once."""
    arb = EtcdArbiter(etcd1.endpoints, prefix=f"/t/{tmp_path.name}")
    try:
        for generation in range(1, 16):
            nodes = [f"n{i % 10}" for i in range(20)]
            won = await asyncio.gather(*(arb.claim_async("vm", generation, n) for n in nodes))
            assert sum(won) == 1, f"generation {generation}: {sum(won)} winners"
            current = await arb.current_async("vm")
            assert current is not None and current.generation == generation
            assert current.node == nodes[won.index(True)]
    finally:
        await arb.aclose()


# Each racer claims generations 1..N in order at a common start time and prints the ones it won.
RACER = textwrap.dedent(
    """
    import json, sys, time
    from replica.etcd_arbiter import EtcdArbiter
    endpoints, prefix, name = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    start, n = float(sys.argv[4]), int(sys.argv[5])
    # Generous deadlines: six racers share two busy cores, and this test is about who wins, not how fast.
    arb = EtcdArbiter(endpoints, prefix=prefix, timeout_s=20.0, attempt_timeout_s=5.0)
    arb.current("warm-up")
    time.sleep(max(0.0, start - time.time()))
    won = [g for g in range(1, n + 1) if arb.claim("vm", g, name)]
    arb.close()
    print(json.dumps(won))
    """
)


def race_processes(endpoints: list[str], prefix: str, racers: int, generations: int) -> dict[str, list[int]]:
    start = time.time() + 1.5  # every process imported and connected by then
    procs = {
        f"p{i}": subprocess.Popen(
            [sys.executable, "-c", RACER, ",".join(endpoints), prefix, f"p{i}", str(start), str(generations)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for i in range(racers)
    }
    wins = {}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"racer {name} failed"
            wins[name] = json.loads(out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return wins


def test_claims_race_from_many_processes(etcd1: EtcdCluster, tmp_path: Path) -> None:
    """Each racer tries every generation in order after its previous try was answered, so every
    generation is claimed by someone: the wins must partition 1..N exactly."""
    generations = 30
    wins = race_processes(etcd1.endpoints, f"/t/{tmp_path.name}", racers=6, generations=generations)
    every = sorted(g for won in wins.values() for g in won)
    assert every == list(range(1, generations + 1)), f"each generation exactly one winner: {wins}"
    arb = EtcdArbiter(etcd1.endpoints, prefix=f"/t/{tmp_path.name}")
    try:
        current = arb.current("vm")
        assert current is not None and current.generation == generations
        assert generations in wins[current.node]
    finally:
        arb.close()


def leader_index(cluster: EtcdCluster) -> int:
    async def find() -> int:
        async with EtcdClient(cluster.endpoints) as client:
            for i in range(len(cluster.members)):
                try:
                    status = await client.status(i)
                except EtcdError:
                    continue
                if status.leader and status.leader == status.header.member_id:
                    return i
        raise AssertionError("no leader")

    return asyncio.run(find())


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_claims_work_after_a_member_is_killed(etcd3: EtcdCluster, victim: str) -> None:
    arb = EtcdArbiter(etcd3.endpoints, timeout_s=5.0)
    try:
        assert arb.claim("vm", 1, "n1")
        leader = leader_index(etcd3)
        dead = leader if victim == "leader" else (leader + 1) % 3
        etcd3.kill(dead)
        # A new leader is elected within a few election timeouts (100 ms): the claim waits it out.
        assert arb.claim("vm", 2, "n2")
        assert not arb.claim("vm", 2, "n1")
        current = arb.current("vm")
        assert current is not None and (current.generation, current.node) == (2, "n2")
        # A second member gone: no quorum, so no answer, so no claim (never a guess).
        etcd3.kill((dead + 1) % 3)
        short = EtcdArbiter(etcd3.endpoints, timeout_s=0.6, attempt_timeout_s=0.2)
        try:
            with pytest.raises(EtcdError):
                short.claim("vm", 3, "n1")
            # Back to a quorum. The unanswered claim may have been applied meanwhile (a leader keeps the
            # proposal and commits it with the quorum back) or not: either way n1's retry wins 3, and only n1.
            etcd3.restart(dead)
            won = None
            for _ in range(20):  # while the member restarts and rejoins, claims may still get no answer
                try:
                    won = short.claim("vm", 3, "n1")
                    break
                except EtcdError:
                    continue
            assert won is True
        finally:
            short.close()
        assert not arb.claim("vm", 3, "n2") and not arb.claim("vm", 3, "n1")
        current = arb.current("vm")
        assert current is not None and (current.generation, current.node) == (3, "n1")
    finally:
        arb.close()


def test_a_hung_member_is_skipped(etcd3: EtcdCluster) -> None:
    """A member that holds its connections but answers nothing (SIGSTOP: like a member cut off from the
    others) costs one attempt's deadline, then the next member answers."""
    arb = EtcdArbiter(etcd3.endpoints, timeout_s=5.0, attempt_timeout_s=0.3)
    try:
        assert arb.claim("vm", 1, "n1")  # member 0 answered: it is the one tried first now
        etcd3.pause(0)
        assert arb.claim("vm", 2, "n2")
        current = arb.current("vm")
        assert current is not None and current.node == "n2"
    finally:
        etcd3.resume(0)
        arb.close()


def test_no_etcd_means_an_error_not_an_answer(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, 1)  # never started: nothing listens on its port
    arb = EtcdArbiter(cluster.endpoints, timeout_s=0.5, attempt_timeout_s=0.2)
    try:
        with pytest.raises(ArbiterUnavailable):  # what nodes already handle for the SQLite arbiter
            arb.claim("vm", 1, "n1")
        with pytest.raises(EtcdError):
            arb.current("vm")
    finally:
        arb.close()


def test_bad_vm_names_are_refused(etcd1: EtcdCluster) -> None:
    arb = EtcdArbiter(etcd1.endpoints)
    try:
        for bad in ("", "a/b"):
            with pytest.raises(EtcdError):
                arb.claim(bad, 1, "n1")
    finally:
        arb.close()


def test_etcd_with_mutual_tls(tmp_path: Path) -> None:
    """etcd members certified by the cluster CA require client certificates from it: a node's
    certificate gets claims through, plaintext and another CA's certificates get nothing."""
    from replica import tls

    ca = tls.init_ca(tmp_path / "ca")
    members = [tls.issue(ca, tls.Role.NODE, f"etcd{i}") for i in range(3)]
    node = tls.issue(ca, tls.Role.NODE, "n1")
    other = tls.init_ca(tmp_path / "other")
    stranger = tls.issue(other, tls.Role.NODE, "n1")
    files = [EtcdTls(ca=m.ca, cert=m.cert, key=m.key) for m in members]
    cluster = EtcdCluster(tmp_path / "etcd", 3, tls=files)
    cluster.start(credentials=tls.channel_credentials(node))
    try:
        arb = EtcdArbiter(cluster.endpoints, credentials=tls.channel_credentials(node))
        try:
            assert arb.claim("vm", 1, "n1")
        finally:
            arb.close()
        for creds in (None, tls.channel_credentials(stranger)):
            bad = EtcdArbiter(cluster.endpoints, credentials=creds, timeout_s=0.6, attempt_timeout_s=0.2)
            try:
                with pytest.raises(EtcdError):
                    bad.claim("vm", 2, "intruder")
            finally:
                bad.close()
        arb = EtcdArbiter(cluster.endpoints, credentials=tls.channel_credentials(node))
        try:
            current = arb.current("vm")
            assert current is not None and (current.generation, current.node) == (1, "n1")
        finally:
            arb.close()
    finally:
        cluster.stop()


# A claim from inside a host, through its own etcd member only: "won", "lost" or "error".
HOST_CLAIM = textwrap.dedent(
    """
    import sys
    from replica.etcd_arbiter import EtcdArbiter
    from replica.etcd_client import EtcdError
    arb = EtcdArbiter([sys.argv[1]], timeout_s=1.0, attempt_timeout_s=0.3)
    try:
        print("won" if arb.claim("vm", int(sys.argv[2]), sys.argv[3]) else "lost")
    except EtcdError:
        print("error")
    finally:
        arb.close()
    """
)


def test_a_partitioned_member_on_namespace_hosts(tmp_path: Path) -> None:
    """Three etcd members, each on its own namespace host; the arbiter's client outside them. A member
    whose host is cut off cannot grant a claim to anyone (a client beside it gets an error, not an
    answer); the other two still decide. After the heal it serves claims again."""
    from replica import hosts
    from replica.hosts import HostNetwork

    if hosts.available() is not None:
        pytest.skip(str(hosts.available()))
    with HostNetwork(tmp_path / "hosts", root_address=True) as net:
        members = [net.add(f"e{i}") for i in range(3)]
        cluster = EtcdCluster(tmp_path / "etcd", 3, hosts=[h.address for h in members],
                              argv_prefix=[h.argv([]) for h in members])
        cluster.start()
        try:
            arb = EtcdArbiter(cluster.endpoints, timeout_s=5.0, attempt_timeout_s=0.3)
            try:
                assert arb.claim("vm", 1, "outside")
                cut = leader_index(cluster)
                net.cut(members[cut].name)
                # The majority elects a leader among itself and decides; the client skips the cut member.
                assert arb.claim("vm", 2, "outside")
                # A claimant next to the cut member reaches only it: no quorum, so no answer.
                def claim_beside(generation: int, node: str) -> str:
                    argv = [sys.executable, "-c", HOST_CLAIM, cluster.endpoints[cut], str(generation), node]
                    done = net.run(members[cut].name, argv, timeout=20, cwd=ROOT)  # this tree's code
                    return done.stdout.strip() or done.stderr

                assert claim_beside(3, "beside-cut") == "error"
                net.heal(members[cut].name)
                # Healed: it catches up and decides again (bounded retries while it rejoins).
                for _ in range(20):
                    answer = claim_beside(3, "beside-healed")
                    if answer != "error":
                        break
                assert answer == "won"
                current = arb.current("vm")
                assert current is not None and (current.generation, current.node) == (3, "beside-healed")
            finally:
                arb.close()
        finally:
            cluster.stop()
