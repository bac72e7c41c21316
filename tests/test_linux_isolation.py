"""What a Linux guest may not see or change, and how bad programs are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linux_helpers import run_guest
from monitor.linux.elf import LinuxImageError
from monitor.linux.personality import LinuxConfig, LinuxPersonality

pytestmark = pytest.mark.kvm

PROBE = """\
import errno, json, os
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as err:
        out[name] = errno.errorcode[err.errno]
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("dotdot", lambda: open("/tmp/../../../etc/shadow").read())
os.symlink("/etc/shadow", "/tmp/to-shadow")
attempt("guest_symlink", lambda: open("/tmp/to-shadow").read())
attempt("host_symlink", lambda: os.listdir("/tmp/planted"))
attempt("root_home", lambda: os.listdir("/root"))
attempt("host_proc", lambda: open("/proc/1/environ").read())
attempt("var", lambda: os.listdir("/var"))
attempt("write_usr", lambda: open("/usr/bin/vmft-guest-was-here", "w"))
attempt("mkdir_etc", lambda: os.mkdir("/etc/vmft-guest-was-here"))
attempt("write_tmp", lambda: open("/tmp/mine", "w").write("x"))
attempt("devices", lambda: open("/dev/sda"))
out["top"] = sorted(os.listdir("/"))
out["etc_has_shadow"] = "shadow" in os.listdir("/etc") or "gshadow" in os.listdir("/etc")
out["exe"] = os.readlink("/proc/self/exe")
out["null"] = open("/dev/null").read()
print(json.dumps(out, sort_keys=True))
"""


def test_guest_sees_only_its_view(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "tmp").mkdir(parents=True)
    (layer / "tmp" / "planted").symlink_to("/root")  # a host-absolute symlink is read inside the guest
    (layer / "home" / "guest").mkdir(parents=True)
    (layer / "home" / "guest" / "probe.py").write_text(PROBE)
    outcome = run_guest(["/usr/bin/python3", "/home/guest/probe.py"], layer=layer)
    assert outcome.status == 0, outcome.stderr
    seen = json.loads(outcome.stdout)
    for name in (
        "shadow",
        "dotdot",
        "guest_symlink",
        "host_symlink",
        "root_home",
        "host_proc",
        "var",
        "devices",
    ):
        assert seen[name] == "ENOENT", (name, seen[name])
    assert seen["write_usr"] == "EROFS" and seen["mkdir_etc"] == "EROFS"
    assert seen["write_tmp"] == "ok"
    assert (layer / "tmp" / "mine").read_text() == "x"
    assert not os.path.exists("/usr/bin/vmft-guest-was-here")
    assert not os.path.exists("/etc/vmft-guest-was-here")
    assert "root" not in seen["top"] and "var" not in seen["top"] and "usr" in seen["top"]
    assert not seen["etc_has_shadow"]
    assert seen["exe"] == "/usr/bin/python3"
    assert seen["null"] == ""


@pytest.mark.parametrize(
    "argv",
    [["/usr/bin/cat", "/etc/shadow"], ["/bin/busybox", "ls", "/root"], ["/usr/bin/cat", "/proc/1/environ"]],
    ids=["shadow", "root", "proc1"],
)
def test_reading_host_secrets_fails(argv: list[str]) -> None:
    if not os.access(argv[0], os.X_OK):
        pytest.skip(f"{argv[0]} is not installed")
    outcome = run_guest(argv)
    assert outcome.status == 1
    assert b"No such file or directory" in outcome.stderr
    assert outcome.stdout == b""


def _config(tmp_path: Path, program: str) -> LinuxConfig:
    return LinuxConfig(program=program, argv=[program], layer=tmp_path / "layer")


def test_bad_programs_are_refused_with_one_message(tmp_path: Path) -> None:
    home = tmp_path / "layer" / "home" / "guest"
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("hello\n")
    true = Path("/usr/bin/true").read_bytes()
    arm = bytearray(true)
    arm[18:20] = (183).to_bytes(2, "little")  # e_machine: AArch64
    (home / "arm").write_bytes(bytes(arm))
    interp = b"/lib64/ld-linux-x86-64.so.2"
    assert interp in true
    (home / "nointerp").write_bytes(true.replace(interp, b"/lib64/ld-linux-x86-64.so.9", 1))
    (home / "script").write_text("#!/bin/sh\necho hi\n")
    cases = {
        "/home/guest/notes.txt": "not an ELF executable",
        "/home/guest/arm": "built for AArch64 (64-bit), not x86-64",
        "/home/guest/nointerp": "its interpreter /lib64/ld-linux-x86-64.so.9 is not in the guest's root",
        "/home/guest/script": "a script (#!/bin/sh), not an executable",
        "/usr/bin/no-such-program": "no such program in the guest's root",
        "no-such-program": "not found in the guest's PATH",
        "/etc/shadow": "no such program in the guest's root",
    }
    for program, message in cases.items():
        with pytest.raises(LinuxImageError) as err:
            LinuxPersonality(_config(tmp_path, program))
        assert message in str(err.value), (program, str(err.value))


def test_cli_refuses_a_bad_program_in_one_line(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "replica.cli", "run", "--linux", "--", "/etc/passwd"],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "/etc/passwd: not an ELF executable" in lines[0], proc.stderr


def test_missing_library_is_one_clear_error(tmp_path: Path) -> None:
    """A dynamic program whose library is not in the root: the loader's own message, exit 127."""
    root = tmp_path / "root"
    for sub in ("usr/bin", "lib64", "usr/lib/x86_64-linux-gnu"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/usr/bin/ls", root / "usr/bin/ls")
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), root / "lib64/ld-linux-x86-64.so.2")
    outcome = run_guest(["/usr/bin/ls"], root=str(root))
    assert outcome.status == 127
    assert b"error while loading shared libraries" in outcome.stderr
