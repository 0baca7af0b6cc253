"""Segmentation and coalescing for the offloaded udp path: the NumPy reference build.

With TUN offloads on, flannel0 hands us TCP super-packets (up to 64 KB, one
virtio-net header in front) and accepts them back. The wire format stays one
MTU-sized inner IPv4 packet per UDP datagram, so:

* egress: :func:`segment_tcp4` splits a super-packet into MSS-sized packets
  with correct IP ids, lengths, sequence numbers, flags and checksums, laid
  out back to back in one buffer, ready for one UDP GSO ``sendmsg``;
* ingress: :func:`tcp_flow_header_len` tells whether a UDP GRO batch is
  in-order segments of one flow, and :func:`merge_tcp4` writes such a batch
  as one super-packet for one TUN write.

Vectorised with NumPy: checksums use the fact that the ones'-complement sum
of 16-bit words equals their plain sum mod 65535, so a whole segment's
checksum is one reduction. The compiled build (``_offload.c``) computes the
same bytes with one call per stage and is what the daemon uses when it was
built; this module is its reference in the tests, and the fallback where no
C compiler was at hand (see :mod:`.offload`). The pure-Python per-packet
functions in :mod:`flanneld_py.core.packet` remain the reference for both.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from ...core.packet import checksum, fold

from .vnet import GSO_TCPV4, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN

__all__ = [
    "complete_checksum",
    "merge_tcp4",
    "plain_ipv4_batch",
    "segment_tcp4",
    "tcp_flow_header_len",
]

Buffer = bytearray | memoryview | np.ndarray

_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_FFFF = np.uint32(0xFFFF)
_INDEX = np.arange(1024, dtype=np.uint32)  # segment numbers (64 KB at the minimum MSS of 88: 745), sliced
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _array(buf: Buffer) -> np.ndarray:
    return buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)


def complete_checksum(packet: bytearray | memoryview, n: int, start: int, offset: int, udp: bool) -> None:
    """Finish a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum already."""
    if n > len(packet) or not 0 <= start <= n or offset < 0 or start + offset + 2 > n:
        raise ValueError("complete_checksum: start or offset outside the packet")
    value = checksum(packet[start:n])
    if udp and value == 0:
        value = 0xFFFF
    _U16.pack_into(packet, start + offset, value)


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def _row_sums(rows: np.ndarray) -> np.ndarray:
    """Per-row sums of the *little-endian* 16-bit words of a (k, even width) uint8 array.

    Native-endian sums are three times faster than big-endian ones, and the
    ones'-complement sum is byte-order independent: a checksum computed in
    the little-endian domain, stored little-endian, is the big-endian
    checksum's bytes. Rows up to 128 KB cannot overflow 32 bits.
    """
    return rows.view("<u2").sum(axis=1, dtype=np.uint32)


def _checksums(sums: np.ndarray) -> np.ndarray:
    """Checksum bytes (k, 2) from little-endian-domain sums, ready to store.

    ``(0xFFFF - sum mod 0xFFFF) mod 0xFFFF`` is the complement of the folded
    sum for every non-zero sum (our headers never sum to zero).
    """
    return ((_FFFF - sums % _FFFF) % _FFFF).astype("<u2").view(np.uint8).reshape(-1, 2)


def header_rows(batch: np.ndarray, count: int, seglen: int, width: int) -> np.ndarray:
    """A (count, width) view of the first ``width`` bytes of each segment, no copy.

    Built with the ndarray constructor: ``as_strided`` costs ~10 us per call.
    The caller guarantees the last segment holds at least ``width`` bytes.
    """
    return np.ndarray((count, width), dtype=np.uint8, buffer=batch, strides=(seglen, 1))


def segment_tcp4(packet: bytearray | memoryview, n: int, mss: int, out: Buffer) -> tuple[int, int, int]:
    """Split the TCP/IPv4 super-packet ``packet[:n]`` into ``mss``-sized segments.

    Segments are written back to back into ``out`` (a uint8 array with room
    for ``count`` full segments); every segment but the last is
    ``segment_len`` long, as UDP GSO requires. ``packet``'s header is used
    as scratch (checksums and flags cleared) and must not be reused.
    Returns ``(total_bytes, segment_len, count)``.
    """
    out = _array(out)
    ip_len = (packet[0] & 0x0F) * 4
    hlen = ip_len + (packet[ip_len + 12] >> 4) * 4
    payload = n - hlen
    count = max(1, -(-payload // mss))
    seglen = hlen + mss
    full = count - 1
    last_payload = payload - full * mss
    total = full * seglen + hlen + last_payload
    if (seglen - ip_len) % 2:
        return _segment_odd(packet, n, mss, out, ip_len, hlen, count)
    flags = packet[ip_len + 13]
    ident = _U16.unpack_from(packet, 4)[0]
    seq = _U32.unpack_from(packet, ip_len + 4)[0]
    _template_header(packet, ip_len, seglen, flags & ~(_TCP_FIN | _TCP_PSH | _TCP_CWR) if full else flags)
    src = np.frombuffer(packet, dtype=np.uint8, count=n)
    rows = out[: count * seglen].reshape(count, seglen)
    rows[:, :hlen] = src[:hlen]
    if full:
        rows[:full, hlen:] = src[hlen : hlen + full * mss].reshape(full, mss)
        rows[0, ip_len + 13] = flags & ~(_TCP_FIN | _TCP_PSH) & 0xFF
    last = rows[full]
    last[hlen : hlen + last_payload] = src[hlen + full * mss : n]
    last[hlen + last_payload :] = 0  # zero padding: the vectorised sums then cover the last row too
    last[ip_len + 13] = flags & ~_TCP_CWR & 0xFF if full else flags
    _U16.pack_into(last, 2, hlen + last_payload)
    index = _INDEX[:count]
    ids = (ident + index) & 0xFFFF
    rows[:, 4:6] = ids.astype(">u2").view(np.uint8).reshape(count, 2)
    seqs = (seq + index.astype(np.uint64) * mss) & 0xFFFFFFFF
    rows[:, ip_len + 4 : ip_len + 8] = seqs.astype(">u4").view(np.uint8).reshape(count, 4)
    _ip_checksums(rows, packet, ip_len, ids, seglen - hlen - last_payload)
    _tcp_checksums(rows, ip_len, seglen, hlen + last_payload)
    return total, seglen, count


def _template_header(packet: bytearray | memoryview, ip_len: int, seglen: int, flags: int) -> None:
    """Turn the super-packet's header into the full segments' header (before the per-row fields)."""
    _U16.pack_into(packet, 2, seglen)
    _U16.pack_into(packet, 10, 0)
    packet[ip_len + 13] = flags & 0xFF
    _U16.pack_into(packet, ip_len + 16, 0)


def _ip_checksums(rows: np.ndarray, template: bytearray | memoryview, ip_len: int, ids: np.ndarray,
                  last_shorter_by: int) -> None:
    """IP header checksums by arithmetic: the rows' headers differ from the template
    only in the id (and the last row's length), so no per-row sum is needed."""
    without_id = int.from_bytes(template[:ip_len], "big") - (_U16.unpack_from(template, 4)[0] << (8 * (ip_len - 6)))
    base = fold(without_id) if without_id else 0
    sums = ids + np.uint32(base)
    sums[-1] += np.uint32(0xFFFF - last_shorter_by) if last_shorter_by else 0  # minus, in ones' complement
    rows[:, 10:12] = ((_FFFF - sums % _FFFF) % _FFFF).astype(">u2").view(np.uint8).reshape(-1, 2)


def _tcp_checksums(rows: np.ndarray, ip_len: int, seglen: int, last_len: int) -> None:
    """TCP checksums of every row: one reduction, plus the pseudo-headers."""
    addresses = int.from_bytes(bytes(rows[0, 12:20]), "big") + 6  # pseudo-header: addresses, protocol
    tcp_sums = _row_sums(rows[:, ip_len:seglen])
    tcp_sums[:-1] += np.uint32(_swap16(fold(addresses + seglen - ip_len)))
    tcp_sums[-1] += np.uint32(_swap16(fold(addresses + last_len - ip_len)))
    rows[:, ip_len + 16 : ip_len + 18] = _checksums(tcp_sums)


def _segment_odd(
    packet: bytearray | memoryview, n: int, mss: int, out: np.ndarray, ip_len: int, hlen: int, count: int
) -> tuple[int, int, int]:
    """Segments whose TCP part has an odd length (rare MSS values): one at a time."""
    flags = packet[ip_len + 13]
    ident = _U16.unpack_from(packet, 4)[0]
    seq = _U32.unpack_from(packet, ip_len + 4)[0]
    header = bytearray(packet[:hlen])
    seglen = hlen + mss
    offset = 0
    for index in range(count):
        chunk = packet[hlen + index * mss : min(n, hlen + (index + 1) * mss)]
        segment = bytearray(header) + chunk
        _U16.pack_into(segment, 2, len(segment))
        _U16.pack_into(segment, 4, (ident + index) & 0xFFFF)
        _U32.pack_into(segment, ip_len + 4, (seq + index * mss) & 0xFFFFFFFF)
        keep = ~_TCP_CWR if index else 0xFF
        if index < count - 1:
            keep &= ~(_TCP_FIN | _TCP_PSH)
        segment[ip_len + 13] = flags & keep & 0xFF
        _U16.pack_into(segment, 10, 0)
        _U16.pack_into(segment, 10, checksum(segment[:ip_len]))
        _U16.pack_into(segment, ip_len + 16, 0)
        body = bytes(segment[ip_len:]) + (b"\x00" if (len(segment) - ip_len) % 2 else b"")
        pseudo = int.from_bytes(segment[12:20], "big") + 6 + len(segment) - ip_len
        _U16.pack_into(segment, ip_len + 16, 0xFFFF - fold(int.from_bytes(body, "big") + pseudo))
        out[offset : offset + len(segment)] = np.frombuffer(segment, dtype=np.uint8)
        offset += len(segment)
    return offset, seglen, count


# --- ingress ----------------------------------------------------------------------

def tcp_flow_header_len(batch: Buffer, count: int, seglen: int, total: int) -> int:
    """The header length if ``batch[:total]`` (``count`` GRO'd datagrams of ``seglen``, the
    last shorter) is one in-order TCP flow with plain, valid IPv4 headers; else 0.

    Plain: no IP options or fragments, the same addresses, ports, ack, window
    and options in every segment, ACK flags (PSH only at the end), IP lengths
    matching the datagrams and valid IP checksums. Such a batch is checked by
    its first header alone (:meth:`Engine.inbound_flow`) and merged by
    :func:`merge_tcp4`; anything else takes the general path.
    """
    batch = _array(batch)
    if count < 2 or seglen < 40 or total - (count - 1) * seglen < 40:
        return 0
    if batch[0] != 0x45 or batch[9] != 6 or batch[6] & 0x3F or batch[7]:
        return 0
    data_offset = int(batch[32]) >> 4
    if data_offset < 5:  # not TCP: a hostile or broken header
        return 0
    hlen = 20 + data_offset * 4
    full = count - 1
    mss = seglen - hlen
    if mss <= 0 or total - full * seglen <= hlen:
        return 0
    headers = header_rows(batch, count, seglen, hlen)
    if not _same_flow(headers, hlen):
        return 0
    lengths = headers[:, 2:4].copy().view(">u2").ravel()
    if (lengths[:full] != seglen).any() or int(lengths[full]) != total - full * seglen:
        return 0
    if (headers[:, :20].view("<u2").sum(axis=1, dtype=np.uint32) % _FFFF).any():
        return 0  # a valid header sums to 0 mod 65535 (in either byte order)
    seqs = headers[:, 24:28].copy().view(">u4").ravel()
    expected = (int(seqs[0]) + _INDEX[:count].astype(np.uint64) * mss) & 0xFFFFFFFF
    return hlen if np.array_equal(seqs, expected) else 0


@functools.lru_cache(maxsize=16)
def _fixed_bytes(hlen: int) -> np.ndarray:
    """Header bytes that must be equal in every segment of one flow (all but
    total length, IP id and checksum, sequence number, flags and TCP checksum)."""
    return np.r_[0:2, 6:10, 12:24, 28:33, 34:36, 38:hlen]


def _same_flow(headers: np.ndarray, hlen: int) -> bool:
    """Same addresses, ports, ack, window and options; plain ACKs, PSH allowed at the end."""
    fixed = headers[:, _fixed_bytes(hlen)]
    if not (fixed == fixed[0]).all():
        return False
    flags = headers[:, 33]
    return bool((flags[:-1] == 0x10).all()) and int(flags[-1]) in (0x10, 0x18)


def merge_tcp4(batch: Buffer, count: int, seglen: int, total: int, hlen: int, out: bytearray) -> int:
    """Write the flow (checked by :func:`tcp_flow_header_len`) as one TCP super-packet with a
    GSO virtio header into ``out``; the TCP checksum is left to the kernel (CHECKSUM_PARTIAL)."""
    batch = _array(batch)
    full = count - 1
    mss = seglen - hlen
    length = total - full * hlen
    view = np.frombuffer(out, dtype=np.uint8)
    base = VNET_HDR_LEN
    view[base : base + hlen] = batch[:hlen]
    payload = view[base + hlen : base + length]
    payload[: full * mss].reshape(full, mss)[:] = batch[: full * seglen].reshape(full, seglen)[:, hlen:]
    payload[full * mss :] = batch[full * seglen + hlen : total]
    view[base + 33] = batch[full * seglen + 33]  # the last segment's flags (PSH)
    packet = memoryview(out)[base : base + length]
    _U16.pack_into(packet, 2, length)
    _U16.pack_into(packet, 10, 0)
    _U16.pack_into(packet, 10, checksum(packet[:20]))
    _U16.pack_into(packet, 36, fold(int.from_bytes(packet[12:20], "big") + 6 + length - 20))
    VNET_HDR.pack_into(out, 0, NEEDS_CSUM, GSO_TCPV4, hlen, mss, 20, 16)
    return base + length


def plain_ipv4_batch(batch: Buffer, count: int, seglen: int, total: int, src_net: int, dst_net: int,
                     mask: int) -> bool:
    """Every datagram of a GRO batch a plain IPv4 header (no options) with the right length and
    a valid checksum, from ``src_net`` to ``dst_net`` (both under ``mask``)."""
    batch = _array(batch)
    full = count - 1
    if count < 1 or seglen < 20 or total - full * seglen < 20:
        return False
    headers = header_rows(batch, count, seglen, 20)
    if (headers[:, 0] != 0x45).any():
        return False
    lengths = headers[:, 2:4].copy().view(">u2").ravel()
    if (lengths[:full] != seglen).any() or int(lengths[full]) != total - full * seglen:
        return False
    if (headers.copy().view("<u2").sum(axis=1, dtype=np.uint32) % _FFFF).any():
        return False  # a valid header sums to 0 mod 65535, in either byte order
    addresses = headers[:, 12:20].copy().view(">u4")
    if ((addresses[:, 0] & mask) != src_net).any():
        return False
    return not ((addresses[:, 1] & mask) != dst_net).any()
