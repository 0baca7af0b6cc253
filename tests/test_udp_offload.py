"""Segmentation and coalescing of the offloaded udp path, checked against scapy.

Each test runs on both builds of the stages (the compiled ``_offload`` and the
NumPy reference), and a differential run holds them to identical bytes.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Network

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.packet import Raw

from flanneld_py.backend.udp import offload
from flanneld_py.backend.udp.engine import Engine
from flanneld_py.backend.udp.vnet import GSO_TCPV4, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN
from flanneld_py.core.packet import check_ipv4

BUILDS = {name: offload.load(name)[1] for name in ("c", "numpy")}  # the C build must have been built
both_builds = pytest.mark.parametrize("build", list(BUILDS.values()), ids=list(BUILDS))


def coalesce(build, batch, count: int, seglen: int, total: int, out: bytearray) -> int:
    """The ingress pair as the hot loop runs it: the flow check, then the merge."""
    hlen = build.tcp_flow_header_len(batch, count, seglen, total)
    return build.merge_tcp4(batch, count, seglen, total, hlen, out) if hlen else 0


def super_packet(payload_len: int, flags: str = "PA", seq: int = 1000, ident: int = 7, options=None) -> bytearray:
    rng = random.Random(payload_len)
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=99, flags=flags, window=500, options=options or [])
    pkt = IP(src="10.244.7.5", dst="10.244.9.8", id=ident, ttl=63, flags="DF") / tcp / Raw(rng.randbytes(payload_len))
    return bytearray(bytes(pkt))


def assert_valid(segment: bytes) -> IP:
    assert check_ipv4(bytearray(segment), len(segment)) is None
    parsed = IP(segment)
    rebuilt = IP(segment)
    del rebuilt.chksum
    del rebuilt[TCP].chksum
    rebuilt = IP(bytes(rebuilt))
    assert rebuilt.chksum == parsed.chksum
    assert rebuilt[TCP].chksum == parsed[TCP].chksum, "TCP checksum wrong"
    return parsed


def split(buf: np.ndarray, total: int, seglen: int) -> list[bytes]:
    data = buf[:total].tobytes()
    return [data[i : i + seglen] for i in range(0, total, seglen)]


@pytest.mark.parametrize("payload_len, mss", [(64000, 1432), (62920, 1420), (1432 * 3, 1432), (5000, 1432),
                                              (100, 1432), (7001, 1001), (3000, 1447),
                                              (300, 7), (30000, 88)])
@both_builds
def test_segments_are_valid_packets_that_rebuild_the_stream(build, payload_len, mss):
    original = super_packet(payload_len, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    out = np.zeros(200_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), mss, out)
    segments = split(out, total, seglen)
    assert len(segments) == count == -(-payload_len // mss)
    parsed = [assert_valid(s) for s in segments]
    first = IP(bytes(original))
    assert b"".join(bytes(p[TCP].payload) for p in parsed) == bytes(first[TCP].payload)
    for index, seg in enumerate(parsed):
        assert seg[TCP].seq == first[TCP].seq + index * mss
        assert seg.id == (first.id + index) & 0xFFFF
        assert seg.ttl == first.ttl and seg[TCP].options == first[TCP].options
        assert len(bytes(seg)) <= seglen
        last = index == count - 1
        assert ("P" in seg[TCP].flags) == last
    assert all(len(s) == seglen for s in segments[:-1])


@both_builds
def test_fin_and_cwr_flags_follow_the_kernel(build):
    original = super_packet(4000, flags="FPAC")
    out = np.zeros(20_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    flags = [IP(s)[TCP].flags for s in split(out, total, seglen)]
    assert "C" in flags[0] and not any("C" in f for f in flags[1:])
    assert "F" in flags[-1] and not any("F" in f for f in flags[:-1])


@settings(max_examples=60, deadline=None)
@given(payload_len=st.integers(1, 20000), mss=st.integers(500, 1460), seq=st.integers(0, 2**32 - 1),
       ident=st.integers(0, 65535))
@both_builds
def test_segmentation_property(build, payload_len, mss, seq, ident):
    original = super_packet(payload_len, seq=seq, ident=ident)
    out = np.zeros(60_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), mss, out)
    segments = split(out, total, seglen)
    data = b"".join(bytes(assert_valid(s)[TCP].payload) for s in segments)
    assert data == bytes(IP(bytes(original))[TCP].payload)
    assert IP(segments[-1])[TCP].seq == (seq + (count - 1) * mss) % 2**32


@both_builds
def test_coalesce_rebuilds_one_super_packet(build):
    original = super_packet(1432 * 10 + 100)
    out = np.zeros(40_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    merged = bytearray(70_000)
    length = coalesce(build, out, count, seglen, total, merged)
    assert length
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(merged, 0)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV4, 40, 1432, 20, 16)
    packet = bytes(merged[VNET_HDR_LEN:length])
    parsed = IP(packet)
    assert check_ipv4(bytearray(packet), len(packet)) is None
    assert bytes(parsed[TCP].payload) == bytes(IP(bytes(original))[TCP].payload)
    assert parsed[TCP].seq == 1000 and "P" in parsed[TCP].flags
    # checksum field holds the pseudo-header sum for the kernel to finish (CHECKSUM_PARTIAL)
    pseudo = (int.from_bytes(packet[12:20], "big") + 6 + len(packet) - 20) % 0xFFFF
    assert parsed[TCP].chksum == (pseudo or 0xFFFF)


@both_builds
def test_coalesce_refuses_gaps_and_mixed_flows(build):
    original = super_packet(1432 * 4)
    out = np.zeros(20_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    gap = out.copy()
    gap[seglen + 24 : seglen + 28] = np.frombuffer((5).to_bytes(4, "big"), dtype=np.uint8)
    assert coalesce(build, gap, count, seglen, total, bytearray(70_000)) == 0
    other_port = out.copy()
    other_port[2 * seglen + 22] ^= 1
    assert coalesce(build, other_port, count, seglen, total, bytearray(70_000)) == 0
    udp = bytearray(bytes(IP(src="10.244.7.5", dst="10.244.9.8") / UDP() / Raw(b"x" * 100)))
    batch = np.frombuffer(bytes(udp) * 3, dtype=np.uint8)
    assert coalesce(build, batch, 3, len(udp), 3 * len(udp), bytearray(70_000)) == 0


@both_builds
def test_complete_checksum_of_partial_packets(build):
    for layer in (TCP(sport=1, dport=2, flags="A"), UDP(sport=1, dport=2)):
        good = bytes(IP(src="10.244.7.5", dst="10.244.9.8") / layer / Raw(b"abcdefghij" * 7))
        partial = bytearray(good)
        offset = 16 if isinstance(layer, TCP) else 6
        pseudo = (int.from_bytes(good[12:20], "big") + good[9] + len(good) - 20) % 0xFFFF
        partial[20 + offset : 22 + offset] = pseudo.to_bytes(2, "big")
        build.complete_checksum(partial, len(partial), 20, offset, isinstance(layer, UDP))
        assert bytes(partial) == good


@both_builds
def test_inbound_batch_agrees_with_one_by_one(build):
    def engine():
        e = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.9.0/24"), 8285)
        e.set_peer(IPv4Network("10.244.7.0/24"), "198.51.100.7")
        return e

    original = super_packet(1432 * 5 + 10)
    out = np.zeros(20_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    fast, slow = engine(), engine()
    assert fast.inbound_batch(out, count, seglen, total, "198.51.100.7")
    for seg in split(out, total, seglen):
        assert slow.inbound(bytearray(seg), len(seg), "198.51.100.7") is not None
    (fp,), (sp,) = fast.peers.values(), slow.peers.values()
    assert (fp.rx_packets, fp.rx_bytes) == (sp.rx_packets, sp.rx_bytes)
    # any defect sends the batch to the one-by-one path, with no counter touched
    broken = out.copy()
    broken[seglen * 2 + 10] ^= 0xFF
    third = engine()
    assert not third.inbound_batch(broken, count, seglen, total, "198.51.100.7")
    assert sum(third.drops) == 0 and next(iter(third.peers.values())).rx_packets == 0
    assert not third.inbound_batch(out, count, seglen, total, "198.51.100.99")


@both_builds
def test_inbound_flow_agrees_with_one_by_one(build):
    e = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.9.0/24"), 8285)
    e.set_peer(IPv4Network("10.244.7.0/24"), "198.51.100.7")
    original = super_packet(1432 * 6 + 99)
    out = np.zeros(20_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    assert build.tcp_flow_header_len(out, count, seglen, total) == 40
    peer = e.inbound_flow(out, count, total, "198.51.100.7")
    assert peer is not None and (peer.rx_packets, peer.rx_bytes) == (count, total)
    assert e.inbound_flow(out, count, total, "198.51.100.8") is None  # not a peer
    e.set_peer(IPv4Network("10.244.7.0/24"), "198.51.100.70")
    assert e.inbound_flow(out, count, total, "198.51.100.70") is not None
    assert e.inbound_flow(out, count, total, "198.51.100.7") is None  # address moved
    other = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.10.0/24"), 8285)
    other.set_peer(IPv4Network("10.244.7.0/24"), "198.51.100.7")
    assert other.inbound_flow(out, count, total, "198.51.100.7") is None  # not for this node
    assert sum(e.drops) == 0 and sum(other.drops) == 0


@both_builds
def test_flow_check_rejects_bad_lengths_and_checksums(build):
    original = super_packet(1432 * 3)
    out = np.zeros(20_000, dtype=np.uint8)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    for offset, flip in ((seglen + 10, 0x01), (2 * seglen + 3, 0x01), (0, 0x01)):
        broken = out.copy()
        broken[offset] ^= flip
        assert build.tcp_flow_header_len(broken, count, seglen, total) == 0


# --- the two builds agree, byte for byte ----------------------------------------------------

C, REF = BUILDS["c"], BUILDS["numpy"]


@st.composite
def super_packets(draw) -> tuple[bytearray, int]:
    """A TCP/IPv4 super-packet as flannel0 hands it over, with any header sizes and flags, and an MSS."""
    ip_options = [IPOption_NOP()] * (4 * draw(st.integers(0, 3)))
    tcp_options = draw(st.sampled_from([[], [("MSS", 1400)], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
                                        [("SAckOK", b""), ("WScale", 7), ("NOP", None)]]))
    flags = draw(st.integers(0, 255))
    payload = draw(st.integers(0, 9000))
    ip = IP(src="10.244.7.5", dst="10.244.9.8", id=draw(st.integers(0, 65535)), ttl=63, options=ip_options)
    tcp = TCP(sport=40000, dport=5201, seq=draw(st.integers(0, 2**32 - 1)), ack=99, flags=flags, window=500,
              options=tcp_options)
    packet = bytearray(bytes(ip / tcp / Raw(random.Random(payload).randbytes(payload))))
    return packet, draw(st.integers(64, 1500))


@settings(max_examples=300, deadline=None)
@given(super_packets())
def test_builds_segment_identically(case):
    packet, mss = case
    outs = []
    for build in (C, REF):
        out = bytearray(4 * 65536)
        total, seglen, count = build.segment_tcp4(bytearray(packet), len(packet), mss, out)
        outs.append(((total, seglen, count), bytes(out[:total])))
    assert outs[0] == outs[1]


@settings(max_examples=300, deadline=None)
@given(payload=st.integers(41, 12000), mss=st.sampled_from([1400, 1432, 1447, 536, 88]),
       mutations=st.lists(st.tuples(st.integers(0, 65535), st.integers(1, 255)), max_size=3),
       cut=st.integers(0, 3))
def test_builds_judge_and_merge_gro_batches_identically(payload, mss, mutations, cut):
    """Batches as a GRO read holds them (a segmented flow), some with bytes changed or the last cut short."""
    original = super_packet(payload)
    out = bytearray(200_000)
    total, seglen, count = C.segment_tcp4(original, len(original), mss, out)
    for offset, flip in mutations:
        out[offset % total] ^= flip
    total = max(1, total - cut)
    batch = memoryview(out)[:total]
    verdicts = [build.tcp_flow_header_len(batch, count, seglen, total) for build in (C, REF)]
    assert verdicts[0] == verdicts[1]
    if verdicts[0]:
        merged = [bytearray(70_000), bytearray(70_000)]
        lengths = [build.merge_tcp4(batch, count, seglen, total, verdicts[0], into)
                   for build, into in zip((C, REF), merged)]
        assert lengths[0] == lengths[1] and merged[0][: lengths[0]] == merged[1][: lengths[1]]
    for src_net, dst_net in ((0x0AF40700, 0x0AF40900), (0x0AF40700, 0x0AF40A00)):
        plain = [build.plain_ipv4_batch(batch, count, seglen, total, src_net, dst_net, 0xFFFFFF00)
                 for build in (C, REF)]
        assert plain[0] == plain[1]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), n=st.integers(-5, 400), a=st.integers(-5, 400),
       b=st.integers(-5, 400), c=st.integers(-5, 400), h=st.integers(-5, 100))
def test_compiled_build_stays_inside_its_buffers(data, n, a, b, c, h):
    """Any lengths with any bytes: a result or a ValueError, never a read or write outside the buffers.

    The C build checks its arguments. Overruns would not crash here; CI runs this file again
    against an ASan/UBSan build (``.ci/sanitizers``), where any overrun fails the run."""
    out = bytearray(len(data) + 64)
    calls = [
        lambda: C.segment_tcp4(bytearray(data), n, a, out),
        lambda: C.tcp_flow_header_len(data, a, b, c),
        lambda: C.merge_tcp4(data, a, b, c, h, out),
        lambda: C.plain_ipv4_batch(data, a, b, c, 0, 0, 0),
        lambda: C.complete_checksum(bytearray(data), n, a, b, True),
    ]
    for call in calls:
        try:
            call()
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=2, max_size=200), start=st.integers(0, 100), offset=st.integers(0, 100),
       udp=st.booleans())
def test_builds_complete_checksums_identically(data, start, offset, udp):
    results = []
    for build in (C, REF):
        packet = bytearray(data)
        try:
            build.complete_checksum(packet, len(packet), start, offset, udp)
            results.append(bytes(packet))
        except ValueError:
            results.append(None)
    assert results[0] == results[1]


def test_build_choice():
    assert offload.load("numpy")[0] == "numpy" and offload.load("auto")[0] == "c" and offload.load("")[0] == "c"
    with pytest.raises(ValueError, match="choose auto, c or numpy"):
        offload.load("fast")
    assert offload.IMPL == "c"  # what the daemon runs here: the tests need the compiled build
