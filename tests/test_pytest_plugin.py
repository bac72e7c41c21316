"""The pytest plugin (replica/pytest_plugin.py) used as a user would: the `vmft_pair` fixture, with no
import of the plugin (it is registered as a pytest11 entry point), both in this suite and in a user's own
test file run by a separate pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from replica.kv_client import KvClientSync

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
KV = ROOT / "guests" / "build" / "kv.elf"


def test_vmft_pair_survives_kill_primary(vmft_pair) -> None:  # type: ignore[no-untyped-def]
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    pair = vmft_pair(KV)
    first_primary = pair.vm.primary.name
    client = KvClientSync(pair.addresses, timeout=1.0, total_timeout=15.0)
    try:
        client.set("greeting", "hello")
        recovery = pair.inject("kill-primary")
        assert client.get("greeting") == "hello"
    finally:
        client.close()
    assert recovery.fault == "kill-primary" and recovery.detail
    assert 0 < recovery.recovery_s < 5.0, recovery
    assert recovery.reprotect_s is not None and recovery.reprotect_s > 0, recovery
    assert pair.controller.protected()
    assert pair.vm.primary.name != first_primary, "the backup's node must be primary now"


USER_TEST = '''
from replica.kv_client import KvClientSync


def test_my_service_survives_a_crash(vmft_pair):
    pair = vmft_pair({image!r})
    client = KvClientSync(pair.addresses, timeout=1.0, total_timeout=15.0)
    client.set("k", "v")
    recovery = pair.inject("crash")
    assert client.get("k") == "v"
    assert recovery.recovery_s < 5.0
    # The fault really happened: the guest crashed and its primary restarted it from a checkpoint.
    status = pair.cluster.vm_status(pair.vm.primary, pair.vm.name)
    assert status is not None and status.faults_recovered == 1, status
    assert "CRASH" in recovery.detail, recovery
    client.close()
'''


def test_plugin_entry_point_works_for_users(tmp_path: Path) -> None:
    """A user's test file in another directory, plain `pytest` (no -p, no conftest): the fixture is found."""
    if not KV.exists():
        pytest.fail(f"{KV} is not built: run scripts/setup", pytrace=False)
    (tmp_path / "test_user.py").write_text(USER_TEST.format(image=str(KV)))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout
