"""The udp backend's sans-I/O engine: routing, TTL/ICMP and ingress checks, with counters."""

from ipaddress import IPv4Network

from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from flanneld_py.backend.udp.engine import Engine
from flanneld_py.core.packet import Drop

OWN = IPv4Network("10.244.7.0/24")


def engine():
    e = Engine(IPv4Network("10.244.0.0/16"), OWN, 8285)
    e.set_peer(IPv4Network("10.244.8.0/24"), "198.51.100.8")
    e.set_peer(IPv4Network("10.244.9.0/24"), "198.51.100.9")
    return e


def pkt(src, dst, ttl=64, payload=b"hello"):
    return bytearray(bytes(IP(src=src, dst=dst, ttl=ttl) / UDP(sport=1, dport=2) / Raw(payload)))


def test_outbound_routes_by_subnet_and_decrements_ttl():
    e = engine()
    buf = pkt("10.244.7.5", "10.244.9.77")
    peer = e.outbound(buf, len(buf))
    assert peer is not None and peer.addr == ("198.51.100.9", 8285)
    assert IP(bytes(buf)).ttl == 63
    assert peer.tx_packets == 1 and peer.tx_bytes == len(buf)


def test_outbound_miss_inside_network_answers_net_unreachable():
    e = engine()
    buf = pkt("10.244.7.5", "10.244.200.1")
    assert e.outbound(buf, len(buf)) is None
    (reply,) = e.take_replies()
    parsed = IP(reply)
    assert parsed.dst == "10.244.7.5" and parsed[ICMP].type == 3 and parsed[ICMP].code == 0
    assert e.drops[Drop.NO_ROUTE] == 1
    outside = pkt("10.244.7.5", "192.0.2.10")
    assert e.outbound(outside, len(outside)) is None and e.take_replies() == []


def test_outbound_ttl_expiry_answers_time_exceeded():
    e = engine()
    buf = pkt("10.244.7.5", "10.244.8.1", ttl=1)
    assert e.outbound(buf, len(buf)) is None
    (reply,) = e.take_replies()
    assert IP(reply)[ICMP].type == 11
    assert e.drops[Drop.TTL_EXPIRED] == 1


def test_no_icmp_about_icmp_errors():
    e = engine()
    err = bytearray(bytes(IP(src="10.244.7.5", dst="10.244.200.1") / ICMP(type=3) / Raw(b"x" * 28)))
    assert e.outbound(err, len(err)) is None
    assert e.take_replies() == []


def test_inbound_accepts_only_peer_traffic_for_us():
    e = engine()
    good = pkt("10.244.8.3", "10.244.7.5")
    assert e.inbound(good, len(good), "198.51.100.8") is not None
    cases = [
        (pkt("10.244.8.3", "10.244.7.5"), "198.51.100.66", Drop.NOT_A_PEER),
        (pkt("10.244.9.3", "10.244.7.5"), "198.51.100.8", Drop.SOURCE_NOT_IN_PEER_SUBNET),
        (pkt("10.244.55.3", "10.244.7.5"), "198.51.100.8", Drop.SOURCE_NOT_IN_PEER_SUBNET),
        (pkt("10.244.8.3", "10.244.9.5"), "198.51.100.8", Drop.DESTINATION_NOT_LOCAL),
        (bytearray(b"\x50" + bytes(39)), "198.51.100.8", Drop.NOT_IPV4),
        (bytearray(b"\x60" + bytes(39)), "198.51.100.8", Drop.BAD_IPV6_HEADER),
        (bytearray(b"\x45\x00"), "198.51.100.8", Drop.TOO_SHORT),
    ]
    for buf, source, reason in cases:
        assert e.inbound(buf, len(buf), source) is None, reason
        assert e.drops[reason] >= 1, reason
    assert sum(e.drops) == len(cases)


def test_peer_updates_and_removal():
    e = engine()
    e.set_peer(IPv4Network("10.244.8.0/24"), "198.51.100.88")
    buf = pkt("10.244.8.3", "10.244.7.5")
    assert e.inbound(buf, len(buf), "198.51.100.8") is None  # old address forgotten
    assert e.inbound(buf, len(buf), "198.51.100.88") is not None
    e.remove_peer(IPv4Network("10.244.8.0/24"))
    assert e.inbound(buf, len(buf), "198.51.100.88") is None
    out = pkt("10.244.7.5", "10.244.8.1")
    assert e.outbound(out, len(out)) is None


