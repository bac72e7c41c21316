"""Unmodified Linux programs under the monitor, compared with the same programs run natively."""

from __future__ import annotations

import os
import re
import sys
import subprocess
from pathlib import Path

import pytest

from linux_helpers import have, run_guest, run_native

pytestmark = pytest.mark.kvm

BUSYBOX = "/bin/busybox"
PYTHON = "/usr/bin/python3"
LISTED = "/usr/lib/python3.11/json"  # a directory every Debian python3.11 has, the same under the view

SHELL_SCRIPT = (
    "i=0; s=0; while [ $i -lt 200 ]; do s=$((s + i * i % 7)); i=$((i + 1)); done; echo sum=$s; "
    "for w in alpha beta gamma; do echo ${#w}:$w; done; x=$((6 * 7)); echo $x; "
    "if [ $x -gt 40 ]; then echo big; else echo small; fi; echo err >&2; exit 3"
)


def _same(argv: list[str], **kwargs: object) -> None:
    guest = run_guest(argv, **kwargs)  # type: ignore[arg-type]
    native = run_native(argv)
    assert guest.stdout == native.stdout, (guest.stdout[-2000:], native.stdout[-2000:], guest.stderr)
    assert guest.status == native.status, (guest.status, native.status, guest.stderr, guest.fatal)
    assert guest.stderr == native.stderr


@pytest.fixture(autouse=True)
def _need_busybox() -> None:
    if not have(BUSYBOX):
        pytest.skip("busybox-static is not installed (scripts/setup installs it)")


@pytest.mark.parametrize(
    "argv",
    [
        [BUSYBOX, "sh", "-c", SHELL_SCRIPT],
        [BUSYBOX, "ls", "-l", LISTED],
        [BUSYBOX, "sha256sum", BUSYBOX, "/usr/bin/ls"],
        [BUSYBOX, "awk", "-F:", "{ n[$7]++ } END { for (s in n) print s, n[s] }", "/etc/passwd"],
        [BUSYBOX, "sort", "-t:", "-k3,3n", "/etc/passwd"],
    ],
    ids=["sh", "ls", "sha256sum", "awk", "sort"],
)
def test_busybox_matches_native(argv: list[str]) -> None:
    _same(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/ls", "-la", LISTED],
        ["/usr/bin/sort", "-r", "/etc/passwd"],
        ["/usr/bin/sha256sum", "/usr/bin/ls", "/etc/passwd"],
        ["/usr/bin/wc", "/etc/passwd", "/usr/lib/os-release"],
    ],
    ids=["ls", "sort", "sha256sum", "wc"],
)
def test_coreutils_match_native(argv: list[str]) -> None:
    _same(argv)


PY_SCRIPT = """\
import hashlib, json, os, re, sys, collections, itertools, math, struct
data = {"primes": [n for n in range(2, 200) if all(n % d for d in range(2, int(n ** 0.5) + 1))]}
text = json.dumps(data, sort_keys=True)
print(hashlib.sha256(text.encode()).hexdigest())
print(sorted(collections.Counter(re.findall(r"[a-z]+", open("/etc/passwd").read())).most_common(3)))
print(list(itertools.islice(itertools.permutations("abcd"), 5)))
print(math.fsum(1 / k ** 2 for k in range(1, 10000)), struct.pack("<dQ", math.pi, 2 ** 40).hex())
os.makedirs(os.path.expanduser("~/out"), exist_ok=True)
path = os.path.expanduser("~/out/result.txt")
with open(path, "w") as f:
    f.write(text)
print(os.path.getsize(path), open(path).read() == text, sorted(os.listdir(os.path.expanduser("~/out"))))
print(sys.version_info[:2], sys.platform, os.getcwd())
"""


