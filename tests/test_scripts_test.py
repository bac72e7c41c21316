"""scripts/test on a machine without KVM (VMFT_TEST_KVM_PATH pointed at nothing): the pure tests still
run, the last line says how many tests were skipped for lack of KVM, and the run fails unless
VMFT_ALLOW_NO_KVM=1. (VMFT_TEST_SKIP_LINT=1 leaves out set-up, ruff and mypy: the suite runs those.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Two pure tests and two that need KVM.
SELECTION = [
    "tests/test_event_log.py::test_queue_source_drains_then_stops",
    "tests/test_bench_smoke.py::test_percentile_and_interleaving",
    "tests/test_bench_smoke.py::test_exits_smoke",
    "tests/test_bench_smoke.py::test_spin_smoke",
]


def scripts_test(*args: str, **env: str) -> tuple[int, list[str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFT_"))}
    result = subprocess.run(
        [str(ROOT / "scripts" / "test"), "-p", "no:cacheprovider", *args],
        env={**base, "VMFT_TEST_SKIP_LINT": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    return result.returncode, [line for line in result.stdout.splitlines() if line.strip()]


def test_without_kvm_the_pure_tests_run_and_the_run_fails() -> None:
    rc, lines = scripts_test(*SELECTION, VMFT_TEST_KVM_PATH="/nonexistent/kvm")
    assert rc != 0, lines[-5:]
    assert re.search(r"\b2 passed, 2 skipped\b", "\n".join(lines)), lines[-8:]
    assert re.search(r"\b2 tests skipped for lack of KVM\b", lines[-1]), lines[-3:]
    assert "VMFT_ALLOW_NO_KVM=1" in lines[-1]


def test_without_kvm_allowed_the_run_passes_and_says_so() -> None:
    rc, lines = scripts_test(*SELECTION, VMFT_TEST_KVM_PATH="/nonexistent/kvm", VMFT_ALLOW_NO_KVM="1")
    assert rc == 0, lines[-8:]
    assert re.search(r"all passed, but 2 tests were skipped for lack of KVM", lines[-1]), lines[-3:]


def test_with_kvm_nothing_is_skipped() -> None:
    rc, lines = scripts_test(*SELECTION[:2])
    assert rc == 0, lines[-8:]
    assert lines[-1] == "scripts/test: all passed (0 tests skipped for lack of KVM)", lines[-3:]


def test_every_test_is_bounded_by_a_timeout(tmp_path: Path) -> None:
    """The suite's configuration bounds every test (pytest-timeout, pyproject.toml): a test that hangs
    fails with a timeout instead of stalling the run. Shown with the suite's own configuration and a
    test that sleeps past a shortened bound (the default itself is read from the run's header)."""
    header = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-p", "no:cacheprovider", "tests/test_event_log.py"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    match = re.search(r"^timeout: ([\d.]+)s$", header.stdout, re.M)
    assert match and 60 <= float(match.group(1)) <= 600, header.stdout[:2000]
    hung = tmp_path / "test_hung.py"
    hung.write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-o", "timeout=1", str(hung)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "Timeout" in result.stdout and "1 failed" in result.stdout, result.stdout
