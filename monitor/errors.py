"""The one root of vmft's errors, with a class per boundary.

Every error vmft raises on purpose derives from `VmftError`, so a command line catches one class and
prints one line. Each boundary has its own class; modules derive their specific errors from these.
`hint` says what the user can do about it (printed after the message by the CLI).
"""

from __future__ import annotations


class VmftError(Exception):
    """Root of every error vmft raises on purpose."""

    hint: str = ""


class ConfigError(VmftError):
    """A VM or node configuration that cannot work (bad sizes, missing options)."""

    hint = "check the command's options (--help)"


class HostError(VmftError):
    """The host cannot run VMs as asked (no usable /dev/kvm, a CPU feature missing)."""

    hint = "vmft needs a readable and writable /dev/kvm"


class ImageError(VmftError):
    """A guest image (ELF executable) that cannot be loaded."""

    hint = "give a static x86-64 ELF executable built for vmft (make -C guests)"


class DiskError(VmftError):
    """A disk image that cannot be opened or used."""

    hint = "give a regular file as the disk"


class CheckpointError(VmftError):
    """A damaged, mismatched or unusable checkpoint; always raised before anything is loaded."""

    hint = "use another checkpoint, or the image and memory size it was taken with"


class LogError(VmftError):
    """A damaged or mismatched event log."""

    hint = "replay a log with the image it was recorded with"


class PeerError(VmftError):
    """A replication peer that refused the pair or broke the protocol."""


class ArbiterError(VmftError):
    """The arbiter could not be reached or answered something unusable."""


class GuestError(VmftError):
    """The guest did something the monitor refuses (bad address, unknown port)."""
