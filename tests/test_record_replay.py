"""Record and deterministic replay, proven on every guest: many recordings with random timing replay to
the recording's exact final state and outputs; tampered, truncated, corrupted and mismatched logs are
caught where they go wrong; a replay fed incrementally (with a horizon) keeps up with a live recording.

Each recording runs with random asynchronous exits (signals) on the recording side only, a random client
load (kv, mixed) or random timer timing (ticker); parametrized by seed so a failure names it.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import guest_image_path

from monitor.journal import EventKind
from monitor.loader import load_image_file
from monitor.machine import StopReason
from monitor.netserver import NicServer
from monitor.record import LogError, QueueSource, ReplayJournal, open_replay
from replica.kv_client import KvClient
from replay_helpers import (
    MEM_MIB,
    LogContents,
    Recording,
    assert_identical,
    events_of,
    finish_recording,
    frame_offsets,
    kv_client_load,
    new_machine,
    queue_tee,
    read_log,
    record_journal,
    record_kv,
    record_mixed,
    record_run,
    replay_run,
    served_recording,
    write_log,
)

pytestmark = pytest.mark.kvm
GuestImage = Callable[[str], Path]
RUNS = 30
ROOT = Path(__file__).resolve().parent.parent
VMFT = [sys.executable, "-m", "replica.cli"]

# final state digests per guest and seed, to show that the runs really differ
OUTCOMES: dict[str, dict[int, bytes]] = {"kv": {}, "ticker": {}, "mixed": {}}


# ----- many recordings, every one replayed -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(RUNS))
def test_kv_under_random_load_replays_identically(guest_image: GuestImage, tmp_path: Path, seed: int) -> None:
    image = guest_image("kv")
    recording = asyncio.run(record_kv(image, tmp_path / "kv.log", seed, tmp_path, use_disk=seed % 2 == 1))
    assert recording.result.reason is StopReason.STOPPED, recording.result.describe()
    assert len(recording.replies) >= 10 and recording.stats.outputs >= 10
    replayed = replay_run(image, recording.log, disk=recording.disk_before)
    assert_identical(recording, replayed)
    if recording.disk_before is not None:  # the replay made the same disk writes
        assert recording.disk_before.read_bytes() == recording.disk_after
    OUTCOMES["kv"][seed] = recording.digest


@pytest.mark.parametrize("seed", range(RUNS))
def test_ticker_replays_identically(guest_image: GuestImage, tmp_path: Path, seed: int) -> None:
    image = guest_image("ticker")
    rng = random.Random(1000 + seed)
    ticks = rng.randint(15, 60)
    recording = record_run(image, tmp_path / "ticker.log", arg=ticks, rng=rng)
    assert recording.result.reason is StopReason.EXITED and recording.result.exit_code == 0
    assert recording.console.startswith(f"ticker: ticks={ticks} ".encode())
    replayed = replay_run(image, recording.log, arg=ticks)
    assert_identical(recording, replayed)
    OUTCOMES["ticker"][seed] = recording.digest


@pytest.mark.parametrize("seed", range(RUNS))
def test_mixed_replays_identically(guest_image: GuestImage, tmp_path: Path, seed: int) -> None:
    image = guest_image("mixed")
    recording = asyncio.run(record_mixed(image, tmp_path / "mixed.log", 2000 + seed, tmp_path))
    assert recording.replies[-1].startswith("BYE ")
    assert recording.disk_before is not None and recording.disk_after is not None
    assert recording.disk_before.read_bytes() != recording.disk_after  # the guest wrote records
    replayed = replay_run(image, recording.log, disk=recording.disk_before)
    assert_identical(recording, replayed)
    assert recording.disk_before.read_bytes() == recording.disk_after
    OUTCOMES["mixed"][seed] = recording.digest


@pytest.mark.parametrize("guest", ["kv", "ticker", "mixed"])
def test_the_runs_really_differ(guest: str) -> None:
    """Different timing gives different final states, so 'identical replay' is a check with teeth."""
    outcomes = OUTCOMES[guest]
    if len(outcomes) < RUNS:
        pytest.skip(f"only {len(outcomes)} of the {RUNS} {guest} runs ran in this session")
    assert len(set(outcomes.values())) == len(outcomes), f"{guest}: runs ended in the same state"


@pytest.mark.parametrize("seed", range(4))
async def test_kv_with_pauses_and_timed_hashes_replays_identically(
    guest_image: GuestImage, tmp_path: Path, seed: int
) -> None:
    """Random pauses (as a checkpoint takes them: at an exit, I/O completed) during the recording, state
    hashes by time rather than by position, small batches and a flush at every output."""
    image = guest_image("kv")
    rng = random.Random(3000 + seed)
    replies: list[str] = []
    pauses = 0
    options = {"hash_every": 0, "hash_interval_s": 0.01, "batch_events": 16, "flush_on_output": True}
    async with served_recording(image, tmp_path / "kv.log", rng=rng, **options) as (
        machine,
        journal,
        address,
        _,
    ):
        await asyncio.to_thread(machine.pause)  # (the first state hash reads all of memory: 0.1-0.3 s)
        machine.resume()
        until = time.monotonic() + 0.3
        load = asyncio.gather(
            *(
                kv_client_load(address, f"p{seed}c{i}", random.Random(rng.random()), until, replies)
                for i in range(3)
            )
        )
        while time.monotonic() < until or pauses < 5:  # a loaded machine pauses slowly: count, not time
            await asyncio.sleep(rng.random() * 0.02)
            await asyncio.to_thread(machine.pause)
            await asyncio.sleep(rng.random() * 0.005)
            machine.resume()
            pauses += 1
        await load
    recording = finish_recording(machine, journal, tmp_path / "kv.log", bytearray(), 0, None, None)
    assert pauses >= 5 and recording.stats.state_hashes >= 2
    assert_identical(recording, replay_run(image, recording.log))


# ----- stops that land between synchronous exits ------------------------------------------------------


def test_stop_while_the_guest_computes_ends_the_recording_at_a_synchronous_exit(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """Stopping a recording while the guest runs (no exit to stop at) must not end the log in a state
    between exits that no replay can reach: the stop takes effect at the next synchronous exit."""
    image = guest_image("spin")
    log = tmp_path / "spin.log"
    journal = record_journal(image, log)
    arg = 500_000_000  # about 0.2 s of ring-3 arithmetic without an exit, then one console write
    machine = new_machine(image, journal, arg, hang_timeout=30)
    machine.start()
    time.sleep(0.05)
    machine.stop()
    machine.wait_blocking(10)
    recording = finish_recording(machine, journal, log, bytearray(), arg, None, None)
    assert recording.result.reason is StopReason.STOPPED and recording.result.position >= 1
    replayed = replay_run(image, log, arg=arg)
    assert_identical(recording, replayed)


@pytest.mark.parametrize("how", ["stop while paused", "stop right after resume"])
async def test_stop_around_a_pause_ends_the_recording_at_a_synchronous_exit(
    guest_image: GuestImage, tmp_path: Path, how: str
) -> None:
    """A pause completes the I/O of the exit it parks at (guest state moves past the exit): a recording
    stopped then must still end at an exit that replay reaches in the same state, and log its hash."""
    image = guest_image("kv")
    replies: list[str] = []
    async with served_recording(image, tmp_path / "kv.log") as (machine, journal, address, _):
        await kv_client_load(address, "s1", random.Random(1), time.monotonic() + 0.1, replies)
        await asyncio.to_thread(machine.pause)
        if how == "stop right after resume":
            machine.resume()
        machine.stop()
        result = await asyncio.wait_for(machine.wait(), 10)
        assert result.reason is StopReason.STOPPED
    recording = finish_recording(machine, journal, tmp_path / "kv.log", bytearray(), 0, None, None)
    assert read_log(recording.log).events[-1][4] == recording.digest  # a final hash to check, and it is this
    assert_identical(recording, replay_run(image, recording.log))


async def test_a_hung_recording_replays_without_a_false_divergence(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """A guest that hangs ends its recording between exits: the final hash cannot be compared, the
    replay still verifies everything up to the last exit."""
    image = guest_image("kv")
    log = tmp_path / "hang.log"
    journal = record_journal(image, log)
    machine = new_machine(image, journal, hang_timeout=0.5)
    server = NicServer(machine.net_backend, "127.0.0.1", 0)
    host, port = await server.start()
    machine.start()
    async with KvClient([f"{host}:{port}"], "h1", timeout=5.0) as kv:
        await kv.set("a", "b")
        await kv.command("HANG")
    result = await asyncio.wait_for(machine.wait(), 10)
    await server.close()
    assert result.reason is StopReason.HUNG
    recording = finish_recording(machine, journal, log, bytearray(), 0, None, None)
    replayed = replay_run(image, log)
    assert replayed.result.reason is StopReason.STOPPED, replayed.result.describe()
    assert replayed.result.position == replayed.end_position == result.position
    assert replayed.stats.outputs == recording.stats.outputs


HLT_GUEST = r"""
/* A guest that idles the way the platform allows ring-0 code to: `sti; hlt` in ring 0, woken by the timer.
 * Arms a 0.2 ms one-shot timer HALTS times, halting until each fires; the interrupt handler counts. */
