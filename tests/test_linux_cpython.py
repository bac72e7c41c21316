"""CPython's own regression tests (Debian's libpython3.11-testsuite) under the monitor and natively.

Each module the issue lists gives the same result as native (run in the guest's writable /tmp: some tests
write files in the working directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from linux_helpers import run_guest, run_native

pytestmark = pytest.mark.kvm

PYTHON = "/usr/bin/python3"


def summary(stderr: bytes) -> tuple[int, str]:
    """(tests run, verdict line) from unittest's output."""
    text = stderr.decode(errors="replace")
    ran = re.search(r"^Ran (\d+) tests? in", text, re.MULTILINE)
    verdict = re.search(r"^(OK.*|FAILED.*)$", text, re.MULTILINE)
    assert ran and verdict, text[-2000:]
    return int(ran.group(1)), verdict.group(1)


MODULES = [
    "test_json", "test_re", "test_struct", "test_math", "test_collections", "test_itertools", "test_string",
    "test_base64",
]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_cpython_module_same_as_native(module: str, tmp_path: Path) -> None:
    where = f"/usr/lib/python3.11/test/{module}"
    if not (os.path.exists(where + ".py") or os.path.isdir(where)):
        pytest.skip("libpython3.11-testsuite is not installed (scripts/setup installs it)")
    argv = [PYTHON, "-m", "unittest", f"test.{module}"]
    guest = run_guest(argv, cwd="/tmp")
    native = run_native(argv, cwd=str(tmp_path))
    assert summary(guest.stderr) == summary(native.stderr)
    assert summary(guest.stderr)[1].startswith("OK")
    assert guest.status == native.status == 0


def test_regrtest_runs_with_its_watchdog_thread() -> None:
    """`python3 -m test` starts a faulthandler watchdog thread: threads must work for it to exit 0."""
    if not os.path.exists("/usr/lib/python3.11/test/test_string.py"):
        pytest.skip("libpython3.11-testsuite is not installed (scripts/setup installs it)")
    guest = run_guest([PYTHON, "-m", "test", "test_string"])
    assert guest.status == 0, guest.stderr[-2000:]
    assert b"Tests result: SUCCESS" in guest.stdout