# --- IPv6 pod traffic ----------------------------------------------------------------------------

from ipaddress import IPv6Network  # noqa: E402

from scapy.layers.inet6 import (  # noqa: E402
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_RS,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
)

from flanneld_py.backend.udp.engine import IcmpBudget  # noqa: E402

OWN6 = IPv6Network("fd00:10:244:7::/64")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine6(underlay6=False, clock=None):
    budget = IcmpBudget(rate=10, burst=3, clock=clock or Clock())
    e = Engine(IPv4Network("10.244.0.0/16"), OWN, 8285, IPv6Network("fd00:10:244::/48"), OWN6, underlay6, budget)
    e.set_peer(IPv4Network("10.244.8.0/24"), "198.51.100.8", IPv6Network("fd00:10:244:8::/64"), "2001:db8::8")
    e.set_peer(IPv4Network("10.244.9.0/24"), "198.51.100.9")  # flannel's own udp backend: IPv4 only
    return e


def pkt6(src, dst, hlim=64, payload=b"hello"):
    return bytearray(bytes(IPv6(src=src, dst=dst, hlim=hlim) / UDP(sport=1, dport=2) / Raw(payload)))


def test_ipv6_outbound_routes_by_ipv6_subnet_over_either_underlay():
    for underlay6, addr in ((False, ("198.51.100.8", 8285)), (True, ("2001:db8::8", 8285))):
        e = engine6(underlay6)
        buf = pkt6("fd00:10:244:7::5", "fd00:10:244:8::77")
        peer = e.outbound(buf, len(buf))
        assert peer is not None and peer.addr6 == addr and peer.addr == ("198.51.100.8", 8285)
        assert IPv6(bytes(buf)).hlim == 63 and peer.tx_packets == 1
        v4 = pkt("10.244.7.5", "10.244.8.1")
        assert e.outbound(v4, len(v4)) is peer  # one peer, both families


def _icmp6_reply(e):
    (reply,) = e.take_replies()
    parsed = IPv6(reply)
    assert parsed.src == "fd00:10:244:7::" and parsed.nh == 58 and parsed.plen == len(reply) - 40
    # scapy recomputes the checksum over the pseudo-header: it must equal what we sent
    sent = parsed.payload.cksum
    del parsed.payload.cksum
    assert IPv6(bytes(parsed)).payload.cksum == sent
    return parsed


def test_ipv6_miss_inside_the_network_answers_no_route_quoting_the_packet():
    e = engine6()
    buf = pkt6("fd00:10:244:7::5", "fd00:10:244:9::1")  # the IPv4-only peer has no IPv6 subnet
    original = bytes(buf)
    assert e.outbound(buf, len(buf)) is None
    parsed = _icmp6_reply(e)
    assert parsed.dst == "fd00:10:244:7::5"
    assert parsed.haslayer(ICMPv6DestUnreach) and parsed[ICMPv6DestUnreach].code == 0
    assert bytes(parsed[ICMPv6DestUnreach].payload) == original
    assert e.drops[Drop.NO_ROUTE] == 1
    outside = pkt6("fd00:10:244:7::5", "fd00:99::1")
    assert e.outbound(outside, len(outside)) is None and e.take_replies() == []


def test_ipv6_hop_limit_expiry_answers_time_exceeded_within_the_minimum_mtu():
    e = engine6()
    big = pkt6("fd00:10:244:7::5", "fd00:10:244:8::1", hlim=1, payload=b"z" * 1400)
    assert e.outbound(big, len(big)) is None
    parsed = _icmp6_reply(e)
    assert parsed.haslayer(ICMPv6TimeExceeded) and parsed[ICMPv6TimeExceeded].code == 0
    assert len(bytes(parsed)) == 1280
    assert bytes(parsed)[48:] == bytes(big[:1280 - 48])  # the invoking packet, truncated
    assert e.drops[Drop.TTL_EXPIRED] == 1


