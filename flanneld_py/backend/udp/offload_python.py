"""Segmentation and coalescing for the offloaded udp path, in plain Python: the reference build.

With TUN offloads on, flannel0 hands us TCP super-packets (up to 64 KB, one
virtio-net header in front) and accepts them back. The wire format stays one
MTU-sized inner IPv4 or IPv6 packet per UDP datagram, so:

* egress: :func:`segment_tcp4` (TSO) and :func:`segment_tcp6` (TSO6) split a
  super-packet into MSS-sized packets with correct IP ids or payload lengths,
  sequence numbers, flags and checksums, laid out back to back in one buffer,
  ready for UDP GSO ``sendmsg`` calls;
* ingress: :func:`tcp_flow_run` finds how many leading datagrams of a UDP GRO
  batch are in-order segments of one TCP flow (either family), and
  :func:`merge_tcp4` / :func:`merge_tcp6` write such a run as one
  super-packet for one TUN write.

Only plain headers are merged or split for IPv6: a packet with extension
headers is no run (it takes the one-by-one path), as IPv4 with options is.

This module states the rules once, per segment and readably; the compiled
build (``_offload.c``) computes the same results and bytes with one call per
stage, and the tests hold it to this one. The daemon runs this build only
where the compiled one was not built (see :mod:`.offload`). Checksums come
from :mod:`flanneld_py.core.packet`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...core.packet import checksum, fold, pseudo_header_sum, pseudo_header_sum6

__all__ = [
    "complete_checksum",
    "extend_tcp4",
    "extend_tcp6",
    "merge_tcp4",
    "merge_tcp6",
    "plain_ipv4_batch",
    "segment_tcp4",
    "segment_tcp6",
    "tcp_flow_run",
]

Buffer = bytes | bytearray | memoryview

_TCP_FIN, _TCP_PSH, _TCP_ACK, _TCP_CWR = 0x01, 0x08, 0x10, 0x80
_PROTO_TCP = 6
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
# Byte ranges of a TCP/IPv4 header (no IP options) that every segment of one flow shares: all but
# total length, IP id and checksum, sequence number, flags and TCP checksum; the options (38..)
# are compared up to the header's end.
_FIXED_RANGES = ((0, 2), (6, 10), (12, 24), (28, 33), (34, 36))
# The same for TCP/IPv6 (no extension headers): all but payload length, sequence number, flags and
# TCP checksum; the options (58..) are compared up to the header's end.
_FIXED_RANGES6 = ((0, 4), (6, 44), (48, 53), (54, 56))
_MAX_BATCH = 0x10000


def complete_checksum(packet: bytearray | memoryview, n: int, start: int, offset: int, udp: bool) -> None:
    """Finish a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum already."""
    if n > len(packet) or not 0 <= start <= n or offset < 0 or start + offset + 2 > n:
        raise ValueError("complete_checksum: start or offset outside the packet")
    value = checksum(packet[start:n])
    if udp and value == 0:
        value = 0xFFFF
    _U16.pack_into(packet, start + offset, value)


def _header_lengths(packet: Buffer, n: int) -> tuple[int, int]:
    """(IP header length, IP + TCP header length) of a super-packet; ValueError if they do not fit."""
    ip_len = (packet[0] & 0x0F) * 4
    if ip_len < 20 or ip_len + 20 > n:
        raise ValueError("segment_tcp4: bad IP header length")
    hlen = ip_len + (packet[ip_len + 12] >> 4) * 4
    if hlen < ip_len + 20 or hlen > n:
        raise ValueError("segment_tcp4: bad TCP header length")
    return ip_len, hlen


def segment_tcp4(packet: Buffer, n: int, mss: int, out: bytearray | memoryview) -> tuple[int, int, int]:
    """Split the TCP/IPv4 super-packet ``packet[:n]`` into ``mss``-sized segments.

    Segments are written back to back into ``out``; every segment but the
    last is ``segment_len`` long, as UDP GSO requires. As the kernel's TSO:
    IP ids count up from the super-packet's, CWR stays on the first segment,
    FIN and PSH on the last. ``packet`` is not modified.

    Returns:
        ``(total_bytes, segment_len, count)``.
    Raises:
        ValueError: the headers or lengths do not fit ``packet``, ``n`` or ``out``.
    """
    if n < 40 or n > len(packet) or not 1 <= mss <= 0xFFFF:
        raise ValueError("segment_tcp4: packet or MSS out of range")
    ip_len, hlen = _header_lengths(packet, n)
    return _segment(packet, n, mss, out, ip_len, hlen)


def segment_tcp6(packet: Buffer, n: int, mss: int, out: bytearray | memoryview) -> tuple[int, int, int]:
    """Split the TCP/IPv6 super-packet ``packet[:n]`` into ``mss``-sized segments, as
    :func:`segment_tcp4` (IPv6 has no id and no header checksum: each segment gets its payload
    length, and its TCP checksum over the IPv6 pseudo-header).

    Only a plain IPv6 header followed by TCP is split: a packet with extension headers raises,
    as one with a bad header length does (the loop drops and counts it).

    Returns:
        ``(total_bytes, segment_len, count)``.
    Raises:
        ValueError: not plain TCP/IPv6, or headers or lengths that do not fit.
    """
    if n < 60 or n > len(packet) or not 1 <= mss <= 0xFFFF:
        raise ValueError("segment_tcp6: packet or MSS out of range")
    if packet[0] >> 4 != 6 or packet[6] != _PROTO_TCP:
        raise ValueError("segment_tcp6: not a plain TCP/IPv6 packet")
    hlen = 40 + (packet[52] >> 4) * 4
    if hlen < 60 or hlen > n:
        raise ValueError("segment_tcp6: bad TCP header length")
    return _segment(packet, n, mss, out, 40, hlen)


def _segment(packet: Buffer, n: int, mss: int, out: bytearray | memoryview, ip_len: int,
             hlen: int) -> tuple[int, int, int]:
    """The segmentation of both families; ``ip_len`` 40 with version 6 is IPv6."""
    six = packet[0] >> 4 == 6
    what = "segment_tcp6" if six else "segment_tcp4"
    payload = n - hlen
    count = -(-payload // mss) if payload > 0 else 1
    seglen = hlen + mss
    full = count - 1
    last_payload = payload - full * mss
    total = full * seglen + hlen + last_payload
    if total > len(out) or hlen + last_payload > 0xFFFF or (full and seglen > 0xFFFF):
        raise ValueError(f"{what}: output buffer too small")
    flags = packet[ip_len + 13]
    ident = _U16.unpack_from(packet, 4)[0]
    seq = _U32.unpack_from(packet, ip_len + 4)[0]
    header = bytearray(packet[:hlen])
    offset = 0
    for index in range(count):
        length = hlen + (mss if index < full else last_payload)
        keep = 0xFF if index == 0 else 0xFF & ~_TCP_CWR
        if index < full:
            keep &= ~(_TCP_FIN | _TCP_PSH)
        header[ip_len + 13] = flags & keep
        if six:
            _U16.pack_into(header, 4, length - 40)
        else:
            _U16.pack_into(header, 2, length)
            _U16.pack_into(header, 4, (ident + index) & 0xFFFF)
            _U16.pack_into(header, 10, 0)
            _U16.pack_into(header, 10, checksum(header[:ip_len]))
        _U32.pack_into(header, ip_len + 4, (seq + index * mss) & 0xFFFFFFFF)
        _U16.pack_into(header, ip_len + 16, 0)
        segment = memoryview(out)[offset : offset + length]
        segment[:hlen] = header
        segment[hlen:] = packet[hlen + index * mss : hlen + index * mss + length - hlen]
        pseudo = (pseudo_header_sum6 if six else pseudo_header_sum)(header, _PROTO_TCP, length - ip_len)
        _U16.pack_into(segment, ip_len + 16, checksum(segment[ip_len:], pseudo))
        offset += length
    return total, seglen, count


# --- ingress ----------------------------------------------------------------------

def _check_batch(count: int, seglen: int, total: int, size: int, what: str) -> None:
    if not (0 <= count <= _MAX_BATCH and 0 <= seglen <= _MAX_BATCH and 0 <= total <= size):
        raise ValueError(f"{what}: batch lengths out of range")


def _ip_header_valid(header: Buffer) -> bool:
    return int.from_bytes(header[:20], "big") % 0xFFFF == 0  # a valid header sums to 0 mod 65535


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a plain TCP/IPv4 or TCP/IPv6 header (no IP options, no extension headers) keeps
    what the ingress stages read and write; TCP starts at ``ip_len``."""

    name: str
    ip_len: int
    fixed: tuple[tuple[int, int], ...]  # the byte ranges every segment of one flow shares
    length_at: int  # IPv4's total length or IPv6's payload length: the datagram's length - ip_len * six
    six: bool


