"""Shared test fixtures for vmft.

Tests that need a usable /dev/kvm carry the `kvm` marker (or take the `kvm_required` fixture); where KVM is
not usable they are skipped and the reason is shown in the summary (addopts has -rs). Tests without either
run everywhere: they must not touch KVM.

The count of tests skipped for lack of KVM ends the terminal summary and, when VMFT_KVM_SKIP_REPORT names a
file, is written there (scripts/test reads it and fails unless VMFT_ALLOW_NO_KVM=1).
VMFT_TEST_KVM_PATH (default /dev/kvm) points the check, and the monitor in this process, at another path:
`VMFT_TEST_KVM_PATH=/nonexistent` shows what runs on a machine without KVM.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import IO, AnyStr
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_BUILD = ROOT / "guests" / "build"

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
KVM_PATH = os.environ.get("VMFT_TEST_KVM_PATH", "/dev/kvm")
NO_KVM_PREFIX = "needs KVM: "


@functools.cache
def kvm_unusable_reason() -> str | None:
    """None when /dev/kvm can create a VM; otherwise a plain sentence saying why not."""
    path = KVM_PATH
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this machine)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        why = os.strerror(e.errno or errno.EIO)
        return f"cannot open {path} read-write: {why} (needs root or the kvm group)"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"{path} speaks KVM API version {version}, vmft needs {KVM_API_VERSION}"
        try:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            return f"KVM_CREATE_VM on {path} failed: {os.strerror(e.errno or errno.EIO)}"
        os.close(vm)
    except OSError as e:
        return f"{path} does not answer KVM ioctls: {os.strerror(e.errno or errno.EIO)}"
    finally:
        os.close(fd)
    return None


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated here so the markers exist however pytest is started.
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm")
    config.addinivalue_line("markers", "slow: long-running test")
    if KVM_PATH != "/dev/kvm":
        # A test wrongly left without the kvm marker then fails here instead of passing on real KVM.
        import monitor.kvm

        monitor.kvm.KVM_DEVICE = KVM_PATH


def pytest_report_header(config: pytest.Config) -> str:
    reason = kvm_unusable_reason()
    return "kvm: usable" if reason is None else f"kvm: NOT usable: {reason}; kvm tests will be skipped"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"{NO_KVM_PREFIX}{reason}")
    for item in items:
        if "kvm" in item.keywords or "kvm_required" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvm_required() -> None:
    """Depend on this fixture (or mark the test `kvm`) to be skipped where /dev/kvm is unusable."""
    reason = kvm_unusable_reason()
    if reason is not None:
        pytest.skip(f"{NO_KVM_PREFIX}{reason}")


_KVM_SKIPPED: list[str] = []  # node ids of the tests skipped for lack of KVM in this run


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and _skip_reason(report).startswith(NO_KVM_PREFIX):
        _KVM_SKIPPED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    count = len(_KVM_SKIPPED)
    if count:
        terminalreporter.write_line(
            f"kvm: {count} tests skipped for lack of KVM ({kvm_unusable_reason()})", yellow=True
        )
    report = os.environ.get("VMFT_KVM_SKIP_REPORT")
    if report:
        Path(report).write_text(f"{count}\n")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that nothing listens on right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def free_port() -> Callable[[], int]:
    """`free_port()` returns a free loopback TCP port (call it once per port needed)."""
    return find_free_port


def guest_image_path(name: str) -> Path:
    path = GUEST_BUILD / f"{name}.elf"
    if not path.is_file():
        pytest.fail(
            f"guest image {path.relative_to(ROOT)} is not built: run scripts/setup "
            f"(or `make -C guests PYTHON=$PWD/.venv/bin/python`)",
            pytrace=False,
        )
    return path


@pytest.fixture
def guest_image() -> Callable[[str], Path]:
    """`guest_image("kv")` is the path of guests/build/kv.elf; the test fails clearly if it is not built."""
    return guest_image_path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def readline_within(stream: IO[AnyStr], timeout_s: float, what: str = "a line") -> AnyStr:
    """stream.readline(), failing the test if no line comes within timeout_s (a pipe from a child that
    hangs would block forever). The reading thread is left behind on timeout: killing the child ends it."""
    result: list[AnyStr] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result:
        raise AssertionError(f"no {what} within {timeout_s} s")
    return result[0]