def test_ipv6_errors_are_rate_limited_and_never_about_errors_or_multicast():
    clock = Clock()
    e = engine6(clock=clock)
    for _ in range(5):
        buf = pkt6("fd00:10:244:7::5", "fd00:10:244:200::1")
        e.outbound(buf, len(buf))
    assert len(e.take_replies()) == 3  # the burst
    clock.now += 0.1  # one token at 10/s
    buf = pkt6("fd00:10:244:7::5", "fd00:10:244:200::1")
    e.outbound(buf, len(buf))
    assert len(e.take_replies()) == 1
    clock.now += 10
    err = bytearray(bytes(IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:200::1") / ICMPv6DestUnreach()
                          / Raw(b"x" * 48)))
    frag = bytearray(bytes(IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:200::1") / IPv6ExtHdrFragment()
                           / ICMPv6TimeExceeded() / Raw(b"x" * 48)))
    echo = bytearray(bytes(IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:200::1") / ICMPv6EchoRequest()))
    for buf in (err, frag):
        assert e.outbound(buf, len(buf)) is None
    assert e.take_replies() == []
    assert e.outbound(echo, len(echo)) is None and len(e.take_replies()) == 1


def test_flannel0_link_scope_ipv6_is_counted_apart_and_never_answered():
    e = engine6()
    rs = bytearray(bytes(IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS()))
    mld = bytearray(bytes(IPv6(src="::", dst="ff02::16", hlim=1) / Raw(b"\x8f" + bytes(7))))
    for buf in (rs, mld):
        assert e.outbound(buf, len(buf)) is None
    assert e.drops[Drop.LINK_SCOPE] == 2 and sum(e.drops) == 2 and e.take_replies() == []


def test_ipv6_inbound_accepts_only_peer_traffic_for_us():
    e = engine6()
    good = pkt6("fd00:10:244:8::3", "fd00:10:244:7::5")
    for outer in ("198.51.100.8", "2001:db8::8"):  # PublicIP or PublicIPv6 of the lease
        assert e.inbound(good, len(good), outer) is not None
    short = pkt6("fd00:10:244:8::3", "fd00:10:244:7::5")
    cases = [
        (pkt6("fd00:10:244:8::3", "fd00:10:244:7::5"), "2001:db8::66", Drop.NOT_A_PEER),
        (pkt6("fd00:10:244:8::3", "fd00:10:244:7::5"), "198.51.100.9", Drop.SOURCE_NOT_IN_PEER_SUBNET),
        (pkt6("fd00:10:244:9::3", "fd00:10:244:7::5"), "198.51.100.9", Drop.SOURCE_NOT_IN_PEER_SUBNET),
        (pkt6("fd00:10:244:55::3", "fd00:10:244:7::5"), "198.51.100.8", Drop.SOURCE_NOT_IN_PEER_SUBNET),
        (pkt6("fd00:10:244:8::3", "fd00:10:244:9::5"), "198.51.100.8", Drop.DESTINATION_NOT_LOCAL),
        (pkt6("::", "fd00:10:244:7::5"), "198.51.100.8", Drop.BAD_IPV6_HEADER),
        (pkt6("ff02::1", "fd00:10:244:7::5"), "198.51.100.8", Drop.BAD_IPV6_HEADER),
        (short[:-1], "198.51.100.8", Drop.BAD_TOTAL_LENGTH),
        (short[:30], "198.51.100.8", Drop.TOO_SHORT),
    ]
    for buf, source, reason in cases:
        assert e.inbound(buf, len(buf), source) is None, reason
        assert e.drops[reason] >= 1, reason
    assert sum(e.drops) == len(cases)


def test_ipv6_subnet_follows_peer_updates_and_removal():
    e = engine6()
    e.set_peer(IPv4Network("10.244.8.0/24"), "198.51.100.18", IPv6Network("fd00:10:244:18::/64"), "2001:db8::18")
    assert set(e.peers6) == {int(IPv6Network("fd00:10:244:18::/64").network_address)}
    stale = pkt6("fd00:10:244:8::3", "fd00:10:244:7::5")
    assert e.inbound(stale, len(stale), "2001:db8::8") is None and e.drops[Drop.NOT_A_PEER] == 1
    e.remove_peer(IPv4Network("10.244.8.0/24"))
    assert e.peers6 == {}
    fresh = pkt6("fd00:10:244:18::3", "fd00:10:244:7::5")
    assert e.inbound(fresh, len(fresh), "2001:db8::18") is None


def test_without_an_ipv6_subnet_of_ours_ipv6_finds_no_route_and_no_answer():
    e = engine()
    buf = pkt6("fd00:10:244:7::5", "fd00:10:244:8::1")
    assert e.outbound(buf, len(buf)) is None and e.take_replies() == [] and e.drops[Drop.NO_ROUTE] == 1


ZERO = IPv4Network("0.0.0.0/0")  # flannel's IPv4 half of an IPv6-only lease


def engine_ipv6_only():
    """An IPv6-only network's engine: every lease's IPv4 half is 0.0.0.0/0, PublicIP 0.0.0.0."""
    e = Engine(IPv4Network("10.244.0.0/16"), ZERO, 8285, IPv6Network("fd00:10:244::/48"), OWN6, True,
               IcmpBudget(rate=10, burst=3, clock=Clock()))
    for n in (8, 9):
        e.set_peer(ZERO, "0.0.0.0", IPv6Network(f"fd00:10:244:{n}::/64"), f"2001:db8::{n}")
    return e


def test_ipv6_only_peers_are_apart_and_no_ipv4_finds_them():
    e = engine_ipv6_only()
    assert len(e.peers) == 2 and len(e.peers6) == 2
    for n in (8, 9):
        buf = pkt6("fd00:10:244:7::5", f"fd00:10:244:{n}::77")
        peer = e.outbound(buf, len(buf))
        assert peer is not None and peer.addr6 == (f"2001:db8::{n}", 8285)
        inbound = pkt6(f"fd00:10:244:{n}::3", "fd00:10:244:7::5")
        assert e.inbound(inbound, len(inbound), f"2001:db8::{n}") is peer
    v4 = pkt("10.244.7.5", "10.244.8.1")
    assert e.outbound(v4, len(v4)) is None and e.drops[Drop.NO_ROUTE] == 1
    for source in ("0.0.0.0", "198.51.100.8"):  # PublicIP 0.0.0.0 is no peer's address
        v4_in = pkt("10.244.8.1", "10.244.7.5")
        assert e.inbound(v4_in, len(v4_in), source) is None
    assert e.drops[Drop.NOT_A_PEER] == 2


def test_ipv6_only_peer_removal_forgets_that_peer_only():
    e = engine_ipv6_only()
    gone = e.remove_peer(ZERO, IPv6Network("fd00:10:244:8::/64"))
    assert gone is not None and gone.public_ipv6 == "2001:db8::8"
    assert [p.public_ipv6 for p in e.peers.values()] == ["2001:db8::9"]
    stale = pkt6("fd00:10:244:8::3", "fd00:10:244:7::5")
    assert e.inbound(stale, len(stale), "2001:db8::8") is None and e.drops[Drop.NOT_A_PEER] == 1
# --- the shared ICMP error budget ----------------------------------------------------------------


def send_out(e, make, times=1):
    """``times`` fresh packets from ``make()`` through ``e.outbound``."""
    for _ in range(times):
        buf = make()
        assert e.outbound(buf, len(buf)) is None


def no_route4():
    return pkt("10.244.7.5", "10.244.200.1")


def expired4():
    return pkt("10.244.7.5", "10.244.8.1", ttl=1)


def no_route6():
    return pkt6("fd00:10:244:7::5", "fd00:10:244:200::1")


def test_ipv4_errors_are_rate_limited_and_the_rest_counted():
    clock = Clock()
    e = engine6(clock=clock)  # a budget of 10 a second, bursts of 3
    send_out(e, no_route4, 4)
    send_out(e, expired4, 2)
    assert [IP(r)[ICMP].type for r in e.take_replies()] == [3, 3, 3]  # the burst
    assert e.icmp_suppressed == 3
    assert e.drops[Drop.NO_ROUTE] == 4 and e.drops[Drop.TTL_EXPIRED] == 2  # every packet counted as before
    clock.now += 0.1  # one token at 10/s
    send_out(e, expired4, 2)
    assert [IP(r)[ICMP].type for r in e.take_replies()] == [11]
    assert e.icmp_suppressed == 4


def test_one_budget_for_icmp_and_icmpv6():
    clock = Clock()
    e = engine6(clock=clock)
    send_out(e, no_route4, 3)
    send_out(e, no_route6)
    assert len(e.take_replies()) == 3 and e.icmp_suppressed == 1  # IPv4 spent the burst IPv6 would have used
    clock.now += 0.1
    send_out(e, no_route6)
    send_out(e, no_route4)
    assert [r[0] >> 4 for r in e.take_replies()] == [6] and e.icmp_suppressed == 2


def test_packets_not_answered_spend_no_budget():
    e = engine6(clock=Clock())
    send_out(e, lambda: bytearray(bytes(IP(src="10.244.7.5", dst="10.244.200.1") / ICMP(type=3) / Raw(b"x" * 28))), 5)
    send_out(e, lambda: pkt("10.244.7.5", "192.0.2.10"), 5)
    assert e.take_replies() == [] and e.icmp_suppressed == 0
    assert e.icmp_budget.take()  # the burst is still whole