_V4 = _Layout("tcp4", 20, _FIXED_RANGES, 2, False)
_V6 = _Layout("tcp6", 40, _FIXED_RANGES6, 4, True)


def _length_field(layout: _Layout, length: int) -> int:
    """What the IP length field holds for a datagram of ``length`` bytes."""
    return length - layout.ip_len if layout.six else length


def _same_flow(first: Buffer, other: Buffer, hlen: int, layout: _Layout) -> bool:
    options = layout.ip_len + 18  # the urgent pointer and the TCP options
    return all(first[a:b] == other[a:b] for a, b in layout.fixed) and first[options:hlen] == other[options:hlen]


def _plain_tcp(batch: Buffer, layout: _Layout) -> bool:
    """A plain TCP/IPv4 header (no options, not a fragment) or TCP/IPv6 header (no extension
    headers): the only ones the stages merge."""
    if layout.six:
        return batch[6] == _PROTO_TCP
    return batch[0] == 0x45 and batch[9] == _PROTO_TCP and not batch[6] & 0x3F and not batch[7]


def tcp_flow_run(batch: Buffer, count: int, seglen: int, total: int) -> tuple[int, int]:
    """How many leading datagrams of a GRO batch form one mergeable TCP run: ``(header length, run)``.

    ``batch[:total]`` holds ``count`` datagrams of ``seglen`` bytes, the last
    shorter. The run starts with the first datagram, a plain TCP/IPv4 data
    segment (no IP options or fragments, ACK or ACK+PSH, a valid IP header
    and matching length) or a plain TCP/IPv6 one (no extension headers, a
    matching payload length); each further datagram joins while it is the next
    in-order segment of the same flow (same addresses, ports, ack, window,
    options, and for IPv6 traffic class, flow label and hop limit). A PSH ends
    the run (it is the last a merge may carry, as in the kernel's GRO). ``(0, 0)``
    when the first datagram is no such segment. A run of 2 or more is checked by
    its first header alone (:meth:`Engine.inbound_flow`) and merged by
    :func:`merge_tcp4` or :func:`merge_tcp6`, as its version says.

    Raises:
        ValueError: lengths that do not fit the buffer.
    """
    _check_batch(count, seglen, total, len(batch), "tcp_flow_run")
    full = count - 1
    last_len = total - full * seglen
    if count < 1 or seglen < 40 or last_len < 40:
        return 0, 0
    layout = _V6 if batch[0] >> 4 == 6 else _V4
    shortest = layout.ip_len + 20
    if seglen < shortest or last_len < shortest or not _plain_tcp(batch, layout):
        return 0, 0
    tcp = layout.ip_len
    data_offset = batch[tcp + 12] >> 4
    if data_offset < 5:
        return 0, 0
    hlen = tcp + data_offset * 4
    mss = seglen - hlen
    if mss <= 0 or last_len <= hlen:
        return 0, 0
    seq0 = _U32.unpack_from(batch, tcp + 4)[0]
    run = 0
    for index in range(count):
        segment = memoryview(batch)[index * seglen : index * seglen + hlen]
        if index and not _same_flow(batch, segment, hlen, layout):
            break
        flags = segment[tcp + 13]
        if flags not in (_TCP_ACK, _TCP_ACK | _TCP_PSH):
            break
        length = seglen if index < full else last_len
        if _U16.unpack_from(segment, layout.length_at)[0] != _length_field(layout, length):
            break
        if not layout.six and not _ip_header_valid(segment):
            break
        if _U32.unpack_from(segment, tcp + 4)[0] != (seq0 + index * mss) & 0xFFFFFFFF:
            break
        run = index + 1
        if flags & _TCP_PSH:
            break
    return (hlen, run) if run else (0, 0)


