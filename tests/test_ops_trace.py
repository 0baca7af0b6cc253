"""trace's verdicts come from the daemon's own Engine; the line format shows both headers."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from flanneld_py.ops.trace import Judge, Topology, describe

A, B = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
TOPO = Topology(IPv4Network("10.244.0.0/16"), ((A, "198.51.100.1"), (B, "198.51.100.2")), "test")


def inner(src: str, dst: str, **kw) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=63, **kw) / ICMP() / Raw(b"x" * 8))


@pytest.mark.parametrize("outer_src, outer_dst, payload, verdict", [
    ("198.51.100.1", "198.51.100.2", inner("10.244.1.5", "10.244.2.9"), "deliver into 10.244.2.0/24"),
    ("198.51.100.2", "198.51.100.1", inner("10.244.2.9", "10.244.1.5"), "deliver into 10.244.1.0/24"),
    ("198.51.100.77", "198.51.100.2", inner("10.244.1.5", "10.244.2.9"), "drop: not_a_peer"),
    ("198.51.100.1", "198.51.100.2", inner("10.244.3.5", "10.244.2.9"), "drop: source_not_in_peer_subnet"),
    ("198.51.100.1", "198.51.100.2", inner("10.244.1.5", "10.244.1.9"), "drop: destination_not_local"),
    ("198.51.100.1", "198.51.100.2", inner("10.244.1.5", "10.244.2.9", chksum=1), "drop: bad_checksum"),
    ("198.51.100.1", "198.51.100.2", b"\x50" + bytes(39), "drop: not_ipv4"),
    ("198.51.100.1", "198.51.100.2", b"\x60" + bytes(39), "drop: bad_ipv6_header"),
    ("198.51.100.1", "198.51.100.99", inner("10.244.1.5", "10.244.2.9"),
     "not for a flannel node: 198.51.100.99 holds no lease"),
])
def test_verdicts(outer_src, outer_dst, payload, verdict):
    assert Judge(TOPO).verdict(outer_src, outer_dst, payload) == verdict


def test_without_leases_only_the_packet_checks():
    judge = Judge(None)
    assert judge.verdict("1.2.3.4", "5.6.7.8", inner("10.244.1.5", "10.244.2.9")) == "well-formed (leases unknown)"
    assert judge.verdict("1.2.3.4", "5.6.7.8", b"\x45" + bytes(5)) == "drop: too_short"


def test_describe_icmp():
    line = describe("198.51.100.1", 8285, "198.51.100.2", 8285, inner("10.244.1.5", "10.244.2.9"), Judge(TOPO))
    assert line == ("198.51.100.1:8285 > 198.51.100.2:8285 | 10.244.1.5 > 10.244.2.9 icmp echo-request len=36 ttl=63"
                    " | peer 10.244.1.0/24 > 10.244.2.0/24 | deliver into 10.244.2.0/24")


def test_describe_tcp_and_garbage():
    tcp = bytes(IP(src="10.244.2.9", dst="10.244.1.5") / TCP(sport=80, dport=40000, flags="SA"))
    line = describe("198.51.100.2", 8285, "198.51.100.1", 8285, tcp, Judge(None))
    assert "| 10.244.2.9 > 10.244.1.5 tcp 80 > 40000 [SA] len=40 ttl=64 | peer ? > ? |" in line
    assert "| not IPv4 (3 bytes) |" in describe("1.1.1.1", 1, "2.2.2.2", 2, b"abc", Judge(None))
