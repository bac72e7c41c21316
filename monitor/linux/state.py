"""The personality's state as a checkpoint carries it (proto LinuxState), and back.

Guest memory and the vCPU are the machine's; this is the monitor's side of the process, with the
writable layer's files. Host files are reopened by their guest path at restore, after the layer is back.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Callable

from monitor.errors import CheckpointError
from monitor.linux import fdtable as fdt
from monitor.linux import socket_state
from monitor.linux import sockets as sk
from monitor.linux.mm import AddressSpace, LinuxError, Vma
from monitor.linux.process import ProcessState
from monitor.linux.threads import FIRST_TID, Scheduler, Thread, ThreadState, Wait
from proto import vmft_pb2

_TRIPLE = struct.Struct("<QQQ")


def save(process: ProcessState, random_at: int, syscalls: int) -> vmft_pb2.LinuxState:
    sched = process.sched
    if any(t.pid != process.pid for t in sched.threads.values()) or process.pid != FIRST_TID:
        raise CheckpointError("checkpoints of Linux guests with several processes are not supported yet")
    space = process.space
    msg = vmft_pb2.LinuxState(
        pages=b"".join(_TRIPLE.pack(vpn, phys, prot) for vpn, (phys, prot) in sorted(space.pages.items())),
        tables=b"".join(
            _TRIPLE.pack(_key_path(key), len(key), addr) for key, addr in sorted(space._tables.items())
        ),
        phys_next_free=space.phys.next_free,
        phys_free=space.phys.free,
        brk_start=space.brk_start,
        brk=space.brk,
        cwd=process.cwd,
        umask=process.umask,
        signal_mask=process.signals.mask,
        altstack=process.signals.altstack,
        fs_base=process.fs_base,
        clear_child_tid=process.clear_child_tid,
        robust_head=process.robust_list[0],
        robust_len=process.robust_list[1],
        last_time_ns=process.last_time_ns,
        pipe_count=process.pipes,
        console_eof=process.console_eof,
        comm=getattr(process, "comm", b""),
        random_at=random_at,
        syscalls=syscalls,
    )
    for vma in space.vmas:
        msg.vmas.add(
            start=vma.start, end=vma.end, prot=vma.prot, name=vma.name, offset=vma.offset, shared=vma.shared
        )
    for sig, action in process.signals.actions.items():
        msg.signal_actions[sig] = action
    for path, data in process.root_files.items():
        msg.root_files[path] = data
    files: dict[int, int] = {}
    pipes: dict[int, fdt.Pipe] = {}

    def file_index(file: fdt.OpenFile) -> int:
        if id(file) not in files:
            files[id(file)] = len(msg.files)
            msg.files.add()  # its place first: an epoll's interest list may name files after it
            saved = _save_file(file, pipes)
            socket_state.save_file(file, saved, file_index, pipes)
            msg.files[files[id(file)]].CopyFrom(saved)
        return files[id(file)]

    for fd in sorted(process.fds.fds):
        entry = process.fds.fds[fd]
        msg.fds.add(fd=fd, file=file_index(entry.file), cloexec=entry.cloexec)

    for tid in sorted(sched.threads):
        msg.threads.append(_save_thread(sched.threads[tid], pipes, file_index))
    msg.current_tid, msg.next_tid = sched.current, sched.next_tid
    msg.run_queue.extend(sched.run_queue)
    for ino, pipe in sorted(pipes.items()):
        msg.pipes.add(ino=ino, buffer=bytes(pipe.buffer))
    msg.layer.extend(save_layer(process.fs.layer))
    if isinstance(process.host.net, sk.NetStack):
        msg.net.CopyFrom(socket_state.save_net(process.host.net))
    return msg


def _save_thread(
    thread: Thread, pipes: dict[int, fdt.Pipe], file_index: Callable[[fdt.OpenFile], int]
) -> vmft_pb2.LinuxThread:
    out = vmft_pb2.LinuxThread(
        tid=thread.tid,
        state=thread.state.value,
        regs=thread.regs,
        xsave=thread.xsave,
        fs_base=thread.fs_base,
        result=thread.result,
        clear_child_tid=thread.clear_child_tid,
        syscalls=thread.syscalls,
        restart=thread.restart,
        sigmask=thread.sigmask,
    )
    wait = thread.wait
    if wait is None:
        return out
    out.wait_kind, out.wait_uaddr, out.wait_bitset, out.wait_clock = (
        wait.kind,
        wait.uaddr,
        wait.bitset,
        wait.clock,
    )
    if wait.deadline_ns is not None:
        out.has_deadline, out.deadline_ns = True, wait.deadline_ns
    target = wait.target
    if wait.kind in ("pipe-read", "pipe-write"):
        assert isinstance(target, tuple) and isinstance(target[1], fdt.Pipe)
        pipes[target[1].ino] = target[1]
        out.wait_pipe = target[1].ino
    elif wait.kind == "poll":
        assert isinstance(target, tuple)
        for file, events in target[1]:
            out.poll_files.append(file_index(file))
            out.poll_events.append(events)
    elif wait.kind not in ("futex", "sleep", "pause"):
        raise CheckpointError(f"a thread waiting for {wait.kind} cannot be checkpointed yet")
    return out


def _restore_threads(
    process: ProcessState, msg: vmft_pb2.LinuxState, pipes: dict[int, fdt.Pipe], opened: list[fdt.OpenFile]
) -> None:
    if not msg.threads:
        return
    sched = Scheduler(threads={}, current=msg.current_tid, next_tid=msg.next_tid)
    for saved in msg.threads:
        thread = Thread(
            saved.tid, ThreadState(saved.state), saved.regs, saved.xsave, saved.fs_base, saved.result,
            saved.clear_child_tid, None, saved.syscalls, process.pid, saved.restart, saved.sigmask,
        )  # fmt: skip
        if saved.wait_kind:
            deadline = saved.deadline_ns if saved.has_deadline else None
            wait = Wait(saved.wait_uaddr, saved.wait_bitset, deadline, saved.wait_clock, saved.wait_kind)
            if saved.wait_kind in ("pipe-read", "pipe-write"):
                wait.target = (saved.wait_kind, pipes[saved.wait_pipe])
            elif saved.wait_kind == "poll":
                watched = [(opened[i], ev) for i, ev in zip(saved.poll_files, saved.poll_events)]
                wait.target = ("poll", watched, deadline)
            thread.wait = wait
        sched.threads[thread.tid] = thread
    sched.run_queue.extend(msg.run_queue)
    process.sched = sched


def save_layer(layer: Path) -> list[vmft_pb2.LinuxLayerEntry]:
    """The writable layer's tree: directories (before their contents), files and symlinks."""
    entries = []
    for top, dirs, files in os.walk(layer):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            entry = vmft_pb2.LinuxLayerEntry(
                path=os.path.relpath(path, layer),
                mode=st.st_mode,
                mtime_ns=st.st_mtime_ns,
                atime_ns=st.st_atime_ns,
            )
            if stat.S_ISLNK(st.st_mode):
                entry.target = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry.data = f.read()
            elif not stat.S_ISDIR(st.st_mode):
                continue  # nothing else can be made in the layer by a guest
            entries.append(entry)
    return entries


