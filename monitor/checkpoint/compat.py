"""Whether a checkpoint or an event log can be used with this vmft, image, memory size and host.

Both carry the same provenance in their headers (format version, guest ABI, CPUID table hash, image
sha256, guest RAM size); `check_provenance` refuses a mismatch with the error class of the caller's
boundary (CheckpointError, LogError) and a message that names what differs. `check_link` checks one
link of a checkpoint chain. No KVM here: these are pure comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from monitor import cpuid
from monitor.errors import CheckpointError, VmftError
from monitor.guest_abi import ABI_VERSION


class _Image(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class Provenance:
    """What a checkpoint or log header says it was made with."""

    abi_version: int
    cpuid_hash: str
    image_sha256: str
    mem_size: int


def check_format(
    found: int, expected: int, what: str, kind: str, error: type[VmftError] = CheckpointError
) -> None:
    """Refuse another format version of a `kind` ("checkpoint", "log") clearly: no guessing."""
    if found != expected:
        raise error(f"{what}: {kind} format version {found}; this vmft reads {expected}")


def check_provenance(
    found: Provenance,
    image: _Image | None,
    mem_size: int | None,
    what: str,
    made: str = ": made",
    error: type[VmftError] = CheckpointError,
) -> None:
    """Refuse what was `made` (": made", " was recorded") for another guest ABI, CPUID table, image or
    guest RAM size. `image`, `mem_size`: None skips that check (a restore takes them from the header)."""
    said = f"{what}{made} with"
    if found.abi_version != ABI_VERSION:
        raise error(f"{said} guest ABI {found.abi_version}; this vmft has {ABI_VERSION}")
    if found.cpuid_hash != cpuid.cpuid_hash():
        raise error(f"{said} CPUID table {found.cpuid_hash}; this node has {cpuid.cpuid_hash()}")
    if image is not None and found.image_sha256 != image.sha256:
        raise error(
            f"{said} image sha256 {found.image_sha256[:16]}..., not {image.path} ({image.sha256[:16]}...): "
            f"another image"
        )
    if mem_size is not None and found.mem_size != mem_size:
        raise error(
            f"{said} {found.mem_size >> 20} MiB of guest RAM, not {mem_size >> 20} MiB: memory size mismatch"
        )


class _Header(Protocol):
    """The fields of vmft_pb2.CheckpointHeader that a chain link compares."""

    @property
    def incremental(self) -> bool: ...
    @property
    def parent_id(self) -> str: ...
    @property
    def checkpoint_id(self) -> str: ...


def check_link(parent: _Header, parent_what: str, child: _Header, child_what: str, same_vm: bool) -> None:
    """`child` must be an incremental checkpoint of `parent`, for the same VM."""
    if not child.incremental:
        raise CheckpointError(f"{child_what}: a full checkpoint cannot follow {parent_what} in a chain")
    if child.parent_id != parent.checkpoint_id:
        raise CheckpointError(
            f"{child_what}: incremental checkpoint of parent {child.parent_id[:12]}, "
            f"but it follows {parent.checkpoint_id[:12]} ({parent_what}): a different parent"
        )
    if not same_vm:
        raise CheckpointError(f"{child_what}: made for another VM than its parent {parent_what}")
