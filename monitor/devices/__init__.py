"""Paravirtual devices of the vmft platform, each a few ports from monitor.guest_abi.Port."""
