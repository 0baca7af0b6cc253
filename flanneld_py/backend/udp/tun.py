"""The TUN device ``flannel0``: opened with the TUNSETIFF ioctl (pyroute2 gives no fd).

The device side of the udp backend, like wireguard-go's ``tun/``: it reads and
writes whole IP packets in batches, so that offloads can change what one
``read_batch`` returns without changing the loop above it.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

__all__ = ["TunDevice", "open_tun"]

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


@dataclass
class TunDevice:
    """An open TUN queue: non-blocking fd plus the device name."""

    fd: int
    name: str

    def read_batch(self, bufs: list[bytearray], sizes: list[int]) -> int:
        """Read up to ``len(bufs)`` packets without blocking; how many were read."""
        count = 0
        readv = os.readv
        fd = self.fd
        for buf in bufs:
            try:
                sizes[count] = readv(fd, (buf,))
            except BlockingIOError:
                break
            count += 1
        return count

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str) -> TunDevice:
    """Create (or attach to) TUN device ``name`` without packet info headers."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        result = fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError:
        os.close(fd)
        raise
    actual = result[:16].rstrip(b"\x00").decode()
    return TunDevice(fd, actual)
