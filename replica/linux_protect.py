"""`vmft protect --linux`: an unmodified Linux program as a protected primary/backup pair.

    vmft protect --linux [--root NAME] [--env NAME=VALUE]... [--cwd DIR] [--mem MiB] [--hang-timeout S]
                 --primary ADDR [--backup ADDR | --etcd ENDPOINTS] [--service HOST:PORT]
                 [--backup-service HOST:PORT] [--json] NAME -- PROGRAM [ARGS...]

NAME is the VM's name. The program and its libraries come from each node's root: the host's filtered
system directories, or --root NAME, a tree prepared in each node's DATA_DIR/roots/NAME (a name, never a
path: no request names a host file). Its console output is kept in DATA_DIR/console/NAME.out on the node
serving it (replica/guest_kind.py); a port it listens on is served at the service address.
"""

from __future__ import annotations

import argparse
import json
import sys

from proto import vmft_pb2
from replica import node_client
from replica.guest_kind import LINUX_HANG_TIMEOUT_S, LINUX_MEM_MIB, GuestSpecError, merge_env

EXIT_USAGE = 2
PROG = "vmft protect --linux"


def wants(argv: list[str]) -> bool:
    """True for `protect --linux ...` (options before `--`)."""
    if not argv or argv[0] != "protect":
        return False
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--linux" in options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux", action="store_true", required=True)
    parser.add_argument("name", help="the VM's name")
    parser.add_argument(
        "--root", default="", metavar="NAME",
        help="a root tree prepared in each node's DATA_DIR/roots/NAME (default: the host's system view)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="add to the environment"
    )
    parser.add_argument("--cwd", default="/", help="the program's working directory (default /)")
    parser.add_argument(
        "--clock", choices=["syscall", "vdso"], default="syscall",
        help="how the program reads the clock: system calls (default) or the vDSO (docs/linux.md)",
    )  # fmt: skip
    parser.add_argument(
        "--mem", type=int, default=LINUX_MEM_MIB, metavar="MiB", help="guest RAM (default 512)"
    )
    parser.add_argument(
        "--hang-timeout", type=float, default=LINUX_HANG_TIMEOUT_S, metavar="S",
        help="hung after S s without a system call (then restarted from its checkpoint)",
    )  # fmt: skip
    parser.add_argument("--primary", required=True, metavar="ADDR", help="node daemon to run the primary")
    parser.add_argument(
        "--backup",
        metavar="ADDR",
        help="node daemon to run the backup (omit: unprotected, or placed by --etcd)",
    )
    parser.add_argument(
        "--etcd", metavar="HOST:PORT[,...]", help="without --backup: place the backup on a live member"
    )
    parser.add_argument("--service", metavar="HOST:PORT", help="where the primary serves clients")
    parser.add_argument("--backup-service", metavar="HOST:PORT", help="where the backup serves once promoted")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    node_client.add_arguments(parser)
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    return parser


def spec_from_args(args: argparse.Namespace) -> vmft_pb2.VmSpec:
    """The VmSpec of a Linux guest; GuestSpecError for a missing program or a bad --env."""
    argv = list(args.program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise GuestSpecError("name the program to run after --")
    merge_env(args.env)  # refuses a malformed entry here, before any node is asked
    spec = vmft_pb2.VmSpec(name=args.name, mem_mib=args.mem, hang_timeout_s=args.hang_timeout)
    spec.linux.argv.extend(argv)
    spec.linux.env.extend(args.env)
    spec.linux.cwd = args.cwd
    spec.linux.root = args.root
    spec.linux.clock = "" if args.clock == "syscall" else args.clock
    return spec


def main(argv: list[str]) -> int:
    from replica.cli import _free_loopback_address, _node_call

    args = build_parser().parse_args(argv[1:])
    try:
        spec = spec_from_args(args)
    except GuestSpecError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.etcd and not args.backup:  # placement, as `vmft protect`
        from replica.node_etcd import parse_endpoints, pick_backup

        auth = node_client.from_args(args)
        chosen = pick_backup(parse_endpoints(args.etcd), auth.identity, args.mem, args.primary)
        if chosen is None:
            print(f"{PROG}: no live member can host the backup", file=sys.stderr)
            return 1
        args.backup = chosen.address
    service = args.service or _free_loopback_address()
    backup_service = args.backup_service or (_free_loopback_address() if args.backup else "")
    request = vmft_pb2.ProtectRequest(
        spec=spec, backup_node=args.backup or "", service=service, backup_service=backup_service
    )
    status = _node_call(args, args.primary, "Protect", request, 60, "vmft protect")
    if status is None:
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "name": status.name,
                    "generation": status.generation,
                    "state": vmft_pb2.VmState.Name(status.state),
                    "primary": args.primary,
                    "backup": args.backup or "",
                    "service": service,
                    "backup_service": backup_service,
                    "console": f"DATA_DIR/console/{status.name}.out",
                }
            )
        )
        return 0
    print(
        f"protected {status.name} (Linux: {' '.join(spec.linux.argv)}): generation {status.generation}, ",
        end="",
    )
    print(f"primary {args.primary}, backup {args.backup or '(none: unprotected)'}")
    print(f"service: {service}" + (f" (after failover: {backup_service})" if backup_service else ""))
    print(f"console: DATA_DIR/console/{status.name}.out on the node serving it")
    return 0