#define HALTS 30
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    mov $stack_top, %rsp
    lidt idt_desc
    mov $HALTS, %r12
1:  mov $req, %eax
    mov $0x610, %dx             /* CLOCK: now -> req.arg64 */
    out %eax, %dx
    mov req+16, %rax
    add $200000, %rax
    mov %rax, req+16
    mov $req, %eax
    mov $0x611, %dx             /* TIMER: arm at req.arg64 */
    out %eax, %dx
    sti
    hlt
    cli
    mov $0x620, %dx             /* EVENTS: take the news (clears what the interrupt latched) */
    in %dx, %eax
    dec %r12
    jnz 1b
    mov counter, %eax
    mov $0x660, %dx             /* POWER_EXIT with the interrupt count */
    out %eax, %dx
2:  jmp 2b
irq_timer:
    incl counter
    iretq
__shim_stubs_end:
    .globl __shim_stubs_end

    .data
    .balign 16
idt:
    .fill 32 * 16, 1, 0
    .word irq_timer - 0x100000
    .word 0x8
    .byte 0, 0x8E
    .word 0x10
    .long 0
    .long 0
idt_end:
    .balign 8
    .word 0, 0, 0
idt_desc:
    .word idt_end - idt - 1
    .quad idt
    .balign 8
req:
    .quad 0, 0, 0, 0