def restore_layer(layer: Path, entries: list[vmft_pb2.LinuxLayerEntry]) -> None:
    """Recreate the layer's tree under `layer` (a fresh layer: only its empty tmp and home)."""
    root = os.path.realpath(layer)
    for entry in entries:
        path = os.path.realpath(os.path.join(root, os.path.dirname(entry.path)))
        if entry.path.startswith("/") or ".." in entry.path.split("/") or not path.startswith(root):
            raise CheckpointError(f"a layer entry outside the layer: {entry.path!r}")
        path = os.path.join(path, os.path.basename(entry.path))
        if stat.S_ISDIR(entry.mode):
            os.makedirs(path, exist_ok=True)
        elif stat.S_ISLNK(entry.mode):
            os.symlink(entry.target, path)
            continue
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, entry.data)
            finally:
                os.close(fd)
        os.chmod(path, stat.S_IMODE(entry.mode))
        os.utime(path, ns=(entry.atime_ns, entry.mtime_ns))


def _pipe(pipes: dict[int, fdt.Pipe], ino: int) -> fdt.Pipe:
    if ino not in pipes:
        raise CheckpointError(f"a Linux guest's socketpair names pipe {ino} the checkpoint does not hold")
    return pipes[ino]


def _key_path(key: tuple[int, ...]) -> int:
    padded = (*key, 0, 0, 0)[:3]
    return padded[0] << 18 | padded[1] << 9 | padded[2]


def _save_file(file: fdt.OpenFile, pipes: dict[int, fdt.Pipe]) -> vmft_pb2.LinuxOpenFile:
    out = vmft_pb2.LinuxOpenFile(kind=file.kind, path=file.path, flags=file.flags, offset=file.offset)
    if isinstance(file, fdt.HostFile):
        out.layer = file.layer
    elif isinstance(file, fdt.BytesFile):
        out.data = file.data
    elif isinstance(file, fdt.DeviceFile):
        out.device = file.device
    elif isinstance(file, fdt.ConsoleFile):
        out.number = file.number
    elif isinstance(file, fdt.PipeEnd):
        out.pipe = file.pipe.ino
        out.reading = file.reading
        pipes[file.pipe.ino] = file.pipe
    return out


