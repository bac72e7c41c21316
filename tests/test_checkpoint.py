"""Checkpoints (monitor/checkpoint/) and fast restart (monitor/restart.py) with real KVM and real guests:
restore gives the same state hash and behaviour, a log recorded after a checkpoint replays on it, chains of
incremental checkpoints restore, crashed and hung guests come back from their checkpoints, and every kind
of damaged checkpoint is refused before anything is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import readline_within

from monitor import checkpoint as ck
from monitor import builder
from monitor.builder import MachineConfig, build
from monitor.checkpoint import CheckpointError, Checkpointer, CheckpointStore, RecordStream
from monitor.journal import OutputKind
from monitor.loader import load_image_file
from monitor.machine import Machine, StopReason
from monitor.netserver import NicServer
from monitor.record import (
    IteratorSource,
    LogFileReader,
    LogFileWriter,
    RecordJournal,
    ReplayJournal,
    check_header,
    make_header,
    open_recording,
)
from monitor.restart import FaultAction, RestartPolicy, Supervisor
from proto import vmft_pb2
from replica.checkpoint_cli import snapshot_request
from replica.kv_client import KvClient, KvClientSync

pytestmark = pytest.mark.kvm
GuestImage = Callable[[str], Path]
MEM = 64 << 20


def make_disk(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(fill)
    return path


class ShowingReplay(ReplayJournal):
    """A replay that also delivers the outputs it verifies (to compare them with the recording's)."""

    def output(self, kind: OutputKind, data: bytes) -> bool:
        super().output(kind, data)
        return True


def showing_replay(path: Path, image_path: Path) -> ShowingReplay:
    reader = LogFileReader(path)
    check_header(reader.header, load_image_file(str(image_path)), MEM)
    return ShowingReplay(IteratorSource(reader.batches()), start_position=reader.header.start_position)


def test_ticker_checkpoint_then_log_replays_to_the_same_end(guest_image: GuestImage, tmp_path: Path) -> None:
    """Record ticker; checkpoint it mid-run and record the rest into a new log starting at the checkpoint's
    position. Restored, the checkpoint replays that log to the recording's final state hash and output."""
    image = load_image_file(str(guest_image("ticker")))
    journal = open_recording(tmp_path / "boot.log", image, MEM, hash_every=50)
    machine = build(MachineConfig(image.path, 64, None, 150), journal=journal, image=image)
    machine.start()
    after = tmp_path / "after.log"

    def switch_log(position: int) -> None:
        header = make_header(image, MEM, start_position=position, hash_every=50)
        writer = LogFileWriter(after, header)
        machine.set_journal(RecordJournal(writer, start_position=position, hash_every=50))

    try:
        time.sleep(0.05)
        stats = Checkpointer(machine).save(tmp_path / "t.vmck", on_paused=switch_log, digest=True)
        assert 0 < stats.position
        assert stats.pause_s < 0.5
        result = machine.wait_blocking(30)
        assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
        final = machine.state_digest()
        output = bytes(machine.console_output)
    finally:
        machine.close()
    assert output.startswith(b"ticker: ticks=150 ")

    restored, rstats = builder.restore(
        tmp_path / "t.vmck",
        journal=lambda pos: showing_replay(after, guest_image("ticker")),
        verify_digest=True,
    )
    try:
        assert restored.position == stats.position == rstats.position
        result = restored.run_blocking(30)
        assert result.reason is StopReason.EXITED, result.describe()  # DIVERGED if the final hash differed
        assert restored.state_digest() == final
        assert bytes(restored.console_output) == output
    finally:
        restored.close()

    # Restored live (no log), it finishes its ticks too, with its own clock values.
    live, _ = builder.restore(tmp_path / "t.vmck")
    try:
        result = live.run_blocking(30)
        assert result.reason is StopReason.EXITED and result.exit_code == 0
        assert bytes(live.console_output).startswith(b"ticker: ticks=150 ")
    finally:
        live.close()


@asynccontextmanager
async def serving(machine: Machine, port: int = 0) -> AsyncIterator[str]:
    server = NicServer(machine.net_backend, "127.0.0.1", port, first_conn_id=machine.next_conn_id())
    host, bound = await server.start()
    if not machine.is_running() and machine.result is None:
        machine.start()
    try:
        yield f"{host}:{bound}"
    finally:
        if machine.result is None:
            machine.stop()
        await asyncio.wait_for(machine.wait(), 10)
        await server.close()


async def test_kv_restore_same_state_memory_and_disk(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "kv.img", 4 << 20)
    image = guest_image("kv")
    machine = build(MachineConfig(str(image), 64, str(disk), 0, 3.0))
    try:
        async with serving(machine) as address:
            async with KvClient([address], "c1", timeout=5.0) as kv:
                for i in range(20):
                    await kv.set(f"k{i}", f"v{i}")
                stats = await asyncio.to_thread(
                    Checkpointer(machine).save, tmp_path / "kv.vmck", None, None, True
                )
                assert stats.disk_chunks >= 1 and not stats.incremental
                await kv.set("late", "x")  # after the checkpoint: in neither memory nor disk of the restore
                await kv.set("k0", "changed")
    finally:
        machine.close()

    restored, _ = builder.restore(tmp_path / "kv.vmck", verify_digest=True)  # the digest check is the test
    try:
        async with serving(restored) as address:
            async with KvClient([address], "c2", timeout=5.0) as kv:
                assert await kv.get("k19") == "v19"
                assert await kv.get("k0") == "v0"
                assert await kv.get("late") is None
                await kv.set("new", "1")
    finally:
        restored.close()

    # The disk was rewritten to the checkpoint's contents plus what the restored guest wrote: a cold boot
    # replays its log to exactly that.
    console = bytearray()
    cold = build(MachineConfig(str(image), 64, str(disk), 0, 3.0), on_console=console.extend)
    try:
        async with serving(cold) as address:
            async with KvClient([address], "c3", timeout=5.0) as kv:
                assert await kv.get("k0") == "v0"
                assert await kv.get("late") is None
                assert await kv.get("new") == "1"
    finally:
        cold.close()
    assert "kv: ready (21 keys restored)" in console.decode()


async def test_incremental_chain_and_stream(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "kv.img", 2 << 20)
    machine = build(MachineConfig(str(guest_image("kv")), 64, str(disk), 0, 3.0))
    store = CheckpointStore(tmp_path / "ckpts", full_every=10)
    checkpointer = Checkpointer(machine)
    digests = []
    try:
        async with serving(machine) as address:
            async with KvClient([address], "c1", timeout=5.0) as kv:
                for step in range(3):
                    for i in range(10):
                        await kv.set(f"s{step}k{i}", str(step * 100 + i))
                    stats = await asyncio.to_thread(store.save, checkpointer)
                    assert stats.incremental == (step > 0)
                    manifest = ck.open_checkpoint(stats.path).manifest
                    digests.append(manifest.state_digest)
                # A live checkpoint streamed (as over gRPC) and restored from the stream.
                streamer = Checkpointer(machine, name="stream")
                records = await asyncio.to_thread(lambda: list(streamer.records(digest=True)))
                await kv.set("after", "1")
    finally:
        machine.close()
    latest = store.latest()
    assert latest is not None and len(ck.find_chain(latest)) == 3
    assert all(d == b"" for d in digests)  # digests are opt-in

    restored, rstats = builder.restore(latest)
    try:
        assert rstats.chain_length == 3
        async with serving(restored) as address:
            async with KvClient([address], "c2", timeout=5.0) as kv:
                for step in range(3):
                    assert await kv.get(f"s{step}k9") == str(step * 100 + 9)
                assert await kv.get("after") is None
    finally:
        restored.close()

    disk2 = tmp_path / "other-disk.img"
    streamed, _ = builder.restore(RecordStream(iter(records)), disk=str(disk2), verify_digest=True)
    try:
        assert disk2.stat().st_size == 2 << 20
        async with serving(streamed) as address:
            async with KvClient([address], "c3", timeout=5.0) as kv:
                assert await kv.get("s2k9") == "209"
    finally:
        streamed.close()
    # the records of a saved file are the same records
    assert list(ck.file_records(latest))[0][:1] == bytes([ck.RecordType.HEADER])


async def send_fault(address: str, command: str) -> None:
    host, port = address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(struct.pack(">I", len(command)) + command.encode())
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


@pytest.mark.parametrize("command", ["CRASH", "HANG"])
async def test_fault_restarts_from_checkpoint(guest_image: GuestImage, tmp_path: Path, command: str) -> None:
    machine = build(MachineConfig(str(guest_image("kv")), 64, None, 0, 0.5))
    store = CheckpointStore(tmp_path / "ckpts")
    server: list[NicServer] = []
    port = 0
    address = ""
    attached = asyncio.Event()

    async def attach(m: Machine) -> None:
        nonlocal port, address
        srv = NicServer(m.net_backend, "127.0.0.1", port, first_conn_id=m.next_conn_id())
        host, port = await srv.start()
        address = f"{host}:{port}"
        server.append(srv)
        attached.set()

    async def detach(m: Machine) -> None:
        await server.pop().close()

    supervisor = Supervisor(machine, RestartPolicy(FaultAction.RESTART), store, attach=attach, detach=detach)
    task = asyncio.create_task(supervisor.run())
    try:
        await asyncio.wait_for(attached.wait(), 10)
        async with KvClient([address], "c1", timeout=5.0) as kv:
            await kv.set("before", "1")
            await asyncio.to_thread(supervisor.checkpoint_now)
            await kv.set("lost", "2")  # after the checkpoint: the restart goes back before it
        await asyncio.sleep(supervisor.restarter.trust_after_s + 0.05)  # the checkpoint is trusted now
        first = supervisor.machine
        await send_fault(address, command)
        for _ in range(500):
            if supervisor.restarter.restarts:
                break
            await asyncio.sleep(0.01)
        assert supervisor.restarter.restarts == 1, supervisor.restarter.faults
        fault = supervisor.restarter.faults[0]
        assert fault.reason == ("crashed" if command == "CRASH" else "hung")
        assert supervisor.machine is not first
        async with KvClient([address], "c2", timeout=5.0) as kv:
            assert await kv.get("before") == "1"
            assert await kv.get("lost") is None
            await kv.set("again", "3")
            assert await kv.get("again") == "3"
        supervisor.stop()
        result = await asyncio.wait_for(task, 10)
        assert result.reason is StopReason.STOPPED
    finally:
        if not task.done():
            supervisor.machine.stop()
            await asyncio.wait_for(task, 10)
        supervisor.machine.close()


# ----- damaged checkpoints -------------------------------------------------------------------------------


def _records(path: Path) -> list[bytes]:
    return list(ck.file_records(path))


def _rewrite(records: list[bytes], path: Path) -> Path:
    ck.write_records(records, path)
    return path


def _reframe(
    rtype: ck.RecordType, message: vmft_pb2.CheckpointHeader | vmft_pb2.CheckpointManifest
) -> bytes:
    body: bytes = message.SerializeToString()
    return struct.pack("<BBHII", rtype, 0, 0, len(body), zlib.crc32(body)) + body


def _edit_header(records: list[bytes], edit: Callable[[vmft_pb2.CheckpointHeader], None]) -> list[bytes]:
    """Change the header consistently (leading header and the manifest's copy), with valid checksums."""
    header = vmft_pb2.CheckpointHeader()
    header.ParseFromString(records[0][12:])
    edit(header)
    manifest = vmft_pb2.CheckpointManifest()
    manifest.ParseFromString(records[-1][12:])
    manifest.header.CopyFrom(header)
    head = _reframe(ck.RecordType.HEADER, header)
    return [head, *records[1:-1], _reframe(ck.RecordType.MANIFEST, manifest)]


def test_damaged_checkpoints_are_refused(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", 1 << 20, fill=os.urandom(8192))
    image = guest_image("ticker")
    good = tmp_path / "good" / "full.vmck"
    good.parent.mkdir()
    incr = tmp_path / "good" / "incr.vmck"
    other_full = tmp_path / "other.vmck"
    with contextlib.ExitStack() as machines:  # closed even when a save fails
        machine = build(MachineConfig(str(image), 64, str(disk), 0, 3.0))  # not started: position 0 will do
        machines.callback(machine.close)
        checkpointer = Checkpointer(machine)
        checkpointer.save(good)
        machine.memory.write(0x300000, b"incremental")
        checkpointer.save(incr)
        other = build(MachineConfig(str(image), 64, str(disk), 0, 3.0))
        machines.callback(other.close)
        Checkpointer(other).save(other_full)
    restored, _ = builder.restore(incr)  # the good chain restores
    try:
        assert restored.memory.read(0x300000, 11) == b"incremental"
    finally:
        restored.close()

    later_disk = os.urandom(4096)
    with open(disk, "r+b") as out:
        out.write(later_disk)  # the disk moved on: a refused restore must leave it alone

    records = _records(good)
    chunk_indices = [i for i, r in enumerate(records) if r[0] == ck.RecordType.CHUNK]
    disk_index = next(i for i in chunk_indices if records[i][12] == ck.Region.DISK)
    raw = good.read_bytes()
    cases: dict[str, tuple[Path | list[Path], dict[str, object], str]] = {}

    def damaged(name: str, data: bytes | list[bytes]) -> Path:
        path = tmp_path / f"{name}.vmck"
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            _rewrite(data, path)
        return path

    cases["truncated"] = (damaged("truncated", raw[: len(raw) * 2 // 3]), {}, "truncated")
    cases["truncated-before-manifest"] = (damaged("nomanifest", records[:-1]), {}, "before the manifest")
    flipped = list(records)
    body = bytearray(flipped[chunk_indices[0]])
    body[-5] ^= 0xFF
    flipped[chunk_indices[0]] = bytes(body)
    cases["chunk checksum"] = (damaged("chunkcrc", flipped), {}, "fails its checksum")
    flipped = list(records)
    body = bytearray(flipped[disk_index])
    body[-5] ^= 0xFF
    flipped[disk_index] = bytes(body)
    cases["disk chunk checksum"] = (damaged("diskcrc", flipped), {}, "disk at 0x0")
    flipped = list(records)
    body = bytearray(flipped[-1])
    body[len(body) // 2] ^= 0xFF
    flipped[-1] = bytes(body)
    cases["manifest"] = (damaged("manifest", flipped), {}, "manifest corrupted")
    missing = list(records)
    del missing[chunk_indices[1]]
    cases["missing chunk"] = (damaged("missingchunk", missing), {}, "chunks")
    cases["other image"] = (good, {"image": load_image_file(str(guest_image("hello")))}, "another image")

    def cpuid(h: vmft_pb2.CheckpointHeader) -> None:
        h.cpuid_hash = "0" * 16

    def version(h: vmft_pb2.CheckpointHeader) -> None:
        h.format_version = 99

    def abi(h: vmft_pb2.CheckpointHeader) -> None:
        h.abi_version = 999

    cases["cpuid"] = (damaged("cpuid", _edit_header(records, cpuid)), {}, "CPUID")
    cases["format version"] = (damaged("version", _edit_header(records, version)), {}, "format version 99")
    cases["abi"] = (damaged("abi", _edit_header(records, abi)), {}, "guest ABI 999")
    cases["memory size"] = (good, {"mem_size": 128 << 20}, "memory size mismatch")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(incr, lonely / "incr.vmck")
    cases["parent missing"] = (lonely / "incr.vmck", {}, "parent")
    cases["parent different"] = ([other_full, incr], {}, "different parent")
    bad_magic = damaged("magic", b"NOTACKPT" + raw[8:])
    cases["not a checkpoint"] = (bad_magic, {}, "not a vmft checkpoint")

    for name, (path, kwargs, expected) in cases.items():
        with pytest.raises(CheckpointError) as err:
            builder.restore(path, **kwargs)  # type: ignore[arg-type]
        assert expected in str(err.value), f"{name}: {err.value}"
        with open(disk, "rb") as f:
            assert f.read(4096) == later_disk, f"{name}: the disk was touched"

    # The stream reader refuses the same damage.
    for name, data in (("truncated", records[:-1]), ("chunk checksum", _records(tmp_path / "chunkcrc.vmck"))):
        with pytest.raises(CheckpointError):
            builder.restore(RecordStream(iter(data)))
        with open(disk, "rb") as f:
            assert f.read(4096) == later_disk, f"stream {name}: the disk was touched"


# ----- the command line and the benchmark ----------------------------------------------------------------


def control_status(sock: Path) -> dict[str, int]:
    """`status` on a `vmft run --control-socket`: position, faults, restarts, checkpoints."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"status\n")
        reply = s.makefile("r").readline().split()
    assert reply and reply[0] == "ok", reply
    return {k: int(v) for k, v in (word.split("=", 1) for word in reply[1:])}


def wait_for_trusted_checkpoint(sock: Path, trust_after_s: float, limit_s: float = 20.0) -> None:
    """Until a periodic checkpoint begun after this call is older than the restarter's trust window. The
    next checkpoint to complete may have begun earlier; the one after it began later. Its age counts from
    when it was seen complete, which is no earlier than when it was taken."""
    deadline = time.monotonic() + limit_s
    first = control_status(sock)["checkpoints"]
    while control_status(sock)["checkpoints"] < first + 2:
        assert time.monotonic() < deadline, f"no two periodic checkpoints within {limit_s} s"
        time.sleep(0.02)
    time.sleep(trust_after_s + 0.05)  # its age, not a guess at how long the machine takes


def listening_address(proc: subprocess.Popen[bytes], seen: list[bytes]) -> str:
    """The address a `vmft run|restore --listen 127.0.0.1:0` bound (it says so on stderr); the stderr
    lines read to find it are appended to `seen`."""
    assert proc.stderr is not None
    for _ in range(50):
        line = readline_within(proc.stderr, 20, "the listening address")
        seen.append(line)
        if line.startswith(b"vmft: listening on "):
            return line.decode().split()[-1]
        assert line, f"vmft ended before listening: {seen}"
    raise AssertionError(f"no listening address in {seen}")


def test_cli_run_snapshot_restore(guest_image: GuestImage, tmp_path: Path) -> None:
    """vmft run with periodic checkpoints, a control socket and fault restart; vmft snapshot; vmft restore.
    Both listen on port 0 and say which port they got (no free port guessed beforehand)."""
    root = Path(__file__).resolve().parent.parent
    sock = tmp_path / "ctl.sock"
    vmft = [sys.executable, "-m", "replica.cli"]
    run = subprocess.Popen(
        [*vmft, "run", str(guest_image("kv")), "--listen", "127.0.0.1:0", "--checkpoint-dir",
         str(tmp_path / "ck"), "--checkpoint-every", "0.2", "--on-fault", "restart", "--hang-timeout", "0.5",
         "--control-socket", str(sock)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    restore = None
    try:
        seen: list[bytes] = []
        with KvClientSync([listening_address(run, seen)], "cli1", timeout=5.0) as kv:
            kv.set("a", "1")
            reply = snapshot_request(str(sock), str(tmp_path / "snap.vmck"))
            assert reply.startswith("ok position="), reply
            wait_for_trusted_checkpoint(sock, trust_after_s=0.5 + 0.1)  # --hang-timeout + 0.1
            kv.command("CRASH")
            assert kv.get("a") == "1"  # served again, restarted from a checkpoint
        assert control_status(sock)["restarts"] == 1
        run.send_signal(2)
        _out, err = run.communicate(timeout=10)
        err = b"".join(seen) + err
        assert b"1 faults, 1 restarts" in err, err
        restore = subprocess.Popen(
            [*vmft, "restore", str(tmp_path / "snap.vmck"), "--listen", "127.0.0.1:0"],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        seen = []
        with KvClientSync([listening_address(restore, seen)], "cli2", timeout=5.0) as kv:
            assert kv.get("a") == "1"
        restore.send_signal(2)
        _out, err = restore.communicate(timeout=10)
        err = b"".join(seen) + err
        assert b"restored" in err, err
    finally:
        for proc in (run, restore):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_bench_checkpoint_smoke() -> None:
    import argparse

    import bench_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    bench_checkpoint.add_arguments(parser)
    # Incompressible data: a checkpoint stores about what the guest touched, so six times the memory
    # touched makes a checkpoint six times larger.
    args = parser.parse_args(["checkpoint", "--mem", "32", "--touched", "2,12", "--repeat", "1", "--random"])
    figures = {f.name: f for f in bench_checkpoint.run(args)}
    assert len(figures) == 24  # 12 per scenario
    for figure in figures.values():
        assert figure.value > 0 and figure.reference > 0, figure
    small = figures["32 MiB guest, 2 MiB touched: checkpoint size"]
    large = figures["32 MiB guest, 12 MiB touched: checkpoint size"]
    for size, touched in ((small, 2), (large, 12)):
        assert size.reference == touched and touched <= size.value < 1.2 * touched + 0.5, size
    assert large.value > 4 * small.value, (small, large)


def test_a_confined_restore_takes_no_host_path_from_the_checkpoint(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """A node restores what a peer streamed: a checkpoint naming a disk (or an image) path is refused
    when the VM has no disk of its own here, and nothing is created at the path it names."""
    image = load_image_file(guest_image("ticker"))
    machine = build(MachineConfig(str(image.path), 64, None, 0, 3.0))
    try:
        records = list(Checkpointer(machine, name="stream").records())
    finally:
        machine.close()
    planted = tmp_path / "outside" / "planted.img"
    planted.parent.mkdir()

    def naming_a_disk(header: vmft_pb2.CheckpointHeader) -> None:
        header.config.disk_path = str(planted)
        header.config.disk_size = 1 << 20

    forged = _edit_header(records, naming_a_disk)
    with pytest.raises(CheckpointError, match="has a disk, and this VM has none here"):
        builder.restore(RecordStream(iter(forged)), image=image, confined=True)
    assert not planted.exists()
    with pytest.raises(CheckpointError, match="given its image"):
        builder.restore(RecordStream(iter(records)), confined=True)
    restored, _ = builder.restore(RecordStream(iter(records)), image=image, confined=True)
    restored.close()
