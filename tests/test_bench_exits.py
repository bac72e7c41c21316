"""The C reference loop of the exit benchmark (scripts/bench_exits.c via benchlib.load_c_exit_loop)
against a tiny real-mode guest set up here with raw ioctls."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest

import benchlib  # scripts/ is on pytest's pythonpath (pyproject.toml)
from monitor import kvm_abi

NOP_PORT, EXIT_PORT = 0x10, 0x11
CODE_ADDR = 0x1000
MEM_SIZE = 0x10000
# loop: out NOP_PORT, al; dec cx; jnz loop; out EXIT_PORT, al; hlt   (16-bit real mode)
CODE = bytes([0xE6, NOP_PORT, 0x49, 0x75, 0xFB, 0xE6, EXIT_PORT, 0xF4])
HLT_ONLY = bytes([0xF4])


class TinyVm:
    def __init__(self, code: bytes, rcx: int) -> None:
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = fcntl.ioctl(self.kvm, kvm_abi.Ioctl.CREATE_VM, 0)
        self.mem = mmap.mmap(-1, MEM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[CODE_ADDR : CODE_ADDR + len(code)] = code
        mem_view = ctypes.c_char.from_buffer(self.mem)
        addr = ctypes.addressof(mem_view)
        region = kvm_abi.UserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=MEM_SIZE, userspace_addr=addr
        )
        del mem_view
        fcntl.ioctl(self.vm, kvm_abi.Ioctl.SET_USER_MEMORY_REGION, region)
        self.vcpu = fcntl.ioctl(self.vm, kvm_abi.Ioctl.CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, kvm_abi.Ioctl.GET_VCPU_MMAP_SIZE, 0)
        self.run_map = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = kvm_abi.Sregs()
        fcntl.ioctl(self.vcpu, kvm_abi.Ioctl.GET_SREGS, sregs)
        sregs.cs.base, sregs.cs.selector = 0, 0
        fcntl.ioctl(self.vcpu, kvm_abi.Ioctl.SET_SREGS, sregs)
        regs = kvm_abi.Regs(rip=CODE_ADDR, rflags=0x2, rcx=rcx)
        fcntl.ioctl(self.vcpu, kvm_abi.Ioctl.SET_REGS, regs)

    def run_addr(self) -> int:
        view = ctypes.c_char.from_buffer(self.run_map)
        try:
            return ctypes.addressof(view)
        finally:
            del view

    def close(self) -> None:
        self.run_map.close()
        self.mem.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)


@pytest.fixture
def tiny_vm_factory() -> Iterator[list[TinyVm]]:
    vms: list[TinyVm] = []
    yield vms
    for vm in vms:
        vm.close()


@pytest.mark.kvm
@pytest.mark.parametrize("nops, max_exits, expected", [(50, 1000, 50), (50, 10, 10), (1, 1000, 1)])
def test_c_exit_loop_counts(tiny_vm_factory: list[TinyVm], nops: int, max_exits: int, expected: int) -> None:
    loop = benchlib.load_c_exit_loop()
    vm = TinyVm(CODE, rcx=nops)
    tiny_vm_factory.append(vm)
    assert loop(vm.vcpu, vm.run_addr(), NOP_PORT, EXIT_PORT, max_exits) == expected


@pytest.mark.kvm
def test_c_exit_loop_reports_other_exits(tiny_vm_factory: list[TinyVm]) -> None:
    loop = benchlib.load_c_exit_loop()
    vm = TinyVm(HLT_ONLY, rcx=0)
    tiny_vm_factory.append(vm)
    assert loop(vm.vcpu, vm.run_addr(), NOP_PORT, EXIT_PORT, 100) == -(kvm_abi.ExitReason.HLT + 1000)


def test_c_exit_loop_bad_fd() -> None:
    loop = benchlib.load_c_exit_loop()
    assert loop(-1, 0, NOP_PORT, EXIT_PORT, 10) == -errno.EBADF
