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
