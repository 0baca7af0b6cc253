"""The fast lane: plain forwards move in a C thread, not through Python.

At low load a packet is alone in its wakeup, and waking the interpreter for it
costs more than the relay's system calls; in a bulk transfer each super-packet
and each ACK cost the interpreter more than the C stages that do the work (see
bench/results/hotloop.md). The compiled lane (``_lane``) owns flannel0 and the
IPv4 socket while it sees only plain forwards under a copy of the engine's IPv4
table: lone packets and, with TUN offloads on (the bulk path), also what the
loop's offload stages do for TCP over IPv4: checksums to complete, super-packets
split and sent with UDP GSO, GRO reads merged by flow, with the same C stages
(``offload_stages.h``). The first frame that is anything else (IPv6, a packet to
drop or answer with ICMP, an offload the lane does not take) is handed, unread
by anyone else, to the Python loop with the descriptor (for a GRO read, from its
first datagram the lane did not forward). The loop keeps the descriptor while
traffic keeps coming and gives it back after ``HOLD`` seconds without a wakeup.
The engine and the loop stay the one place of the rules; the lane's copy is
held to them by the differential tests.

``FLANNELD_PY_FAST_LANE``: ``auto`` (default: on where built), ``off``, ``on``
(fail if not built), or ``lone`` (lone packets only: the bulk path stays with the
Python loop).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from ...core.packet import Drop
from .engine import Engine, Peer

log = logging.getLogger(__name__)

__all__ = ["HOLD", "BulkPath", "FastLane", "bulk_path_on", "load"]

VARIABLE = "FLANNELD_PY_FAST_LANE"
HOLD = 0.005  # seconds without a wakeup before the loop gives a descriptor back to the lane
TUN, UDP = 0, 1


def _choice(choice: str | None) -> str:
    choice = (choice if choice is not None else os.environ.get(VARIABLE, "")).strip().lower() or "auto"
    if choice not in ("auto", "on", "off", "lone"):
        raise ValueError(f"{VARIABLE}={choice!r}: choose auto, on, off or lone")
    return choice


def bulk_path_on(choice: str | None = None) -> bool:
    """Whether the lane also takes the bulk path (all but ``lone``)."""
    return _choice(choice) != "lone"


def load(choice: str | None = None) -> ModuleType | None:
    """The compiled lane, or None (off, or not built under ``auto``/``lone``).

    Raises:
        ValueError: an unknown choice, or ``on`` and the lane was not built.
    """
    choice = _choice(choice)
    if choice == "off":
        return None
    try:
        return importlib.import_module("._lane", __package__)
    except ImportError:
        if choice == "on":
            raise ValueError(f"{VARIABLE}=on but the fast lane was not built: install gcc and the Python "
                             "headers, then reinstall flanneld-py") from None
        return None


class Batches(Protocol):
    """What the lane adds to: a :class:`~.loop.BatchStats`."""

    buckets: list[int]
    wakeups: int


@dataclass(frozen=True)
class BulkPath:
    """What the lane needs for the bulk path: the loop's own send-run and merge buffers
    (free while the lane holds the descriptor that fills them), the socket's UDP GSO
    limits (``gso_segments`` 0: no GSO) and the largest split the loop always takes."""

    send_buffer: Any
    merge_buffer: Any
    gso_segments: int
    gso_bytes: int
    segment_room: int


class FastLane:
    """The lane's thread and the loop, taking turns on flannel0 and the IPv4 socket.

    ``handlers``: the loop's flannel0 handler, run on a handed frame's size (-1:
    none read), and its socket handler, run on a handed read (``(size, segment
    size, source, first datagram left to the loop)``); ``readers``: the handlers
    the loop polls a descriptor with while it holds it. Pairs are (flannel0, IPv4
    socket) throughout. ``bulk``: None for lone packets only.
    """

    def __init__(self, module: ModuleType, engine: Engine, fds: tuple[int, int], buffers: tuple[bytearray, Any],
                 vnet: bool, gro: bool, handlers: tuple[Callable[[int], None], Callable[[Any], None]],
                 readers: tuple[Callable[[], None], Callable[[], None]], stats: tuple[Batches, Batches],
                 bulk: BulkPath | None = None) -> None:
        self.engine = engine
        extra = {} if bulk is None else {
            "send_buffer": bulk.send_buffer, "merge_buffer": bulk.merge_buffer, "gso_segments": bulk.gso_segments,
            "gso_bytes": bulk.gso_bytes, "segment_room": bulk.segment_room}
        self._lane = module.Lane(fds[TUN], fds[UDP], buffers[TUN], buffers[UDP], vnet, gro,
                                 engine.subnet_mask, engine.own_net, **extra)
        self._fds = fds
        self._handlers = handlers
        self._readers = readers
        self._stats = stats
        self._held = [False, False]
        self._seen = [0, 0]
        self._peers: list[Peer] = []
        self._timer: asyncio.TimerHandle | None = None
        self._push_due = False
        self._failed = False  # the thread stopped on an error (see _take_over)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.push_peers()
        self.engine.on_peers_changed = self._peers_changed
        loop.add_reader(self._lane.fileno(), self._on_handover)
        self._lane.start()

    def stop(self) -> None:
        """Join the thread (the descriptors stay open: their owners close them)."""
        self.engine.on_peers_changed = None
        if self._loop is not None:
            self._loop.remove_reader(self._lane.fileno())
            for direction in (TUN, UDP):
                if self._held[direction]:
                    self._loop.remove_reader(self._fds[direction])
                    self._held[direction] = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loop = None
        self._lane.close()  # the thread has stopped counting when this returns
        self.sync_counters()

    # --- the peer table --------------------------------------------------------------

    def _peers_changed(self) -> None:
        """A batch of lease events lands as one push, before the loop's next callbacks."""
        if not self._push_due and self._loop is not None:
            self._push_due = True
            self._loop.call_soon(self.push_peers)

    def push_peers(self) -> None:
        self._push_due = False
        routes = self.engine.forward_routes()
        old = self._lane.set_peers([(key, peer.public_ip, self.engine.port) for key, peer in routes])
        self._fold_peers(old)
        self._peers = [peer for _key, peer in routes]

    # --- counters --------------------------------------------------------------------

    def sync_counters(self) -> None:
        """Fold what the thread counted since the last call into the engine's and the loop's counters."""
        rows, send_failed, write_failed, *buckets = self._lane.take_counts()
        self._fold_peers(rows)
        self.engine.drops[Drop.UDP_SEND_FAILED] += send_failed
        self.engine.drops[Drop.TUN_WRITE_FAILED] += write_failed
        for stats, counted in zip(self._stats, buckets):
            stats.wakeups += sum(counted)
            for bucket, count in enumerate(counted):
                stats.buckets[bucket] += count

    def _fold_peers(self, rows: list[tuple[int, int, int, int, int, float, float]]) -> None:
        for index, tx_packets, tx_bytes, rx_packets, rx_bytes, last_tx, last_rx in rows:
            peer = self._peers[index]
            peer.tx_packets += tx_packets
            peer.tx_bytes += tx_bytes
            peer.rx_packets += rx_packets
            peer.rx_bytes += rx_bytes
            peer.last_tx = max(peer.last_tx, last_tx)
            peer.last_rx = max(peer.last_rx, last_rx)

    # --- taking turns ----------------------------------------------------------------

    def _on_handover(self) -> None:
        tun, udp = self._lane.take()
        for direction, handed in ((TUN, tun), (UDP, udp)):
            if handed is not None:
                self._hold(direction)  # first: a handler that raises must not leave the descriptor unread
                self._handlers[direction](handed)
        failure = self._lane.failure()
        if failure and not self._failed:
            self._take_over(failure)

    def _take_over(self, failure: int) -> None:
        """The thread stopped on an error: the loop reads both descriptors from now on."""
        assert self._loop is not None
        log.error("udp fast lane stopped (epoll_wait: %s); flannel0 and the socket stay with the Python loop",
                  os.strerror(failure))
        self._failed = True
        self._loop.remove_reader(self._lane.fileno())
        for direction in (TUN, UDP):
            self._hold(direction)

    def _hold(self, direction: int) -> None:
        assert self._loop is not None
        if not self._held[direction]:
            self._held[direction] = True
            self._loop.add_reader(self._fds[direction], self._readers[direction])
        self._seen[direction] = self._stats[direction].wakeups + 1  # the handed read's own wakeup
        if self._timer is None:
            self._timer = self._loop.call_later(HOLD, self._release_idle)

    def _release_idle(self) -> None:
        """Give back each descriptor that had no wakeup for ``HOLD`` seconds."""
        assert self._loop is not None
        self._timer = None
        if self._failed:
            return
        for direction in (TUN, UDP):
            if not self._held[direction]:
                continue
            wakeups = self._stats[direction].wakeups
            if wakeups != self._seen[direction]:
                self._seen[direction] = wakeups
                continue
            self._loop.remove_reader(self._fds[direction])
            self._held[direction] = False
            self._lane.resume(direction)
        if any(self._held):
            self._timer = self._loop.call_later(HOLD, self._release_idle)
