"""The C load generator (scripts/kvload.c, build/kvload) and its wrapper scripts/kvload.py, against the native
kv (guests/build/kv-host: kv.c over the host runtime) and against small misbehaving servers: counts agree
with what the server was handed, latency fields are consistent, failures are clear and bounded, and the JSON
has the fields the benchmarks read. No KVM needed."""

from __future__ import annotations

import json
import math
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kvload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    result = subprocess.run(["make", "-C", str(ROOT / "guests"), f"PYTHON={sys.executable}", "host"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    kvload.build()


@pytest.fixture
def native() -> Iterator[kvload.NativeKv]:
    with kvload.NativeKv() as server:
        yield server


def raw(address: str, *requests: str) -> list[str]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for r in requests:
            s.sendall(struct.pack(">I", len(r)) + r.encode())
        f = s.makefile("rb")
        replies = []
        for _ in requests:
            (n,) = struct.unpack(">I", f.read(4))
            replies.append(f.read(n).decode())
        return replies


def kvload_cli(*argv: str) -> tuple[int, dict[str, object] | None, str]:
    """build/kvload's exit status, its JSON (None if it printed none) and its stderr."""
    done = subprocess.run([str(kvload.BINARY), *argv], capture_output=True, text=True, timeout=60)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    return done.returncode, answer, done.stderr


def test_counts_match_what_the_server_was_handed() -> None:
    with kvload.NativeKv() as server:
        result = kvload.run([server.address], 4, requests=3000, tag="count")
    assert server.requests == 3000  # counted by the host runtime, not by the generator
    raw_json = result.raw
    assert result.requests == 3000 and raw_json["errors"] == 0 and raw_json["ok"] is True
    assert raw_json["sets"] + raw_json["gets"] == 3000
    assert raw_json["found"] + raw_json["notfound"] == raw_json["gets"]
    assert 1000 < raw_json["sets"] < 2000  # half and half, drawn at random
    assert result.histogram.count == 3000
    assert result.request_bytes > 3000 * 10
    assert result.seconds > 0 and result.rate == pytest.approx(3000 / result.seconds, rel=1e-3)


def test_latency_fields(native: kvload.NativeKv) -> None:
    result = kvload.run([native.address], 2, requests=2000, tag="lat")
    lat = result.raw["latency_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    # The wrapper's percentiles come from the same buckets as the generator's own (its midpoints).
    assert result.latency(50) * 1e6 == pytest.approx(lat["p50"], abs=0.001)  # printed to the ns
    assert result.latency(99) * 1e6 == pytest.approx(min(lat["p99"], lat["max"]), rel=0.02)
    for low, width, count in result.histogram.buckets:
        assert width >= 1 and count > 0 and low >= 0


def test_pipelined_sets_are_applied(native: kvload.NativeKv) -> None:
    result = kvload.run([native.address], 3, requests=900, depth=8, keys=1, set_ratio=1.0, value_size=100,
                        tag="pipe")  # fmt: skip
    assert result.requests == 900 and result.raw["sets"] == 900 and result.raw["depth"] == 8
    assert raw(native.address, "GET k0") == ["VALUE " + "v" * 100]
    # Every SET carried a request id the service accepted: a retry of a connection's last one is deduplicated.
    assert result.raw["errors"] == 0


def test_runs_reusing_a_tag_are_not_stale(native: kvload.NativeKv) -> None:
    for _ in range(2):
        result = kvload.run([native.address], 2, requests=200, set_ratio=1.0, tag="same")
        assert result.raw["errors"] == 0


def test_warmup_is_not_counted() -> None:
    with kvload.NativeKv() as server:
        result = kvload.run([server.address], 2, requests=100, warmup=0.2, tag="warm")
    assert result.requests == 100
    assert server.requests > 100  # the warm-up's requests reached the server too


def test_duration_run_and_clock(native: kvload.NativeKv) -> None:
    before = time.monotonic()
    result = kvload.run([native.address], 4, 0.3, tag="dur")
    after = time.monotonic()
    assert result.requests > 0
    # started_at is CLOCK_MONOTONIC, comparable with this process's time.monotonic() (bench record's windows)
    assert before <= result.started_at <= result.started_at + result.seconds <= after
    assert result.cpu_seconds > 0


def test_several_addresses() -> None:
    with kvload.NativeKv() as a, kvload.NativeKv() as b:
        result = kvload.run([a.address, b.address], 4, requests=1000, tag="two")
    assert result.requests == 1000
    assert a.requests > 0 and b.requests > 0 and a.requests + b.requests == 1000


def test_async_and_background_runs(native: kvload.NativeKv) -> None:
    import asyncio

    result = asyncio.run(kvload.run_async([native.address], 2, requests=300, tag="aio"))
    assert result.requests == 300
    running = kvload.start([native.address], 2, requests=300, tag="bg")
    assert running.result().requests == 300 and running.done()


def test_echo_server_ceiling() -> None:
    result = kvload.run_ceiling(4, 0.3)
    assert result.requests > 0 and result.raw["echo_server"] is True
    assert result.raw["notfound"] == result.raw["gets"] and result.raw["errors"] == 0


def test_refused_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(kvload.LoadError, match="Connection refused"):
            kvload.run([f"127.0.0.1:{port}"], 2, 1.0)
        status, answer, stderr = kvload_cli("--address", f"127.0.0.1:{port}", "--seconds", "1")
    assert status == 1 and answer is not None and answer["ok"] is False
    assert "Connection refused" in str(answer["error"]) and "Connection refused" in stderr


def test_usage_errors() -> None:
    cases = [
        ["--seconds", "1"],  # no server
        ["--echo-server"],  # neither a duration nor a count
        ["--echo-server", "--seconds", "1", "--requests", "5"],  # both
        ["--echo-server", "--seconds", "1", "--depth", "0"],
        ["--echo-server", "--seconds", "x"],
        ["--echo-server", "--seconds", "1", "--tag", "a:b"],  # a colon would break the request id
    ]
    for argv in cases:
        status, answer, stderr = kvload_cli(*argv)
        assert status == 2 and answer is None and stderr.startswith("kvload:"), (argv, stderr)


def serve(handle: Callable[[socket.socket], None]) -> tuple[str, Callable[[], None]]:
    """A one-thread TCP server on loopback calling handle(conn) per connection; returns (address, stop)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    stopping = threading.Event()
    conns: list[socket.socket] = []

    def loop() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            handle(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(5)
        listener.close()
        for c in conns:
            c.close()

    return f"127.0.0.1:{listener.getsockname()[1]}", stop


def test_bounded_when_the_server_never_answers() -> None:
    address, stop = serve(lambda conn: None)  # accepts, never replies
    try:
        start = time.monotonic()
        with pytest.raises(kvload.LoadError, match="timed out after 1.0 s with 2 requests in flight"):
            kvload.run([address], 2, 0.2, timeout=1.0)
        assert time.monotonic() - start < 30  # bounded by --timeout, not by the wrapper's grace
    finally:
        stop()


def test_a_server_that_closes() -> None:
    address, stop = serve(lambda conn: conn.close())
    try:
        with pytest.raises(kvload.LoadError, match="closed by the server|Connection reset|Broken pipe"):
            kvload.run([address], 1, 1.0)
    finally:
        stop()


def test_err_replies_fail_the_run() -> None:
    def answer_err(conn: socket.socket) -> None:
        def reply() -> None:
            buf = b""
            try:
                while data := conn.recv(65536):
                    buf += data
                    while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                        buf = buf[4 + struct.unpack(">I", buf[:4])[0]:]
                        conn.sendall(struct.pack(">I", 8) + b'ERR "no"')
            except OSError:
                pass

        threading.Thread(target=reply, daemon=True).start()

    address, stop = serve(answer_err)
    try:
        status, answer, _ = kvload_cli("--address", address, "--requests", "10", "--connections", "1")
        assert status == 1 and answer is not None and answer["errors"] == 10 and answer["requests"] == 10
        assert answer["error"] == '10 ERR replies, the first: ERR "no"'  # escaped into valid JSON
        with pytest.raises(kvload.LoadError, match="ERR replies"):
            kvload.run([address], 1, requests=5)
    finally:
        stop()


def test_histogram_merge_and_percentile() -> None:
    a = kvload.Histogram(((1000, 1, 2), (2000, 16, 1)))
    b = kvload.Histogram(((1000, 1, 1), (4000, 32, 1)))
    merged = kvload.Histogram.merge([a, b])
    assert merged.buckets == ((1000, 1, 3), (2000, 16, 1), (4000, 32, 1))
    assert merged.count == 5
    assert merged.percentile(50) == pytest.approx(1000e-9)
    assert merged.percentile(80) == pytest.approx(2007.5e-9)
    assert merged.percentile(100) == pytest.approx(4015.5e-9)
    assert math.isnan(kvload.Histogram(()).percentile(50))


def test_cpu_layout_keeps_generator_apart() -> None:
    generator, servers = kvload.cpu_layout()
    if generator is None:
        pytest.skip("one usable core: nothing is pinned")
    assert generator not in servers and servers


def test_pinned_generator(native: kvload.NativeKv) -> None:
    generator, _ = kvload.cpu_layout()
    result = kvload.run([native.address], 2, requests=200, cpu=generator or 0)
    assert result.raw["cpu"] == (generator or 0)


def test_reconnect_moves_to_the_next_address() -> None:
    with kvload.NativeKv() as a, kvload.NativeKv() as b:
        load = kvload.start([a.address, b.address], 4, 1.5, reconnect=True, tag="move")
        time.sleep(0.5)
        a.__exit__(None, None, None)  # the first address goes away under load
        result = load.result()
    assert result.raw["ok"] is True and result.raw["errors"] == 0
    assert result.raw["reconnects"] == 2  # connections 0 and 2 were on the first address
    recoveries = result.raw["recoveries_us"]
    assert len(recoveries) == 2 and all(0 < r < 1.5e6 for r in recoveries)
    assert result.recoveries == pytest.approx([r / 1e6 for r in recoveries])
    # Every counted reply came from one of the two servers (requests sent again may be counted twice there).
    assert a.requests + b.requests >= result.requests > 0
    assert b.requests > 0


def test_reconnect_gives_up_when_no_address_answers() -> None:
    with kvload.NativeKv() as a:
        load = kvload.start([a.address], 2, 5.0, reconnect=True, reconnect_timeout=0.5)
        time.sleep(0.3)
        a.__exit__(None, None, None)
        with pytest.raises(kvload.LoadError, match="no address answered within 0.5 s"):
            load.result()


def test_stop_ends_a_run_early(native: kvload.NativeKv) -> None:
    load = kvload.start([native.address], 2, 600.0, tag="stop")
    time.sleep(0.3)
    result = load.stop()  # SIGTERM: drained and reported, not killed
    assert result.raw["ok"] is True and 0 < result.seconds < 60 and result.requests > 0


def test_reconnect_starts_past_an_address_not_serving_yet(native: kvload.NativeKv) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused (a backup before its promotion)
        refused = f"127.0.0.1:{s.getsockname()[1]}"
        result = kvload.run([refused, native.address], 4, requests=400, reconnect=True, tag="late")
    assert result.requests == 400 and result.raw["reconnects"] == 0 and result.recoveries == ()


class CuttingProxy:
    """Forwards connections to `target` and cuts each one after `cut_after` reply bytes (mid-frame, with
    requests already applied whose replies are lost): the generator must send them again."""

    def __init__(self, target: str, cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0
        self.address, self._stop = serve(self._handle)

    def _handle(self, client: socket.socket) -> None:
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=5)

        def pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while data := src.recv(65536):
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: limit - sent])
                        self.cuts += 1
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, self.cut_after), daemon=True).start()

    def stop(self) -> None:
        self._stop()


def test_reconnect_sends_unanswered_writes_again(native: kvload.NativeKv) -> None:
    proxy = CuttingProxy(native.address, cut_after=5000)  # a few hundred replies per connection
    try:
        # One connection: through the proxy first (cut after ~800 replies), then to the service directly.
        result = kvload.run([proxy.address, native.address], 1, requests=3000, depth=4, set_ratio=1.0,
                            reconnect=True, tag="cut")  # fmt: skip
    finally:
        proxy.stop()
    assert proxy.cuts == 1 and result.raw["reconnects"] == 1
    # Every write got its reply: OK (fresh or the service's cached reply for a retried last write) or, for
    # an older write sent again, ERR stale (applied already, its reply lost): never an error.
    assert result.requests == 3000 and result.raw["errors"] == 0 and result.raw["ok"] is True
    assert result.raw["sets"] == 3000
