"""The TUN device ``flannel0``: the device side of the udp backend (wireguard-go's ``tun/``).

The loop sees packets, never the virtio-net header: :class:`TunQueue` reads one
packet (or, with offloads on, a TCP super-packet with its MSS), finishing
CHECKSUM_PARTIAL checksums on the way, and writes single packets and merged
super-packets, adding the header the kernel expects. The kernel edge is two
raw calls (``_read_raw``/``_write_raw``): :class:`KernelTun` makes them on the
TUNSETIFF fd (a netlink request gives no fd), and the tests' fake keeps them in memory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ...core.packet import Drop
from .offload import complete_checksum
from .vnet import GSO_NONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, ZERO_VNET_HDR

__all__ = ["HEADROOM", "KernelTun", "OffloadError", "TunDevice", "TunPacket", "TunQueue", "open_tun"]

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
HEADROOM = VNET_HDR_LEN  # bytes a caller leaves free before a super-packet it hands to write_super
MAX_READ = 65536 + VNET_HDR_LEN
_PROTO_UDP = 17
_TCP_CSUM_OFFSET = 16  # a merged super-packet's TCP checksum, after a plain IPv4 (20) or IPv6 (40) header

log = logging.getLogger(__name__)


def _is_udp(packet: memoryview) -> bool:
    """Whether a packet's transport is UDP (whose checksum 0 must be sent as 0xFFFF): IPv4's
    protocol byte or IPv6's next header (a UDP packet with extension headers is rare enough to
    keep a computed 0, which receivers read as no checksum at worst)."""
    return packet[9 if packet[0] < 0x60 else 6] == _PROTO_UDP


class OffloadError(Exception):
    """A read whose virtio-net header cannot be honoured; ``drop`` says how it is counted."""

    def __init__(self, drop: Drop) -> None:
        super().__init__(drop.label)
        self.drop = drop


@dataclass(slots=True)
class TunPacket:
    """One read from the device, reused for every read (the loop allocates nothing per packet).

    ``packet[:length]`` is an IPv4 or IPv6 packet; ``mss`` is 0, or for a TCP
    super-packet (TSO or TSO6) the segment size to split it at. ``packet`` is scratch: the
    next read overwrites it.
    """

    packet: memoryview
    length: int = 0
    mss: int = 0


class TunDevice(Protocol):
    """What the loop needs from flannel0."""

    name: str
    offload: bool

    def fileno(self) -> int: ...

    def read(self) -> TunPacket | None:
        """The next packet, or None when none is queued. Raises :class:`OffloadError`."""

    def parse(self, size: int) -> TunPacket:
        """A frame of ``size`` bytes that another reader (the fast lane) left in the read buffer."""

    @property
    def read_buffer(self) -> bytearray: ...

    def write(self, packet: memoryview) -> None:
        """Write one IPv4 packet. Raises OSError."""

    def write_super(self, buf: memoryview, length: int, hlen: int, mss: int) -> None:
        """Write the TCP super-packet ``buf[HEADROOM:HEADROOM + length]``, plain TCP/IPv4 or TCP/IPv6
        as its version says (headers of ``hlen``
        bytes, segments of ``mss``, the TCP checksum field holding the pseudo-header sum), using
        the ``HEADROOM`` bytes in front for the offload header. Raises OSError."""


class TunQueue:
    """flannel0's packet and offload handling (a :class:`TunDevice`) over two raw calls that a
    subclass provides."""

    def __init__(self, name: str, offload: bool) -> None:
        self.name = name
        self.offload = offload  # reads and writes carry a virtio-net header; TSO super-packets
        self._buf = bytearray(MAX_READ)
        self._view = memoryview(self._buf)
        start = VNET_HDR_LEN if offload else 0
        self._read = TunPacket(self._view[start:])

    def fileno(self) -> int:
        raise NotImplementedError

    def _read_raw(self, buf: bytearray) -> int:
        """Read one frame into ``buf``: its size, or 0 when none is queued."""
        raise NotImplementedError

    def _write_raw(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one frame made of ``parts``. Raises OSError."""
        raise NotImplementedError

    @property
    def read_buffer(self) -> bytearray:
        """Where reads land (the fast lane reads into it too, then hands the frame to :meth:`parse`)."""
        return self._buf

    def read(self) -> TunPacket | None:
        size = self._read_raw(self._buf)
        if not size:
            return None
        return self.parse(size)

    def parse(self, size: int) -> TunPacket:
        """The frame of ``size`` bytes in :attr:`read_buffer`. Raises :class:`OffloadError`."""
        read = self._read
        if not self.offload:
            read.length, read.mss = size, 0
            return read
        if size < VNET_HDR_LEN:
            raise OffloadError(Drop.BAD_OFFLOAD_HEADER)
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(self._buf, 0)
        length = size - VNET_HDR_LEN
        kind = gso_type & 0x7F
        if kind == GSO_NONE:
            if flags & NEEDS_CSUM and length > 9:
                try:
                    complete_checksum(read.packet, length, csum_start, csum_offset, _is_udp(read.packet))
                except ValueError:
                    raise OffloadError(Drop.BAD_OFFLOAD_HEADER) from None
            read.length, read.mss = length, 0
            return read
        if kind != GSO_TCPV4 and kind != GSO_TCPV6:
            raise OffloadError(Drop.NOT_IPV4)
        if not length or (kind == GSO_TCPV6) != (read.packet[0] >> 4 == 6):  # TSO of the other family
            raise OffloadError(Drop.BAD_OFFLOAD_HEADER)
        read.length, read.mss = length, gso_size
        return read

    def write(self, packet: memoryview) -> None:
        self._write_raw((ZERO_VNET_HDR, packet) if self.offload else (packet,))

    def write_super(self, buf: memoryview, length: int, hlen: int, mss: int) -> None:
        if buf[HEADROOM] >> 4 == 6:
            VNET_HDR.pack_into(buf, 0, NEEDS_CSUM, GSO_TCPV6, hlen, mss, 40, _TCP_CSUM_OFFSET)
        else:
            VNET_HDR.pack_into(buf, 0, NEEDS_CSUM, GSO_TCPV4, hlen, mss, 20, _TCP_CSUM_OFFSET)
        self._write_raw((buf[: HEADROOM + length],))


