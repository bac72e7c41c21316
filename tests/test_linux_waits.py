"""A pause, checkpoint or stop of the machine changes nothing a waiting Linux program sees (docs/linux.md,
"Threads"): every wait with a timeout (nanosleep, clock_nanosleep relative and absolute, poll, epoll_wait,
select, pselect6, futex relative and absolute) lasts until its deadline by the guest's own clock through
checkpoints taken every 0.2 s, whether the vCPU waits for the network (a listening program) or for the
deadline alone, and the recording replays to the same state; a checkpoint taken in a select with a
timeout restores into a select that ends as the original's did (its sets cleared)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from linux_helpers import run_guest, run_native
from monitor.checkpoint.take import Checkpointer
from monitor.linux.personality import LinuxConfig, LinuxPersonality, build_linux, restore_linux
from monitor.machine import StopReason
from monitor.record import ReplayJournal, open_recording, open_replay

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (scripts/setup)"),
]

MEM = 512 << 20
WAIT_S = 60.0
CHECKPOINT_EVERY_S = 0.2

# Every wait ends at its deadline (nothing is ever written to the pipe, nobody wakes the futex word); each
# says what it returned and whether it lasted as long as it was asked to, by the guest's own clock. The
# first sleep outlasts Machine.pause's 5 s bound: a checkpoint must be served inside it, not after it.
WAITS = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SHORT_NS 400000000LL
static long long started, wanted;
static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}
static void report(const char *what, long ret, int err) {
    int lasted = now_ns() - started >= wanted;
    printf("%s %ld %s lasted %d\n", what, ret, ret < 0 ? strerror(err) : "", lasted);
    fflush(stdout);
}
#define WAIT(what, ns, call) do { wanted = (ns); started = now_ns(); long r_ = (call); \
    report(what, r_, errno); } while (0)
static struct timespec after(long long ns) {
    long long at = now_ns() + ns;
    struct timespec t = {at / 1000000000LL, at % 1000000000LL};
    return t;
}

int main(int argc, char **argv) {
    if (argc > 1) {  /* a listening program: the vCPU waits for the network as well as the deadline */
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) return 2;
    }
    int p[2];
    if (pipe(p)) return 2;
    uint32_t word = 0;
    printf("ready\n");
    fflush(stdout);

    struct timespec t = {5, 500000000}, rem = {7, 7};
    WAIT("nanosleep", 5500000000LL, nanosleep(&t, &rem));
    printf("rem untouched %d\n", rem.tv_sec == 7 && rem.tv_nsec == 7);
    t.tv_sec = 0; t.tv_nsec = SHORT_NS;
    WAIT("clock_nanosleep", SHORT_NS, clock_nanosleep(CLOCK_MONOTONIC, 0, &t, 0));
    struct timespec at = after(SHORT_NS);
    WAIT("clock_nanosleep abs", SHORT_NS, clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, 0));

    struct pollfd pf = {p[0], POLLIN, 0};
    WAIT("poll", SHORT_NS, poll(&pf, 1, SHORT_NS / 1000000));
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, got;
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
    WAIT("epoll_wait", SHORT_NS, epoll_wait(ep, &got, 1, SHORT_NS / 1000000));

    fd_set r;
    FD_ZERO(&r);
    FD_SET(p[0], &r);
    struct timeval tv = {0, SHORT_NS / 1000};
    WAIT("select", SHORT_NS, select(p[0] + 1, &r, 0, 0, &tv));
    printf("select set %d left %ld.%06ld\n", FD_ISSET(p[0], &r), (long)tv.tv_sec, (long)tv.tv_usec);
    FD_ZERO(&r);
    FD_SET(p[0], &r);
    struct timespec ts = {0, SHORT_NS};
    WAIT("pselect6", SHORT_NS, pselect(p[0] + 1, &r, 0, 0, &ts, 0));
    printf("pselect6 set %d\n", FD_ISSET(p[0], &r));

    t.tv_sec = 0; t.tv_nsec = SHORT_NS;
    WAIT("futex", SHORT_NS, syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &t, 0, 0));
    at = after(SHORT_NS);
    WAIT("futex abs", SHORT_NS,
         syscall(SYS_futex, &word, FUTEX_WAIT_BITSET_PRIVATE, 0, &at, 0, FUTEX_BITSET_MATCH_ANY));
    printf("done\n");
    return 0;
}
"""