counter:
    .long 0
    .bss
    .balign 16
    .skip 4096
stack_top:
"""


@pytest.fixture(scope="module")
def hlt_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hlt")
    (tmp / "hlt.S").write_text(HLT_GUEST)
    image = tmp / "hlt.elf"
    linker_script = ROOT / "guests" / "runtime" / "guest.ld"
    subprocess.run(
        [
            "gcc",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            f"-Wl,-T,{linker_script}",
            "-o",
            str(image),
            str(tmp / "hlt.S"),
        ],
        check=True,
        capture_output=True,
    )
    return image


@pytest.mark.parametrize("seed", range(3))
def test_a_guest_idling_with_hlt_replays(hlt_image: Path, tmp_path: Path, seed: int) -> None:
    """`sti; hlt` in ring 0 until the timer fires, then an EVENTS read: the recorder must not read EVENTS
    for the guest at the HLT exit (it did: replay then found an event the guest never asked for)."""
    recording = record_run(hlt_image, tmp_path / "hlt.log", rng=random.Random(seed))
    assert recording.result.reason is StopReason.EXITED and recording.result.exit_code == 30
    assert_identical(recording, replay_run(hlt_image, recording.log))


# ----- tampering ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recording]:
    """Recordings to tamper with: ticker and kv with a state hash at every position (so a wrong value is
    caught where it was given), and ticker with the default hash interval."""
    tmp = tmp_path_factory.mktemp("tamper")
    out = {
        "ticker1": record_run(guest_image_path("ticker"), tmp / "ticker1.log", arg=40, hash_every=1),
        "ticker": record_run(guest_image_path("ticker"), tmp / "ticker.log", arg=40),
    }
    kv = guest_image_path("kv")

    async def kv_run() -> None:
        replies: list[str] = []
        async with served_recording(kv, tmp / "kv1.log", hash_every=1) as (machine, journal, address, _c):
            until = time.monotonic() + 0.15
            await asyncio.gather(
                *(kv_client_load(address, f"t{i}", random.Random(i), until, replies) for i in range(3))
            )
        out["kv1"] = finish_recording(machine, journal, tmp / "kv1.log", bytearray(), 0, None, None)

    asyncio.run(kv_run())
    return out


def tampered(recording: Recording, tmp_path: Path, change: Callable[[LogContents], int]) -> tuple[Path, int]:
    """Rewrite the recording's log with `change` applied; `change` returns the position it tampered at."""
    contents = read_log(recording.log)
    position = change(contents)
    path = tmp_path / f"tampered-{recording.log.name}"
    write_log(path, contents)
    return path, position


