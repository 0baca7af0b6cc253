"""The UDP side of the udp backend (wireguard-go's ``conn/``): one socket on port 8285."""

from __future__ import annotations

import socket
from dataclasses import dataclass

__all__ = ["UdpConn", "open_udp"]

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 8 * 1024 * 1024


@dataclass
class UdpConn:
    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def _grow_buffers(sock: socket.socket, size: int) -> None:
    """Large socket buffers absorb bursts; the FORCE variants work where sysctls cap."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp(address: str, port: int) -> UdpConn:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_buffers(sock, SOCKET_BUFFER)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return UdpConn(sock)
