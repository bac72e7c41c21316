"""Test hosts as network namespaces on a bridge (replica/hosts.py): real namespaces, real links, real TCP."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from replica import hosts
from replica.hosts import HostNetwork

pytestmark = pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))

PORT = 7000

# A TCP server that answers every connection with "hi <its address>" (runs inside a host).
SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen()
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(b"hi " + sys.argv[1].encode())
        c.close()
    """
)

# Connect once with a bounded timeout; print what came back or the error's name.
CLIENT = textwrap.dedent(
    """
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
            c.settimeout(float(sys.argv[3]))
            print(c.recv(100).decode())
    except OSError as e:
        print("ERR", type(e).__name__)
    """
)


def start_server(net: HostNetwork, name: str) -> subprocess.Popen[str]:
    proc = net.spawn(name, [sys.executable, "-c", SERVER, net.hosts[name].address, str(PORT)],
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def connect(net: HostNetwork, src: str, dst: str, timeout: float = 2.0) -> str:
    """From host `src`, connect to the server on host `dst`: its greeting or 'ERR <exception>'."""
    done = net.run(src, [sys.executable, "-c", CLIENT, net.hosts[dst].address, str(PORT), str(timeout)])
    return done.stdout.strip()


def connect_eventually(net: HostNetwork, src: str, dst: str, attempts: int = 20) -> str:
    """A healed link needs the bridge port to come back (and ARP): retry a bounded number of times."""
    out = ""
    for _ in range(attempts):
        out = connect(net, src, dst, timeout=0.5)
        if out.startswith("hi"):
            return out
    return out


def leftovers(token: str) -> list[str]:
    """Namespaces and links of run `token` that still exist on this machine."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line for line in (ns + links).splitlines() if token in line]


def test_hosts_talk_over_the_bridge_and_a_cut_link_is_silent(tmp_path: Path) -> None:
    with HostNetwork(tmp_path) as net:
        a, b = net.add("a"), net.add("b")
        assert a.address != b.address and a.data_dir != b.data_dir and a.data_dir.is_dir()
        # No route out: the only routes inside a host are its bridge subnet (no default route).
        routes = net.run("a", ["ip", "-4", "route"]).stdout
        assert "default" not in routes and str(net.subnet) in routes
        start_server(net, "a")
        assert connect(net, "b", "a") == f"hi {a.address}"
        # The root namespace has no address on the bridge (root_address=False): it cannot reach a host.
        done = subprocess.run([sys.executable, "-c", CLIENT, a.address, str(PORT), "0.3"],
                              capture_output=True, text=True, timeout=10)
        assert done.stdout.startswith("ERR")

        net.cut("a")
        t0 = time.monotonic()
        assert connect(net, "b", "a", timeout=0.5).startswith("ERR")
        assert time.monotonic() - t0 < 5, "a connection across a cut link must fail within its timeout"

        net.heal("a")
        assert connect_eventually(net, "b", "a") == f"hi {a.address}"
        token = net.token
        assert leftovers(token)
    assert leftovers(token) == []


def test_cut_between_isolates_one_pair_only(tmp_path: Path) -> None:
    with HostNetwork(tmp_path) as net:
        for name in ("a", "b", "c"):
            net.add(name)
            start_server(net, name)
        net.cut_between("a", "b")
        assert connect(net, "b", "a", timeout=0.5).startswith("ERR")
        assert connect(net, "a", "b", timeout=0.5).startswith("ERR")
        assert connect(net, "c", "a").startswith("hi")
        assert connect(net, "a", "c").startswith("hi")
        assert connect(net, "b", "c").startswith("hi")
        net.heal_between("a", "b")
        assert connect_eventually(net, "b", "a").startswith("hi")


def test_root_address_lets_outside_clients_in(tmp_path: Path) -> None:
    with HostNetwork(tmp_path, root_address=True) as net:
        a = net.add("a")
        start_server(net, "a")
        done = subprocess.run([sys.executable, "-c", CLIENT, a.address, str(PORT), "1"],
                              capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() == f"hi {a.address}"


def test_everything_is_removed_after_an_exception(tmp_path: Path) -> None:
    token = ""
    with pytest.raises(RuntimeError):
        with HostNetwork(tmp_path) as net:
            token = net.token
            net.add("a")
            proc = start_server(net, "a")
            raise RuntimeError("boom")
    assert leftovers(token) == []
    assert proc.poll() is not None, "a process spawned in a host is stopped with it"


def test_remove_one_host(tmp_path: Path) -> None:
    with HostNetwork(tmp_path) as net:
        net.add("a")
        b = net.add("b")
        net.remove("a")
        assert net.hosts == {"b": b}
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"vmft-{net.token}-a" not in names and f"vmft-{net.token}-b" in names


# A child process that builds a network with a process inside a host, says its token, and waits.
CHILD = textwrap.dedent(
    """
    import sys, time
    from replica.hosts import HostNetwork
    with HostNetwork(sys.argv[1]) as net:
        net.add("a"); net.add("b")
        net.spawn("a", ["sleep", "60"])
        print(net.token, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_everything_is_removed_after_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, cwd=root)
    try:
        assert child.stdout is not None
        token = child.stdout.readline().strip()
        assert token and leftovers(token)
        child.send_signal(sig)
        child.wait(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if sig == signal.SIGKILL:
        # Nothing could run in the child: the next run (any HostNetwork, or sweep_stale) removes it all.
        assert leftovers(token)
        assert hosts.sweep_stale() >= 1
    assert leftovers(token) == []
    assert not (hosts.STATE_DIR / f"{token}.json").exists()
