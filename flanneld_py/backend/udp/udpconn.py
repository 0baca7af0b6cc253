"""The UDP side of the udp backend (wireguard-go's ``conn/``): a socket on port 8285 per underlay
family (IPv4; IPv6 too when the node has a PublicIPv6).

The loop hands over runs of equal-size datagrams and takes back GRO reads as
``(size, segment size, source)``; the UDP_SEGMENT/UDP_GRO control messages,
the probing of both at open and the fallback when GSO fails stay here.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Protocol

__all__ = ["KernelUdp", "UdpConn", "gro_segment_size", "gso_control", "open_udp"]

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOL_UDP = 17
UDP_SEGMENT = 103  # GSO: one sendmsg carries a run of equal-size datagrams
UDP_GRO = 104  # GRO: one recvmsg returns a run of datagrams from one sender
SOCKET_BUFFER = 8 * 1024 * 1024
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65507
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT)  # the kernel or device cannot segment

log = logging.getLogger(__name__)

Address = tuple[str, int]


class UdpConn(Protocol):
    """What the loop needs from the overlay socket."""

    def fileno(self) -> int: ...

    def per_send(self, seglen: int) -> int:
        """How many datagrams of ``seglen`` one :meth:`send` carries in one call."""

    def send(self, data: memoryview, seglen: int, addr: Address) -> int:
        """Send ``data``: back-to-back datagrams of ``seglen`` bytes (the last may be shorter),
        at most :meth:`per_send` of them. Returns how many datagrams could not be sent."""

    def recv(self, buf: memoryview) -> tuple[int, int, str] | None:
        """Receive into ``buf``: ``(size, segment size, source address)``, a run of datagrams
        of one sender when GRO is on, or None when nothing is queued."""


class KernelUdp:
    """The overlay socket, with UDP GSO/GRO when the kernel has them."""

    def __init__(self, sock: socket.socket, gso: bool = False, gro: bool = False) -> None:
        self.sock = sock
        self.gso = gso
        self.gro = gro

    def fileno(self) -> int:
        return self.sock.fileno()

    def per_send(self, seglen: int) -> int:
        return min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // seglen) if self.gso else 1

    def send(self, data: memoryview, seglen: int, addr: Address) -> int:
        size = len(data)
        try:
            if size > seglen:
                self.sock.sendmsg([data], gso_control(seglen), 0, addr)
            else:
                self.sock.sendto(data, addr)
            return 0
        except (BlockingIOError, InterruptedError):
            return -(-size // seglen)
        except OSError as exc:
            if size > seglen and exc.errno in _GSO_REFUSED:
                self._disable_gso(exc)
                return sum(self.send(data[start : start + seglen], seglen, addr) for start in range(0, size, seglen))
            return -(-size // seglen)

    def _disable_gso(self, reason: OSError) -> None:
        """A send with UDP_SEGMENT failed for a reason other than a full buffer: stop using it."""
        if self.gso:
            log.warning("UDP GSO send failed (%s); sending one datagram per call from now on", reason)
            self.gso = False

    def recv(self, buf: memoryview) -> tuple[int, int, str] | None:
        while True:
            try:
                if self.gro:
                    nbytes, ancdata, _flags, peer = self.sock.recvmsg_into([buf], GRO_CMSG_SPACE)
                    return nbytes, gro_segment_size(ancdata, nbytes), peer[0]
                nbytes, peer = self.sock.recvfrom_into(buf)
                return nbytes, nbytes, peer[0]  # (host, port) or, for IPv6, (host, port, flow, scope)
            except BlockingIOError:
                return None
            except OSError:
                continue  # e.g. a queued ICMP port-unreachable (ECONNREFUSED) for an earlier send

    def close(self) -> None:
        self.sock.close()


def _grow_buffers(sock: socket.socket, size: int) -> None:
    """Large socket buffers absorb bursts; the FORCE variants work where sysctls cap."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp(address: str, port: int, offload: bool = False) -> KernelUdp:
    """The overlay socket, bound to the underlay address (IPv4, or IPv6 only: never mapped
    IPv4, which the IPv4 socket takes); GSO/GRO probed when ``offload``."""
    ipv6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_buffers(sock, SOCKET_BUFFER)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    conn = KernelUdp(sock)
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
