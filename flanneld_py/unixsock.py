"""Claiming a unix socket path for a server: the daemon's CNI and control sockets."""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["SocketPathBusy", "claim_socket_path", "socket_answers"]


class SocketPathBusy(OSError):
    """The path is a live socket of another process, or not a socket at all."""


def claim_socket_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket left by a crash.

    Raises :class:`SocketPathBusy` when another process answers on it (never
    steal a live socket) or when the path is some other kind of file.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathBusy(f"{path} exists and is not a socket; remove it or choose another path")
    if socket_answers(path):
        raise SocketPathBusy(f"another process already serves on {path}")
    os.unlink(path)


def socket_answers(path: str, timeout: float = 1.0) -> bool:
    """True if a process accepts connections on the unix socket ``path`` (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
