"""A Linux spec's defaults are written into it where a node takes it, so the node reserves the RAM the
guest will really get (a spec sent without --mem counted 0 MiB against the node's budget)."""

from __future__ import annotations

from proto import vmft_pb2
from replica.guest_kind import LINUX_HANG_TIMEOUT_S, LINUX_MEM_MIB, fill_defaults
from replica.node import NodeLimits


def test_a_linux_spec_without_ram_reserves_the_ram_it_runs_with() -> None:
    spec = vmft_pb2.VmSpec(name="py", linux=vmft_pb2.LinuxSpec(argv=["/usr/bin/python3", "-c", "pass"]))
    limits = NodeLimits()
    fill_defaults(spec)
    assert spec.mem_mib == LINUX_MEM_MIB
    assert spec.hang_timeout_s == LINUX_HANG_TIMEOUT_S
    assert limits.reservation_mib(spec) == LINUX_MEM_MIB + limits.vm_overhead_mib


def test_given_values_and_platform_specs_are_left_alone() -> None:
    linux = vmft_pb2.VmSpec(
        name="py", mem_mib=64, hang_timeout_s=3.0, linux=vmft_pb2.LinuxSpec(argv=["/bin/true"])
    )
    fill_defaults(linux)
    assert (linux.mem_mib, linux.hang_timeout_s) == (64, 3.0)
    platform = vmft_pb2.VmSpec(name="kv")
    fill_defaults(platform)
    assert (platform.mem_mib, platform.hang_timeout_s) == (0, 0.0)
