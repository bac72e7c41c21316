"""The checkpoint side of the `vmft` command line: `vmft run` with periodic checkpoints, fault restart
and a control socket; `vmft restore FILE`; `vmft snapshot SOCKET FILE`.

Control socket protocol (a Unix socket served by `vmft run/restore --control-socket PATH`): one request
per line, one reply line each, `ok ...` or `error ...`:
    snapshot FILE   write a full checkpoint of the running VM to FILE (a path on the VM's host)
    status          position, faults, restarts and checkpoints so far
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from monitor.address import parse_address
from monitor import builder
from monitor.checkpoint import CheckpointError, CheckpointStats, CheckpointStore, Loading
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import NicServer
from monitor.restart import FaultAction, RestartPolicy, Supervisor
from replica.cli_common import EXIT_UNREACHABLE, fail, result_exit_status, write_console

log = logging.getLogger("vmft")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `vmft run` (and `vmft restore`) for checkpoints and fault handling."""
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="write periodic checkpoints into DIR")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=0.0,
        metavar="S",
        help="take a checkpoint every S seconds (the first right after start; full, then incremental)",
    )
    parser.add_argument(
        "--full-every", type=int, default=10, metavar="N", help="a new full checkpoint every N checkpoints"
    )
    parser.add_argument(
        "--on-fault",
        choices=[a.value for a in FaultAction],
        default=FaultAction.STOP.value,
        help="when the guest crashes, panics or hangs: restart it from its latest checkpoint, or stop",
    )
    parser.add_argument(
        "--max-restarts", type=int, default=5, metavar="N", help="give up after N faults in a row"
    )
    parser.add_argument(
        "--control-socket", metavar="PATH", help="serve `snapshot FILE` and `status` on this Unix socket"
    )


def wants_supervision(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "checkpoint_dir", None)
        or getattr(args, "control_socket", None)
        or getattr(args, "on_fault", "stop") != FaultAction.STOP.value
    )


def _check_args(args: argparse.Namespace) -> str | None:
    if args.on_fault == FaultAction.RESTART.value and not args.checkpoint_dir:
        return "--on-fault restart needs --checkpoint-dir (restarts come from checkpoints)"
    if args.checkpoint_dir and args.checkpoint_every <= 0:
        return "--checkpoint-dir needs --checkpoint-every S"
    if getattr(args, "record", None) and args.on_fault == FaultAction.RESTART.value:
        return "--record with --on-fault restart: a restarted VM runs live, unrecorded; choose one"
    return None


def _describe(stats: CheckpointStats) -> str:
    return (
        f"position={stats.position} incremental={int(stats.incremental)} raw_bytes={stats.raw_bytes} "
        f"stored_bytes={stats.stored_bytes} ratio={stats.ratio:.2f} pause_ms={stats.pause_s * 1e3:.3f} "
        f"total_ms={stats.total_s * 1e3:.1f} id={stats.checkpoint_id} path={stats.path}"
    )


