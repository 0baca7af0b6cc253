"""The udp backend's routing and checks, without I/O (sans-I/O core of the hot loop).

Stages, in the order packets meet them:

* outbound (flannel0 -> UDP): parse the destination, look up the peer by
  ``dst & subnet_mask`` (one dict probe, O(1) in the number of peers),
  decrement the TTL, or answer with ICMP net-unreachable / time-exceeded.
* inbound (UDP -> flannel0): the outer source must be a leased PublicIP, the
  inner packet a well-formed IPv4 packet from that peer's subnet to ours.

Every packet ends either forwarded (per-peer counters) or dropped (one drop
counter per reason), so counters account for all traffic. Peer changes are
plain method calls made between batches by the loop that owns the engine.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Network

from ...core.packet import (
    Drop,
    check_ipv4,
    decrement_ttl,
    icmp_net_unreachable,
    icmp_time_exceeded,
    may_answer_with_icmp,
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


class Engine:
    """Route table, checks and counters for one node's udp backend."""

    def __init__(self, network: IPv4Network, own_subnet: IPv4Network, port: int) -> None:
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

    # --- control plane -------------------------------------------------------

    def set_peer(self, subnet: IPv4Network, public_ip: str) -> Peer:
        """Add or update the peer that owns ``subnet``; counters survive an update."""
        key = int(subnet.network_address)
        old = self.peers.get(key)
        if old is not None:
            self._forget_ip(old.public_ip)
            old.public_ip = public_ip
            old.addr = (public_ip, self.port)
            peer = old
        else:
            peer = Peer(subnet, public_ip, (public_ip, self.port))
            self.peers[key] = peer
        self._public_ips[public_ip] = self._public_ips.get(public_ip, 0) + 1
        return peer

    def remove_peer(self, subnet: IPv4Network) -> Peer | None:
        peer = self.peers.pop(int(subnet.network_address), None)
        if peer is not None:
            self._forget_ip(peer.public_ip)
        return peer

    def _forget_ip(self, public_ip: str) -> None:
        left = self._public_ips.get(public_ip, 0) - 1
        if left > 0:
            self._public_ips[public_ip] = left
        else:
            self._public_ips.pop(public_ip, None)

    # --- data plane ----------------------------------------------------------

    def outbound(self, buf: bytearray | memoryview, n: int) -> Peer | None:
        """Route one packet read from flannel0; None if dropped or answered with ICMP."""
        if n < 20 or buf[0] >> 4 != 4:
            self.drops[Drop.TOO_SHORT if n < 20 else Drop.NOT_IPV4] += 1
            return None
        dst = _U32.unpack_from(buf, 16)[0]
        peer = self.peers.get(dst & self.subnet_mask)
        if peer is None:
            self.drops[Drop.NO_ROUTE] += 1
            if dst & self.net_mask == self.net and may_answer_with_icmp(buf, n):
                self.replies.append(icmp_net_unreachable(memoryview(buf)[:n], self.icmp_source))
            return None
        if not decrement_ttl(buf):
            self.drops[Drop.TTL_EXPIRED] += 1
            if may_answer_with_icmp(buf, n):
                self.replies.append(icmp_time_exceeded(memoryview(buf)[:n], self.icmp_source))
            return None
        peer.tx_packets += 1
        peer.tx_bytes += n
        return peer

    def inbound(self, buf: bytearray | memoryview, n: int, source_ip: str) -> Peer | None:
        """Check one datagram from ``source_ip``; the peer if it may enter flannel0."""
        if source_ip not in self._public_ips:
            self.drops[Drop.NOT_A_PEER] += 1
            return None
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
        """Accept ``count`` datagrams of one verified flow (see ``tcp_flow_header_len``),
        whose headers equal ``header`` but for lengths, ids and checksums, by checking
        the first. None, with no counter touched, sends the batch to the general path."""
        if source_ip not in self._public_ips:
            return None
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
