"""Reading and atomically writing the subnet file (temp file + rename)."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network

from .core.subnetenv import SubnetEnv, SubnetEnvError

__all__ = ["previous_env", "previous_ipv6_subnet", "previous_subnet", "write_subnet_file"]


def write_subnet_file(path: str, env: SubnetEnv) -> None:
    """Write ``env`` so that readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # A name no other writer picks (O_EXCL makes sure), made without tempfile: the daemon would
    # load tempfile, shutil and their compression modules for this one call.
    tmp = os.path.join(directory, f".subnet.env.{os.getpid()}.{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(env.render())
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def previous_env(path: str) -> SubnetEnv | None:
    """What a previous run wrote, if the file exists and parses."""
    try:
        with open(path) as handle:
            return SubnetEnv.parse(handle.read())
    except (FileNotFoundError, SubnetEnvError):
        return None


def previous_subnet(path: str) -> IPv4Network | None:
    """The IPv4 subnet a previous run wrote (None also on an IPv6-only node)."""
    env = previous_env(path)
    return env.subnet if env is not None else None


def previous_ipv6_subnet(path: str) -> IPv6Network | None:
    """The IPv6 subnet a previous run wrote (``FLANNEL_IPV6_SUBNET``), None if it wrote none."""
    env = previous_env(path)
    return env.ipv6_subnet if env is not None else None