def test_python_script_matches_native(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    guest_home = layer / "home" / "guest"
    guest_home.mkdir(parents=True)
    (guest_home / "script.py").write_text(PY_SCRIPT)
    guest = run_guest(["/usr/bin/python3", "/home/guest/script.py"], layer=layer)
    native_layer = tmp_path / "native"
    (native_layer / "home" / "guest").mkdir(parents=True)
    script = native_layer / "script.py"
    script.write_text(PY_SCRIPT)
    native = run_native(["/usr/bin/python3", str(script)], layer=native_layer)
    assert guest.stderr == b""
    assert guest.stdout == native.stdout
    assert guest.status == 0
    assert (guest_home / "out" / "result.txt").exists()  # the write went to the VM's writable layer


def test_cli_prints_42() -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "replica.cli", "run", "--linux", "--", "/usr/bin/python3", "-c", "print(6*7)"],
        cwd=root,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.stdout == b"42\n", proc.stderr
    assert proc.returncode == 0


def test_exit_status_and_fatal_signal() -> None:
    assert run_guest(["/usr/bin/python3", "-c", "import sys; sys.exit(7)"]).status == 7
    crashed = run_guest(["/usr/bin/python3", "-c", "import ctypes; ctypes.string_at(0)"])
    native = run_native(["/usr/bin/python3", "-c", "import ctypes; ctypes.string_at(0)"])
    assert crashed.status == native.status == 128 + 11
    assert "SIGSEGV" in crashed.fatal and "page fault reading an unmapped page at 0x0" in crashed.fatal


def sqlite_script(rows: int = 10_000) -> str:
    inserts = "\n".join(f"insert into t(name, v) values ('n{i % 97}', {i} * 0.5);" for i in range(rows))
    return (
        "create table t(id integer primary key, name text, v real);\nbegin;\n" + inserts + "\ncommit;\n"
        "select count(*), sum(v), min(name), max(name) from t;\n"
        "select name, count(*), avg(v) from t group by name order by count(*) desc, name limit 5;\n"
        "create index t_name on t(name);\nselect count(*) from t where name = 'n42';\n"
    )


def test_sqlite_ten_thousand_rows_in_the_layer(tmp_path: Path) -> None:
    if not have("/usr/bin/sqlite3"):
        pytest.skip("sqlite3 is not installed (scripts/setup installs it)")
    layer = tmp_path / "layer"
    home = layer / "home" / "guest"
    home.mkdir(parents=True)
    (home / "load.sql").write_text(sqlite_script())
    guest = run_guest(
        ["/usr/bin/sqlite3", "/home/guest/db.sqlite", ".read /home/guest/load.sql"], layer=layer
    )
    native_dir = tmp_path / "native"
    native_dir.mkdir()
    (native_dir / "load.sql").write_text(sqlite_script())
    native = run_native(
        ["/usr/bin/sqlite3", str(native_dir / "db.sqlite"), f".read {native_dir / 'load.sql'}"]
    )
    assert guest.status == native.status == 0, guest.stderr
    assert guest.stdout == native.stdout
    assert guest.stdout.startswith(b"10000|24997500.0|n0|n96\n")
    assert (home / "db.sqlite").stat().st_size == (native_dir / "db.sqlite").stat().st_size


THREADS_SCRIPT = """\
import queue, threading, time
results, q, lock = [], queue.Queue(), threading.Lock()
def worker(n):
    s = sum(range(n * 20000))
    with lock:
        results.append((n, s))
    q.put(n)
threads = [threading.Thread(target=worker, args=(n,)) for n in range(1, 9)]
for t in threads: t.start()
for t in threads: t.join()
print(sorted(results), sorted(q.get() for _ in range(8)))
ev = threading.Event()
threading.Thread(target=lambda: (time.sleep(0.05), ev.set())).start()
print("event", ev.wait(5), "timeout", threading.Event().wait(0.05), threading.active_count())
cond, items = threading.Condition(), []
def consumer():
    with cond:
        while len(items) < 3:
            cond.wait()
    print("consumed", items)
c = threading.Thread(target=consumer); c.start()
for i in range(3):
    with cond:
        items.append(i); cond.notify()
c.join()
"""


