"""The UDP side of the udp backend (wireguard-go's ``conn/``): one socket on port 8285."""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass

__all__ = ["UdpConn", "open_udp"]

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOL_UDP = 17
UDP_SEGMENT = 103  # GSO: one sendmsg carries a run of equal-size datagrams
UDP_GRO = 104  # GRO: one recvmsg returns a run of datagrams from one sender
SOCKET_BUFFER = 8 * 1024 * 1024
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65507

log = logging.getLogger(__name__)


@dataclass
class UdpConn:
    sock: socket.socket
    gso: bool = False
    gro: bool = False

    def disable_gso(self, reason: OSError) -> None:
        """A send with UDP_SEGMENT failed for a reason other than a full buffer: stop using it."""
        if self.gso:
            log.warning("UDP GSO send failed (%s); sending one datagram per call from now on", reason)
            self.gso = False

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


def open_udp(address: str, port: int, offload: bool = False) -> UdpConn:
    """The overlay socket, bound to the underlay address; GSO/GRO probed when ``offload``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_buffers(sock, SOCKET_BUFFER)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    conn = UdpConn(sock)
    if offload:
        conn.gso = _probe(sock, UDP_SEGMENT, 1400)
        conn.gro = _probe(sock, UDP_GRO, 1)
    return conn


def _probe(sock: socket.socket, option: int, value: int) -> bool:
    try:
        if option == UDP_SEGMENT:
            sock.getsockopt(SOL_UDP, UDP_SEGMENT)  # exists? (the value itself goes per sendmsg)
        else:
            sock.setsockopt(SOL_UDP, option, value)
    except OSError as exc:
        log.warning("UDP option %d unavailable (%s); not using it", option, exc)
        return False
    return True


def gso_control(segment_len: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data that makes one sendmsg a run of ``segment_len`` datagrams."""
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment_len))]


def gro_segment_size(ancdata: list[tuple[int, int, bytes]], nbytes: int) -> int:
    """The datagram size of a GRO read (``nbytes`` when it holds one datagram)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            return struct.unpack("=i", data[:4])[0] or nbytes
    return nbytes
