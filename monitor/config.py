"""A VM's configuration: the one place for its defaults and their validation."""

from __future__ import annotations

from dataclasses import dataclass

from monitor import guest_abi as g
from monitor.errors import ConfigError

DEFAULT_MEM_MIB = 64
DEFAULT_HANG_TIMEOUT_S = 2.0
_MEM_ALIGN_MIB = 2  # guest RAM is mapped with 2 MiB pages


class InvalidConfig(ConfigError, ValueError):
    """A configuration value out of range (a ValueError too: callers that validate input with
    `except ValueError` keep refusing it the same way)."""


@dataclass(frozen=True)
class MachineConfig:
    """A VM's configuration, validated when made. Zero for `mem_mib` or `hang_timeout_s` (an unset
    protobuf field, a missing option) means the default."""

    image: str
    mem_mib: int = DEFAULT_MEM_MIB
    disk: str | None = None
    arg: int = 0
    hang_timeout_s: float = DEFAULT_HANG_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.mem_mib:
            object.__setattr__(self, "mem_mib", DEFAULT_MEM_MIB)
        if not self.hang_timeout_s:
            object.__setattr__(self, "hang_timeout_s", DEFAULT_HANG_TIMEOUT_S)
        object.__setattr__(self, "image", str(self.image))
        if self.disk is not None:
            object.__setattr__(self, "disk", str(self.disk))
        if not self.image:
            raise InvalidConfig("a VM needs a guest image")
        if self.mem_mib < 0 or self.mem_mib % _MEM_ALIGN_MIB or self.mem_mib > g.MAX_MEM_MIB:
            raise InvalidConfig(
                f"guest RAM must be a positive multiple of {_MEM_ALIGN_MIB} MiB up to {g.MAX_MEM_MIB} MiB, "
                f"not {self.mem_mib} MiB"
            )
        if self.hang_timeout_s < 0:
            raise InvalidConfig(f"the hang timeout must be positive, not {self.hang_timeout_s} s")
        if not 0 <= self.arg < 1 << 64:
            raise InvalidConfig(f"the guest argument must fit in 64 unsigned bits, not {self.arg}")

    @property
    def mem_size(self) -> int:
        return self.mem_mib << 20