def merge_tcp4(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview) -> int:
    """Write a run (checked by :func:`tcp_flow_run`) as one TCP super-packet into ``out``,
    the TCP checksum left to the kernel (CHECKSUM_PARTIAL: the field holds the pseudo-header
    sum); the TUN device adds the offload header (segments of ``seglen - hlen``).

    Returns:
        The super-packet's length.
    Raises:
        ValueError: lengths that do not fit the buffers.
    """
    return _merge(batch, count, seglen, total, hlen, out, _V4)


def merge_tcp6(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview) -> int:
    """:func:`merge_tcp4` for a run of TCP/IPv6 segments (the payload length, no header checksum,
    the pseudo-header sum over the IPv6 pseudo-header)."""
    return _merge(batch, count, seglen, total, hlen, out, _V6)


def _merge(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview,
           layout: _Layout) -> int:
    what = f"merge_{layout.name}"
    _check_batch(count, seglen, total, len(batch), what)
    full = count - 1
    mss = seglen - hlen
    length = total - full * hlen
    if (count < 2 or hlen < layout.ip_len + 20 or mss <= 0 or total - full * seglen <= hlen or length > 0xFFFF
            or length > len(out)):
        raise ValueError(f"{what}: batch lengths out of range")
    packet = memoryview(out)
    packet[:hlen] = batch[:hlen]
    _copy_payloads(batch, count, seglen, total, hlen, packet, hlen)
    _finish_merged(packet, batch[full * seglen + layout.ip_len + 13], length, layout)
    return length


