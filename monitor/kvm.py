"""A small safe layer over /dev/kvm: system, VM and vCPU file descriptors as typed objects."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from monitor import kvm_abi as abi
from monitor.errors import HostError
from proto import vmft_pb2
from monitor.kvm_abi import Ioctl

KVM_DEVICE = "/dev/kvm"

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


class KvmError(HostError):
    """A KVM ioctl failed or KVM cannot run VMs as asked."""


class KvmUnavailable(KvmError):
    """No usable /dev/kvm on this host."""


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array | int | None = None) -> int:
    """ioctl through libc: releases the GIL, does not retry on EINTR, handles any struct size."""
    if arg is None:
        ptr: int | None = 0
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc_ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        name = Ioctl(request).name if request in Ioctl._value2member_map_ else hex(request)
        raise OSError(err, f"KVM_{name}: {os.strerror(err)}")
    return int(ret)


def kvm_available() -> str | None:
    """None if KVM can be used here, else the reason it cannot."""
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist (no KVM on this host)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    return None


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self) -> None:
        reason = kvm_available()
        if reason:
            raise KvmUnavailable(reason)
        self.fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        version = _ioctl(self.fd, Ioctl.GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, vmft needs {abi.KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, Ioctl.GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, Ioctl.CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[abi.CpuidEntry2]:
        cpuid = abi.Cpuid2(nent=abi.CPUID_MAX_ENTRIES)
        _ioctl(self.fd, Ioctl.GET_SUPPORTED_CPUID, cpuid)
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def create_vm(self) -> VmFd:
        return VmFd(self, _ioctl(self.fd, Ioctl.CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


class VmFd:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def set_memory_region(
        self, slot: int, guest_phys: int, size: int, host_addr: int, log_dirty: bool = False
    ) -> None:
        region = abi.UserspaceMemoryRegion(
            slot=slot,
            flags=abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_phys,
            memory_size=size,
            userspace_addr=host_addr,
        )
        _ioctl(self.fd, Ioctl.SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, Ioctl.SET_TSS_ADDR, addr)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty bitmap (one bit per 4 KiB page), cleared by the call."""
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        log = abi.DirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self.fd, Ioctl.GET_DIRTY_LOG, log)
        return bytes(bitmap)

    def create_vcpu(self, index: int) -> VcpuFd:
        return VcpuFd(self, _ioctl(self.fd, Ioctl.CREATE_VCPU, index))

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class VcpuState:
    """Everything needed to put a vCPU back exactly where it was (raw KVM structs as bytes)."""

    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    msrs: list[tuple[int, int]]
    vcpu_events: bytes
    mp_state: int
    debugregs: bytes

    def to_proto(self) -> vmft_pb2.VcpuState:
        return vmft_pb2.VcpuState(
            regs=self.regs,
            sregs=self.sregs,
            fpu=self.fpu,
            xsave=self.xsave,
            xcrs=self.xcrs,
            msrs=[vmft_pb2.Msr(index=i, value=v) for i, v in self.msrs],
            vcpu_events=self.vcpu_events,
            mp_state=self.mp_state,
            debugregs=self.debugregs,
        )

    @classmethod
    def from_proto(cls, msg: vmft_pb2.VcpuState) -> VcpuState:
        return cls(
            regs=msg.regs,
            sregs=msg.sregs,
            fpu=msg.fpu,
            xsave=msg.xsave,
            xcrs=msg.xcrs,
            msrs=[(m.index, m.value) for m in msg.msrs],
            vcpu_events=msg.vcpu_events,
            mp_state=msg.mp_state,
            debugregs=msg.debugregs,
        )


# MSRs that long-mode ring-3 guests of this platform depend on (no SYSCALL used, but saved for safety).
PLATFORM_MSRS = (
    0xC0000080,  # EFER
    0xC0000081,  # STAR
    0xC0000082,  # LSTAR
    0xC0000084,  # SFMASK
    0xC0000100,  # FS.base
    0xC0000101,  # GS.base
    0xC0000102,  # KernelGSbase
    0x00000277,  # PAT
)


