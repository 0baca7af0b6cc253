"""IPv4 packet checks, TTL handling and ICMP errors, on plain buffers.

Functions take a ``bytearray``/``memoryview`` and a length so that the hot loop
can hand over preallocated buffers without slicing. Nothing allocates except
the ICMP builders, which only run on the error path.
"""

from __future__ import annotations

import struct
from enum import IntEnum

__all__ = [
    "Drop",
    "check_ipv4",
    "checksum",
    "decrement_ttl",
    "fold",
    "icmp_error",
    "icmp_net_unreachable",
    "icmp_time_exceeded",
    "may_answer_with_icmp",
    "pseudo_header_sum",
]

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
PROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_TIME_EXCEEDED = 11
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
ICMP_TTL = 64


class Drop(IntEnum):
    """Why a packet was dropped; also the index into the drop counters."""

    TOO_SHORT = 0
    NOT_IPV4 = 1
    BAD_HEADER_LENGTH = 2
    BAD_TOTAL_LENGTH = 3
    BAD_CHECKSUM = 4
    NOT_A_PEER = 5
    SOURCE_NOT_IN_PEER_SUBNET = 6
    DESTINATION_NOT_LOCAL = 7
    TTL_EXPIRED = 8
    NO_ROUTE = 9
    TUN_WRITE_FAILED = 10
    UDP_SEND_FAILED = 11
    BAD_OFFLOAD_HEADER = 12  # a flannel0 read whose virtio-net header does not fit its packet

    @property
    def label(self) -> str:
        return self.name.lower()


def check_ipv4(buf: bytearray | memoryview | bytes, n: int) -> Drop | None:
    """Validate the IPv4 header of ``buf[:n]``; ``None`` if well formed."""
    if n < 20:
        return Drop.TOO_SHORT
    first = buf[0]
    if first >> 4 != 4:
        return Drop.NOT_IPV4
    header_len = (first & 0x0F) * 4
    if header_len < 20 or header_len > n:
        return Drop.BAD_HEADER_LENGTH
    if _U16.unpack_from(buf, 2)[0] != n:
        return Drop.BAD_TOTAL_LENGTH
    # A header with a valid checksum sums to 0xFFFF, i.e. 0 mod 65535.
    if int.from_bytes(buf[:header_len], "big") % 0xFFFF:
        return Drop.BAD_CHECKSUM
    return None


def decrement_ttl(buf: bytearray | memoryview) -> bool:
    """Decrement the TTL in place with an incremental checksum update (RFC 1624).

    Returns False, leaving the packet untouched, when the TTL would reach 0.
    """
    ttl = buf[8]
    if ttl <= 1:
        return False
    buf[8] = ttl - 1
    # TTL is the high byte of word 4: the word drops by 0x0100, so the checksum rises by it.
    # Same arithmetic as the kernel's ip_decrease_ttl(), end-around carry included.
    total = _U16.unpack_from(buf, 10)[0] + 0x0100
    _U16.pack_into(buf, 10, (total + (total >= 0xFFFF)) & 0xFFFF)
    return True


def may_answer_with_icmp(buf: bytearray | memoryview | bytes, n: int) -> bool:
    """RFC 1812: never answer an ICMP error or a non-first fragment with an ICMP error."""
    if n < 20:
        return False
    if _U16.unpack_from(buf, 6)[0] & 0x1FFF:
        return False
    if buf[9] == PROTO_ICMP:
        header_len = (buf[0] & 0x0F) * 4
        if n <= header_len or buf[header_len] in _ICMP_ERROR_TYPES:
            return False
    return True


def icmp_error(original: bytes | bytearray | memoryview, source: bytes, icmp_type: int, code: int) -> bytes:
    """An ICMP error from ``source`` (4 bytes) about ``original``, sent back to its sender."""
    header_len = (original[0] & 0x0F) * 4
    quoted = bytes(original[: header_len + 8])
    icmp = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted)
    _U16.pack_into(icmp, 2, checksum(icmp))
    total = 20 + len(icmp)
    header = bytearray(struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ICMP_TTL, PROTO_ICMP, 0, source, bytes(original[12:16])
    ))
    _U16.pack_into(header, 10, checksum(header))
    return bytes(header + icmp)


def icmp_net_unreachable(original: bytes | bytearray | memoryview, source: bytes) -> bytes:
    return icmp_error(original, source, ICMP_DEST_UNREACH, ICMP_NET_UNREACH)


def icmp_time_exceeded(original: bytes | bytearray | memoryview, source: bytes) -> bytes:
    return icmp_error(original, source, ICMP_TIME_EXCEEDED, 0)


def fold(total: int) -> int:
    """A ones'-complement sum of any size folded to 16 bits.

    Since 2**16 = 1 (mod 65535), the sum of a buffer's 16-bit words equals the
    buffer's big-endian value mod 65535: one big-int operation instead of a
    loop over words. A non-zero multiple of 65535 folds to 0xFFFF.
    """
    rest = total % 0xFFFF
    return rest if rest or not total else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, partial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of a buffer: the value to store in its checksum field
    when that field holds zero (or, for CHECKSUM_PARTIAL, the pseudo-header's partial sum).
    ``partial`` is a sum to include, e.g. :func:`pseudo_header_sum`."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\x00"
    return 0xFFFF - fold(int.from_bytes(raw, "big") + partial)


def pseudo_header_sum(ip_header: bytes | bytearray | memoryview, protocol: int, length: int) -> int:
    """The TCP/UDP pseudo-header of an IPv4 packet (addresses, protocol, transport length) as a
    sum for :func:`checksum` or :func:`fold` (words add up to the same value mod 65535)."""
    return int.from_bytes(ip_header[12:20], "big") + protocol + length
