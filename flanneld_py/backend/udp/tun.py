"""The TUN device ``flannel0``: opened with the TUNSETIFF ioctl (pyroute2 gives no fd).

The device side of the udp backend, like wireguard-go's ``tun/``: one read is
one IP packet, or with offloads on a virtio-net header and a packet that may be
a TCP super-packet; the loop above decides what to do with either.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from .vnet import VNET_HDR_LEN

__all__ = ["TunDevice", "open_tun"]

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

log = logging.getLogger(__name__)


@dataclass
class TunDevice:
    """An open TUN queue: non-blocking fd plus the device name."""

    fd: int
    name: str
    offload: bool = False  # reads and writes carry a virtio-net header; TSO super-packets

    def read_into(self, buf: bytearray) -> int:
        """Read one packet into ``buf`` without blocking; its size, or 0 when none is queued."""
        try:
            return os.readv(self.fd, (buf,))
        except BlockingIOError:
            return 0

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        os.write(self.fd, packet)

    def set_persistent(self, persistent: bool) -> None:
        """A persistent device outlives our fd: a restarting daemon keeps flannel0 and its
        route, so pods only lose the packets sent while no process is attached."""
        fcntl.ioctl(self.fd, TUNSETPERSIST, int(persistent))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str, offload: bool = False) -> TunDevice:
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


def _open(name: str, offload: bool) -> TunDevice:
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
    return TunDevice(fd, actual, offload)
