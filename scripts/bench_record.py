"""The cost of recording the event log, as `vmft run --record` does (monitor.record: a RecordJournal writing
zstd frames to a LogFileWriter in a temporary directory), and what it produces:

(a) exit cost of the exitloop guest with recording on against off;
(b) kv throughput with 32 connections with recording on against off (fresh VM per phase, interleaved);
(c) log bytes per event (compressed against uncompressed) and log bandwidth under that kv load (against the
    clients' input bandwidth) and for an idle kv guest ticking its 50 ms timer (against 0.1 Mbit/s);
(d) replay speed: each recorded kv log replayed (monitor.record.open_replay + Machine), wall time per
    position against the recording's.
The kv client load is build/kvload (scripts/kvload.c) in its own process, placed as in `scripts/bench kv`
(--placement: by default the generator on the last core and this process free)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_exits
import bench_kv
import benchlib
from monitor.devices.net import NetMessage
from monitor.journal import Journal
from monitor.loader import GuestImage, load_image_file
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import Machine, StopReason
from monitor.record import DEFAULT_HASH_EVERY, LogFileWriter, RecordJournal, make_header, open_replay
from proto import vmft_pb2

IDLE_TARGET_MBIT = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exits", type=int, default=5000, help="exitloop exits per run (default 5000)")
    parser.add_argument("--exit-rounds", type=int, default=11, help="exitloop rounds (default 11)")
    bench_kv.add_load_arguments(parser)
    parser.add_argument("--kv-rounds", type=int, default=3, help="kv rounds, on and off (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle kv guest time (default 5)")
    parser.add_argument("--hash-every", type=int, default=DEFAULT_HASH_EVERY,
                        help=f"state hash every N positions (default {DEFAULT_HASH_EVERY}, as vmft run)")


class CountingWriter(LogFileWriter):
    """LogFileWriter that also counts the uncompressed (serialized) size of what it writes."""

    def __init__(self, path: Path, header: vmft_pb2.LogHeader) -> None:
        super().__init__(path, header)
        self.raw_bytes = 0

    def write_batch(self, batch: vmft_pb2.EventBatch) -> None:
        self.raw_bytes += batch.ByteSize()
        super().write_batch(batch)


def recording(path: Path, image: GuestImage, hash_every: int) -> tuple[RecordJournal, CountingWriter]:
    """What monitor.record.open_recording builds for `vmft run --record`, with a counting writer."""
    writer = CountingWriter(path, make_header(image, bench_kv.MEM_MIB << 20, hash_every=hash_every))
    return RecordJournal(writer, hash_every=hash_every), writer


@dataclass
class Recorded:
    """One recorded kv phase."""

    path: Path
    positions: int  # of the whole recording
    events: int
    log_bytes: int
    raw_bytes: int
    # during the load (from the samples nearest to the client's start and end):
    load_seconds: float
    load_positions: int
    load_log_bytes: int
    load_input_bytes: int  # client payload and framing bytes that reached the NIC


@dataclass
class KvResults:
    off: bench_kv.Load = field(default_factory=lambda: bench_kv.Load([], [], []))
    on: bench_kv.Load = field(default_factory=lambda: bench_kv.Load([], [], []))
    recorded: list[Recorded] = field(default_factory=list)


class Sampler:
    """Samples (time.monotonic, position, log bytes, input bytes) every few ms on the event loop."""

    def __init__(self, machine: Machine, writer: LogFileWriter, interval: float = 0.01) -> None:
        self.samples: list[tuple[float, int, int, int]] = []
        self._machine = machine
        self._writer = writer
        self._input = count_input(machine)
        self._interval = interval
        self._task = asyncio.create_task(self._run())

    def sample(self) -> None:
        m = self._machine
        self.samples.append((time.monotonic(), m.position, self._writer.bytes_written, self._input()))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def window(self, start: float, end: float) -> tuple[float, int, int, int]:
        """Differences (seconds, positions, log bytes, input bytes) between the samples nearest start/end."""
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        return b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]


def count_input(machine: Machine) -> Callable[[], int]:
    """Count the bytes the network server pushes to the guest (payload + 4-byte frame)."""
    backend = machine.net_backend
    push = backend.push
    total = [0]

    def counting_push(message: NetMessage) -> None:
        total[0] += len(message.payload) + 4
        push(message)

    backend.push = counting_push  # type: ignore[method-assign]
    return lambda: total[0]


async def kv_phases(args: argparse.Namespace, image: GuestImage, tmp: Path) -> KvResults:
    res = KvResults()
    for r in range(args.kv_rounds):
        for recorded in (True, False) if r % 2 == 0 else (False, True):
            tag = f"{'on' if recorded else 'off'}{r}"
            if not recorded:
                async with bench_kv.kv_guest(image=image) as (_machine, address):
                    await bench_kv.measure(address, args, tag, res.off, latency=False)
                continue
            path = tmp / f"kv-{r}.log"
            journal, writer = recording(path, image, args.hash_every)
            async with bench_kv.kv_guest(journal, image) as (machine, address):
                sampler = Sampler(machine, writer)
                start, end = await bench_kv.measure(address, args, tag, res.on, latency=False)
                await asyncio.sleep(0.05)
                await sampler.stop()
                machine.stop()
                result = await asyncio.wait_for(machine.wait(), 30)
            if result.reason is not StopReason.STOPPED:
                raise RuntimeError(f"recorded kv guest: {result.describe()}")
            res.recorded.append(Recorded(path, result.position, journal.stats.events, writer.bytes_written,
                                         writer.raw_bytes, *sampler.window(start, end)))
    return res


async def idle_phase(seconds: float, image: GuestImage, tmp: Path, hash_every: int) -> tuple[float, int]:
    """Log bits per second of a recorded kv guest that only ticks its timer; and the events logged."""
    journal, writer = recording(tmp / "idle.log", image, hash_every)
    async with bench_kv.kv_guest(journal, image):
        await asyncio.sleep(0.3)  # past start-up
        bytes0, events0, t0 = writer.bytes_written, journal.stats.events, time.perf_counter()
        await asyncio.sleep(seconds)
        bits = (writer.bytes_written - bytes0) * 8
        events = journal.stats.events - events0
        rate = bits / (time.perf_counter() - t0)
    return rate, events


def replay(rec: Recorded, image: GuestImage) -> float:
    """Wall seconds per position replaying `rec` from its log; checks the replay is identical."""
    journal = open_replay(rec.path, image, bench_kv.MEM_MIB << 20)
    config = MachineConfig(str(image.path), bench_kv.MEM_MIB, None, 0, 5.0)
    machine = builder.build(config, journal=journal, image=image)
    try:
        machine.state_digest()  # as for the recording VM (bench_kv.kv_guest)
        start = time.perf_counter()
        result = machine.run_blocking(300)
        seconds = time.perf_counter() - start
    finally:
        machine.close()
    if (result.reason in (StopReason.DIVERGED, StopReason.ERROR) or journal.end_position is None
            or result.position != journal.end_position or result.position != rec.positions):
        raise RuntimeError(f"replay of {rec.path} not identical: {result.describe()}")
    return seconds / result.position


def run(args: argparse.Namespace) -> list[benchlib.Figure]:
    image = load_image_file(str(benchlib.guest_path("kv.elf")))
    exit_image = load_image_file(str(benchlib.guest_path("exitloop.elf")))
    figures: list[benchlib.Figure] = []
    med = benchlib.median
    with tempfile.TemporaryDirectory(prefix="vmft-bench-record-") as tmpdir:
        tmp = Path(tmpdir)

        # (a) the exit loop
        counter = iter(range(1 << 30))

        def exit_journal() -> Journal:
            path = tmp / f"exits-{next(counter)}.log"
            header = make_header(exit_image, 64 << 20, hash_every=args.hash_every)
            return RecordJournal(LogFileWriter(path, header), hash_every=args.hash_every)

        exits = benchlib.interleaved(args.exit_rounds, {
            "on": lambda: bench_exits.monitor_run(args.exits, exit_journal),
            "off": lambda: bench_exits.monitor_run(args.exits),
        })
        figures.append(benchlib.Figure("exit cost, recording on", med(exits["on"]), "us/exit",
                                       med(exits["off"]), "recording off"))

        # (b) kv throughput, (c) log size under load, (d) replay
        with bench_kv.servers_pinned(args):
            kv = asyncio.run(kv_phases(args, image, tmp))
        figures.append(benchlib.Figure(f"kv throughput, {args.connections} connections, recording on",
                                       med(kv.on.requests_per_s), "req/s", med(kv.off.requests_per_s),
                                       "recording off"))
        recs = kv.recorded
        events = sum(r.events for r in recs)
        figures.append(benchlib.Figure("log bytes per event, kv under load (zstd)",
                                       sum(r.log_bytes for r in recs) / events, "B/event",
                                       sum(r.raw_bytes for r in recs) / events, "uncompressed"))
        figures.append(benchlib.Figure("log bandwidth, kv under load",
                                       med(r.load_log_bytes * 8 / r.load_seconds / 1e6 for r in recs),
                                       "Mbit/s",
                                       med(r.load_input_bytes * 8 / r.load_seconds / 1e6 for r in recs),
                                       "client input to the NIC"))

        # (c) idle
        idle_rate, _ = asyncio.run(idle_phase(args.idle_seconds, image, tmp, args.hash_every))
        figures.append(benchlib.Figure("log bandwidth, idle kv guest (50 ms timer)", idle_rate / 1e6,
                                       "Mbit/s", IDLE_TARGET_MBIT, "target"))

        # (d) replay against record
        replay_s = [replay(rec, image) for rec in recs]
        figures.append(benchlib.Figure("replay of the kv log", med(replay_s) * 1e6, "us/position",
                                       med(r.load_seconds / r.load_positions for r in recs) * 1e6,
                                       "recording under load"))
    return figures
