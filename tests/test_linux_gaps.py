"""The small gaps Linux services hit (docs/linux.md): pause and rt_sigsuspend (the mask swap and its
restore, EINTR after the handler), a guest whose only thread waits with no deadline for a signal from
outside, nanosleep's time left on EINTR, siginfo's si_code (SI_USER, SI_TKILL), EPOLLET and MSG_WAITALL.
Each C program is compiled here with the system gcc and run natively and under the monitor: same output;
what involves signals from outside is also recorded and replayed to the same final state hash."""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from linux_helpers import run_guest, run_native
from monitor.checkpoint.take import Checkpointer
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.machine import Machine, StopReason
from proto import vmft_pb2
from replica.cluster import LocalCluster
from test_linux_net import GuestService
from test_linux_node import FAILURE_TIMEOUT_MS, console, protect_linux, vmft, wait_status
from test_linux_signals_external import Run, _replay

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (scripts/setup)"),
]

HEADER = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static void handler(int sig, siginfo_t *info, void *uc) {
    char line[80];
    int n = snprintf(line, sizeof line, "handler %d code %d\n", sig, info->si_code);
    write(1, line, n);
}
static void handle(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(sig, &sa, 0);
}
static int blocked(int sig) {
    sigset_t now;
    sigprocmask(SIG_BLOCK, 0, &now);
    return sigismember(&now, sig);
}
"""

# Signals the program sends itself: kill(2) gives SI_USER, raise (tgkill) SI_TKILL; rt_sigsuspend takes
# the pending one with its mask swapped and restores the caller's mask after the handler.
SELF = HEADER + r"""
int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    handle(SIGUSR1);
    sigset_t usr1, empty;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigemptyset(&empty);
    sigprocmask(SIG_BLOCK, &usr1, 0);
    kill(getpid(), SIGUSR1);
    printf("pending, blocked %d\n", blocked(SIGUSR1));
    int r = sigsuspend(&empty);
    printf("sigsuspend %d %s, blocked after %d\n", r, strerror(errno), blocked(SIGUSR1));
    sigprocmask(SIG_UNBLOCK, &usr1, 0);
    raise(SIGUSR1);
    printf("raised, blocked %d\n", blocked(SIGUSR1));
    struct timespec zero = {0, 0};
    printf("nanosleep 0: %d\n", nanosleep(&zero, 0));
    return 0;
}
"""

# Waits only for signals from outside, with no deadline and no listening port: sigsuspend (SIGTERM
# blocked around it), then a 100 s nanosleep that SIGHUP ends (the time left written), then pause that
# SIGINT ends.
OUTSIDE = HEADER + r"""
int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    handle(SIGTERM);
    handle(SIGHUP);
    handle(SIGINT);
    sigset_t term, empty;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigemptyset(&empty);
    sigprocmask(SIG_BLOCK, &term, 0);
    printf("ready 1\n");
    int r = sigsuspend(&empty);
    printf("sigsuspend %d %s, SIGTERM blocked after %d\n", r, strerror(errno), blocked(SIGTERM));
    struct timespec req = {100, 0}, rem = {-1, -1};
    printf("ready 2\n");
    r = nanosleep(&req, &rem);
    int sane = rem.tv_sec >= 0 && rem.tv_sec < 100 && rem.tv_nsec >= 0 && rem.tv_nsec < 1000000000;
    printf("nanosleep %d %s, time left below 100 s: %d\n", r, strerror(errno), sane && rem.tv_sec > 50);
    printf("ready 3\n");
    r = pause();
    printf("pause %d %s\n", r, strerror(errno));
    return 0;
}
"""

# EPOLLET against level on two socketpairs: an edge reports once per arrival (not again for unread
# bytes, not after a drain to EAGAIN) and never misses an arrival after the drain, also in a blocking
# wait (a child writes later).
EDGE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
static int ep;
static void report(const char *what, int timeout) {
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, timeout);
    printf("%s: %d", what, n);
    for (int i = 0; i < n; i++) printf(" [%s %x]", ev[i].data.u32 == 1 ? "edge" : "level", ev[i].events);
    printf("\n");
}
static int drain(int fd) {
    char buf[2];
    int total = 0, n;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    return n < 0 && errno == EAGAIN ? total : -1;
}
int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    int e[2], l[2];
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, e);
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, l);
    ep = epoll_create1(0);
    struct epoll_event edge = {EPOLLIN | EPOLLET, {.u32 = 1}}, level = {EPOLLIN, {.u32 = 2}};
    epoll_ctl(ep, EPOLL_CTL_ADD, e[0], &edge);
    epoll_ctl(ep, EPOLL_CTL_ADD, l[0], &level);
    report("empty", 0);
    write(e[1], "abc", 3);
    write(l[1], "abc", 3);
    report("written", 0);
    report("unread", 0);
    printf("drained %d %d\n", drain(e[0]), drain(l[0]));
    report("drained", 0);
    write(e[1], "de", 2);
    report("after drain", 0);
    write(e[1], "f", 1);
    report("more unread", 0);
    printf("drained %d\n", drain(e[0]));
    report("drained again", 0);
    epoll_ctl(ep, EPOLL_CTL_MOD, e[0], &edge);
    report("rearmed empty", 0);
    int p[2];
    pipe2(p, O_NONBLOCK);
    struct epoll_event pe = {EPOLLIN | EPOLLET, {.u32 = 1}};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &pe);
    write(p[1], "abc", 3);
    report("pipe written", 0);
    char one;
    read(p[0], &one, 1);
    report("pipe partly read", 0);
    write(p[1], "d", 1);
    report("pipe written again", 0);
    epoll_ctl(ep, EPOLL_CTL_DEL, p[0], 0);
    pid_t child = fork();
    if (child == 0) {
        usleep(100000);
        write(e[1], "g", 1);
        _exit(0);
    }
    report("blocking", -1);
    report("then", 0);
    waitpid(child, 0, 0);
    return 0;
}
"""

