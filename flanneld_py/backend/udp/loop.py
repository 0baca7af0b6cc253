"""The udp backend's hot loop: the asyncio adapter around :class:`Engine`.

Two reader callbacks on the event loop, one per direction. Each wakeup drains
at most ``batch`` packets into preallocated buffers (a bounded drain keeps
timers and the control plane responsive), hands each to the engine, and
sends or writes the survivors. Nothing is allocated per packet beyond the
memoryview slice handed to the syscall. Peer changes run as ordinary
callbacks on the same loop, so they land between batches.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from ...core.packet import Drop
from .engine import Engine
from .tun import TunDevice
from .udpconn import UdpConn

__all__ = ["BatchStats", "Pump"]

MAX_PACKET = 65536


@dataclass
class BatchStats:
    """How many packets each wakeup handled: a histogram by power-of-two bucket."""

    buckets: list[int] = field(default_factory=lambda: [0] * 8)
    wakeups: int = 0

    def record(self, count: int) -> None:
        self.wakeups += 1
        self.buckets[min(count.bit_length(), 7)] += 1


class Pump:
    """Moves packets between flannel0 and the UDP socket for one :class:`Engine`."""

    def __init__(self, engine: Engine, tun: TunDevice, conn: UdpConn, batch: int = 64) -> None:
        self.engine = engine
        self.tun = tun
        self.conn = conn
        self.batch = batch
        self._tun_bufs = [bytearray(MAX_PACKET) for _ in range(batch)]
        self._tun_views = [memoryview(b) for b in self._tun_bufs]
        self._tun_sizes = [0] * batch
        self._udp_buf = bytearray(MAX_PACKET)
        self._udp_view = memoryview(self._udp_buf)
        self.tun_batches = BatchStats()
        self.udp_batches = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.tun.fd, self._on_tun_readable)
        self._loop.add_reader(self.conn.fileno(), self._on_udp_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.tun.fd)
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None

    # --- flannel0 -> UDP -------------------------------------------------------

    def _on_tun_readable(self) -> None:
        count = self.tun.read_batch(self._tun_bufs, self._tun_sizes)
        self.tun_batches.record(count)
        if not count:
            return
        engine = self.engine
        sendto = self.conn.sock.sendto
        now = self._loop.time() if self._loop else 0.0
        views, sizes = self._tun_views, self._tun_sizes
        for index in range(count):
            view, size = views[index], sizes[index]
            peer = engine.outbound(view, size)
            if peer is None:
                continue
            peer.last_tx = now
            try:
                sendto(view[:size], peer.addr)
            except (BlockingIOError, OSError):
                engine.drops[Drop.UDP_SEND_FAILED] += 1
        if engine.replies:
            self._write_replies()

    def _write_replies(self) -> None:
        for reply in self.engine.take_replies():
            try:
                self.tun.write(reply)
            except OSError:
                self.engine.drops[Drop.TUN_WRITE_FAILED] += 1

    # --- UDP -> flannel0 -------------------------------------------------------

    def _on_udp_readable(self) -> None:
        engine = self.engine
        recvfrom_into = self.conn.sock.recvfrom_into
        fd = self.tun.fd
        write = os.write
        buf, view = self._udp_buf, self._udp_view
        now = self._loop.time() if self._loop else 0.0
        count = 0
        for count in range(1, self.batch + 1):
            try:
                size, (source, _port) = recvfrom_into(buf)
            except BlockingIOError:
                count -= 1
                break
            except OSError:
                # e.g. a queued ICMP port-unreachable (ECONNREFUSED) for an earlier send
                continue
            peer = engine.inbound(buf, size, source)
            if peer is None:
                continue
            peer.last_rx = now
            try:
                write(fd, view[:size])
            except OSError:
                engine.drops[Drop.TUN_WRITE_FAILED] += 1
        self.udp_batches.record(count)