def replay_diverges_at(image: Path, log: Path, position: int, what: str, arg: int = 0) -> str:
    """Replay `log`: it must stop DIVERGED at `position`, the message naming it, `what` differed (a regular
    expression), the expected and the found values."""
    replayed = replay_run(image, log, arg=arg)
    result = replayed.result
    assert result.reason is StopReason.DIVERGED, result.describe()
    assert result.position == position, result.describe()
    pattern = rf"divergence at position {position}: (?:{what}): expected .+, found .+"
    assert re.fullmatch(pattern, result.message), result.message
    return result.message


def middle(indices: list[int]) -> int:
    assert indices
    return indices[len(indices) // 2]


def test_untampered_logs_replay(logs: dict[str, Recording], guest_image: GuestImage) -> None:
    for name, recording in logs.items():
        image = guest_image("kv" if name.startswith("kv") else "ticker")
        assert_identical(recording, replay_run(image, recording.log, arg=recording.arg))


def _flip_middle_clock(contents: LogContents) -> int:
    """Change the value of the middle CLOCK event; returns its position."""
    event = contents.events[middle(events_of(contents, EventKind.CLOCK))]
    event[3] ^= 1 << 12
    return int(event[0])


def test_flipped_clock_value_is_caught_where_it_was_given(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    log, position = tampered(logs["ticker1"], tmp_path, _flip_middle_clock)
    message = replay_diverges_at(guest_image("ticker"), log, position, "state hash", arg=40)
    assert re.search(r"expected [0-9a-f]{32}, found [0-9a-f]{32}$", message)


def test_flipped_clock_value_is_caught_without_per_position_hashes(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    log, position = tampered(logs["ticker"], tmp_path, _flip_middle_clock)
    replayed = replay_run(guest_image("ticker"), log, arg=40)
    assert replayed.result.reason is StopReason.DIVERGED, replayed.result.describe()
    assert replayed.result.position >= position
    assert f"divergence at position {replayed.result.position}: " in replayed.result.message


def test_flipped_net_rx_byte_is_caught_where_it_was_given(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    def flip(contents: LogContents) -> int:
        with_data = [i for i in events_of(contents, EventKind.NET_RX) if len(contents.events[i][4]) > 24]
        event = contents.events[middle(with_data)]
        data = bytearray(event[4])
        data[16] ^= 0x20  # the first payload byte of the first message
        event[4] = bytes(data)
        return int(event[0])

    log, position = tampered(logs["kv1"], tmp_path, flip)
    replay_diverges_at(guest_image("kv"), log, position, "state hash")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ticker1", EventKind.CLOCK),
        ("ticker", EventKind.EVENTS),
        ("kv1", EventKind.NET_RX),
        ("kv1", EventKind.OUTPUT),
    ],
)
def test_dropped_event_is_caught_where_it_was(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path, name: str, kind: EventKind
) -> None:
    def drop(contents: LogContents) -> int:
        event = contents.events.pop(middle(events_of(contents, kind)))
        return int(event[0])

    recording = logs[name]
    log, position = tampered(recording, tmp_path, drop)
    image = guest_image("kv" if name.startswith("kv") else "ticker")
    # the guest asks for the dropped event: the log has none there, or (with a hash at every position)
    # has that position's state hash next
    what = f"the guest asked for {kind.name}|event kind"
    message = replay_diverges_at(image, log, position, what, recording.arg)
    assert re.search(rf"expected an event of that kind here, found none|found {kind.name}$", message)


def test_dropped_interrupt_is_caught_at_its_position(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    """The interrupt became pending at P in the recording: the state hash at P already shows it missing
    (the interrupt state is part of the state hash)."""

    def drop(contents: LogContents) -> int:
        event = contents.events.pop(middle(events_of(contents, EventKind.IRQ)))
        return int(event[0])

    log, position = tampered(logs["ticker1"], tmp_path, drop)
    replay_diverges_at(guest_image("ticker"), log, position, "state hash", arg=40)


def _move_irq(contents: LogContents, front: bool) -> int:
    """Move an interrupt from its position P to P + 1 (with the guest RIP there): first thing at P + 1
    (`front`), or where the recorder would have put it (after the exit's own events, before its state
    hash). Returns P + 1."""
    events = contents.events
    irqs = events_of(contents, EventKind.IRQ)
    for index in irqs[len(irqs) // 4 :]:
        position = events[index][0]
        following = events[index + 1 : index + 40]
        at_next = [i for i, e in enumerate(following, index + 1) if e[0] == position + 1]
        between = following[: at_next[0] - index - 1] if at_next else []
        if not at_next or any(e[2] == EventKind.IRQ or e[0] != position for e in between):
            continue  # want the only interrupt of P, with events at P + 1
        if front and events[at_next[0]][2] in (EventKind.IRQ, EventKind.STATE_HASH):
            continue  # want a guest request first at P + 1
        event = events.pop(index)
        at = at_next[0] - 1  # (one earlier after the pop)
        event[0], event[1] = position + 1, events[at][1]
        if not front:
            while (
                at < len(events) and events[at][0] == position + 1 and events[at][2] != EventKind.STATE_HASH
            ):
                at += 1
        events.insert(at, event)
        return int(position + 1)
    raise AssertionError("no interrupt to move")


def test_interrupt_moved_one_position_is_caught_there(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    """Without a state hash at P (which covers the interrupt state and would catch the move there), the
    interrupt found first at P + 1 where the guest's own request was expected is an event-kind mismatch."""

    def move_and_drop_hash(contents: LogContents) -> int:
        moved_to = _move_irq(contents, front=True)
        contents.events[:] = [
            e for e in contents.events if not (e[0] == moved_to - 1 and e[2] == EventKind.STATE_HASH)
        ]
        return moved_to

    log, position = tampered(logs["ticker1"], tmp_path, move_and_drop_hash)
    message = replay_diverges_at(guest_image("ticker"), log, position, "event kind", arg=40)
    assert re.search(r"expected IRQ, found [A-Z_]+$", message), message


def test_interrupt_moved_in_recorder_order_is_caught_by_the_state_hash(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    """The interrupt is missing at P (its recorded position): the state hash there, which covers the
    interrupt state, shows it."""
    log, position = tampered(logs["ticker1"], tmp_path, lambda c: _move_irq(c, front=False))
    replay_diverges_at(guest_image("ticker"), log, position - 1, "state hash", arg=40)


def test_interrupt_moved_on_a_kv_log_is_caught(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    """Moved from P to P + 1: the interrupt state at P differs (it is part of the state hash), so the
    replay stops at P, where the interrupt went missing."""
    log, position = tampered(logs["kv1"], tmp_path, lambda c: _move_irq(c, front=False))
    replayed = replay_run(guest_image("kv"), log)
    result = replayed.result
    assert result.reason is StopReason.DIVERGED, result.describe()
    assert result.position == position - 1, result.describe()
    assert re.fullmatch(
        rf"divergence at position {result.position}: state hash: expected \w+, found \w+", result.message
    ), result.message


def test_tampered_log_through_the_cli(
    logs: dict[str, Recording], guest_image: GuestImage, tmp_path: Path
) -> None:
    def drop(contents: LogContents) -> int:
        return int(contents.events.pop(middle(events_of(contents, EventKind.CLOCK)))[0])

    log, position = tampered(logs["ticker"], tmp_path, drop)
    run = subprocess.run(
        [*VMFT, "replay", "--arg", "40", str(guest_image("ticker")), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 71, run.stdout + run.stderr
    assert f"verdict: DIVERGED: divergence at position {position}: the guest asked for CLOCK" in run.stdout


# ----- truncated, corrupted and mismatched log files ---------------------------------------------------


def _cut(at: Callable[[Path, list[int]], int]) -> Callable[[Path, Path], Path]:
    def make(src: Path, dest: Path) -> Path:
        dest.write_bytes(src.read_bytes()[: at(src, frame_offsets(src))])
        return dest

    return make


def _flip(at: Callable[[Path, list[int]], int]) -> Callable[[Path, Path], Path]:
    def make(src: Path, dest: Path) -> Path:
        data = bytearray(src.read_bytes())
        data[at(src, frame_offsets(src))] ^= 0x40
        dest.write_bytes(bytes(data))
        return dest

    return make


def _header(**fields: object) -> Callable[[Path, Path], Path]:
    def make(src: Path, dest: Path) -> Path:
        contents = read_log(src)
        for name, value in fields.items():
            setattr(contents.header, name, value)
        write_log(dest, contents)
        return dest

    return make


BAD_LOGS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty": (_cut(lambda p, f: 0), r"truncated|empty"),
    "cut in the magic": (_cut(lambda p, f: 5), r"truncated inside the magic"),
    "cut in the header length": (_cut(lambda p, f: 10), r"truncated inside the header"),
    "cut in the header": (_cut(lambda p, f: f[0] - 7), r"truncated inside the header"),
    "cut in a frame header": (
        _cut(lambda p, f: f[1] + 5),
        r"truncated: frame 1 at byte \d+ has an incomplete",
    ),
    "cut in the first frame": (
        _cut(lambda p, f: f[0] + 8 + (f[1] - f[0] - 8) // 2),  # past frame 0's header, inside its body
        r"truncated: frame 0 at byte \d+ needs \d+ bytes",
    ),
    "cut in the last frame": (
        _cut(lambda p, f: p.stat().st_size - 3),
        r"truncated: frame \d+ at byte \d+ needs \d+ bytes, \d+ remain",
    ),
    "flipped frame byte": (
        _flip(lambda p, f: (f[2] + f[3]) // 2),
        r"corrupted: frame 2 at byte \d+ fails its checksum",
    ),
    "flipped checksum": (_flip(lambda p, f: f[1] + 5), r"corrupted: frame 1 at byte \d+ fails its checksum"),
    "flipped frame length": (_flip(lambda p, f: f[-1] + 2), r"frame \d+ at byte \d+ needs \d+ bytes"),
    "bad magic": (_flip(lambda p, f: 0), r"not a vmft event log \(bad magic\)"),
    "other format version": (_header(format_version=9), r"format version 9"),
    "other CPUID": (_header(cpuid_hash="0" * 16), r"CPUID table"),
    "other memory size": (_header(mem_size=128 << 20), r"recorded with 128 MiB of guest RAM, not 64 MiB"),
    "other image": (_header(image_sha256="ab" * 32), r"recorded with image sha256 abababab"),
}


@pytest.fixture(scope="module")
def kv_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kv recording of many frames."""
    log = tmp_path_factory.mktemp("badlogs") / "kv.log"
    recording = asyncio.run(record_kv(guest_image_path("kv"), log, 7, log.parent, use_disk=False))
    assert len(frame_offsets(log)) >= 6
    assert recording.result.reason is StopReason.STOPPED
    return log


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_bad_log_is_refused_before_replay(
    kv_log: Path, guest_image: GuestImage, tmp_path: Path, case: str
) -> None:
    make, pattern = BAD_LOGS[case]
    bad = make(kv_log, tmp_path / "bad.log")
    with pytest.raises(LogError, match=pattern) as info:
        open_replay(bad, load_image_file(str(guest_image("kv"))), MEM_MIB << 20)
    assert str(bad) in str(info.value) or case.startswith("other")


def test_replay_with_the_wrong_image_or_memory_is_refused(kv_log: Path, guest_image: GuestImage) -> None:
    with pytest.raises(LogError, match=r"recorded with image sha256 .* not .*ticker.elf"):
        open_replay(kv_log, load_image_file(str(guest_image("ticker"))), MEM_MIB << 20)
    with pytest.raises(LogError, match=r"recorded with 64 MiB of guest RAM, not 128 MiB"):
        open_replay(kv_log, load_image_file(str(guest_image("kv"))), 128 << 20)


def test_log_cut_at_a_frame_boundary_replays_what_it_has(
    kv_log: Path, guest_image: GuestImage, tmp_path: Path
) -> None:
    """Frames intact but the end missing (a recorder that died): replay what is there, then say so."""
    offsets = frame_offsets(kv_log)
    cut = tmp_path / "cut.log"
    cut.write_bytes(kv_log.read_bytes()[: offsets[len(offsets) // 2]])
    horizon = read_log(cut).horizons[-1]
    replayed = replay_run(guest_image("kv"), cut)
    assert replayed.result.reason is StopReason.STOPPED, replayed.result.describe()
    assert replayed.end_position is None
    assert replayed.result.position == horizon
    assert "without an end marker" in replayed.result.message


CLI_CASES = [
    "cut in a frame header",
    "cut in the last frame",
    "flipped frame byte",
    "bad magic",
    "other memory size",
]


def test_bad_logs_through_the_cli(kv_log: Path, guest_image: GuestImage, tmp_path: Path) -> None:
    image = str(guest_image("kv"))
    for case in CLI_CASES:
        make, pattern = BAD_LOGS[case]
        bad = make(kv_log, tmp_path / "bad.log")
        run = subprocess.run(
            [*VMFT, "replay", image, str(bad)], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert run.returncode == 2, (case, run.stdout, run.stderr)
        assert re.search(r"vmft: error: .*" + pattern, run.stderr), (case, run.stderr)
        assert "replayed" not in run.stdout, case  # refused before replaying anything
    run = subprocess.run(
        [*VMFT, "replay", str(guest_image("ticker")), str(kv_log)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 2 and "was recorded with image sha256" in run.stderr, run.stderr
    offsets = frame_offsets(kv_log)
    cut = tmp_path / "cut.log"
    cut.write_bytes(kv_log.read_bytes()[: offsets[-2]])
    run = subprocess.run(
        [*VMFT, "replay", image, str(cut)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 1 and "verdict: INCOMPLETE" in run.stdout, run.stdout + run.stderr
    run = subprocess.run(
        [*VMFT, "replay", image, str(kv_log)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0 and "verdict: IDENTICAL" in run.stdout, run.stdout + run.stderr


# ----- incremental replay behind a live recording --------------------------------------------------------


async def test_replay_follows_a_live_recording_with_a_horizon(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """The recorder's batches reach a replaying machine through a QueueSource while the recorder runs;
    the replay waits at the horizon (also through a quiet spell longer than its hang timeout), keeps
    up, and ends in the recording's state."""
    image = guest_image("kv")
    source = QueueSource()

    tee = queue_tee(source)

    journal = ReplayJournal(source)
    replay = new_machine(image, journal, hang_timeout=0.5)
    rng = random.Random(99)
    replies: list[str] = []
    lags: list[int] = []
    async with served_recording(image, tmp_path / "live.log", tee=tee, rng=rng) as (
        machine,
        recorder,
        address,
        _console,
    ):
        replay.start()

        async def load(seconds: float) -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(
                *(kv_client_load(address, f"live{i}", random.Random(i), until, replies) for i in range(3))
            )

        async def caught_up(limit_s: float = 10.0) -> None:
            """Until the replay is within 2 positions of the idle recorder (the exit it is blocked in and
            what a flush holds back); a replay that never catches up fails here, with its lag."""
            deadline = time.monotonic() + limit_s
            while machine.position - replay.position > 2:
                assert time.monotonic() < deadline, f"lag {machine.position - replay.position} at {limit_s} s"
                await asyncio.sleep(0.01)
            lags.append(machine.position - replay.position)

        await load(0.3)
        await caught_up()
        await asyncio.sleep(0.8)  # quiet, longer than the replay's hang timeout: it waits, it is not hung
        assert replay.result is None, replay.result.describe()
        lags.append(machine.position - replay.position)  # and stays caught up while the recorder idles
        await load(0.2)
        await caught_up()
    recorded = machine.result
    assert recorded is not None and recorded.reason is StopReason.STOPPED
    digest = machine.state_digest()
    machine.close()
    try:
        result = replay.wait_blocking(10)
        replay_digest = replay.state_digest()
    finally:
        replay.close()
    assert result.reason is StopReason.STOPPED and not result.message, result.describe()
    assert result.position == recorded.position == journal.end_position
    assert journal.stats.outputs == recorder.stats.outputs > 10
    assert replay_digest == digest
    # caught up while the recorder idled: at most the exit it is blocked in (and what a flush holds back)
    assert all(0 <= lag <= 2 for lag in lags), lags


def test_replay_log_copy_matches(tmp_path: Path) -> None:
    """write_log(read_log(x)) is a faithful copy (the tampering helpers change only what they mean to)."""
    recording = record_run(guest_image_path("ticker"), tmp_path / "t.log", arg=10)
    copy = tmp_path / "copy.log"
    write_log(copy, read_log(recording.log))
    original, again = read_log(recording.log), read_log(copy)
    assert original.events == again.events and original.horizons == again.horizons
    assert_identical(recording, replay_run(guest_image_path("ticker"), copy, arg=10))
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_replay_behind_an_idle_recording_is_not_hung(guest_image: GuestImage, tmp_path: Path) -> None:
    """mixed has no timer: idle, it sits in one WAIT exit, so its replay waits for log at one position for
    as long as the quiet lasts. Waiting for log is not a hang."""
    image = guest_image("mixed")
    disk = tmp_path / "mixed.img"
    disk.write_bytes(bytes(64 << 10))
    before = tmp_path / "before.img"
    shutil.copyfile(disk, before)
    source = QueueSource()
    journal = ReplayJournal(source)
    replay = new_machine(image, journal, disk=before, hang_timeout=0.3)
    tee = queue_tee(source)
    async with served_recording(image, tmp_path / "idle.log", disk, tee=tee) as (
        machine,
        recorder,
        address,
        _,
    ):
        replay.start()
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        for message in (b"one", b"two", b"QUIT"):
            await asyncio.sleep(1.0)  # quiet, longer than the replay's hang timeout
            assert replay.result is None, replay.result.describe()
            writer.write(len(message).to_bytes(4, "big") + message)
            await writer.drain()
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
            await asyncio.wait_for(reader.readexactly(size), 10)
        writer.close()
        assert (await asyncio.wait_for(machine.wait(), 10)).reason is StopReason.EXITED
    digest = machine.state_digest()
    machine.close()
    try:
        result = replay.wait_blocking(10)
        assert result.reason is StopReason.EXITED, result.describe()
        assert replay.state_digest() == digest
    finally:
        replay.close()
    assert before.read_bytes() == disk.read_bytes()