async def _serve_control(path: str, supervisor: Supervisor) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                words = line.decode(errors="replace").strip().split(maxsplit=1)
                if not words:
                    continue
                try:
                    if words[0] == "snapshot" and len(words) == 2:
                        stats = await asyncio.to_thread(supervisor.snapshot, words[1])
                        reply = "ok " + _describe(stats)
                    elif words[0] == "status":
                        r = supervisor.restarter
                        reply = (
                            f"ok position={supervisor.machine.position} faults={len(r.faults)} "
                            f"restarts={r.restarts} checkpoints={supervisor.stats.checkpoints}"
                        )
                    else:
                        reply = "error unknown request (snapshot FILE | status)"
                except Exception as err:
                    reply = f"error {type(err).__name__}: {err}"
                writer.write(reply.replace("\n", " ").encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    _remove_socket(path)
    return await asyncio.start_unix_server(handle, path)


def _remove_socket(path: str) -> None:
    Path(path).unlink(missing_ok=True)


async def run_supervised(machine: Machine, args: argparse.Namespace, restored_from: str = "") -> Supervisor:
    """Run `machine` (loaded or restored, not started) under a Supervisor until it stops for good."""
    loop = asyncio.get_running_loop()
    store = CheckpointStore(args.checkpoint_dir, full_every=args.full_every) if args.checkpoint_dir else None
    policy = RestartPolicy(FaultAction(args.on_fault), max_restarts=args.max_restarts)
    servers: list[NicServer] = []
    listen = getattr(args, "listen", None)
    address: list[tuple[str, int]] = [parse_address(listen)] if listen else []

    async def attach(m: Machine) -> None:
        if not address:
            return
        server = NicServer(m.net_backend, address[0][0], address[0][1], first_conn_id=m.next_conn_id())
        bound = await server.start()
        if address[0][1] == 0:
            address[0] = bound
        print(f"vmft: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        servers.append(server)

    async def detach(m: Machine) -> None:
        while servers:
            await servers.pop().close()

    supervisor = Supervisor(
        machine, policy, store, args.checkpoint_every or None, attach, detach, restored_from=restored_from
    )
    control = await _serve_control(args.control_socket, supervisor) if args.control_socket else None

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.stop)
    try:
        await supervisor.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if control is not None:
            control.close()
            await control.wait_closed()
            _remove_socket(args.control_socket)
    return supervisor


def finish_supervised(supervisor: Supervisor) -> int:
    """Report how a supervised run ended; the exit status."""
    machine = supervisor.machine
    result: MachineResult | None = machine.result
    machine.close()
    for fault in supervisor.restarter.faults:
        print(f"vmft: fault: {fault.describe()}", file=sys.stderr)
    if supervisor.restarter.faults:
        print(
            f"vmft: {len(supervisor.restarter.faults)} faults, {supervisor.restarter.restarts} restarts",
            file=sys.stderr,
        )
    assert result is not None
    if result.reason is not StopReason.EXITED:
        print(f"vmft: guest {result.describe()}", file=sys.stderr)
    for message in machine.guest_faults[-5:]:
        print(f"vmft: guest fault: {message}", file=sys.stderr)
    return result_exit_status(result)


def cmd_run_supervised(args: argparse.Namespace, machine: Machine) -> int:
    """`vmft run` with checkpoint options (machine loaded, not started)."""
    problem = _check_args(args)
    if problem:
        machine.close()
        return fail(problem)
    return _supervise(machine, args)


def _supervise(machine: Machine, args: argparse.Namespace) -> int:
    try:
        supervisor = asyncio.run(run_supervised(machine, args))
    except BaseException:
        machine.close()
        raise
    return finish_supervised(supervisor)


def cmd_restore(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        return fail(problem)
    try:
        machine, stats = builder.restore(
            args.file,
            disk=args.disk,
            hang_timeout_s=args.hang_timeout,
            on_console=write_console,
            loading=Loading.LAZY,
        )
    except CheckpointError as err:
        return fail(f"refused: {err}")
    print(
        f"vmft: restored {args.file} (chain of {stats.chain_length}) at position {stats.position} "
        f"in {stats.seconds * 1e3:.1f} ms",
        file=sys.stderr,
    )
    return _supervise(machine, args)


def snapshot_request(socket_path: str, file: str, timeout: float = 60.0) -> str:
    """Ask a running `vmft run --control-socket` for a checkpoint; its reply line."""
    target = os.path.abspath(file)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(f"snapshot {target}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    return reply.decode(errors="replace").strip()


def cmd_snapshot(args: argparse.Namespace) -> int:
    try:
        reply = snapshot_request(args.socket, args.file)
    except OSError as err:
        print(f"vmft snapshot: cannot reach {args.socket}: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.startswith("ok"):
        print(f"vmft snapshot: {reply or 'no reply'}", file=sys.stderr)
        return 1
    print(reply[3:])
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    restore = sub.add_parser("restore", help="run a VM again from a checkpoint file (and its chain)")
    restore.add_argument("file", help="checkpoint file (an incremental one finds its parents beside it)")
    restore.add_argument("--listen", metavar="HOST:PORT", help="serve the guest's NIC on this TCP address")
    restore.add_argument("--disk", metavar="FILE", help="restore the disk here (default: its recorded path)")
    restore.add_argument("--hang-timeout", type=float, default=None, metavar="S")
    add_run_arguments(restore)
    restore.set_defaults(func=cmd_restore)

    snapshot = sub.add_parser("snapshot", help="checkpoint a VM run with --control-socket into FILE")
    snapshot.add_argument("socket", help="the VM's control socket (vmft run --control-socket PATH)")
    snapshot.add_argument("file", help="where the running VM's host writes the checkpoint")
    snapshot.set_defaults(func=cmd_snapshot)
