"""The `vmft` command line: one sub-command each, every error told in one line (replica/cli_common.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from monitor.address import parse_address
from monitor.errors import VmftError
from monitor.loader import load_image_file
from monitor import builder
from monitor.config import MachineConfig
from monitor.machine import Machine, MachineResult, StopReason
from monitor.netserver import NicServer
from monitor.record import open_recording, open_replay
from replica import ca_cli, checkpoint_cli, node_client
from replica.cli_common import (
    EXIT_DIVERGED,
    EXIT_GUEST_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    error_line,
    result_exit_status,
    run_until_stopped,
    write_console,
)

log = logging.getLogger("vmft")


def _add_machine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="static ELF64 guest image (built into guests/build/)")
    parser.add_argument("--mem", type=int, default=64, metavar="MiB", help="guest RAM (default 64)")
    parser.add_argument("--disk", metavar="FILE", help="disk image file (size a multiple of 512)")
    parser.add_argument("--arg", type=int, default=0, help="a number passed to the guest (boot info)")
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="report the guest hung after S seconds without an exit",
    )


def machine_config(args: argparse.Namespace) -> MachineConfig:
    return MachineConfig(args.image, args.mem, args.disk, args.arg, args.hang_timeout)


async def run_machine(machine: Machine, listen: str | None) -> MachineResult:
    """Run until the guest stops; SIGINT/SIGTERM stop it cleanly at a synchronous exit."""
    server: NicServer | None = None
    if listen:
        host, port = parse_address(listen)
        server = NicServer(machine.net_backend, host, port)
        bound = await server.start()
        print(f"vmft: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    try:
        return await run_until_stopped(machine)
    finally:
        if server is not None:
            await server.close()


def cmd_run(args: argparse.Namespace) -> int:
    image = load_image_file(args.image)
    journal = open_recording(args.record, image, args.mem << 20, args.hash_every) if args.record else None
    machine = builder.build(machine_config(args), journal=journal, image=image, on_console=write_console)
    if checkpoint_cli.wants_supervision(args):  # checkpoints, fault restart, control socket
        return checkpoint_cli.cmd_run_supervised(args, machine)
    try:
        result = asyncio.run(run_machine(machine, args.listen))
    finally:
        machine.close()
    if result.reason is not StopReason.EXITED:
        print(f"vmft: guest {result.describe()}", file=sys.stderr)
    for fault in machine.guest_faults[-5:]:
        print(f"vmft: guest fault: {fault}", file=sys.stderr)
    return result_exit_status(result)


def cmd_replay(args: argparse.Namespace) -> int:
    image = load_image_file(args.image)
    journal = open_replay(args.log, image, args.mem << 20)
    machine = builder.build(machine_config(args), journal=journal, image=image)
    started = time.monotonic()
    try:
        result = machine.run_blocking()
    finally:
        machine.close()
    seconds = time.monotonic() - started
    stats = journal.stats
    print(
        f"replayed {result.position} positions in {seconds:.2f} s: {stats.events} events applied, "
        f"{stats.outputs} outputs and {stats.state_hashes} state hashes verified"
    )
    if result.reason is StopReason.DIVERGED:
        print(f"verdict: DIVERGED: {result.message}")
        return EXIT_DIVERGED
    if result.reason is StopReason.ERROR:
        print(f"verdict: ERROR: {result.message}")
        return EXIT_GUEST_FAILED
    if journal.end_position is None or result.position != journal.end_position:
        print(f"verdict: INCOMPLETE: {result.message or result.describe()}")
        return 1
    print(f"verdict: IDENTICAL to the recording (guest {stats.end_reason}: {result.describe()})")
    return 0


def cmd_kv(args: argparse.Namespace) -> int:
    from replica.kv_client import KvError, KvUnavailable, KvClientSync

    client = KvClientSync(args.address.split(","), client_id=args.client_id, timeout=args.timeout)
    op: str = args.op
    try:
        if op == "get":
            value = client.get(args.key)
            print(value if value is not None else "(not found)")
            return 0 if value is not None else 1
        if op == "set":
            client.set(args.key, args.value)
        elif op == "incr":
            print(client.incr(args.key, int(args.value or 1)))
        elif op == "del":
            print("deleted" if client.delete(args.key) else "(not found)")
        elif op == "stats":
            print(client.stats())
        return 0
    except KvUnavailable as err:
        print(f"vmft kv: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KvError as err:
        print(f"vmft kv: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()


DEFAULT_ARBITER = "/var/tmp/vmft/arbiter.sqlite"


def _node_identity(args: argparse.Namespace) -> Any:
    """The node's own certificate (--cert NAME under --ca, or an identity directory); None with
    --insecure (tls.bind then refuses any address but loopback)."""
    from replica import node_client, tls

    if args.cert:
        identity = node_client.find_identity(args.cert, args.ca or os.environ.get("VMFT_CA"))
        if identity.role is not tls.Role.NODE:
            raise tls.TlsError(
                f"{identity.directory} holds a {identity.role.value} certificate, not a node's"
            )
        if args.insecure:
            raise tls.TlsError("--insecure with --cert: choose one")
        return identity
    if not args.insecure:
        raise tls.TlsError(
            "a node serves mutual TLS: give --cert NAME (with --ca DIR), or --insecure on loopback"
        )
    tls.check_plaintext(args.listen, True)
    return None


def _milliseconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of milliseconds in [low, high] (a clear error otherwise)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
        if not low <= value <= high:  # (also refuses nan)
            raise argparse.ArgumentTypeError(f"{value:g} ms is outside {low:g} to {high:g} ms")
        return value

    return parse


def _address(text: str) -> str:
    """An argparse type: HOST:PORT (the parser's own message otherwise)."""
    try:
        return str(parse_address(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free one)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)


def cmd_node(args: argparse.Namespace) -> int:
    from replica.node import serve
    from replica.vm_common import NodeSettings

    if args.failure_timeout_ms <= args.heartbeat_ms:
        raise SystemExit(
            f"vmft node: --failure-timeout-ms ({args.failure_timeout_ms:g}) must be longer than "
            f"--heartbeat-ms ({args.heartbeat_ms:g}): a live peer would be declared dead"
        )
    identity = _node_identity(args)
    settings = NodeSettings(
        name=args.listen,
        data_dir=Path(args.data_dir),
        heartbeat_interval_s=args.heartbeat_ms / 1000,
        failure_timeout_s=args.failure_timeout_ms / 1000,
        checkpoint_every_s=args.checkpoint_every,
        link_relay=args.link_relay,
        input_hold_ms=args.input_hold_ms,
        replication_port=args.replication_port,
        replication_advertise=args.replication_advertise or "",
        auto_reprotect_s=args.auto_reprotect,
        unsafe_release_outputs=args.unsafe_release_outputs,
        identity=identity,
        insecure=identity is None,
    )

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        from replica.node import NodeLimits
        from replica.node_etcd import parse_endpoints

        await serve(
            settings,
            Path(args.arbiter),
            etcd=parse_endpoints(args.etcd) if args.etcd else None,
            limits=NodeLimits(max_vms=args.max_vms, memory_mib=args.memory_mib, cgroups=not args.no_cgroups),
            metrics=args.metrics,
        )

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    return 0


def _free_loopback_address() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _node_call(
    args: argparse.Namespace, address: str, method: str, request: Any, timeout: float, what: str
) -> Any:
    """One call of the node API; on failure print the node's reason and return None."""
    import grpc

    from proto import vmft_pb2_grpc
    from replica import node_client

    with node_client.from_args(args).channel(address) as channel:
        try:
            return getattr(vmft_pb2_grpc.NodeStub(channel), method)(request, timeout=timeout)
        except grpc.RpcError as err:
            print(f"{what}: {err.details()}", file=sys.stderr)
            return None


def cmd_protect(args: argparse.Namespace) -> int:
    from proto import vmft_pb2

    from replica.cluster import empty_disk_size

    image = load_image_file(args.image)
    spec = vmft_pb2.VmSpec(
        name=args.name,
        image=image.data,  # each node stores it by sha256 in its image directory: no host paths
        image_sha256=image.sha256,
        mem_mib=args.mem,
        disk_size=empty_disk_size(args.disk) if args.disk else 0,  # made empty inside each data dir
        arg=args.arg,
        hang_timeout_s=args.hang_timeout,
        cpu_quota=args.cpu_quota,
        memory_limit_mib=args.memory_limit_mib,
        moving_address=args.moving_address or "",
    )
    if args.etcd and not args.backup:  # placement: a live member other than the primary's node
        from replica.node_etcd import parse_endpoints, pick_backup

        auth = node_client.from_args(args)
        chosen = pick_backup(parse_endpoints(args.etcd), auth.identity, args.mem, args.primary)
        if chosen is None:
            print("vmft protect: no live member can host the backup", file=sys.stderr)
            return 1
        args.backup = chosen.address
        print(f"backup placed on {chosen.name} ({chosen.address}, {chosen.memory_free_mib} MiB free)")
    service = args.service or _free_loopback_address()
    backup_service = args.backup_service or (_free_loopback_address() if args.backup else "")
    request = vmft_pb2.ProtectRequest(
        spec=spec, backup_node=args.backup or "", service=service, backup_service=backup_service
    )
    status = _node_call(args, args.primary, "Protect", request, 30, "vmft protect")
    if status is None:
        return 1
    print(f"protected {status.name}: generation {status.generation}, primary {args.primary}, ", end="")
    print(f"backup {args.backup or '(none: unprotected)'}")
    print(f"service: {service}" + (f" (after failover: {backup_service})" if backup_service else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from proto import vmft_pb2, vmft_pb2_grpc
    from replica import node_client

    auth = node_client.from_args(args)
    addresses = list(args.node or [])
    cluster: dict[str, Any] = {}
    if args.etcd:
        from replica import status_cli
        from replica.node_etcd import parse_endpoints

        cluster = status_cli.cluster_view(parse_endpoints(args.etcd), auth)
        addresses += [m["address"] for m in cluster["members"] if m["address"] not in addresses]
    if not addresses and not args.etcd:
        print("vmft status: give --node ADDR (repeat) or --etcd ENDPOINTS", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        from replica import status_cli

        nodes = [status_cli.node_view(address, auth) for address in addresses]
        status_cli.print_json({**cluster, "nodes": nodes})
        return 1 if nodes and all("error" in n for n in nodes) else 0
    for member in cluster.get("members", []):
        print(f"member {member['name']} at {member['address']}: {member['vms']} VMs, "
              f"{member['memory_free_mib']} MiB free")  # fmt: skip
    for claim in cluster.get("claims", []):
        print(f"arbiter: {claim['vm']} generation {claim['generation']} held by {claim['node']}")
    failed = 0
    print(
        f"{'node':22} {'vm':10} {'role':8} {'gen':>3} {'position':>10} {'acked':>10} {'held':>5} prot  state"
    )
    for address in addresses:
        with auth.channel(address) as channel:
            try:
                node = vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=5)
            except grpc.RpcError as err:
                print(f"{address:22} unreachable: {err.code().name}")
                failed += 1
                continue
        print(
            f"{address:22} memory {node.memory_reserved_mib} of {node.memory_budget_mib} MiB reserved, "
            f"{len([vm for vm in node.vms if vm.role != vmft_pb2.ROLE_STOPPED])} of {node.max_vms} VMs; "
            f"limits: {node.resource_limits or 'none'}"
            + (f"; metrics {node.metrics}" if node.metrics else "")
            + (f"; replication {node.replication}" if node.replication else "")
        )
        if not node.vms:
            print(f"{address:22} (no VMs)")
        for vm in node.vms:
            role = vmft_pb2.Role.Name(vm.role).removeprefix("ROLE_").lower()
            state = vmft_pb2.VmState.Name(vm.state).removeprefix("VM_STATE_").lower().replace("_", " ")
            print(
                f"{address:22} {vm.name:10} {role:8} {vm.generation:>3} {vm.position:>10} "
                f"{vm.acked_position:>10} "
                f"{vm.held_outputs:>5} {'yes' if vm.protected else 'no ':4} {state}"
                + (f" ({vm.message})" if vm.message else "")
                + (f" log {vm.log_bytes_per_s / 1024:.1f} KiB/s" if vm.log_bytes_per_s else "")
                + (f" {vm.reprotect_progress:.0%}" if vm.state == vmft_pb2.VM_STATE_REPROTECTING else "")
            )
    return 1 if addresses and failed == len(addresses) else 0


def cmd_reprotect(args: argparse.Namespace) -> int:
    from proto import vmft_pb2

    request = vmft_pb2.ReprotectRequest(
        name=args.vm, backup_node=args.backup, backup_service=args.backup_service or _free_loopback_address()
    )
    status = _node_call(args, args.primary, "Reprotect", request, 120, "vmft reprotect")
    if status is None:
        return 1
    print(f"{status.name}: {status.message}")
    print(f"service: {status.service} (after failover: {request.backup_service})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from proto import vmft_pb2

    request = vmft_pb2.StopVmRequest(name=args.vm, grace_s=args.grace)
    status = _node_call(args, args.node, "StopVm", request, args.grace + 30, "vmft stop")
    if status is None:
        return 1
    print(f"{status.name}: {vmft_pb2.VmState.Name(status.state)}: {status.message}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """`vmft migrate VM --to NODE`: the primary's node moves the primary there (replica/migration.py)."""
    import json

    import grpc

    from proto import vmft_pb2, vmft_pb2_grpc
    from replica import node_client

    auth = node_client.from_args(args)
    primary = None
    for address in args.node:  # the node that runs the VM's primary now
        with auth.channel(address) as channel:
            try:
                status = vmft_pb2_grpc.NodeStub(channel).Status(vmft_pb2.StatusRequest(), timeout=5)
            except grpc.RpcError:
                continue
        if any(vm.name == args.vm and vm.role == vmft_pb2.ROLE_PRIMARY for vm in status.vms):
            primary = address
            break
    if primary is None:
        print(f"vmft migrate: no node of {', '.join(args.node)} runs {args.vm}'s primary", file=sys.stderr)
        return 1
    request = vmft_pb2.MigrateRequest(
        name=args.vm, target_node=args.to, target_service=args.service or "",
        next_backup_node=args.next_backup or "", next_backup_service=args.next_backup_service or "",
    )  # fmt: skip
    reply = _node_call(args, primary, "Migrate", request, 300, "vmft migrate")
    if reply is None:
        return 1
    if args.json:
        print(json.dumps({
            "name": reply.name, "from": primary, "to": reply.target_node, "generation": reply.generation,
            "position": reply.position, "total_s": reply.total_s, "seed_s": reply.seed_s,
            "catch_up_s": reply.catch_up_s, "switch_ms": reply.switch_ms,
            "next_backup": reply.next_backup_node, "message": reply.message,
        }, sort_keys=True))  # fmt: skip
    else:
        print(reply.message)
        print(f"total {reply.total_s:.2f} s (seed {reply.seed_s:.2f} s, catch-up {reply.catch_up_s:.2f} s)")
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    from replica import node_client
    from replica.faults import Fault, FaultError, inject

    auth = node_client.from_args(args)
    try:
        reply = inject(
            args.node, args.vm, Fault(args.kind), args.duration, args.delay_ms, args.fraction, auth=auth
        )
    except FaultError as err:
        print(f"vmft fault: {err}", file=sys.stderr)
        return 1
    print(reply.detail)
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from replica.chaos import run_campaign, work_directory
    from replica.faults import Fault

    faults = [Fault(name) for name in args.faults.split(",")] if args.faults else None
    started = time.monotonic()
    # With --json stdout carries only the report; the progress goes to stderr.
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    def progress(line: str) -> None:
        say(f"chaos {time.monotonic() - started:6.1f}s {line}")

    with work_directory(args.keep, say) as workdir:  # removed at the end unless --keep
        say(f"chaos: work directory {workdir}, report into {args.out}")
        report = asyncio.run(
            run_campaign(
                workdir,
                args.image,
                args.out,
                progress,
                faults=faults,
                count=args.count,
                seed=args.seed,
                clients=args.clients,
                settle_s=args.settle,
                hosts=args.hosts,
                etcd_members=args.etcd_members,
                partition_s=args.partition,
            )
        )
    if args.json:
        print(report.to_json())
        return 0 if report.ok else 1
    print(report.table())
    partitions = report.partition_table()
    if partitions:
        print("partitions (client-seen outage: the longest gap a client saw, and the median over clients):")
        print(partitions)
    print(report.summary())
    for violation in report.violations[:20]:
        print(f"chaos: VIOLATION {violation}")
    print(f"chaos: wrote {args.out}/report.json, report.txt and timeline.png")
    return 0 if report.ok else 1


Subparsers = argparse._SubParsersAction  # what `add_subparsers()` returns


def _add_run_parsers(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="run a guest image, show its console, exit with its code")
    _add_machine_args(run)
    run.add_argument("--listen", metavar="HOST:PORT", help="serve the guest's NIC on this TCP address")
    run.add_argument("--record", metavar="LOG", help="record the nondeterministic event log to LOG")
    run.add_argument(
        "--hash-every", type=int, default=20000, metavar="N", help="state hash every N positions"
    )
    checkpoint_cli.add_run_arguments(run)
    run.set_defaults(func=cmd_run)

    replay = sub.add_parser("replay", help="replay a recorded log and verify it")
    _add_machine_args(replay)
    replay.add_argument("log", help="event log written by `vmft run --record`")
    replay.add_argument("-q", "--quiet", action="store_true")
    replay.set_defaults(func=cmd_replay)


def _add_node_parser(sub: Subparsers) -> None:
    node = sub.add_parser("node", help="run a node daemon hosting primaries and backups")
    node.add_argument("--listen", required=True, metavar="HOST:PORT", help="gRPC address of this node")
    node.add_argument("--data-dir", required=True, metavar="DIR", help="where the node keeps its state")
    node.add_argument(
        "--replication-port", type=_port, default=0, metavar="PORT",
        help="take replication streams on this port of the --listen host (default 0: a free one; "
        "`vmft status` shows it)",
    )  # fmt: skip
    node.add_argument(
        "--replication-advertise", type=_address, default=None, metavar="HOST:PORT",
        help="tell primaries to reach the replication port here instead (a relay or NAT in front of it)",
    )  # fmt: skip
    node.add_argument("--ca", default=None, metavar="DIR", help="the cluster CA directory ($VMFT_CA)")
    node.add_argument(
        "--cert", default=None, metavar="NAME|DIR",
        help="this node's certificate: NAME issued under --ca (`vmft ca issue node NAME`), or its directory",
    )  # fmt: skip
    node.add_argument(
        "--insecure", action="store_true", help="serve plaintext (refused on any address but loopback)"
    )
    node.add_argument("--max-vms", type=int, default=16, help="VMs (primaries and backups) it takes on")
    node.add_argument(
        "--memory-mib", type=int, default=0, help="guest memory it gives its VMs (default: the machine's)"
    )
    node.add_argument(
        "--metrics", default=None, metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )  # fmt: skip
    node.add_argument(
        "--no-cgroups", action="store_true",
        help="apply no cgroup limits (per-VM cpu quotas, the node's memory limit)",
    )  # fmt: skip
    node.add_argument(
        "--etcd", default=None, metavar="HOST:PORT[,...]",
        help="the arbiter and membership on etcd (its client endpoints); default: the SQLite --arbiter",
    )  # fmt: skip
    node.add_argument(
        "--arbiter", default=DEFAULT_ARBITER, metavar="PATH", help="the machine's arbiter database"
    )
    node.add_argument(
        "--heartbeat-ms", type=_milliseconds(0.1, 1000), default=5.0, help="heartbeat interval (default 5 ms)"
    )
    node.add_argument(
        "--failure-timeout-ms",
        type=_milliseconds(1, 600_000),
        default=300.0,
        help="silence that means a dead peer",
    )
    node.add_argument(
        "--input-hold-ms",
        type=_milliseconds(0, 5),
        default=1.0,
        metavar="MS",
        help="a protected guest's input waits at most this long while its replies wait for the backup, "
        "so that requests gather into fewer, larger batches (input moderation; 0: off; default 1 ms)",
    )
    node.add_argument(
        "--checkpoint-every", type=float, default=1.0, metavar="S", help="primary checkpoints (default 1 s)"
    )
    node.add_argument(
        "--auto-reprotect",
        type=float,
        default=1.0,
        metavar="S",
        help="retry re-protecting an unprotected primary onto the pair's other node every S s (0: off)",
    )
    node.add_argument(
        "--link-relay",
        action="store_true",
        help="route replication links through a fault-injecting relay (for cut/delay/drop-link faults)",
    )
    node.add_argument(
        "--unsafe-release-outputs",
        action="store_true",
        help="BROKEN ON PURPOSE (tests): release outputs without the backup's acknowledgement",
    )
    node.set_defaults(func=cmd_node)


def _add_pair_parsers(sub: Subparsers) -> None:
    protect = sub.add_parser(
        "protect", help="start a protected primary/backup pair (a Linux program: vmft protect --linux --help)"
    )
    _add_machine_args(protect)
    protect.add_argument("--name", default="vm1", help="the VM's name (default vm1)")
    protect.add_argument("--primary", required=True, metavar="ADDR", help="node daemon to run the primary")
    protect.add_argument(
        "--backup", metavar="ADDR",
        help="node daemon to run the backup (omit: unprotected, or placed by --etcd)",
    )  # fmt: skip
    protect.add_argument(
        "--etcd", metavar="HOST:PORT[,...]", help="without --backup: place the backup on a live member"
    )
    protect.add_argument("--service", metavar="HOST:PORT", help="where the primary serves clients")
    protect.add_argument("--cpu-quota", type=float, default=0.0, help="CPUs its vCPU may use (0: no limit)")
    protect.add_argument(
        "--memory-limit-mib", type=int, default=0,
        help="memory it reserves on a node (default: guest RAM plus the node's monitor overhead)",
    )  # fmt: skip
    protect.add_argument(
        "--moving-address", metavar="IP/PREFIX",
        help="a service address on the hosts' network that moves with the primary (give --service IP:PORT)",
    )  # fmt: skip
    protect.add_argument(
        "--backup-service", metavar="HOST:PORT", help="where the backup serves once promoted"
    )
    node_client.add_arguments(protect)
    protect.set_defaults(func=cmd_protect)

    reprotect = sub.add_parser("reprotect", help="give an unprotected primary a new backup (live checkpoint)")
    reprotect.add_argument("vm", help="the VM's name")
    reprotect.add_argument("--primary", required=True, metavar="ADDR", help="node daemon running the primary")
    reprotect.add_argument(
        "--backup", required=True, metavar="ADDR", help="node daemon to run the new backup"
    )
    reprotect.add_argument(
        "--backup-service", metavar="HOST:PORT", help="where the backup serves once promoted"
    )
    node_client.add_arguments(reprotect)
    reprotect.set_defaults(func=cmd_reprotect)

    stop = sub.add_parser("stop", help="stop a VM (a Linux program: SIGTERM through its log first)")
    stop.add_argument("vm", help="the VM's name")
    stop.add_argument("--node", required=True, metavar="ADDR", help="node daemon running the VM")
    stop.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="a Linux program gets SIGTERM (its backup replays the same shutdown) and S s to exit before "
        "the VM is stopped from outside (default 10; 0: at once)",
    )
    node_client.add_arguments(stop)
    stop.set_defaults(func=cmd_stop)

    migrate = sub.add_parser("migrate", help="move a VM's primary to another node (a planned switch)")
    migrate.add_argument("vm", help="the VM's name")
    migrate.add_argument("--to", required=True, metavar="ADDR", help="node daemon to run the primary")
    migrate.add_argument(
        "--node", action="append", required=True, metavar="ADDR",
        help="node daemons that may run the primary now (repeat; the one that does is asked)",
    )  # fmt: skip
    migrate.add_argument(
        "--service",
        metavar="HOST:PORT",
        help="where the target serves (default: the backup's address if it is the backup, else the "
        "primary's port on the target's host, or a free port on the same host)",
    )
    migrate.add_argument(
        "--next-backup", metavar="ADDR", help="the backup after migration (default: the old backup "
        "if it is not the target, else the old primary's node)",
    )  # fmt: skip
    migrate.add_argument("--next-backup-service", metavar="HOST:PORT", help="where that backup serves")
    migrate.add_argument("--json", action="store_true", help="print the outcome and its timings as JSON")
    node_client.add_arguments(migrate)
    migrate.set_defaults(func=cmd_migrate)

    status = sub.add_parser("status", help="show every VM of the given nodes")
    status.add_argument("--node", action="append", metavar="ADDR", help="a node daemon (repeat)")
    status.add_argument(
        "--etcd", metavar="HOST:PORT[,...]", help="the cluster from etcd: its members, the arbiter's claims"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    node_client.add_arguments(status)
    status.set_defaults(func=cmd_status)


def _add_fault_parsers(sub: Subparsers) -> None:
    from replica.faults import Fault

    fault = sub.add_parser("fault", help="inject a fault into a running protected VM")
    fault.add_argument("vm", help="the VM's name")
    fault.add_argument("kind", choices=[f.value for f in Fault])
    fault.add_argument(
        "--node", action="append", required=True, metavar="ADDR", help="node daemons of the pair"
    )
    fault.add_argument(
        "--duration", type=float, default=1.0, metavar="S", help="how long a stop/link/disk fault lasts"
    )
    fault.add_argument("--delay-ms", type=float, default=20.0, help="delay-link: added delay each way")
    fault.add_argument("--fraction", type=float, default=0.1, help="drop-link: fraction of segments lost")
    node_client.add_arguments(fault)
    fault.set_defaults(func=cmd_fault)


def _add_chaos_parser(sub: Subparsers) -> None:
    chaos = sub.add_parser("chaos", help="a fault campaign against a protected kv VM, with a report")
    chaos.add_argument("--image", default="guests/build/kv.elf", help="the kv guest image")
    chaos.add_argument("--faults", help="comma-separated faults in order (default: random)")
    chaos.add_argument("--count", type=int, default=10, help="random faults to inject (default 10)")
    chaos.add_argument("--seed", type=int, default=0, help="seed for the random faults and the load")
    chaos.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    chaos.add_argument("--settle", type=float, default=0.3, metavar="S", help="load between faults")
    chaos.add_argument("--out", default="chaos-report", metavar="DIR", help="where the report goes")
    chaos.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (/tmp/vmft-chaos.*: node data, logs, the disk)",
    )
    chaos.add_argument(
        "--hosts",
        type=int,
        default=0,
        metavar="N",
        help="run each of N nodes as its own namespace host, on etcd, with partition faults "
        "(needs root; default 0: two nodes on loopback)",
    )
    chaos.add_argument(
        "--etcd-members",
        type=int,
        default=3,
        metavar="M",
        help="with --hosts: etcd members, each on its own host (default 3)",
    )
    chaos.add_argument(
        "--partition",
        type=float,
        default=1.0,
        metavar="S",
        help="with --hosts: how long a partition lasts before it heals (default 1.0)",
    )
    chaos.add_argument("--json", action="store_true", help="print the report as JSON (progress on stderr)")
    chaos.add_argument("--linux", action="store_true",
                       help="against Debian's redis-server as a protected pair (own options: vmft chaos "
                       "--linux --help)")  # fmt: skip
    chaos.set_defaults(func=cmd_chaos)


def _add_kv_parser(sub: Subparsers) -> None:
    kv = sub.add_parser("kv", help="talk to a kv guest")
    kv.add_argument("address", help="HOST:PORT of the service (comma-separated: primary's, backup's)")
    kv.add_argument("op", choices=["get", "set", "incr", "del", "stats"])
    kv.add_argument("key", nargs="?", default="")
    kv.add_argument("value", nargs="?")
    kv.add_argument("--client-id", default=None, help="client id for request ids (default: random)")
    kv.add_argument("--timeout", type=float, default=5.0)
    kv.set_defaults(func=cmd_kv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmft", description="fault-tolerant virtual machines on Linux KVM")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log everything (default: $VMFT_LOG or WARNING)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_run_parsers,
        _add_node_parser,
        _add_pair_parsers,
        _add_fault_parsers,
        _add_chaos_parser,
        _add_kv_parser,
        checkpoint_cli.add_commands,
        ca_cli.add_commands,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from replica import linux_protect, linux_run  # `run|protect --linux ... -- PROGRAM ARGS...`: own parsers

    argv = sys.argv[1:] if argv is None else argv
    if linux_run.wants(argv):
        return linux_run.main(argv)
    if linux_protect.wants(argv):
        return linux_protect.main(argv)
    if argv[:1] == ["chaos"] and "--linux" in argv[: argv.index("--") if "--" in argv else None]:
        from replica import chaos_linux  # `chaos --linux ... [-- redis-server ARGS...]`: its own parser

        return chaos_linux.main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else os.environ.get("VMFT_LOG", "WARNING").upper(),
        format="vmft: %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (VmftError, ValueError, OSError) as err:
        log.debug("command failed", exc_info=True)
        print(error_line(err), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