def extend_tcp4(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview,
                used: int) -> int:
    """Append a run (checked by :func:`tcp_flow_run`) to the super-packet that :func:`merge_tcp4`
    or this function left in ``out[:used]``, when the run continues it: the same flow header,
    the next sequence number, only whole segments so far, no PSH yet, and room under the IP
    length limit. So a flow split over two GRO reads (a 64 KB super-packet is more than one UDP
    GSO send carries) is written with one TUN write.

    Returns:
        The super-packet's new length, or 0 (``out`` untouched) when the run does not continue it.
    Raises:
        ValueError: lengths that do not fit the buffers.
    """
    return _extend(batch, count, seglen, total, hlen, out, used, _V4)


def extend_tcp6(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview,
                used: int) -> int:
    """:func:`extend_tcp4` for TCP/IPv6: appends to what :func:`merge_tcp6` left in ``out[:used]``."""
    return _extend(batch, count, seglen, total, hlen, out, used, _V6)


def _extend(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray | memoryview,
            used: int, layout: _Layout) -> int:
    what = f"extend_{layout.name}"
    _check_batch(count, seglen, total, len(batch), what)
    full = count - 1
    mss = seglen - hlen
    tcp = layout.ip_len
    if (count < 1 or not tcp + 20 <= hlen <= tcp + 60 or mss <= 0 or total - full * seglen <= hlen
            or not hlen <= used <= len(out)):
        raise ValueError(f"{what}: lengths out of range")
    packet = memoryview(out)
    grown = used + total - count * hlen
    if (used - hlen) % mss or packet[tcp + 13] != _TCP_ACK or grown > 0xFFFF or grown > len(out):
        return 0
    if not _same_flow(packet, memoryview(batch)[:hlen], hlen, layout):
        return 0
    if _U32.unpack_from(batch, tcp + 4)[0] != (_U32.unpack_from(packet, tcp + 4)[0] + used - hlen) & 0xFFFFFFFF:
        return 0
    _copy_payloads(batch, count, seglen, total, hlen, packet, used)
    _finish_merged(packet, batch[full * seglen + tcp + 13], grown, layout)
    return grown


def _copy_payloads(batch: Buffer, count: int, seglen: int, total: int, hlen: int, packet: memoryview,
                   dest: int) -> None:
    """The payloads of a run's segments, back to back into ``packet`` from ``dest``."""
    for index in range(count):
        start = index * seglen + hlen
        end = min(start + seglen - hlen, total)
        packet[dest : dest + end - start] = batch[start:end]
        dest += end - start


def _finish_merged(packet: memoryview, flags: int, length: int, layout: _Layout) -> None:
    """A merged super-packet's header: the last segment's flags (PSH), its length, the IPv4
    checksum, and for CHECKSUM_PARTIAL the pseudo-header sum the kernel completes."""
    tcp = layout.ip_len
    packet[tcp + 13] = flags
    _U16.pack_into(packet, layout.length_at, _length_field(layout, length))
    if layout.six:
        pseudo = pseudo_header_sum6(packet, _PROTO_TCP, length - tcp)
    else:
        _U16.pack_into(packet, 10, 0)
        _U16.pack_into(packet, 10, checksum(packet[:20]))
        pseudo = pseudo_header_sum(packet, _PROTO_TCP, length - tcp)
    _U16.pack_into(packet, tcp + 16, fold(pseudo))


def plain_ipv4_batch(batch: Buffer, count: int, seglen: int, total: int, src_net: int, dst_net: int,
                     mask: int) -> bool:
    """Every datagram of a GRO batch a plain IPv4 header (no options) with the right length and
    a valid checksum, from ``src_net`` to ``dst_net`` (both under ``mask``).

    Raises:
        ValueError: lengths that do not fit the buffer.
    """
    _check_batch(count, seglen, total, len(batch), "plain_ipv4_batch")
    full = count - 1
    if count < 1 or seglen < 20 or total - full * seglen < 20:
        return False
    for index in range(count):
        header = memoryview(batch)[index * seglen : index * seglen + 20]
        if header[0] != 0x45 or not _ip_header_valid(header):
            return False
        if _U16.unpack_from(header, 2)[0] != (seglen if index < full else total - full * seglen):
            return False
        src, dst = struct.unpack_from("!II", header, 12)
        if src & mask != src_net or dst & mask != dst_net:
            return False
    return True
