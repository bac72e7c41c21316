"""Shared test fixtures for vmft.

Tests that need a usable /dev/kvm carry the `kvm` marker (or take the `kvm_required` fixture); where KVM is
not usable they are skipped and the reason is shown in the summary (addopts has -rs).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_BUILD = ROOT / "guests" / "build"

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


@functools.cache
def kvm_unusable_reason() -> str | None:
    """None when /dev/kvm can create a VM; otherwise a plain sentence saying why not."""
    path = "/dev/kvm"
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


def pytest_report_header(config: pytest.Config) -> str:
    reason = kvm_unusable_reason()
    return "kvm: usable" if reason is None else f"kvm: NOT usable: {reason}; kvm tests will be skipped"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords or "kvm_required" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvm_required() -> None:
    """Depend on this fixture (or mark the test `kvm`) to be skipped where /dev/kvm is unusable."""
    reason = kvm_unusable_reason()
    if reason is not None:
        pytest.skip(f"needs KVM: {reason}")


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