# MSG_WAITALL on a stream: the whole length though it comes in pieces, then the rest at the end.
WAITALL = r"""
import socket, sys
sys.stdout.reconfigure(line_buffering=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("port", s.getsockname()[1], file=sys.stderr, flush=True)
conn, _ = s.accept()
print("whole", len(conn.recv(30000, socket.MSG_WAITALL)))
print("at the end", len(conn.recv(30000, socket.MSG_WAITALL)))
print("after the end", len(conn.recv(100, socket.MSG_WAITALL)))
"""

# An edge-triggered server (epoll EPOLLIN|EPOLLET on the listener and the connection): it accepts and
# reads until EAGAIN, then waits; each wake is printed, so a spin or a missed arrival shows.
EDGE_SERVER = r"""
import select, socket, sys
sys.stdout.reconfigure(line_buffering=True)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
s.setblocking(False)
print("port", s.getsockname()[1], file=sys.stderr, flush=True)
ep = select.epoll()
ep.register(s.fileno(), select.EPOLLIN | select.EPOLLET)
conns = {}
done = False
while not done:
    for fd, events in ep.poll(30):
        if fd == s.fileno():
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                conns[conn.fileno()] = conn
                ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLET)
                print("accepted")
            continue
        conn, got = conns[fd], b""
        while True:
            try:
                chunk = conn.recv(7)
            except BlockingIOError:
                break
            if not chunk:
                done = True
                break
            got += chunk
        print("woke with", got)
        if got:
            conn.sendall(got.upper())
print("end")
"""

# Waits in rt_sigsuspend with edge-triggered epoll state behind it: one edge reported (its bytes left
# unread), one not yet looked at. A checkpoint taken in the wait carries both and the wait itself.
SUSPENDED = HEADER + r"""
#include <sys/epoll.h>
#include <sys/socket.h>
static int ep;
static void report(const char *what) {
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 0);
    printf("%s: %d", what, n);
    for (int i = 0; i < n; i++) printf(" [%u]", ev[i].data.u32);
    printf("\n");
}
int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    handle(SIGTERM);
    int a[2], b[2];
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, a);
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, b);
    ep = epoll_create1(0);
    struct epoll_event ea = {EPOLLIN | EPOLLET, {.u32 = 1}}, eb = {EPOLLIN | EPOLLET, {.u32 = 2}};
    epoll_ctl(ep, EPOLL_CTL_ADD, a[0], &ea);
    epoll_ctl(ep, EPOLL_CTL_ADD, b[0], &eb);
    write(a[1], "abc", 3);
    report("before");
    write(b[1], "d", 1);
    sigset_t term, empty;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigemptyset(&empty);
    sigprocmask(SIG_BLOCK, &term, 0);
    printf("ready\n");
    int r = sigsuspend(&empty);
    printf("sigsuspend %d %s, SIGTERM blocked after %d\n", r, strerror(errno), blocked(SIGTERM));
    report("after");
    write(a[1], "e", 1);
    report("more");
    return 0;
}
"""