class KernelTun(TunQueue):
    """An open TUN queue: a non-blocking fd plus the device name."""

    def __init__(self, fd: int, name: str, offload: bool = False) -> None:
        super().__init__(name, offload)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def _read_raw(self, buf: bytearray) -> int:
        try:
            return os.readv(self.fd, (buf,))
        except BlockingIOError:
            return 0

    def _write_raw(self, parts: Sequence[bytes | memoryview]) -> None:
        if len(parts) == 1:
            os.write(self.fd, parts[0])
        else:
            os.writev(self.fd, parts)

    def set_persistent(self, persistent: bool) -> None:
        """A persistent device outlives our fd: a restarting daemon keeps flannel0 and its
        route, so pods only lose the packets sent while no process is attached."""
        fcntl.ioctl(self.fd, TUNSETPERSIST, int(persistent))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str, offload: bool = False) -> KernelTun:
    """Create TUN device ``name`` (or attach to a persistent one) without packet info headers.

    With ``offload`` it also asks for virtio-net headers and checksum/TSO
    offloads; a kernel that refuses gets a plain device (logged), so the
    caller checks ``device.offload``.
    """
    if offload:
        try:
            return _open(name, offload=True)
        except OSError as exc:
            log.warning("TUN offloads unavailable (%s); using one packet per read", exc)
    return _open(name, offload=False)


def _open(name: str, offload: bool) -> KernelTun:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        result = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    actual = result[:16].rstrip(b"\x00").decode()
    return KernelTun(fd, actual, offload)
