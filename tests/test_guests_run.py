"""Every guest program under the monitor (monitor.machine.Machine, one VM, no replication): exit codes,
console output, device bounds checks, the kv service through replica.kv_client, its disk log, and the
fault commands (crash, panic, hang, scribble)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from monitor.builder import MachineConfig, build
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import NicServer
from replica.kv_client import KvClient

pytestmark = pytest.mark.kvm
GuestImage = Callable[[str], Path]


def make_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def run_guest(image: Path, arg: int = 0, disk: Path | None = None, timeout: float = 60.0,
              hang_timeout: float = 3.0) -> tuple[MachineResult, str]:
    console = bytearray()
    machine = build(MachineConfig(str(image), 64, str(disk) if disk else None, arg, hang_timeout),
                    on_console=console.extend)
    try:
        result = machine.run_blocking(timeout)
    finally:
        machine.close()
    return result, console.decode(errors="replace")


@asynccontextmanager
async def served(image: Path, disk: Path | None = None, hang_timeout: float = 3.0
                 ) -> AsyncIterator[tuple[Machine, str, bytearray]]:
    console = bytearray()
    machine = build(MachineConfig(str(image), 64, str(disk) if disk else None, 0, hang_timeout),
                    on_console=console.extend)
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    try:
        yield machine, f"{host}:{port}", console
    finally:
        if machine.result is None:
            machine.stop()
        await asyncio.wait_for(machine.wait(), 10)
        await server.close()
        machine.close()


def test_hello_exit_code(guest_image: GuestImage) -> None:
    result, console = run_guest(guest_image("hello"))
    assert result.reason is StopReason.EXITED and result.exit_code == 7, result.describe()
    assert console == "hello from vmft guest\n"
    result, _ = run_guest(guest_image("hello"), arg=42)
    assert result.exit_code == 42


def test_spin_matches_native(guest_image: GuestImage) -> None:
    n = 300000
    result, console = run_guest(guest_image("spin"), arg=n)
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    native = subprocess.run([str(guest_image("spin").parent / "spin-native"), str(n)], capture_output=True,
                            text=True, check=True).stdout
    assert console == native


def test_exitloop_makes_one_exit_per_iteration(guest_image: GuestImage) -> None:
    result, _ = run_guest(guest_image("exitloop"), arg=500)
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert result.position >= 500


def test_badfault_gets_efault_everywhere(guest_image: GuestImage) -> None:
    result, console = run_guest(guest_image("badfault"))
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    statuses = dict(line.split()[1:3] for line in console.splitlines() if "status=" in line)
    for what in ("console_write", "console_write_wrap", "net_rx", "net_tx", "entropy", "console_read"):
        assert statuses[what] == "status=-1", console
    assert statuses["block_read"] in ("status=-1", "status=-4")  # -4: no disk configured
    assert statuses["entropy_ok"] == "status=0"
    assert "badfault: done" in console


def test_ticker_runs(guest_image: GuestImage) -> None:
    result, console = run_guest(guest_image("ticker"), arg=50)
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert console.startswith("ticker: ticks=50 ")


async def test_kv_through_the_client(guest_image: GuestImage) -> None:
    async with served(guest_image("kv")) as (_machine, address, console):
        async with KvClient([address], "t1", timeout=5.0) as kv:
            assert await kv.get("a") is None
            await kv.set("a", "hello world")
            assert await kv.get("a") == "hello world"
            assert await kv.incr("n", 5) == 5
            assert await kv.incr("n", -7) == -2
            assert await kv.delete("a") is True
            assert await kv.delete("a") is False
            stats = await kv.stats()
            assert stats["keys"] == 1 and stats["writes"] == 5
            await asyncio.sleep(0.3)
            assert (await kv.stats())["ticks"] >= stats["ticks"] + 3  # the 50 ms timer
            assert await kv.command("SET t1:1 x y") == "ERR stale"
        assert "kv: ready (0 keys restored, no disk)" in console.decode()


async def test_kv_disk_log_survives_a_restart(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "kv.img", 4 << 20)
    async with served(guest_image("kv"), disk) as (_machine, address, _console):
        async with KvClient([address], "p1", timeout=5.0) as kv:
            for i in range(50):
                await kv.set(f"k{i}", str(i))
            await kv.incr("n", 3)
            last = f"p1:{kv._seq}"
    async with served(guest_image("kv"), disk) as (_machine, address, console):
        async with KvClient([address], "p2", timeout=5.0) as kv:
            assert await kv.get("k49") == "49"
            assert await kv.get("n") == "3"
            # exactly-once state came back too: the last request id still gets its cached reply
            assert await kv.command(f"INCR {last} n 3") == "VALUE 3"
        assert "kv: ready (51 keys restored)" in console.decode()


async def send_fault(address: str, command: str) -> None:
    host, port = address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(struct.pack(">I", len(command)) + command.encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()


@pytest.mark.parametrize(
    ("command", "reason", "message"),
    [
        ("CRASH", StopReason.CRASHED, "triple fault"),
        ("PANIC", StopReason.PANICKED, "kv: PANIC requested"),
        ("HANG", StopReason.HUNG, ""),
        ("SCRIBBLE", StopReason.PANICKED, "kv: hash table corrupted"),
    ],
)
async def test_kv_faults(guest_image: GuestImage, command: str, reason: StopReason, message: str) -> None:
    async with served(guest_image("kv"), hang_timeout=1.0) as (machine, address, _console):
        async with KvClient([address], "f1", timeout=5.0) as kv:
            await kv.set("a", "b")
        await send_fault(address, command)
        result = await asyncio.wait_for(machine.wait(), 10)
        assert result.reason is reason, result.describe()
        assert message in result.message


async def test_mixed_echo_and_quit(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "mixed.img", 1 << 20)
    async with served(guest_image("mixed"), disk) as (machine, address, console):
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        messages = [b"one", b"two", b"three", b"QUIT"]
        for m in messages:
            writer.write(struct.pack(">I", len(m)) + m)
        await writer.drain()
        replies = []
        for _ in messages:
            (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))
            replies.append((await asyncio.wait_for(reader.readexactly(n), 10)).decode())
        writer.close()
        assert [r.split()[0] for r in replies] == ["HASH", "HASH", "HASH", "BYE"]
        assert replies[2].split()[1] == replies[3].split()[1]
        result = await asyncio.wait_for(machine.wait(), 10)
        assert result.reason is StopReason.EXITED and result.exit_code == 0
        assert "mixed: quit after 3 messages" in console.decode()
    assert disk.read_bytes()[512:520] == struct.pack("<Q", 0x44524F434558494D)  # record 1 in sector 1


TRAP_SOURCE = """
#include "vmft.h"
int main(void)
{
    volatile unsigned zero = 0;
    vmft_printf("trap: %d\\n", TRAP);
    if (TRAP == 6) __asm__ volatile("ud2");
    if (TRAP == 14) *(volatile int *)0x7f0000000000ull = 1;
    if (TRAP == 0) return (int)(10u / zero);
    return 99;
}
"""


@pytest.mark.parametrize("vector", [0, 6, 14])
def test_exceptions_report_a_panic_with_vector_and_rip(tmp_path: Path, vector: int) -> None:
    """An ad-hoc guest linked against the runtime faults in ring 3: the shim reports `exception N`."""
    guests = Path(__file__).resolve().parent.parent / "guests"
    flags = subprocess.run(["make", "-s", "-C", str(guests), "print-cflags"], capture_output=True, text=True,
                           check=True).stdout.split()
    src = tmp_path / "trap.c"
    src.write_text(TRAP_SOURCE)
    image = tmp_path / "trap.elf"
    objs = [str(guests / "build" / o) for o in ("shim.o", "vmft.o", "vmft_lib.o")]
    subprocess.run(["gcc", *flags, f"-DTRAP={vector}", "-Wl,-T,runtime/guest.ld", "-o", str(image), *objs,
                    str(src), "-lgcc"], cwd=guests, check=True, capture_output=True)
    result, console = run_guest(image)
    assert console == f"trap: {vector}\n"
    assert result.reason is StopReason.PANICKED, result.describe()
    assert result.message == f"exception {vector}"
    # The shim reports where the fault happened: the faulting instruction is in main().
    assert "fault_rip" in result.registers, result.registers
    assert result.registers["vector"] == vector, result.registers
    fault_rip = result.registers["fault_rip"]
    symbols = subprocess.run(["nm", str(image)], capture_output=True, text=True, check=True).stdout
    main_addr = next(int(line.split()[0], 16) for line in symbols.splitlines() if line.endswith(" T main"))
    assert main_addr <= fault_rip < main_addr + 256, (hex(main_addr), hex(fault_rip))


def test_ticker_record_and_replay_identical(guest_image: GuestImage, tmp_path: Path) -> None:
    """The timer-heavy guest through `vmft run --record` and `vmft replay`: the replay is identical."""
    log = tmp_path / "ticker.log"
    image = str(guest_image("ticker"))
    cli = [sys.executable, "-m", "replica.cli"]
    run = subprocess.run([*cli, "run", "--record", str(log), "--arg", "100", image],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ticker: ticks=100 ")
    replay = subprocess.run([*cli, "replay", "--arg", "100", image, str(log)],
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "IDENTICAL" in replay.stdout + replay.stderr