# A signal ends a MSG_WAITALL receive that has part of its bytes: the handler runs, and the call returns
# what it had (Python would run the call again after an EINTR, so a wait that the signal did not end
# would go on waiting: the client waits for the reply).
WAITALL_SIGNAL = r"""
import signal, socket, sys
sys.stdout.reconfigure(line_buffering=True)
signal.signal(signal.SIGTERM, lambda sig, frame: print("handler", sig))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("port", s.getsockname()[1], file=sys.stderr, flush=True)
conn, _ = s.accept()
print("got", len(conn.recv(30000, socket.MSG_WAITALL)))
conn.sendall(b"done")
"""


class NativeRun(Run):
    """The program itself as a process (Run's line reader, wait and finish)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.stdout = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def _compile(source: str, layer: Path, name: str) -> str:
    """The program built into the layer's /tmp; its guest path."""
    (layer / "tmp").mkdir(parents=True, exist_ok=True)
    src = layer / f"{name}.c"
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(layer / "tmp" / name), str(src)], check=True, timeout=120)
    return f"/tmp/{name}"


def test_sigsuspend_and_siginfo_codes_of_signals_the_program_sends_itself(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    guest = _compile(SELF, layer, "self")
    native = run_native([str(layer / guest.lstrip("/"))])
    assert native.status == 0, native.stderr
    assert b"handler 10 code 0\nsigsuspend -1 Interrupted system call, blocked after 1\n" in native.stdout
    assert b"handler 10 code -6\n" in native.stdout  # the check has teeth: the codes differ natively
    vm = run_guest([guest], layer=layer)
    assert (vm.status, vm.fatal) == (0, "")
    assert vm.stdout == native.stdout


def test_a_program_waiting_only_for_signals_from_outside_waits_and_replays(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    guest = _compile(OUTSIDE, layer, "outside")
    shutil.copytree(layer, tmp_path / "replay-layer")  # as the recording began

    # Natively a signal sent between "ready" and the call is handled before it (then nanosleep and pause
    # would wait on): the native run waits a moment first. Under the monitor the signal is taken at the
    # next system call, which is the wait itself, so it cannot be missed.
    native = NativeRun([str(layer / guest.lstrip("/"))])
    signals = ((b"ready 1", signal.SIGTERM), (b"ready 2", signal.SIGHUP), (b"ready 3", signal.SIGINT))
    for ready, sig in signals:
        native.wait_for(ready)
        time.sleep(0.5)
        native.proc.send_signal(sig)
    native_status, _ = native.finish()
    assert native_status == 0
    expected = bytes(native.stdout)

    log = tmp_path / "run.log"
    run = Run(["--layer", str(layer), "--record", str(log), "--stop-grace", "120"], [guest])
    for ready, sig in signals:
        run.wait_for(ready)
        run.proc.send_signal(sig)
    status, stderr = run.finish()
    assert status == 0, (bytes(run.stdout), stderr)
    # Lines the native run printed between its ready lines, in order (the test read them as it went).
    vm_lines = [line for line in bytes(run.stdout).splitlines() if not line.startswith(b"ready")]
    native_lines = [line for line in expected.splitlines() if not line.startswith(b"ready")]
    assert vm_lines == native_lines, (bytes(run.stdout), expected)
    assert b"handler 15 code 0" in bytes(run.stdout)  # SI_USER from outside
    assert b"SIGTERM blocked after 1" in bytes(run.stdout)
    assert b"time left below 100 s: 1" in bytes(run.stdout)
    replayed = _replay(log, tmp_path / "replay-layer", [guest])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "verdict: IDENTICAL" in replayed.stdout and "exit code 0" in replayed.stdout, replayed.stdout


def test_epollet_reports_each_arrival_once_and_none_after_a_drain(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    guest = _compile(EDGE, layer, "edge")
    native = run_native([str(layer / guest.lstrip("/"))])
    assert native.status == 0, native.stderr
    assert b"unread: 1 [level 1]\n" in native.stdout  # the edge is not reported again
    assert b"pipe partly read: 0\npipe written again: 1 [edge 1]\n" in native.stdout
    assert b"after drain: 1 [edge 1]\n" in native.stdout and b"blocking: 1 [edge 1]\n" in native.stdout
    vm = run_guest([guest], layer=layer)
    assert (vm.status, vm.fatal) == (0, "")
    assert vm.stdout == native.stdout


def _feed(address: tuple[str, int]) -> None:
    """30,000 bytes in three pieces some time apart, then 5,000 and the end."""
    with socket.create_connection(address, timeout=60) as conn:
        for _ in range(3):
            conn.sendall(b"x" * 10_000)
            time.sleep(0.2)  # each piece arrives on its own (the outcome must not depend on it)
        conn.sendall(b"y" * 5_000)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b""


def test_msg_waitall_waits_for_the_whole_length_or_the_end(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "waitall.py").write_text(WAITALL)
    argv = [sys.executable, str(layer / "tmp" / "waitall.py"), "0"]
    native = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert native.stderr is not None
        port = int(native.stderr.readline().split()[1])
        _feed(("127.0.0.1", port))
        expected, _ = native.communicate(timeout=60)
    finally:
        if native.poll() is None:
            native.kill()
            native.wait(10)
    assert expected == b"whole 30000\nat the end 5000\nafter the end 0\n"
    service = GuestService(["/usr/bin/python3", "/tmp/waitall.py", "8080"], layer)
    try:
        _feed(service.address)
        status, stdout = service.wait()
    finally:
        service.stop()
    assert status == 0, bytes(service.stderr)
    assert stdout == expected


def _talk(address: tuple[str, int]) -> None:
    """Messages one at a time, each after the reply to the one before, then the end."""
    with socket.create_connection(address, timeout=60) as conn:
        for message in (b"hello", b"a longer line than seven bytes", b"x"):
            conn.sendall(message)
            got = b""
            while len(got) < len(message):
                got += conn.recv(100)
            assert got == message.upper()
        conn.shutdown(socket.SHUT_WR)


def test_an_edge_triggered_server_neither_spins_nor_misses_data(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "edge.py").write_text(EDGE_SERVER)
    argv = [sys.executable, str(layer / "tmp" / "edge.py"), "0"]
    native = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert native.stderr is not None
        _talk(("127.0.0.1", int(native.stderr.readline().split()[1])))
        expected, _ = native.communicate(timeout=60)
    finally:
        if native.poll() is None:
            native.kill()
            native.wait(10)
    assert expected.count(b"woke with") == 4, expected  # one wake per message, and the end
    service = GuestService(["/usr/bin/python3", "/tmp/edge.py", "8080"], layer)
    try:
        _talk(service.address)
        status, stdout = service.wait()
    finally:
        service.stop()
    assert status == 0, bytes(service.stderr)
    assert stdout == expected


def _until_ready(machine: Machine, out: bytearray) -> None:
    deadline = time.monotonic() + 60
    while b"ready" not in out:
        assert time.monotonic() < deadline and machine.is_running(), bytes(out)
        time.sleep(0.02)


def test_a_checkpoint_in_sigsuspend_keeps_the_wait_its_mask_and_epoll_edges(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    guest = _compile(SUSPENDED, layer, "suspended")
    shutil.copytree(layer, tmp_path / "restored-layer")  # the program must be there to restore it
    config = LinuxConfig(program=guest, argv=[guest], layer=layer)
    personality = LinuxPersonality(config)
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda _number, data: out.extend(data)
    checkpoint = tmp_path / "waiting.ckpt"
    try:
        machine.start()
        _until_ready(machine, out)
        Checkpointer(machine).save(checkpoint)  # the program waits in rt_sigsuspend (not a deadlock)
        before = bytes(out)
        personality.request_signal(signal.SIGTERM)
        result = machine.wait_blocking(60)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    full = bytes(out)
    assert full.endswith(
        b"handler 15 code 0\nsigsuspend -1 Interrupted system call, SIGTERM blocked after 1\n"
        b"after: 1 [2]\nmore: 1 [1]\n"
    ), full

    again = LinuxPersonality(LinuxConfig(program=guest, argv=[guest], layer=tmp_path / "restored-layer"))
    restored = restore_linux(again, checkpoint)
    rest = bytearray()
    again.on_stream = lambda _number, data: rest.extend(data)
    try:
        restored.start()
        again.request_signal(signal.SIGTERM)
        result = restored.wait_blocking(60)
    finally:
        restored.close()
        again.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert before + bytes(rest) == full


# Python's signal.pause(): the only thread waits with no deadline (before, ended as a deadlock).
PAUSES = """
import signal, sys
def handler(sig, frame):
    print("handler got", sig, flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, handler)
print("ready", flush=True)
signal.pause()
print("not reached")
"""


def test_a_protected_program_in_pause_checkpoints_stops_by_sigterm_and_its_backup_replays_it(
    tmp_path: Path,
) -> None:
    """It waits through the primary's checkpoints (every second: each runs the call again) and the
    backup's replay, then `vmft stop` ends the wait with its handler on both sides."""
    with LocalCluster(tmp_path, failure_timeout_ms=FAILURE_TIMEOUT_MS) as cluster:
        a, b = cluster.add_node(), cluster.add_node()
        protect_linux(cluster, a, b, ["/usr/bin/python3", "-c", PAUSES])
        wait_status(cluster, a, "protected", lambda s: s.protected and s.state == vmft_pb2.VM_STATE_RUNNING)
        deadline = time.monotonic() + 60
        while b"ready" not in console(a):
            assert time.monotonic() < deadline, console(a)
            time.sleep(0.05)
        time.sleep(2.5)  # a few checkpoints while it waits (the outcome is the same without them)
        status = wait_status(cluster, a, "still running", lambda s: s.state == vmft_pb2.VM_STATE_RUNNING)
        assert status.protected
        stopped = vmft(cluster, "stop", "vm1", "--node", a.name, "--grace", "20")
        assert stopped.returncode == 0, stopped.stderr
        assert "exit code 3" in stopped.stdout, stopped.stdout
        assert console(a) == b"ready\nhandler got 15\n"
        ended = wait_status(cluster, b, "replayed to the end", lambda s: s.role == vmft_pb2.ROLE_STOPPED)
        assert "exit code 3" in ended.message, ended.message
        assert console(b) == b"ready\nhandler got 15\n"


def _part_then_signal(address: tuple[str, int], send_signal: Callable[[], None]) -> None:
    with socket.create_connection(address, timeout=60) as conn:
        conn.sendall(b"x" * 10_000)
        time.sleep(0.5)  # the bytes reach the receive first (the outcome must not depend on it)
        send_signal()
        assert conn.recv(100) == b"done"


def test_a_signal_ends_msg_waitall_with_the_bytes_it_had_and_the_recording_replays(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "waitall.py").write_text(WAITALL_SIGNAL)
    shutil.copytree(layer, tmp_path / "replay-layer")
    argv = [sys.executable, str(layer / "tmp" / "waitall.py"), "0"]
    native = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert native.stderr is not None
        port = int(native.stderr.readline().split()[1])
        _part_then_signal(("127.0.0.1", port), lambda: native.send_signal(signal.SIGTERM))
        expected, _ = native.communicate(timeout=60)
    finally:
        if native.poll() is None:
            native.kill()
            native.wait(10)
    assert expected == b"handler 15\ngot 10000\n"
    log = tmp_path / "run.log"
    guest = ["/usr/bin/python3", "/tmp/waitall.py", "8080"]
    service = GuestService(guest, layer, record=log)
    try:
        _part_then_signal(service.address, lambda: service.proc.send_signal(signal.SIGTERM))
        status, stdout = service.wait()
    finally:
        service.stop()
    assert status == 0, bytes(service.stderr)
    assert stdout == expected
    replayed = _replay(log, tmp_path / "replay-layer", guest)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "verdict: IDENTICAL" in replayed.stdout and "exit code 0" in replayed.stdout, replayed.stdout