def _compile(source: str, layer: Path, name: str) -> str:
    """The program built into the layer's /tmp; its guest path."""
    (layer / "tmp").mkdir(parents=True, exist_ok=True)
    src = layer / f"{name}.c"
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(layer / "tmp" / name), str(src)], check=True, timeout=120)
    return f"/tmp/{name}"


@pytest.fixture(scope="module")
def waits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, bytes]:
    """The program (its layer and guest path) and what it prints natively."""
    layer = tmp_path_factory.mktemp("waits") / "layer"
    guest = _compile(WAITS, layer, "waits")
    native = run_native([str(layer / guest.lstrip("/"))])
    assert native.status == 0, native.stderr
    assert native.stdout.count(b" lasted 1\n") == 9, native.stdout  # the check has teeth natively
    assert b"select set 0 left 0.000000\n" in native.stdout and b"pselect6 set 0\n" in native.stdout
    return layer, guest, native.stdout


@pytest.mark.parametrize("listening", [False, True], ids=["deadline-only", "listening"])
def test_waits_last_until_their_deadlines_through_checkpoints_and_replay(
    waits: tuple[Path, str, bytes], tmp_path: Path, listening: bool
) -> None:
    built, guest, expected = waits
    layer, replay_layer = tmp_path / "layer", tmp_path / "replay-layer"
    shutil.copytree(built, layer)
    shutil.copytree(built, replay_layer)  # as the recording began
    argv = [guest, "listen"] if listening else [guest]
    log = tmp_path / "run.log"
    personality = LinuxPersonality(LinuxConfig(program=guest, argv=argv, layer=layer))
    machine = build_linux(personality, open_recording(log, personality.image, MEM, 500))
    out = bytearray()
    personality.on_stream = lambda _number, data: out.extend(data)
    checkpointer = Checkpointer(machine)
    at_first: list[bytes] = []
    taken = 0
    try:
        machine.start()
        deadline = time.monotonic() + WAIT_S
        while b"ready" not in out:
            assert time.monotonic() < deadline and machine.is_running(), bytes(out)
            time.sleep(0.02)
        # In the first sleep (5.5 s): the checkpoint is served there, and the sleep goes on.
        checkpointer.save(
            tmp_path / "first.ckpt", full=True, on_paused=lambda _p: at_first.append(bytes(out))
        )
        while b"done" not in out and machine.is_running():
            assert time.monotonic() < deadline, bytes(out)
            time.sleep(CHECKPOINT_EVERY_S)
            checkpointer.save(tmp_path / "later.ckpt", full=True)
            taken += 1
        result = machine.wait_blocking(WAIT_S)
        recorded_digest = machine.state_digest()
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert at_first == [b"ready\n"]
    assert taken >= 10  # every wait went through checkpoints (the short ones last 0.4 s each)
    assert bytes(out) == expected

    journals: list[ReplayJournal] = []

    def replaying(again: LinuxPersonality) -> ReplayJournal:
        journals.append(open_replay(log, again.image, MEM))
        return journals[0]

    replayed = run_guest(argv, layer=replay_layer, journal=replaying)
    assert replayed.result is not None and replayed.result.reason is StopReason.EXITED
    assert replayed.result.position == result.position == journals[0].end_position
    assert replayed.digest == recorded_digest


