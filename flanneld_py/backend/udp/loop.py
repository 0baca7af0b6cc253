"""The udp backend's hot loop: the asyncio adapter around :class:`Engine`.

Two reader callbacks on the event loop, one per direction. Each wakeup
drains at most ``batch`` reads into preallocated buffers (a bounded drain
keeps timers and the control plane responsive), hands each packet to the
engine, and sends or writes the survivors at once: nothing waits for a
batch to fill, so a lone packet goes out with no added delay.

Two shapes of the same stages:

* plain: one inner packet per read and per ``sendto``/``write``;
* offload (TUN virtio-net headers, UDP GSO/GRO): a read from flannel0 may
  be a TCP super-packet, split by ``segment_tcp4`` into a run of datagrams
  that leaves in GSO ``sendmsg`` calls (runs span super-packets, so a 64 KB
  one costs no extra send); a GRO read from the socket may hold many datagrams, checked
  in runs (``tcp_flow_run``, :meth:`Engine.inbound_batch`), each run of one
  TCP flow written back as one super-packet (``merge_tcp4``). The stages
  come from :mod:`.offload` (compiled, or the pure-Python reference).

Either way every datagram on the wire is one complete inner IPv4 packet no
larger than flannel0's MTU, and every packet ends forwarded or counted as a
drop. Peer changes run as ordinary callbacks on the same loop, so they land
between batches.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass, field

from ...core.packet import Drop
from .engine import Engine
from .offload import complete_checksum, extend_tcp4, merge_tcp4, segment_tcp4, tcp_flow_run
from .tun import TunDevice
from .udpconn import GRO_CMSG_SPACE, MAX_GSO_BYTES, MAX_GSO_SEGMENTS, UdpConn, gro_segment_size, gso_control
from .vnet import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, ZERO_VNET_HDR

__all__ = ["BatchStats", "Pump"]

MAX_PACKET = 65536 + VNET_HDR_LEN
# room for one segmented super-packet: 64 KB grows by one header per segment
# (at TCP's minimum MSS of 88 and the longest headers, to ~155 KB)
SEGMENT_ROOM = 4 * MAX_PACKET
_PROTO_UDP = 17


@dataclass
class BatchStats:
    """Packets handled per wakeup, as a histogram by power-of-two bucket (1, 2-3, 4-7, ...)."""

    buckets: list[int] = field(default_factory=lambda: [0] * 8)
    wakeups: int = 0
    packets: int = 0

    def record(self, count: int) -> None:
        self.wakeups += 1
        self.packets += count
        self.buckets[min(count.bit_length(), 7)] += 1


class _SendRun:
    """Datagrams of one size to one peer, back to back in one buffer, waiting for GSO sends.

    Segments of consecutive super-packets and small packets join one run, and
    the run leaves in sends of as many datagrams as one UDP GSO call carries.
    A pod's 64 KB super-packet (46 MTU-sized segments) is more than one send
    can carry (44 under the 65507-byte UDP limit); its last segments wait
    for the next super-packet's instead of costing a send of their own. Only
    the last datagram of a send may be shorter: a short one ends the run.
    """

    def __init__(self, capacity: int) -> None:
        self.view = memoryview(bytearray(capacity))
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        self.addr: tuple[str, int] = ("", 0)
        self.seglen = 0
        self.start = 0  # pending datagrams: view[start:used]
        self.used = 0
        self.closed = False  # ends with a short datagram: nothing may join

    @property
    def pending(self) -> int:
        return self.used - self.start

    def compact(self) -> None:
        """Move the pending datagrams to the front of the buffer."""
        if self.start:
            self.view[: self.pending] = self.view[self.start : self.used]
            self.used -= self.start
            self.start = 0


class Pump:
    """Moves packets between flannel0 and the UDP socket for one :class:`Engine`."""

    def __init__(self, engine: Engine, tun: TunDevice, conn: UdpConn, batch: int = 32) -> None:
        self.engine = engine
        self.tun = tun
        self.conn = conn
        self.batch = batch
        # one read buffer, reused: each packet is sent, or copied into the GSO run, before the next read
        self._tun_buf = bytearray(MAX_PACKET)
        self._tun_view = memoryview(self._tun_buf)
        self._udp_buf = bytearray(MAX_PACKET)
        self._udp_view = memoryview(self._udp_buf)
        self._merge_buf = bytearray(MAX_PACKET)
        self._merge_view = memoryview(self._merge_buf)
        self._merged = 0  # a merged super-packet waiting in _merge_buf[:_merged] for more of its flow
        self._run = _SendRun(MAX_GSO_BYTES + SEGMENT_ROOM)
        self.tun_batches = BatchStats()
        self.udp_batches = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def offload(self) -> bool:
        return self.tun.offload

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.tun.offload:
            self._loop.add_reader(self.tun.fd, self._on_tun_offload)
            self._loop.add_reader(self.conn.fileno(), self._on_udp_offload)
        else:
            self._loop.add_reader(self.tun.fd, self._on_tun_plain)
            self._loop.add_reader(self.conn.fileno(), self._on_udp_plain)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.tun.fd)
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    # --- flannel0 -> UDP ---------------------------------------------------------

    def _on_tun_plain(self) -> None:
        engine = self.engine
        sendto = self.conn.sock.sendto
        read, buf, view = self.tun.read_into, self._tun_buf, self._tun_view
        now = self._now()
        count = 0
        while count < self.batch and (size := read(buf)):
            count += 1
            peer = engine.outbound(view, size)
            if peer is None:
                continue
            peer.last_tx = now
            try:
                sendto(view[:size], peer.addr)
            except OSError:
                engine.drops[Drop.UDP_SEND_FAILED] += 1
        self.tun_batches.record(count)
        if engine.replies:
            self._write_replies()

    def _on_tun_offload(self) -> None:
        read, buf, view = self.tun.read_into, self._tun_buf, self._tun_view
        now = self._now()
        count = 0
        while count < self.batch and (size := read(buf)):
            count += 1
            self._egress_offloaded(view, size, now)
        self._flush_run()  # within the same wakeup: batching adds no delay
        self.tun_batches.record(count)
        if self.engine.replies:
            self._write_replies()

    def _egress_offloaded(self, view: memoryview, size: int, now: float) -> None:
        engine = self.engine
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(view, 0)
        packet = view[VNET_HDR_LEN:size]
        length = size - VNET_HDR_LEN
        kind = gso_type & 0x7F
        if kind == GSO_NONE:
            if flags & NEEDS_CSUM and length > 9:
                try:
                    complete_checksum(packet, length, csum_start, csum_offset, packet[9] == _PROTO_UDP)
                except ValueError:
                    engine.drops[Drop.BAD_OFFLOAD_HEADER] += 1
                    return
            peer = engine.outbound(packet, length)
            if peer is not None:
                peer.last_tx = now
                self._queue_small(packet, length, peer.addr)
            return
        if kind != GSO_TCPV4:
            engine.drops[Drop.NOT_IPV4] += 1
            return
        peer = engine.outbound(packet, length)
        if peer is None:
            return
        run = self._make_room(peer.addr, SEGMENT_ROOM)
        try:
            total, seglen, segments = segment_tcp4(packet, length, gso_size, run.view[run.used :])
        except ValueError:
            peer.tx_packets -= 1
            peer.tx_bytes -= length
            engine.drops[Drop.BAD_OFFLOAD_HEADER] += 1
            return
        peer.last_tx = now
        peer.tx_packets += segments - 1
        peer.tx_bytes += total - length
        self._append(peer.addr, total, seglen, total - (segments - 1) * seglen)

    def _queue_small(self, packet: memoryview, length: int, addr: tuple[str, int]) -> None:
        """Gather runs of equal-size packets to one peer (a UDP flood, a stream of small
        writes) into GSO sends; without GSO each goes out at once."""
        if not self.conn.gso:
            self._flush_run()
            self._send_one(packet[:length], addr)
            return
        run = self._make_room(addr, length)
        run.view[run.used : run.used + length] = packet[:length]
        self._append(addr, length, length, length)

    def _make_room(self, addr: tuple[str, int], size: int) -> _SendRun:
        """The run, ready for ``size`` more bytes to ``addr`` at ``run.used``: a run to
        another peer, or one that may not grow, is sent first."""
        run = self._run
        if run.pending and (run.addr != addr or run.closed):
            self._flush_run()
        if run.used + size > run.capacity:
            run.compact()
        return run

    def _append(self, addr: tuple[str, int], nbytes: int, seglen: int, last_len: int) -> None:
        """Take ``nbytes`` of datagrams just written at ``run.used`` into the run and send
        every full GSO send's worth; the rest waits (:meth:`_flush_run` ends the wakeup)."""
        run = self._run
        if run.pending and seglen != run.seglen:
            self._send_segments(run.view[run.start : run.used], run.pending, run.seglen, run.addr)
            run.start = run.used
        run.addr, run.seglen = addr, seglen
        run.used += nbytes
        run.closed = last_len != seglen
        if run.closed:
            self._flush_run()
            return
        chunk = self._per_send(seglen) * seglen
        if run.pending >= chunk:
            whole = run.pending - run.pending % chunk
            self._send_segments(run.view[run.start : run.start + whole], whole, seglen, addr)
            run.start += whole
        if not run.pending:
            run.reset()

    def _flush_run(self) -> None:
        run = self._run
        if run.pending:
            self._send_segments(run.view[run.start : run.used], run.pending, run.seglen, run.addr)
        run.reset()

    def _per_send(self, seglen: int) -> int:
        return min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // seglen) if self.conn.gso else 1

    def _send_one(self, data: memoryview, addr: tuple[str, int]) -> None:
        try:
            self.conn.sock.sendto(data, addr)
        except OSError:
            self.engine.drops[Drop.UDP_SEND_FAILED] += 1

    def _send_segments(self, view: memoryview, total: int, seglen: int, addr: tuple[str, int]) -> None:
        """Send ``view[:total]``, back-to-back datagrams of ``seglen`` (the last may be shorter):
        GSO runs when possible, else one by one."""
        per_send = self._per_send(seglen)
        sock = self.conn.sock
        start = 0
        while start < total:
            end = min(total, start + per_send * seglen)
            chunk = view[start:end]
            try:
                if end - start > seglen:
                    sock.sendmsg([chunk], gso_control(seglen), 0, addr)
                else:
                    sock.sendto(chunk, addr)
            except (BlockingIOError, InterruptedError):
                self.engine.drops[Drop.UDP_SEND_FAILED] += -(-(end - start) // seglen)
            except OSError as exc:
                if end - start > seglen and exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    self.conn.disable_gso(exc)
                    self._send_segments_plain(view, start, end, seglen, addr)
                else:
                    self.engine.drops[Drop.UDP_SEND_FAILED] += -(-(end - start) // seglen)
            start = end

    def _send_segments_plain(self, view: memoryview, start: int, end: int, seglen: int,
                             addr: tuple[str, int]) -> None:
        for offset in range(start, end, seglen):
            self._send_one(view[offset : min(end, offset + seglen)], addr)

    def _write_replies(self) -> None:
        prefix = ZERO_VNET_HDR if self.tun.offload else b""
        for reply in self.engine.take_replies():
            try:
                os.write(self.tun.fd, prefix + reply)
            except OSError:
                self.engine.drops[Drop.TUN_WRITE_FAILED] += 1

    # --- UDP -> flannel0 ---------------------------------------------------------

    def _on_udp_plain(self) -> None:
        engine = self.engine
        recvfrom_into = self.conn.sock.recvfrom_into
        fd = self.tun.fd
        write = os.write
        buf, view = self._udp_buf, self._udp_view
        now = self._now()
        count = 0
        for _ in range(self.batch):
            try:
                size, (source, _port) = recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError:
                continue  # e.g. a queued ICMP port-unreachable (ECONNREFUSED) for an earlier send
            count += 1
            peer = engine.inbound(buf, size, source)
            if peer is None:
                continue
            peer.last_rx = now
            try:
                write(fd, view[:size])
            except OSError:
                engine.drops[Drop.TUN_WRITE_FAILED] += 1
        self.udp_batches.record(count)

    def _on_udp_offload(self) -> None:
        """Datagrams land after a zero virtio header kept at the buffer's front, so a
        single packet goes to flannel0 with one write and no copy."""
        recvmsg_into = self.conn.sock.recvmsg_into
        target = [self._udp_view[VNET_HDR_LEN:]]
        now = self._now()
        count = 0
        for _ in range(self.batch):
            try:
                nbytes, ancdata, _flags, (source, _port) = recvmsg_into(target, GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:
                continue
            seglen = gro_segment_size(ancdata, nbytes)
            if nbytes <= seglen and not self._merged:
                count += 1
                self._ingress_one(VNET_HDR_LEN, nbytes, source, now)
            else:
                count += self._ingress_batch(nbytes, seglen, source, now)
        self._flush_merged()  # within the same wakeup: merging adds no delay
        self.udp_batches.record(count)

    def _ingress_one(self, offset: int, size: int, source: str, now: float) -> None:
        self._flush_merged()
        packet = self._udp_view[offset : offset + size]
        peer = self.engine.inbound(packet, size, source)
        if peer is None:
            return
        peer.last_rx = now
        if offset == VNET_HDR_LEN:
            self._tun_write(self._udp_view[: VNET_HDR_LEN + size])
        else:
            self._tun_writev(packet)

    def _ingress_batch(self, nbytes: int, seglen: int, source: str, now: float) -> int:
        """A GRO read, as runs: each run of in-order segments of one TCP flow is checked by its
        first header and merged into one super-packet, which the next run of the same flow
        (in this read or the next) may extend, so a sender's 64 KB super-packet that crossed
        two GSO sends is written with one TUN write; a read that starts with no such run
        (ACKs, a UDP flood) is checked as a whole and written one by one; anything else, and
        any doubt, goes through the one-by-one checks, so drops count exactly."""
        segments = -(-nbytes // seglen)
        end = VNET_HDR_LEN + nbytes
        index = 0
        while index < segments:
            offset = VNET_HDR_LEN + index * seglen
            rest = self._udp_view[offset:end]
            hlen, run = tcp_flow_run(rest, segments - index, seglen, end - offset)
            if run >= 2 or (run and self._merged):
                run_bytes = min(run * seglen, end - offset)
                peer = self.engine.inbound_flow(rest, run, run_bytes, source)
                if peer is not None:
                    peer.last_rx = now
                    self._merge_run(rest, run, seglen, run_bytes, hlen)
                    index += run
                    continue
                if run >= 2:
                    for at in range(offset, offset + run_bytes, seglen):
                        self._ingress_one(at, min(seglen, end - at), source, now)
                    index += run
                    continue
            if not run and not index and self._ingress_plain_batch(segments, nbytes, seglen, source, now):
                return segments
            self._ingress_one(offset, min(seglen, end - offset), source, now)
            index += 1
        return segments

    def _merge_run(self, run_view: memoryview, run: int, seglen: int, run_bytes: int, hlen: int) -> None:
        """Extend the waiting super-packet with an accepted run, or write that one and start anew."""
        if self._merged:
            grown = extend_tcp4(run_view, run, seglen, run_bytes, hlen, self._merge_buf, self._merged)
            if grown:
                self._merged = grown
                return
            self._flush_merged()
        if run >= 2:
            self._merged = merge_tcp4(run_view, run, seglen, run_bytes, hlen, self._merge_buf)
        else:
            self._tun_writev(run_view[:run_bytes])

    def _flush_merged(self) -> None:
        if self._merged:
            self._tun_write(self._merge_view[: self._merged])
            self._merged = 0

    def _ingress_plain_batch(self, segments: int, nbytes: int, seglen: int, source: str, now: float) -> bool:
        batch = self._udp_view[VNET_HDR_LEN : VNET_HDR_LEN + nbytes]
        peer = self.engine.inbound_batch(batch, segments, seglen, nbytes, source)
        if peer is None:
            return False
        self._flush_merged()
        peer.last_rx = now
        for offset in range(VNET_HDR_LEN, VNET_HDR_LEN + nbytes, seglen):
            self._tun_writev(self._udp_view[offset : min(offset + seglen, VNET_HDR_LEN + nbytes)])
        return True

    def _tun_write(self, data: memoryview) -> None:
        try:
            os.write(self.tun.fd, data)
        except OSError:
            self.engine.drops[Drop.TUN_WRITE_FAILED] += 1

    def _tun_writev(self, packet: memoryview) -> None:
        try:
            os.writev(self.tun.fd, (ZERO_VNET_HDR, packet))
        except OSError:
            self.engine.drops[Drop.TUN_WRITE_FAILED] += 1