class VcpuFd:
    def __init__(self, vm: VmFd, fd: int) -> None:
        self.vm = vm
        self.fd = fd
        self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = abi.Run.from_buffer(self._map)
        self.run_address = ctypes.addressof(self.run)
        self.run_buffer = memoryview(self._map)

    def run_once(self) -> int:
        """KVM_RUN. Returns 0, or an errno (EINTR after a kick) instead of raising, for speed."""
        if _libc_ioctl(self.fd, Ioctl.RUN, None) < 0:
            return ctypes.get_errno()
        return 0

    def get_regs(self) -> abi.Regs:
        regs = abi.Regs()
        _ioctl(self.fd, Ioctl.GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.Regs) -> None:
        _ioctl(self.fd, Ioctl.SET_REGS, regs)

    def get_sregs(self) -> abi.Sregs:
        sregs = abi.Sregs()
        _ioctl(self.fd, Ioctl.GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.Sregs) -> None:
        _ioctl(self.fd, Ioctl.SET_SREGS, sregs)

    def set_cpuid(self, entries: list[abi.CpuidEntry2]) -> None:
        cpuid = abi.Cpuid2(nent=len(entries))
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        _ioctl(self.fd, Ioctl.SET_CPUID2, cpuid)

    def interrupt(self, vector: int) -> None:
        _ioctl(self.fd, Ioctl.INTERRUPT, abi.Interrupt(irq=vector))

    def enable_sync_regs(self) -> None:
        self.run.kvm_valid_regs = abi.KVM_SYNC_X86_REGS

    def get_msrs(self, indices: tuple[int, ...]) -> list[tuple[int, int]]:
        msrs = abi.Msrs(nmsrs=len(indices))
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        count = _ioctl(self.fd, Ioctl.GET_MSRS, msrs)
        return [(msrs.entries[i].index, msrs.entries[i].data) for i in range(count)]

    def set_msrs(self, values: list[tuple[int, int]]) -> None:
        msrs = abi.Msrs(nmsrs=len(values))
        for i, (index, data) in enumerate(values):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        count = _ioctl(self.fd, Ioctl.SET_MSRS, msrs)
        if count != len(values):
            raise KvmError(f"KVM_SET_MSRS set {count} of {len(values)} MSRs")

    def _get_raw(self, request: Ioctl, struct_type: type[ctypes.Structure]) -> bytes:
        value = struct_type()
        _ioctl(self.fd, request, value)
        return bytes(value)

    def _set_raw(self, request: Ioctl, struct_type: type[ctypes.Structure], data: bytes) -> None:
        value = struct_type.from_buffer_copy(data)
        _ioctl(self.fd, request, value)

    def save_state(self) -> VcpuState:
        """Call only between runs, after completing any pending I/O (see Machine.quiesce)."""
        mp = abi.MpState()
        _ioctl(self.fd, Ioctl.GET_MP_STATE, mp)
        return VcpuState(
            regs=self._get_raw(Ioctl.GET_REGS, abi.Regs),
            sregs=self._get_raw(Ioctl.GET_SREGS, abi.Sregs),
            fpu=self._get_raw(Ioctl.GET_FPU, abi.Fpu),
            xsave=self._get_raw(Ioctl.GET_XSAVE, abi.Xsave),
            xcrs=self._get_raw(Ioctl.GET_XCRS, abi.Xcrs),
            msrs=self.get_msrs(PLATFORM_MSRS),
            vcpu_events=self._get_raw(Ioctl.GET_VCPU_EVENTS, abi.VcpuEvents),
            mp_state=mp.mp_state,
            debugregs=self._get_raw(Ioctl.GET_DEBUGREGS, abi.DebugRegs),
        )

    def restore_state(self, state: VcpuState) -> None:
        # Order that works (Firecracker): mp_state, regs, sregs, xsave, xcrs, debugregs, MSRs, events.
        # SET_REGS clears pending exceptions, so the events go last.
        _ioctl(self.fd, Ioctl.SET_MP_STATE, abi.MpState(mp_state=state.mp_state))
        self._set_raw(Ioctl.SET_REGS, abi.Regs, state.regs)
        self._set_raw(Ioctl.SET_SREGS, abi.Sregs, state.sregs)
        self._set_raw(Ioctl.SET_FPU, abi.Fpu, state.fpu)
        self._set_raw(Ioctl.SET_XSAVE, abi.Xsave, state.xsave)
        self._set_raw(Ioctl.SET_XCRS, abi.Xcrs, state.xcrs)
        self._set_raw(Ioctl.SET_DEBUGREGS, abi.DebugRegs, state.debugregs)
        self.set_msrs(state.msrs)
        self._set_raw(Ioctl.SET_VCPU_EVENTS, abi.VcpuEvents, state.vcpu_events)

    def close(self) -> None:
        del self.run
        self.run_buffer.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view of kvm_run; the mapping goes when that view does
        os.close(self.fd)


def is_eintr(err: int) -> bool:
    return err in (errno.EINTR, errno.EAGAIN)