# A select with a timeout on a pipe nobody writes: it ends at its deadline with its sets cleared, which
# Python reports as three empty lists (a set left as it was would report the pipe as readable).
SELECTS = """
import os, select, time
r, w = os.pipe()
print("ready", flush=True)
began = time.monotonic()
got = select.select([r], [], [], 2.0)
print("select", got, time.monotonic() - began >= 2.0, flush=True)
"""


def test_a_checkpoint_in_a_select_with_a_timeout_restores_into_the_same_ending(tmp_path: Path) -> None:
    argv = ["/usr/bin/python3", "-c", SELECTS]
    personality = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=tmp_path / "layer"))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda _number, data: out.extend(data)
    checkpoint = tmp_path / "select.ckpt"
    try:
        machine.start()
        deadline = time.monotonic() + WAIT_S
        while b"ready" not in out:
            assert time.monotonic() < deadline and machine.is_running(), bytes(out)
            time.sleep(0.02)
        time.sleep(0.5)  # into the select (the restore below checks that it is there)
        Checkpointer(machine).save(checkpoint)
        result = machine.wait_blocking(WAIT_S)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert bytes(out) == b"ready\nselect ([], [], []) True\n"

    again = LinuxPersonality(LinuxConfig(program=argv[0], argv=argv, layer=tmp_path / "restored-layer"))
    restored = restore_linux(again, checkpoint)
    rest = bytearray()
    again.on_stream = lambda _number, data: rest.extend(data)
    try:
        waiting = [t.wait for t in again.process.sched.threads.values() if t.wait is not None]
        assert [w.kind for w in waiting] == ["poll"] and waiting[0].deadline_ns is not None, waiting
        result = restored.run_blocking(WAIT_S)
    finally:
        restored.close()
        again.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert bytes(rest) == b"select ([], [], []) True\n"


# rt_sigsuspend with SIGUSR1 blocked while it waits (the thread's own mask lets it through): a SIGUSR1
# from outside stays pending through the wait and the checkpoints in it, and runs only when the wait is
# over (after SIGTERM's handler, as rt_sigreturn puts the own mask back), as on Linux.
SUSPENDS = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void handler(int sig) {
    char line[40];
    write(1, line, snprintf(line, sizeof line, "handler %d\n", sig));
}
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigaction(SIGUSR1, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sigset_t waiting;
    sigemptyset(&waiting);
    sigaddset(&waiting, SIGUSR1);
    printf("ready\n");
    fflush(stdout);
    sigsuspend(&waiting);
    printf("after\n");
    return 0;
}
"""


def test_a_signal_the_suspend_mask_blocks_waits_through_checkpoints_until_the_wait_ends(
    tmp_path: Path,
) -> None:
    layer = tmp_path / "layer"
    guest = _compile(SUSPENDS, layer, "suspends")
    personality = LinuxPersonality(LinuxConfig(program=guest, argv=[guest], layer=layer))
    machine = build_linux(personality)
    out = bytearray()
    personality.on_stream = lambda _number, data: out.extend(data)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    try:
        machine.start()
        deadline = time.monotonic() + WAIT_S
        while b"ready" not in out:
            assert time.monotonic() < deadline and machine.is_running(), bytes(out)
            time.sleep(0.02)
        personality.request_signal(signal.SIGUSR1)
        while not personality.process.signals.pending & usr1:  # taken: pending, blocked by the wait
            assert time.monotonic() < deadline and machine.is_running(), bytes(out)
            time.sleep(0.02)
        checkpointer = Checkpointer(machine)
        for number in range(3):
            checkpointer.save(tmp_path / f"{number}.ckpt", full=True)
        assert bytes(out) == b"ready\n"
        personality.request_signal(signal.SIGTERM)
        result = machine.wait_blocking(WAIT_S)
    finally:
        machine.close()
        personality.close()
    assert result.reason is StopReason.EXITED and result.exit_code == 0, result.describe()
    assert bytes(out) == b"ready\nhandler 15\nhandler 10\nafter\n"