def restore(process: ProcessState, msg: vmft_pb2.LinuxState, console: fdt.ConsoleIo) -> None:
    """Put a freshly attached process (memory already restored) in the saved state."""
    space: AddressSpace = process.space
    space.pages = {}
    raw = msg.pages
    for at in range(0, len(raw), _TRIPLE.size):
        vpn, phys, prot = _TRIPLE.unpack_from(raw, at)
        space.pages[vpn] = (phys, prot)
    space._tables = {}
    for at in range(0, len(msg.tables), _TRIPLE.size):
        path, depth, addr = _TRIPLE.unpack_from(msg.tables, at)
        key = ((path >> 18) & 511, (path >> 9) & 511, path & 511)[:depth]
        space._tables[key] = addr
    space.root = space._tables[()]
    space.phys.next_free = msg.phys_next_free
    space.phys.free = list(msg.phys_free)
    space._set_vmas([Vma(v.start, v.end, v.prot, v.name, v.offset, v.shared) for v in msg.vmas])
    space.brk_start, space.brk = msg.brk_start, msg.brk
    process.cwd = msg.cwd
    process.umask = msg.umask
    process.signals.actions = dict(msg.signal_actions)
    process.signals.mask = msg.signal_mask
    process.signals.altstack = msg.altstack
    process.fs_base = msg.fs_base
    process.clear_child_tid = msg.clear_child_tid
    process.robust_list = (msg.robust_head, msg.robust_len)
    process.last_time_ns = msg.last_time_ns
    process.pipes = msg.pipe_count
    process.console_eof = msg.console_eof
    setattr(process, "comm", msg.comm)  # noqa: B010 - ProcessCalls declares it
    process.root_files = dict(msg.root_files)
    restore_layer(process.fs.layer, list(msg.layer))
    pipes = {p.ino: fdt.Pipe(buffer=bytearray(p.buffer), ino=p.ino) for p in msg.pipes}
    process.fds.close_all()
    stack = process.host.net
    if isinstance(stack, sk.NetStack) and msg.HasField("net"):
        socket_state.restore_net(stack, msg.net)
    opened = [_open(process, f, pipes, console) for f in msg.files]
    for saved, file in zip(msg.files, opened):
        socket_state.fill_epoll(saved, file, opened)
    for entry in msg.fds:
        process.fds.install(opened[entry.file], cloexec=entry.cloexec, at=entry.fd)
    _restore_threads(process, msg, pipes, opened)


def _open(
    process: ProcessState, saved: vmft_pb2.LinuxOpenFile, pipes: dict[int, fdt.Pipe], console: fdt.ConsoleIo
) -> fdt.OpenFile:
    file: fdt.OpenFile
    stack = process.host.net
    if isinstance(stack, sk.NetStack):
        known = socket_state.open_file(saved, stack, lambda ino: _pipe(pipes, ino))
        if known is not None:
            return known
    if saved.kind == "console":
        file = fdt.ConsoleFile(saved.path, saved.flags, saved.number, console)
    elif saved.kind == "device":
        node = process.fs.resolve(saved.path)
        file = fdt.DeviceFile(saved.path, saved.flags, saved.device, process.stat_node(node), process.entropy)
    elif saved.kind == "pipe":
        file = fdt.PipeEnd(saved.flags, pipes[saved.pipe], saved.reading)
    elif saved.kind == "bytes":
        node = process.fs.resolve(saved.path)
        info = (
            process.stat_node(node) if node.exists else fdt.StatInfo(dev=fdt.PROC_DEV, ino=1, mode=0o100444)
        )
        file = fdt.BytesFile(saved.path, saved.flags, saved.data, info)
    elif saved.kind in ("host", "dir"):
        try:
            node = process.fs.resolve(saved.path)
            # mypy: open_node lives in FileCalls; every process has it
            file = process.open_node(node, saved.flags & ~(fdt.O_CREAT | fdt.O_TRUNC | fdt.O_EXCL), 0)  # type: ignore[attr-defined]
        except (LinuxError, OSError) as err:
            raise CheckpointError(f"cannot reopen {saved.path} for the Linux guest: {err}") from err
    else:
        raise CheckpointError(f"a Linux guest's open file of unknown kind {saved.kind!r}")
    # The flags the guest opened it with (a reopen leaves out O_CREAT, O_TRUNC and O_EXCL): they are in the
    # state hash, so a restored redis with its AOF open (O_CREAT) diverged at the next hash position.
    file.flags = saved.flags
    file.offset = saved.offset
    return file
