"""The virtio-net header that TUN reads and writes carry with offloads on (``IFF_VNET_HDR``)."""

from __future__ import annotations

import struct

__all__ = ["GSO_NONE", "GSO_TCPV4", "GSO_TCPV6", "NEEDS_CSUM", "VNET_HDR", "VNET_HDR_LEN", "ZERO_VNET_HDR"]

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)