def test_python_threads_match_native() -> None:
    _same([PYTHON, "-c", THREADS_SCRIPT])


SIGNALS_SCRIPT = """\
import os, signal
got = []
signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(sig))
signal.signal(signal.SIGUSR2, lambda sig, frame: got.append(sig))
os.kill(os.getpid(), signal.SIGUSR1)
signal.raise_signal(signal.SIGUSR2)
print("got", got, 1.5 * 3)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.kill(os.getpid(), signal.SIGUSR1)
print("blocked", got)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
print("unblocked", got)
try:
    os.kill(os.getpid(), signal.SIGINT)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_signal_handlers_match_native() -> None:
    _same([PYTHON, "-c", SIGNALS_SCRIPT])


def test_segfault_handler_runs_as_native() -> None:
    """faulthandler's SIGSEGV handler runs on its alternate stack, prints the traceback, re-raises."""
    argv = [PYTHON, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"]
    guest, native = run_guest(argv), run_native(argv)
    assert guest.status == native.status == 128 + 11

    def tidy(text: bytes) -> bytes:
        return re.sub(rb"0x[0-9a-f]+", b"0x", text)  # the thread's address differs (native has ASLR)

    assert tidy(guest.stderr) == tidy(native.stderr)
    assert b"Fatal Python error: Segmentation fault" in guest.stderr


PIPELINE_SCRIPT = (
    "echo $(echo hi there) | /bin/busybox tr a-z A-Z; /bin/busybox ls /usr | /bin/busybox wc -l; "
    'x=$(/usr/bin/python3 -c "print(6*7)"); echo "x=$x"; false || echo "false: $?"; (exit 7); echo "sub $?"; '
    '/bin/busybox sh -c "exit 9"; echo "sh $?"; for i in 1 2 3; do echo $i; done | /bin/busybox sort -r'
)

SUBPROCESS_SCRIPT = """\
import os, subprocess, sys
r = subprocess.run(["/usr/bin/sha256sum", "/etc/passwd"], capture_output=True)
print(r.returncode, r.stdout.split()[0].decode())
code = "import sys; print(sys.argv[1:]); sys.exit(3)"
r = subprocess.run([sys.executable, "-c", code, "x"], capture_output=True)
print(r.returncode, r.stdout)
print(subprocess.check_output("echo a; echo b >&2", shell=True, stderr=subprocess.STDOUT))
p = subprocess.Popen(["/usr/bin/sort"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(p.communicate(b"b\\na\\nc\\n"), p.returncode)
pid = os.fork()
if pid == 0:
    os._exit(5)
print(os.waitpid(pid, 0)[1] >> 8)
"""


def test_shell_pipelines_and_subshells_match_native() -> None:
    _same([BUSYBOX, "sh", "-c", PIPELINE_SCRIPT])


def test_python_subprocess_matches_native() -> None:
    _same([PYTHON, "-c", SUBPROCESS_SCRIPT])


ASYNCIO_SCRIPT = """\
import asyncio, selectors, socket
async def worker(n, q):
    await asyncio.sleep(0.01 * n)
    await q.put(n * n)
async def main():
    q = asyncio.Queue()
    await asyncio.gather(*(worker(n, q) for n in range(5)))
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(a, b"ping")
    data = await loop.sock_recv(b, 10)
    proc = await asyncio.create_subprocess_exec("/bin/echo", "child", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    items = sorted(q.get_nowait() for _ in range(5))
    print(items, data, out, proc.returncode, type(selectors.DefaultSelector()).__name__)
asyncio.run(main())
"""


def test_asyncio_with_epoll_socketpair_and_subprocess_matches_native() -> None:
    _same([PYTHON, "-c", ASYNCIO_SCRIPT])
