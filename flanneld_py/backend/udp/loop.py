"""The udp backend's hot loop: the asyncio adapter around :class:`Engine`.

Two reader callbacks on the event loop, one per direction. Each wakeup
drains at most ``batch`` reads, hands each packet to the engine, and sends
or writes the survivors within the same wakeup: nothing waits for a batch
to fill, so a lone packet goes out with no added delay.

The loop talks to two small interfaces that keep the kernel's details:
:class:`~.tun.TunDevice` (packets and TCP super-packets; the virtio-net
header) and :class:`~.udpconn.UdpConn` (runs of equal-size datagrams; the
GSO/GRO control messages). Stages, in order:

* flannel0 -> UDP: a read is one packet or, with TUN offloads, a TCP
  super-packet (TSO, TSO6), checked once by the engine, split by
  ``segment_tcp4`` or ``segment_tcp6`` into
  a run of datagrams; runs to one peer span super-packets and leave in as
  few sends as the connection allows (a pod's 64 KB super-packet is more
  than one UDP GSO send holds, so its tail waits for the next one's
  segments), small packets of one size to one peer too;
* UDP -> flannel0: a read is one datagram or, with GRO, a run from one
  sender, taken in runs of one TCP flow (``tcp_flow_run``), each checked by
  its first header and merged (``merge_tcp4``/``merge_tcp6``) into a
  super-packet that the next run of the flow may extend (``extend_tcp4``/
  ``extend_tcp6``); other reads are
  checked as a whole (:meth:`Engine.inbound_batch`) or one by one.

The stages come from :mod:`.offload` (compiled, or the pure-Python
reference). Every datagram on the wire is one complete inner IPv4 or IPv6
packet no larger than flannel0's MTU, and every packet ends forwarded or
counted as a drop. Peer changes run as ordinary callbacks on the same loop, so they land
between batches.

With the fast lane (:mod:`.lane`) a C thread reads flannel0 and the IPv4
socket while it meets only plain forwards (with TUN offloads also the IPv4 TCP
bulk path above, with the same C stages and into these same buffers), and hands
the first other frame to these same handlers (``handed``), which then keep the
descriptor while traffic flows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import ModuleType

from ...core.packet import Drop
from .engine import Engine, Peer
from .lane import BulkPath, FastLane, bulk_path_on
from .offload import extend_tcp4, extend_tcp6, merge_tcp4, merge_tcp6, segment_tcp4, segment_tcp6, tcp_flow_run
from .tun import HEADROOM, OffloadError, TunDevice, TunPacket
from .udpconn import MAX_GSO_BYTES, MAX_GSO_SEGMENTS, UdpConn

__all__ = ["BatchStats", "Pump"]

MAX_PACKET = 65536
# room for one segmented super-packet: 64 KB grows by one header per segment
# (at TCP's minimum MSS of 88 and the longest headers, to ~155 KB)
SEGMENT_ROOM = 4 * MAX_PACKET
Address = tuple[str, int]


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
        self.addr: Address = ("", 0)
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

    def __init__(self, engine: Engine, tun: TunDevice, conn: UdpConn, batch: int = 32,
                 conn6: UdpConn | None = None, lane: ModuleType | None = None) -> None:
        self.engine = engine
        self.tun = tun
        self.conn = conn
        self.conn6 = conn6  # the IPv6 underlay's socket, for peers' PublicIPv6 (None: IPv4 underlay only)
        self.batch = batch
        self._udp_view = memoryview(bytearray(MAX_PACKET))
        self._merge_view = memoryview(bytearray(HEADROOM + MAX_PACKET))
        self._merge_out = self._merge_view[HEADROOM:]
        self._merged = 0  # a merged super-packet waiting in _merge_out[:_merged] for more of its flow
        self._merged_hlen = 0
        self._merged_mss = 0
        self._run = _SendRun(MAX_GSO_BYTES + SEGMENT_ROOM)
        self.tun_batches = BatchStats()
        self.udp_batches = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        # the lane's receive and merge buffers: this loop's own, unless the IPv6 socket's reads
        # (conn6, on this loop, while the lane's thread reads the IPv4 socket) use those meanwhile
        shared = conn6 is None or lane is None
        self._lane_udp_view = self._udp_view if shared else memoryview(bytearray(MAX_PACKET))
        self._lane_merge_view = self._merge_view if shared else memoryview(bytearray(HEADROOM + MAX_PACKET))
        self.lane = None if lane is None else FastLane(
            lane, engine, (tun.fileno(), conn.fileno()), (tun.read_buffer, self._lane_udp_view),
            tun.offload, getattr(conn, "gro", False), (self._on_tun, self._on_udp_handed),
            (self._on_tun, self._on_udp), (self.tun_batches, self.udp_batches),
            self._bulk_path() if tun.offload and bulk_path_on() else None)

    @property
    def offload(self) -> bool:
        return self.tun.offload

    def _bulk_path(self) -> BulkPath:
        """The fast lane's share of the bulk path: this loop's send-run and merge buffers, which
        hold nothing between this loop's wakeups, and the socket's GSO limits."""
        gso = getattr(self.conn, "gso", False)
        return BulkPath(self._run.view, self._lane_merge_view, MAX_GSO_SEGMENTS if gso else 0, MAX_GSO_BYTES,
                        SEGMENT_ROOM)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.lane is not None:
            self.lane.start(self._loop)
        else:
            self._loop.add_reader(self.tun.fileno(), self._on_tun)
            self._loop.add_reader(self.conn.fileno(), self._on_udp)
        if self.conn6 is not None:
            self._loop.add_reader(self.conn6.fileno(), self._on_udp, self.conn6)

    def stop(self) -> None:
        if self._loop is not None:
            if self.lane is not None:
                self.lane.stop()
            else:
                self._loop.remove_reader(self.tun.fileno())
                self._loop.remove_reader(self.conn.fileno())
            if self.conn6 is not None:
                self._loop.remove_reader(self.conn6.fileno())
            self._loop = None

    def sync_counters(self) -> None:
        """Bring the counters up to date with what the fast lane moved (none without it)."""
        if self.lane is not None:
            self.lane.sync_counters()

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    # --- flannel0 -> UDP ---------------------------------------------------------

    def _on_tun(self, handed: int = -1) -> None:
        """Drain flannel0; ``handed``: the size of a frame the fast lane left in its read buffer."""
        engine, read = self.engine, self.tun.read
        now = self._now()
        count = 0
        while count < self.batch:
            got: TunPacket | None
            try:
                if handed >= 0:
                    size, handed = handed, -1
                    got = self.tun.parse(size)
                else:
                    got = read()
            except OffloadError as exc:
                count += 1
                engine.drops[exc.drop] += 1
                continue
            if got is None:
                break
            count += 1
            peer = engine.outbound(got.packet, got.length)
            if peer is None:
                continue
            peer.last_tx = now
            if got.mss:
                self._queue_super(got.packet, got.length, got.mss, peer)
            elif got.packet[0] < 0x60:
                self._queue_small(got.packet, got.length, peer.addr)
            else:  # IPv6: the engine routes only to peers with an IPv6 address to send to
                self._queue_small(got.packet, got.length, peer.addr6 or peer.addr)
        self._flush_run()  # within the same wakeup: batching adds no delay
        self.tun_batches.record(count)
        if engine.replies:
            self._write_replies()

    def _queue_super(self, packet: memoryview, length: int, mss: int, peer: Peer) -> None:
        """Split a TCP super-packet (counted by the engine as one packet) into the run."""
        six = packet[0] >> 4 == 6
        addr = (peer.addr6 or peer.addr) if six else peer.addr
        run = self._make_room(addr, SEGMENT_ROOM)
        try:
            total, seglen, segments = (segment_tcp6 if six else segment_tcp4)(packet, length, mss,
                                                                              run.view[run.used :])
        except ValueError:
            peer.tx_packets -= 1
            peer.tx_bytes -= length
            self.engine.drops[Drop.BAD_OFFLOAD_HEADER] += 1
            return
        peer.tx_packets += segments - 1
        peer.tx_bytes += total - length
        self._append(addr, total, seglen, total - (segments - 1) * seglen)

    def _queue_small(self, packet: memoryview, length: int, addr: Address) -> None:
        """Gather runs of equal-size packets to one peer (a UDP flood, a stream of small
        writes) into GSO sends; without GSO each goes out at once."""
        if self._conn_for(addr).per_send(length) == 1:
            self._flush_run()
            self._send(packet[:length], length, addr)
            return
        run = self._make_room(addr, length)
        run.view[run.used : run.used + length] = packet[:length]
        self._append(addr, length, length, length)

    def _make_room(self, addr: Address, size: int) -> _SendRun:
        """The run, ready for ``size`` more bytes to ``addr`` at ``run.used``: a run to
        another peer, or one that may not grow, is sent first."""
        run = self._run
        if run.pending and (run.addr != addr or run.closed):
            self._flush_run()
        if run.used + size > run.capacity:
            run.compact()
        return run

    def _append(self, addr: Address, nbytes: int, seglen: int, last_len: int) -> None:
        """Take ``nbytes`` of datagrams just written at ``run.used`` into the run and send
        every full send's worth; the rest waits (:meth:`_flush_run` ends the wakeup)."""
        run = self._run
        if run.pending and seglen != run.seglen:
            self._send_run(run.start, run.used)
            run.start = run.used
        run.addr, run.seglen = addr, seglen
        run.used += nbytes
        run.closed = last_len != seglen
        if run.closed:
            self._flush_run()
            return
        pending = run.used - run.start
        if pending > seglen:  # one datagram never fills a send: nothing to check
            chunk = self._conn_for(addr).per_send(seglen) * seglen
            if pending >= chunk:
                self._send_run(run.start, run.start + pending - pending % chunk)
                run.start += pending - pending % chunk
                if run.start == run.used:
                    run.reset()

    def _flush_run(self) -> None:
        run = self._run
        pending = run.used - run.start
        if not pending:
            return
        if pending == run.seglen:  # one datagram, e.g. a lone packet: the common case at low load
            self._send(run.view[run.start : run.used], pending, run.addr)
        else:
            self._send_run(run.start, run.used)
        run.reset()

    def _send_run(self, start: int, end: int) -> None:
        """Send ``run.view[start:end]`` in as few calls as the connection allows."""
        run = self._run
        chunk = self._conn_for(run.addr).per_send(run.seglen) * run.seglen
        for at in range(start, end, chunk):
            self._send(run.view[at : min(end, at + chunk)], run.seglen, run.addr)

    def _send(self, data: memoryview, seglen: int, addr: Address) -> None:
        failed = self._conn_for(addr).send(data, seglen, addr)
        if failed:
            self.engine.drops[Drop.UDP_SEND_FAILED] += failed

    def _conn_for(self, addr: Address) -> UdpConn:
        """The socket of ``addr``'s family (the engine routes to an IPv6 address only with conn6)."""
        if self.conn6 is not None and ":" in addr[0]:
            return self.conn6
        return self.conn

    def _write_replies(self) -> None:
        for reply in self.engine.take_replies():
            self._tun_write(memoryview(reply))

    # --- UDP -> flannel0 ---------------------------------------------------------

    def _on_udp_handed(self, handed: tuple[int, int, str, int] | None) -> None:
        if handed is not None and self._lane_udp_view is not self._udp_view:
            self._udp_view[: handed[0]] = self._lane_udp_view[: handed[0]]
        self._on_udp(None, handed)

    def _on_udp(self, conn: UdpConn | None = None, handed: tuple[int, int, str, int] | None = None) -> None:
        """Drain a socket; ``handed``: a read the fast lane left in ``_udp_view``, with the
        first datagram it did not forward."""
        recv, view = (conn or self.conn).recv, self._udp_view
        now = self._now()
        count = 0
        got: tuple[int, int, str] | None
        for _ in range(self.batch):
            start = 0
            if handed is not None:
                nbytes, seglen, source, start = handed
                handed = None
            else:
                got = recv(view)
                if got is None:
                    break
                nbytes, seglen, source = got
            if not start and nbytes <= seglen and (not self._merged or not nbytes):
                count += 1
                self._ingress_one(0, nbytes, source, now)
            else:
                count += self._ingress_batch(nbytes, seglen, source, now, start)
        self._flush_merged()  # within the same wakeup: merging adds no delay
        self.udp_batches.record(count)

    def _ingress_one(self, offset: int, size: int, source: str, now: float) -> None:
        self._flush_merged()
        packet = self._udp_view[offset : offset + size]
        peer = self.engine.inbound(packet, size, source)
        if peer is not None:
            peer.last_rx = now
            self._tun_write(packet)

    def _ingress_batch(self, nbytes: int, seglen: int, source: str, now: float, start: int = 0) -> int:
        """A GRO read, as runs: each run of in-order segments of one TCP flow is checked by its
        first header and merged into one super-packet, which the next run of the same flow
        (in this read or the next) may extend, so a sender's 64 KB super-packet that crossed
        two GSO sends is written with one TUN write; a read that starts with no such run
        (ACKs, a UDP flood) is checked as a whole and written one by one; anything else, and
        any doubt, goes through the one-by-one checks, so drops count exactly. ``start``: the
        first datagram to take (the fast lane forwarded those before it). Returns how many
        datagrams it took."""
        segments = -(-nbytes // seglen)
        index = start
        while index < segments:
            offset = index * seglen
            rest = self._udp_view[offset:nbytes]
            hlen, run = tcp_flow_run(rest, segments - index, seglen, nbytes - offset)
            if run >= 2 or (run and self._merged):
                run_bytes = min(run * seglen, nbytes - offset)
                peer = self.engine.inbound_flow(rest, run, run_bytes, source)
                if peer is not None:
                    peer.last_rx = now
                    self._merge_run(rest, run, seglen, run_bytes, hlen)
                    index += run
                    continue
                if run >= 2:
                    for at in range(offset, offset + run_bytes, seglen):
                        self._ingress_one(at, min(seglen, nbytes - at), source, now)
                    index += run
                    continue
            if not run and not index and self._ingress_plain_batch(segments, nbytes, seglen, source, now):
                return segments
            self._ingress_one(offset, min(seglen, nbytes - offset), source, now)
            index += 1
        return segments - start

    def _merge_run(self, run_view: memoryview, run: int, seglen: int, run_bytes: int, hlen: int) -> None:
        """Extend the waiting super-packet with an accepted run, or write that one and start anew."""
        six = run_view[0] >> 4 == 6
        if self._merged:
            if self._merge_out[0] >> 4 == run_view[0] >> 4:  # a super-packet of the other family never grows
                extend = extend_tcp6 if six else extend_tcp4
                grown = extend(run_view, run, seglen, run_bytes, hlen, self._merge_out, self._merged)
                if grown:
                    self._merged = grown
                    return
            self._flush_merged()
        if run >= 2:
            merge = merge_tcp6 if six else merge_tcp4
            self._merged = merge(run_view, run, seglen, run_bytes, hlen, self._merge_out)
            self._merged_hlen, self._merged_mss = hlen, seglen - hlen
        else:
            self._tun_write(run_view[:run_bytes])

    def _flush_merged(self) -> None:
        if self._merged:
            try:
                self.tun.write_super(self._merge_view, self._merged, self._merged_hlen, self._merged_mss)
            except OSError:
                self.engine.drops[Drop.TUN_WRITE_FAILED] += 1
            self._merged = 0

    def _ingress_plain_batch(self, segments: int, nbytes: int, seglen: int, source: str, now: float) -> bool:
        batch = self._udp_view[:nbytes]
        peer = self.engine.inbound_batch(batch, segments, seglen, nbytes, source)
        if peer is None:
            return False
        self._flush_merged()
        peer.last_rx = now
        for offset in range(0, nbytes, seglen):
            self._tun_write(batch[offset : offset + seglen])
        return True

    def _tun_write(self, packet: memoryview) -> None:
        try:
            self.tun.write(packet)
        except OSError:
            self.engine.drops[Drop.TUN_WRITE_FAILED] += 1
