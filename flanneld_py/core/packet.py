"""IPv4 and IPv6 packet checks, TTL / hop-limit handling and ICMP / ICMPv6 errors, on plain buffers.

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
    "check_ipv6",
    "checksum",
    "decrement_hop_limit",
    "decrement_ttl",
    "fold",
    "icmp6_error",
    "icmp6_no_route",
    "icmp6_time_exceeded",
    "icmp_error",
    "icmp_net_unreachable",
    "icmp_time_exceeded",
    "is_link_scope6",
    "may_answer_with_icmp",
    "may_answer_with_icmp6",
    "pseudo_header_sum",
    "pseudo_header_sum6",
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
    BAD_IPV6_HEADER = 13  # an IPv6 packet with a multicast or unspecified source
    LINK_SCOPE = 14  # flannel0's own link-scope IPv6 (router solicitations, MLD): never forwarded, not hostile

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


def pseudo_header_sum6(ip_header: bytes | bytearray | memoryview, protocol: int, length: int) -> int:
    """The IPv6 pseudo-header (RFC 8200 8.1: addresses, upper-layer length, next header) of a
    packet with no extension headers, as a sum like :func:`pseudo_header_sum`."""
    return int.from_bytes(ip_header[8:40], "big") + protocol + length


# --- IPv6 -------------------------------------------------------------------------------------------

PROTO_ICMPV6 = 58
ICMP6_DEST_UNREACH = 1
ICMP6_NO_ROUTE = 0
ICMP6_TIME_EXCEEDED = 3
ICMP6_HOP_LIMIT = 64
IPV6_MIN_MTU = 1280
_IPV6_HEADER = 40
# extension headers walked to find an ICMPv6 message: hop-by-hop, routing, destination options
_EXTENSIONS = frozenset({0, 43, 60})
_FRAGMENT = 44


def check_ipv6(buf: bytearray | memoryview | bytes, n: int) -> Drop | None:
    """Validate the fixed IPv6 header of ``buf[:n]``; ``None`` if well formed.

    IPv6 has no header checksum; a payload length that disagrees with the datagram
    (or 0, a jumbogram, which never fits a UDP datagram) counts as a bad total length.
    """
    if n < _IPV6_HEADER:
        return Drop.TOO_SHORT
    if buf[0] >> 4 != 6:
        return Drop.NOT_IPV4
    if _U16.unpack_from(buf, 4)[0] + _IPV6_HEADER != n:
        return Drop.BAD_TOTAL_LENGTH
    if buf[8] == 0xFF or not any(buf[8:24]):
        return Drop.BAD_IPV6_HEADER
    return None


def is_link_scope6(buf: bytearray | memoryview | bytes) -> bool:
    """True for IPv6 that stays on the link: from ``::`` or ``fe80::/10``, or to a multicast or
    link-local address (the kernel's router solicitations, MLD reports, neighbour discovery)."""
    unspecified = not any(buf[8:24])
    return unspecified or (buf[8] == 0xFE and buf[9] & 0xC0 == 0x80) or buf[24] == 0xFF or (
        buf[24] == 0xFE and buf[25] & 0xC0 == 0x80)


def decrement_hop_limit(buf: bytearray | memoryview) -> bool:
    """Decrement the hop limit in place (IPv6 has no header checksum to update).

    Returns False, leaving the packet untouched, when it would reach 0.
    """
    hops = buf[7]
    if hops <= 1:
        return False
    buf[7] = hops - 1
    return True


def may_answer_with_icmp6(buf: bytearray | memoryview | bytes, n: int) -> bool:
    """RFC 4443 2.4 (e): no ICMPv6 error about an ICMPv6 error, nor about a packet whose source
    does not name one node (unspecified, multicast) or that went to a multicast address."""
    if n < _IPV6_HEADER or buf[8] == 0xFF or not any(buf[8:24]) or buf[24] == 0xFF:
        return False
    next_header, at = buf[6], _IPV6_HEADER
    while next_header in _EXTENSIONS or next_header == _FRAGMENT:
        if at + 8 > n:
            return True
        if next_header == _FRAGMENT and _U16.unpack_from(buf, at + 2)[0] & 0xFFF8:
            return True  # a later fragment: its first bytes are data, not an ICMPv6 header
        length = 8 if next_header == _FRAGMENT else (buf[at + 1] + 1) * 8
        next_header, at = buf[at], at + length
    if next_header == PROTO_ICMPV6:
        return at < n and buf[at] >= 128  # 0-127 are errors; an empty message gets nothing either
    return True


def icmp6_error(original: bytes | bytearray | memoryview, source: bytes, icmp_type: int, code: int) -> bytes:
    """An ICMPv6 error from ``source`` (16 bytes) about ``original``, sent back to its sender.

    As RFC 4443 2.4 (c) asks, the invoking packet is quoted as far as the whole error
    still fits the IPv6 minimum MTU; the checksum covers the pseudo-header (RFC 8200 8.1).
    """
    quoted = bytes(original[: IPV6_MIN_MTU - _IPV6_HEADER - 8])
    destination = bytes(original[8:24])
    icmp = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0) + quoted)
    pseudo = int.from_bytes(source + destination, "big") + len(icmp) + PROTO_ICMPV6
    _U16.pack_into(icmp, 2, checksum(icmp, pseudo))
    header = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), PROTO_ICMPV6, ICMP6_HOP_LIMIT, source, destination)
    return header + bytes(icmp)


def icmp6_no_route(original: bytes | bytearray | memoryview, source: bytes) -> bytes:
    return icmp6_error(original, source, ICMP6_DEST_UNREACH, ICMP6_NO_ROUTE)


def icmp6_time_exceeded(original: bytes | bytearray | memoryview, source: bytes) -> bytes:
    return icmp6_error(original, source, ICMP6_TIME_EXCEEDED, 0)
