"""The pure packet functions, checked against scapy's own parsing."""

from ipaddress import IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.packet import Raw

from flanneld_py.core.packet import (
    Drop,
    check_ipv4,
    decrement_ttl,
    icmp_net_unreachable,
    icmp_time_exceeded,
    may_answer_with_icmp,
)

SRC = IPv4Network("10.244.7.0/24").network_address.packed


def raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def test_check_accepts_good_packets():
    buf = raw(IP(src="10.244.1.5", dst="10.244.7.9") / TCP() / Raw(b"x" * 100))
    assert check_ipv4(buf, len(buf)) is None
    opts = raw(IP(src="10.244.1.5", dst="10.244.7.9", options=b"\x01\x01\x01\x00") / UDP())
    assert check_ipv4(opts, len(opts)) is None


def test_check_names_each_defect():
    good = raw(IP(src="10.244.1.5", dst="10.244.7.9") / UDP() / Raw(b"abc"))
    assert check_ipv4(good[:19], 19) is Drop.TOO_SHORT
    v6 = bytearray(good); v6[0] = 0x65
    assert check_ipv4(v6, len(v6)) is Drop.NOT_IPV4
    short_ihl = bytearray(good); short_ihl[0] = 0x44
    assert check_ipv4(short_ihl, len(short_ihl)) is Drop.BAD_HEADER_LENGTH
    long_ihl = bytearray(good); long_ihl[0] = 0x4F
    assert check_ipv4(long_ihl, len(long_ihl)) is Drop.BAD_HEADER_LENGTH
    assert check_ipv4(good + b"\x00", len(good) + 1) is Drop.BAD_TOTAL_LENGTH
    assert check_ipv4(good[:-1], len(good) - 1) is Drop.BAD_TOTAL_LENGTH
    bad_sum = bytearray(good); bad_sum[10] ^= 0xFF
    assert check_ipv4(bad_sum, len(bad_sum)) is Drop.BAD_CHECKSUM


@given(ttl=st.integers(2, 255), ident=st.integers(0, 65535), tos=st.integers(0, 255))
def test_decrement_ttl_keeps_the_checksum_valid(ttl, ident, tos):
    buf = raw(IP(src="10.244.1.5", dst="10.244.7.9", ttl=ttl, id=ident, tos=tos) / UDP())
    assert decrement_ttl(buf)
    parsed = IP(bytes(buf))
    assert parsed.ttl == ttl - 1
    assert check_ipv4(buf, len(buf)) is None
    fresh = IP(bytes(buf)); del fresh.chksum
    assert IP(bytes(fresh)).chksum == parsed.chksum


def test_decrement_ttl_refuses_ttl_one_and_zero():
    for ttl in (0, 1):
        buf = raw(IP(src="10.244.1.5", dst="10.244.7.9", ttl=ttl) / UDP())
        before = bytes(buf)
        assert not decrement_ttl(buf)
        assert bytes(buf) == before


def test_icmp_net_unreachable_quotes_the_original():
    original = raw(IP(src="10.244.7.20", dst="10.244.99.3", ttl=63) / UDP(sport=1234, dport=53) / Raw(b"q" * 40))
    reply = IP(icmp_net_unreachable(original, SRC))
    assert reply.src == "10.244.7.0" and reply.dst == "10.244.7.20"
    assert reply[ICMP].type == 3 and reply[ICMP].code == 0
    quoted = reply[IPerror]
    assert quoted.src == "10.244.7.20" and quoted.dst == "10.244.99.3"
    assert len(bytes(reply[ICMP].payload)) == 28  # IP header + 8 bytes
    _assert_checksums_valid(reply)


def test_icmp_time_exceeded():
    original = raw(IP(src="10.244.7.20", dst="10.244.3.3", ttl=1) / TCP(sport=5, dport=80))
    reply = IP(icmp_time_exceeded(original, SRC))
    assert reply[ICMP].type == 11 and reply[ICMP].code == 0
    _assert_checksums_valid(reply)


def _assert_checksums_valid(pkt):
    icmp = bytes(pkt[ICMP])
    rebuilt = ICMP(icmp); del rebuilt.chksum
    assert ICMP(bytes(rebuilt)).chksum == pkt[ICMP].chksum
    ip = IP(bytes(pkt)); del ip.chksum
    assert IP(bytes(ip)).chksum == pkt.chksum


def test_never_answer_icmp_errors_or_later_fragments():
    err = raw(IP(src="10.244.7.2", dst="10.244.9.9") / ICMP(type=3, code=1) / Raw(b"x" * 28))
    assert not may_answer_with_icmp(err, len(err))
    echo = raw(IP(src="10.244.7.2", dst="10.244.9.9") / ICMP(type=8))
    assert may_answer_with_icmp(echo, len(echo))
    frag = raw(IP(src="10.244.7.2", dst="10.244.9.9", frag=100) / Raw(b"x" * 16))
    assert not may_answer_with_icmp(frag, len(frag))
    first = raw(IP(src="10.244.7.2", dst="10.244.9.9", flags="MF") / UDP() / Raw(b"x" * 16))
    assert may_answer_with_icmp(first, len(first))


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=200))
def test_check_never_raises_on_random_bytes(data):
    buf = bytearray(data)
    verdict = check_ipv4(buf, len(buf))
    if verdict is None:
        parsed = IP(bytes(buf))
        assert parsed.version == 4 and parsed.len == len(buf)
