"""The udp backend's routing and checks, without I/O (sans-I/O core of the hot loop).

Stages, in the order packets meet them:

* outbound (flannel0 -> UDP): parse the destination, look up the peer by
  ``dst & subnet_mask`` (one dict probe, O(1) in the number of peers),
  decrement the TTL, or answer with ICMP net-unreachable / time-exceeded
  (rate-limited with the ICMPv6 errors below).
* inbound (UDP -> flannel0): the outer source must be a leased PublicIP, the
  inner packet a well-formed IPv4 packet from that peer's subnet to ours.

IPv6 pod packets take the same stages over the same port: routed by the
destination's IPv6 subnet to the peer's PublicIPv6 (over an IPv6 underlay) or
its PublicIP (IPv6 over an IPv4 underlay), hop limit decremented, ICMPv6
errors rate-limited (RFC 4443 2.4 f); inbound, the outer source must be a
leased PublicIP or PublicIPv6 and the inner packet come from that peer's IPv6
subnet to ours. A peer that publishes no IPv6 subnet (flannel's own udp
backend) is an IPv4 peer only.

Every packet ends either forwarded (per-peer counters) or dropped (one drop
counter per reason), so counters account for all traffic. Peer changes are
plain method calls made between batches by the loop that owns the engine.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from ...core.packet import (
    Drop,
    check_ipv4,
    check_ipv6,
    decrement_hop_limit,
    decrement_ttl,
    icmp6_no_route,
    icmp6_time_exceeded,
    icmp_net_unreachable,
    icmp_time_exceeded,
    is_link_scope6,
    may_answer_with_icmp,
    may_answer_with_icmp6,
)
from .offload import plain_ipv4_batch

__all__ = ["Engine", "Peer"]

_U32 = struct.Struct("!I")
_ADDRS = struct.Struct("!II")


@dataclass(slots=True, eq=False)
class Peer:
    """One remote node: its subnet, where to send, and its traffic counters."""

    subnet: IPv4Network
    public_ip: str
    addr: tuple[str, int]
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    last_tx: float = 0.0
    last_rx: float = 0.0
    subnet6: IPv6Network | None = None
    public_ipv6: str | None = None
    addr6: tuple[str, int] | None = None  # where its IPv6 pod traffic goes; None: it carries none


class IcmpBudget:
    """A token bucket for the ICMP and ICMPv6 errors the node sends (RFC 1812 4.3.2.8,
    RFC 4443 2.4 f): ``rate`` a second, bursts of ``burst``. One bucket serves both
    families, so no pod or peer can make the daemon send errors without bound."""

    def __init__(self, rate: float = 100.0, burst: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _peer_key(subnet: IPv4Network, subnet6: IPv6Network | None) -> int:
    """A peer's key in :attr:`Engine.peers`: its IPv4 subnet's address. An IPv6-only peer (flannel's
    zero IPv4 half, ``0.0.0.0/0``) is keyed by its IPv6 subnet, as a negative number, which no
    IPv4 lookup (a masked address, never negative) can hit."""
    if subnet.prefixlen or subnet6 is None:
        return int(subnet.network_address)
    return -1 - int(subnet6.network_address)


class Engine:
    """Route table, checks and counters for one node's udp backend."""

    def __init__(self, network: IPv4Network, own_subnet: IPv4Network, port: int,
                 network6: IPv6Network | None = None, own_subnet6: IPv6Network | None = None,
                 underlay6: bool = False, icmp_budget: IcmpBudget | None = None) -> None:
        self.network = network
        self.own_subnet = own_subnet
        self.port = port
        self.subnet_mask = int(own_subnet.netmask)
        self.own_net = int(own_subnet.network_address)
        self.net_mask = int(network.netmask)
        self.net = int(network.network_address)
        self.icmp_source = own_subnet.network_address.packed
        self.peers: dict[int, Peer] = {}
        self._public_ips: dict[str, int] = {}
        self.drops = [0] * len(Drop)
        self.replies: list[bytes] = []
        self.icmp_budget = icmp_budget or IcmpBudget()
        self.icmp_suppressed = 0  # ICMP / ICMPv6 errors not sent: the budget was spent
        # IPv6: None without an IPv6 subnet of ours, and then IPv6 packets find no route
        self.own_subnet6 = own_subnet6
        self.network6 = network6
        self.underlay6 = underlay6  # our socket reaches peers' PublicIPv6
        self.subnet6_mask = int(own_subnet6.netmask) if own_subnet6 is not None else 0
        self.own_net6 = int(own_subnet6.network_address) if own_subnet6 is not None else -1
        self.icmp6_source = own_subnet6.network_address.packed if own_subnet6 is not None else b""
        self.peers6: dict[int, Peer] = {}
        self.on_peers_changed: Callable[[], None] | None = None  # e.g. the fast lane's copy of the table

    # --- control plane -------------------------------------------------------

    def set_peer(self, subnet: IPv4Network, public_ip: str, subnet6: IPv6Network | None = None,
                 public_ipv6: str | None = None) -> Peer:
        """Add or update the peer that owns ``subnet`` (and ``subnet6``, if it has one);
        counters survive an update."""
        key = _peer_key(subnet, subnet6)
        old = self.peers.get(key)
        if old is not None:
            self._forget(old)
            old.public_ip = public_ip
            old.addr = (public_ip, self.port)
            peer = old
        else:
            peer = Peer(subnet, public_ip, (public_ip, self.port))
            self.peers[key] = peer
        peer.subnet6, peer.public_ipv6 = subnet6, public_ipv6
        peer.addr6 = self._ipv6_route(public_ip, public_ipv6) if subnet6 is not None else None
        if subnet6 is not None and peer.addr6 is not None:
            self.peers6[int(subnet6.network_address)] = peer
        for address in (public_ip, public_ipv6):
            if address is not None and address != "0.0.0.0":  # an IPv6-only peer's PublicIP sends nothing
                self._public_ips[address] = self._public_ips.get(address, 0) + 1
        self._changed()
        return peer

    def _changed(self) -> None:
        if self.on_peers_changed is not None:
            self.on_peers_changed()

    def forward_routes(self) -> list[tuple[int, Peer]]:
        """``(subnet key, peer)`` for each peer an IPv4 packet may be forwarded to over the IPv4
        underlay: the table a compiled copy of :meth:`outbound` and :meth:`inbound` works from
        (a peer that publishes no PublicIP, 0.0.0.0, stays with this engine)."""
        return [(key, peer) for key, peer in self.peers.items() if peer.public_ip != "0.0.0.0"]

    def _ipv6_route(self, public_ip: str, public_ipv6: str | None) -> tuple[str, int] | None:
        """Where a peer's IPv6 pod traffic goes: its PublicIPv6 over an IPv6 underlay, else its
        PublicIP (an IPv6-only peer publishes 0.0.0.0: then nothing reaches it)."""
        if self.underlay6 and public_ipv6 is not None:
            return (public_ipv6, self.port)
        if public_ip != "0.0.0.0":
            return (public_ip, self.port)
        return None

    def remove_peer(self, subnet: IPv4Network, subnet6: IPv6Network | None = None) -> Peer | None:
        """Forget the peer of a lease (``subnet6`` names an IPv6-only one)."""
        peer = self.peers.pop(_peer_key(subnet, subnet6), None)
        if peer is not None:
            self._forget(peer)
            self._changed()
        return peer

    def _forget(self, peer: Peer) -> None:
        self._forget_ip(peer.public_ip)
        if peer.public_ipv6 is not None:
            self._forget_ip(peer.public_ipv6)
        if peer.subnet6 is not None and self.peers6.get(int(peer.subnet6.network_address)) is peer:
            del self.peers6[int(peer.subnet6.network_address)]

    def _forget_ip(self, public_ip: str) -> None:
        left = self._public_ips.get(public_ip, 0) - 1
        if left > 0:
            self._public_ips[public_ip] = left
        else:
            self._public_ips.pop(public_ip, None)

    # --- data plane ----------------------------------------------------------

    def outbound(self, buf: bytearray | memoryview, n: int) -> Peer | None:
        """Route one packet read from flannel0; None if dropped or answered with ICMP.

        An IPv6 packet's peer is the same :class:`Peer`; its datagram goes to ``peer.addr6``."""
        if n < 20 or buf[0] >> 4 != 4:
            if n >= 40 and buf[0] >> 4 == 6:
                return self._outbound6(buf, n)
            self.drops[Drop.TOO_SHORT if n < 20 else Drop.NOT_IPV4] += 1
            return None
        dst = _U32.unpack_from(buf, 16)[0]
        peer = self.peers.get(dst & self.subnet_mask)
        if peer is None:
            self.drops[Drop.NO_ROUTE] += 1
            if dst & self.net_mask == self.net and may_answer_with_icmp(buf, n):
                self._answer(icmp_net_unreachable, buf, n, self.icmp_source)
            return None
        if not decrement_ttl(buf):
            self.drops[Drop.TTL_EXPIRED] += 1
            if may_answer_with_icmp(buf, n):
                self._answer(icmp_time_exceeded, buf, n, self.icmp_source)
            return None
        peer.tx_packets += 1
        peer.tx_bytes += n
        return peer

    def _outbound6(self, buf: bytearray | memoryview, n: int) -> Peer | None:
        if is_link_scope6(buf):
            self.drops[Drop.LINK_SCOPE] += 1
            return None
        dst = int.from_bytes(buf[24:40], "big")
        peer = self.peers6.get(dst & self.subnet6_mask)
        if peer is None:
            self.drops[Drop.NO_ROUTE] += 1
            if self.network6 is not None and dst >> (128 - self.network6.prefixlen) == int(
                    self.network6.network_address) >> (128 - self.network6.prefixlen):
                self._answer6(icmp6_no_route, buf, n)
            return None
        if not decrement_hop_limit(buf):
            self.drops[Drop.TTL_EXPIRED] += 1
            self._answer6(icmp6_time_exceeded, buf, n)
            return None
        peer.tx_packets += 1
        peer.tx_bytes += n
        return peer

    def _answer6(self, build: Callable[[memoryview, bytes], bytes], buf: bytearray | memoryview, n: int) -> None:
        if self.icmp6_source and may_answer_with_icmp6(buf, n):
            self._answer(build, buf, n, self.icmp6_source)

    def _answer(self, build: Callable[[memoryview, bytes], bytes], buf: bytearray | memoryview, n: int,
                source: bytes) -> None:
        """Queue the error ``build`` makes about ``buf[:n]``, if the shared budget allows."""
        if self.icmp_budget.take():
            self.replies.append(build(memoryview(buf)[:n], source))
        else:
            self.icmp_suppressed += 1

    def inbound(self, buf: bytearray | memoryview, n: int, source_ip: str) -> Peer | None:
        """Check one datagram from ``source_ip``; the peer if it may enter flannel0."""
        if source_ip not in self._public_ips:
            self.drops[Drop.NOT_A_PEER] += 1
            return None
        if n >= 1 and buf[0] >> 4 == 6:
            return self._inbound6(buf, n, source_ip)
        verdict = check_ipv4(buf, n)
        if verdict is not None:
            self.drops[verdict] += 1
            return None
        peer = self.peers.get(_U32.unpack_from(buf, 12)[0] & self.subnet_mask)
        if peer is None or peer.public_ip != source_ip:
            self.drops[Drop.SOURCE_NOT_IN_PEER_SUBNET] += 1
            return None
        if _U32.unpack_from(buf, 16)[0] & self.subnet_mask != self.own_net:
            self.drops[Drop.DESTINATION_NOT_LOCAL] += 1
            return None
        peer.rx_packets += 1
        peer.rx_bytes += n
        return peer

    def _inbound6(self, buf: bytearray | memoryview, n: int, source_ip: str) -> Peer | None:
        verdict = check_ipv6(buf, n)
        if verdict is not None:
            self.drops[verdict] += 1
            return None
        peer = self._source_peer6(buf, source_ip)
        if peer is None:
            self.drops[Drop.SOURCE_NOT_IN_PEER_SUBNET] += 1
            return None
        if not self._to_us6(buf):
            self.drops[Drop.DESTINATION_NOT_LOCAL] += 1
            return None
        peer.rx_packets += 1
        peer.rx_bytes += n
        return peer

    def _source_peer6(self, buf: bytearray | memoryview, source_ip: str) -> Peer | None:
        """The peer whose IPv6 subnet holds the inner source, if ``source_ip`` is one of its addresses."""
        peer = self.peers6.get(int.from_bytes(buf[8:24], "big") & self.subnet6_mask)
        if peer is None or (peer.public_ip != source_ip and peer.public_ipv6 != source_ip):
            return None
        return peer

    def _to_us6(self, buf: bytearray | memoryview) -> bool:
        """Whether the inner IPv6 destination is inside our IPv6 subnet."""
        return int.from_bytes(buf[24:40], "big") & self.subnet6_mask == self.own_net6

    def inbound_batch(self, batch: memoryview, count: int, seglen: int, total: int, source_ip: str) -> Peer | None:
        """Accept a whole GRO batch (``count`` datagrams of ``seglen``, the last shorter) at once.

        The batch equivalent of :meth:`inbound` for the common case, a
        burst of plain IPv4 packets from one peer's subnet to ours. Returns
        None without touching any counter when any datagram needs a closer
        look; the caller then runs :meth:`inbound` on each, so drops are
        counted exactly as on the one-by-one path.
        """
        if source_ip not in self._public_ips or seglen < 20 or total - (count - 1) * seglen < 20:
            return None
        first_src = _U32.unpack_from(batch, 12)[0]
        peer = self.peers.get(first_src & self.subnet_mask)
        if peer is None or peer.public_ip != source_ip:
            return None
        if not plain_ipv4_batch(batch, count, seglen, total, int(peer.subnet.network_address), self.own_net,
                                self.subnet_mask):
            return None
        peer.rx_packets += count
        peer.rx_bytes += total
        return peer

    def inbound_flow(self, header: memoryview, count: int, total: int, source_ip: str) -> Peer | None:
        """Accept ``count`` datagrams of one verified flow, IPv4 or IPv6 (see ``tcp_flow_run``),
        whose headers equal ``header`` but for lengths, ids and checksums, by checking
        the first with :meth:`inbound`'s rules. None, with no counter touched, sends the batch
        to the general path."""
        if source_ip not in self._public_ips:
            return None
        if header[0] >> 4 == 6:
            peer = self._source_peer6(header, source_ip)
            if peer is None or not self._to_us6(header):
                return None
        else:
            src, dst = _ADDRS.unpack_from(header, 12)
            peer = self.peers.get(src & self.subnet_mask)
            if peer is None or peer.public_ip != source_ip or dst & self.subnet_mask != self.own_net:
                return None
        peer.rx_packets += count
        peer.rx_bytes += total
        return peer

    def take_replies(self) -> list[bytes]:
        """ICMP errors produced since the last call, to be written into flannel0."""
        replies, self.replies = self.replies, []
        return replies
