"""monitor/kvm_abi.py and monitor/guest_abi.py against C compilers' view of the same ABI.

The ioctl numbers and struct layouts in kvm_abi.py are derived by hand from linux/kvm.h; here a small C
program built against the installed kernel headers prints the real values. No /dev/kvm needed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monitor import kvm_abi

ROOT = Path(__file__).resolve().parent.parent

# Ioctl member name (without KVM_) -> must match the kernel header's KVM_<name>.
REQUIRED_IOCTLS = [
    "RUN",
    "GET_REGS",
    "SET_SREGS",
    "GET_DIRTY_LOG",
    "SET_USER_MEMORY_REGION",
    "INTERRUPT",
    "GET_MSRS",
    "SET_CPUID2",
    "GET_VCPU_EVENTS",
    "GET_XSAVE",
    "GET_XCRS",
    "GET_FPU",
    "GET_MP_STATE",
    "SET_MSRS",
    "SET_VCPU_EVENTS",
]

# ctypes struct in kvm_abi -> C struct in linux/kvm.h (checked when kvm_abi has it).
STRUCTS = {
    "Run": "kvm_run",
    "Regs": "kvm_regs",
    "Sregs": "kvm_sregs",
    "Fpu": "kvm_fpu",
    "Xsave": "kvm_xsave",
    "Xcrs": "kvm_xcrs",
    "VcpuEvents": "kvm_vcpu_events",
    "DebugRegs": "kvm_debugregs",
    "DirtyLog": "kvm_dirty_log",
    "CpuidEntry2": "kvm_cpuid_entry2",
    "MsrEntry": "kvm_msr_entry",
    "UserspaceMemoryRegion": "kvm_userspace_memory_region",
    "MpState": "kvm_mp_state",
    "Interrupt": "kvm_interrupt",
}

needs_gcc = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="gcc is not installed (scripts/setup installs it)"
)


def _c_program() -> str:
    names = sorted({*REQUIRED_IOCTLS, *(m.name for m in kvm_abi.Ioctl)})
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for name in names:
        lines += [
            f"#ifdef KVM_{name}",
            f'    printf("ioctl {name} %lu\\n", (unsigned long)(KVM_{name}));',
            "#endif",
        ]
    for py, c in STRUCTS.items():
        if hasattr(kvm_abi, py):
            lines.append(f'    printf("sizeof {py} %zu\\n", sizeof(struct {c}));')
    lines += [
        '    printf("offsetof Run.s %zu\\n", offsetof(struct kvm_run, s));',
        '    printf("offsetof Run.exit_reason %zu\\n", offsetof(struct kvm_run, exit_reason));',
        '    printf("offsetof Run.io %zu\\n", offsetof(struct kvm_run, io));',
        '    printf("offsetof Run.kvm_valid_regs %zu\\n", offsetof(struct kvm_run, kvm_valid_regs));',
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (scripts/setup installs it)")
    d = tmp_path_factory.mktemp("kvm_abi")
    src, exe = d / "kvm_abi.c", d / "kvm_abi"
    src.write_text(_c_program())
    cc = subprocess.run(["gcc", "-O0", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, f"compiling the KVM header probe failed:\n{cc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        values[(kind, name)] = int(value)
    return values


@pytest.mark.parametrize("name", REQUIRED_IOCTLS)
def test_required_ioctl_numbers(header_values: dict[tuple[str, str], int], name: str) -> None:
    assert ("ioctl", name) in header_values, f"KVM_{name} is not defined by this machine's linux/kvm.h"
    assert name in kvm_abi.Ioctl.__members__, f"monitor.kvm_abi.Ioctl has no member {name}"
    ours = int(kvm_abi.Ioctl[name])
    theirs = header_values[("ioctl", name)]
    assert ours == theirs, f"Ioctl.{name} = {ours:#x}, but linux/kvm.h has KVM_{name} = {theirs:#x}"


def test_every_ioctl_member_matches_header(header_values: dict[tuple[str, str], int]) -> None:
    wrong = {
        m.name: (int(m), header_values[("ioctl", m.name)])
        for m in kvm_abi.Ioctl
        if ("ioctl", m.name) in header_values and int(m) != header_values[("ioctl", m.name)]
    }
    assert not wrong, "Ioctl members that differ from linux/kvm.h (ours, header): " + ", ".join(
        f"{k}=({a:#x}, {b:#x})" for k, (a, b) in wrong.items()
    )


def test_kvm_run_layout(header_values: dict[tuple[str, str], int]) -> None:
    run = kvm_abi.Run
    assert ctypes.sizeof(run) == header_values[("sizeof", "Run")]
    assert run.s.offset == header_values[("offsetof", "Run.s")]
    assert run.exit_reason.offset == header_values[("offsetof", "Run.exit_reason")]
    assert run.exit.offset == header_values[("offsetof", "Run.io")]
    assert run.kvm_valid_regs.offset == header_values[("offsetof", "Run.kvm_valid_regs")]


@pytest.mark.parametrize("py_name", [n for n in STRUCTS if n != "Run"])
def test_struct_sizes(header_values: dict[tuple[str, str], int], py_name: str) -> None:
    # Every struct the monitor hands to KVM is listed in STRUCTS: a missing one is a failure, not a skip.
    assert hasattr(kvm_abi, py_name), f"monitor.kvm_abi has no {py_name} (struct {STRUCTS[py_name]})"
    ours = ctypes.sizeof(getattr(kvm_abi, py_name))
    theirs = header_values[("sizeof", py_name)]
    assert ours == theirs, f"sizeof({py_name}) = {ours}, but struct {STRUCTS[py_name]} is {theirs} bytes"


@needs_gcc
def test_guest_abi_header_compiles(tmp_path: Path) -> None:
    gen = subprocess.run(
        [sys.executable, "-m", "monitor.guest_abi"], cwd=ROOT, capture_output=True, text=True
    )
    assert gen.returncode == 0, f"python -m monitor.guest_abi failed:\n{gen.stderr}"
    (tmp_path / "vmft_abi.h").write_text(gen.stdout)
    src = tmp_path / "check.c"
    src.write_text('#include "vmft_abi.h"\nint vmft_abi_check(void) { return VMFT_ABI_VERSION; }\n')
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-ffreestanding", "-Wall", "-Wextra", "-Werror", "-c",
         "-I", str(tmp_path), "-o", str(tmp_path / "check.o"), str(src)],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, f"the generated guest ABI header does not compile:\n{cc.stderr}"


@needs_gcc
def test_guest_abi_static_asserts_have_teeth(tmp_path: Path) -> None:
    """A wrong size in the header must break the build: the _Static_asserts are really checked."""
    gen = subprocess.run(
        [sys.executable, "-m", "monitor.guest_abi"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "_Static_assert" in gen.stdout
    broken = gen.stdout.replace(") == ", ") == 1 + ", 1)
    (tmp_path / "vmft_abi.h").write_text(broken)
    src = tmp_path / "check.c"
    src.write_text('#include "vmft_abi.h"\n')
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-ffreestanding", "-fsyntax-only", "-I", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
    )
    assert cc.returncode != 0, "a header with a wrong struct size still compiled"
