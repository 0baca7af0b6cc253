"""Segmentation and coalescing of the offloaded udp path, checked against scapy.

Each test runs on both builds of the stages (the compiled ``_offload`` and the
pure-Python reference), and a differential run holds them to identical results and bytes.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.packet import Raw

from flanneld_py.backend.udp import offload
from flanneld_py.backend.udp.engine import Engine
from flanneld_py.core.packet import check_ipv4

BUILDS = {name: offload.load(name)[1] for name in ("c", "python")}  # the C build must have been built
both_builds = pytest.mark.parametrize("build", list(BUILDS.values()), ids=list(BUILDS))


def coalesce(build, batch, count: int, seglen: int, total: int, out: bytearray) -> int:
    """The ingress pair as the hot loop runs it on a batch that should be one run: the run
    check, then the merge (0 unless the whole batch is one run)."""
    hlen, run = build.tcp_flow_run(batch, count, seglen, total)
    return build.merge_tcp4(batch, count, seglen, total, hlen, out) if run == count >= 2 else 0


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


def split(buf: bytearray, total: int, seglen: int) -> list[bytes]:
    data = bytes(buf[:total])
    return [data[i : i + seglen] for i in range(0, total, seglen)]


@pytest.mark.parametrize("payload_len, mss", [(64000, 1432), (62920, 1420), (1432 * 3, 1432), (5000, 1432),
                                              (100, 1432), (7001, 1001), (3000, 1447),
                                              (300, 7), (30000, 88)])
@both_builds
def test_segments_are_valid_packets_that_rebuild_the_stream(build, payload_len, mss):
    original = super_packet(payload_len, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    out = bytearray(200_000)
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
    out = bytearray(20_000)
    total, seglen, _count = build.segment_tcp4(original, len(original), 1432, out)
    flags = [IP(s)[TCP].flags for s in split(out, total, seglen)]
    assert "C" in flags[0] and not any("C" in f for f in flags[1:])
    assert "F" in flags[-1] and not any("F" in f for f in flags[:-1])


@settings(max_examples=60, deadline=None)
@given(payload_len=st.integers(1, 20000), mss=st.integers(500, 1460), seq=st.integers(0, 2**32 - 1),
       ident=st.integers(0, 65535))
@both_builds
def test_segmentation_property(build, payload_len, mss, seq, ident):
    original = super_packet(payload_len, seq=seq, ident=ident)
    out = bytearray(60_000)
    total, seglen, count = build.segment_tcp4(original, len(original), mss, out)
    segments = split(out, total, seglen)
    data = b"".join(bytes(assert_valid(s)[TCP].payload) for s in segments)
    assert data == bytes(IP(bytes(original))[TCP].payload)
    assert IP(segments[-1])[TCP].seq == (seq + (count - 1) * mss) % 2**32


@both_builds
def test_coalesce_rebuilds_one_super_packet(build):
    original = super_packet(1432 * 10 + 100)
    out = bytearray(40_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    merged = bytearray(70_000)
    length = coalesce(build, out, count, seglen, total, merged)
    assert length
    packet = bytes(merged[:length])
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
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    gap = bytearray(out)
    gap[seglen + 24 : seglen + 28] = (5).to_bytes(4, "big")
    assert coalesce(build, gap, count, seglen, total, bytearray(70_000)) == 0
    other_port = bytearray(out)
    other_port[2 * seglen + 22] ^= 1
    assert coalesce(build, other_port, count, seglen, total, bytearray(70_000)) == 0
    udp = bytearray(bytes(IP(src="10.244.7.5", dst="10.244.9.8") / UDP() / Raw(b"x" * 100)))
    batch = bytes(udp) * 3
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
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    fast, slow = engine(), engine()
    assert fast.inbound_batch(out, count, seglen, total, "198.51.100.7")
    for seg in split(out, total, seglen):
        assert slow.inbound(bytearray(seg), len(seg), "198.51.100.7") is not None
    (fp,), (sp,) = fast.peers.values(), slow.peers.values()
    assert (fp.rx_packets, fp.rx_bytes) == (sp.rx_packets, sp.rx_bytes)
    # any defect sends the batch to the one-by-one path, with no counter touched
    broken = bytearray(out)
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
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    assert build.tcp_flow_run(out, count, seglen, total) == (40, count)
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
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1432, out)
    for offset, flip in ((seglen + 10, 0x01), (2 * seglen + 3, 0x01), (0, 0x01)):
        broken = bytearray(out)
        broken[offset] ^= flip
        assert build.tcp_flow_run(broken, count, seglen, total)[1] < count


# --- the two builds agree, byte for byte ----------------------------------------------------

C, REF = BUILDS["c"], BUILDS["python"]


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
    verdicts = [build.tcp_flow_run(batch, count, seglen, total) for build in (C, REF)]
    assert verdicts[0] == verdicts[1]
    hlen, run = verdicts[0]
    if run >= 2:
        run_bytes = min(run * seglen, total)
        merged = [bytearray(70_000), bytearray(70_000)]
        lengths = [build.merge_tcp4(batch, run, seglen, run_bytes, hlen, into)
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
        lambda: C.tcp_flow_run(data, a, b, c),
        lambda: C.merge_tcp4(data, a, b, c, h, out),
        lambda: C.extend_tcp4(data, a, b, c, h, out, n),
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
    assert offload.load("python")[0] == "python" and offload.load("auto")[0] == "c" and offload.load("")[0] == "c"
    with pytest.raises(ValueError, match="choose auto, c or python"):
        offload.load("fast")
    assert offload.IMPL == "c"  # what the daemon runs here: the tests need the compiled build


# --- runs: a GRO read that holds parts of more than one super-packet ----------------------------

def two_super_packets(build, first_payload: int, second_payload: int, mss: int, first_flags: str) -> tuple[bytearray, int, int, int]:
    """Segments of two back-to-back super-packets of one flow in one buffer (as a GSO send that
    carries the end of one and the start of the next): (buffer, total, seglen, count)."""
    one = super_packet(first_payload, flags=first_flags, seq=1000)
    two = super_packet(second_payload, flags="PA", seq=1000 + first_payload, ident=7 + 50)
    out = bytearray(200_000)
    total_one, seglen, count_one = build.segment_tcp4(one, len(one), mss, out)
    total_two, _, count_two = build.segment_tcp4(two, len(two), mss, memoryview(out)[total_one:])
    return out, total_one + total_two, seglen, count_one + count_two


@both_builds
def test_a_run_ends_at_psh_and_the_next_run_starts_after_it(build):
    batch, total, seglen, count = two_super_packets(build, 1432 * 3, 1432 * 4 + 10, 1432, "PA")
    assert build.tcp_flow_run(batch, count, seglen, total) == (40, 3)
    rest = memoryview(batch)[3 * seglen :]
    assert build.tcp_flow_run(rest, count - 3, seglen, total - 3 * seglen) == (40, 5) and count == 8


@both_builds
def test_a_run_spans_super_packets_without_psh(build):
    batch, total, seglen, count = two_super_packets(build, 1432 * 3, 1432 * 4 + 10, 1432, "A")
    assert build.tcp_flow_run(batch, count, seglen, total) == (40, count)


@both_builds
def test_extend_appends_the_run_that_continues_a_merged_super_packet(build):
    """A flow split over two GRO reads, merged then extended, gives the bytes of one merge."""
    original = super_packet(1420 * 46, flags="PA")
    segmented = bytearray(200_000)
    total, seglen, count = build.segment_tcp4(original, len(original), 1420, segmented)
    whole = bytearray(70_000)
    whole_len = build.merge_tcp4(segmented, count, seglen, total, 40, whole)
    first, second = memoryview(segmented)[: 44 * seglen], memoryview(segmented)[44 * seglen : total]
    merged = bytearray(70_000)
    used = build.merge_tcp4(first, 44, seglen, 44 * seglen, 40, merged)
    assert build.tcp_flow_run(second, 2, seglen, total - 44 * seglen) == (40, 2)
    grown = build.extend_tcp4(second, 2, seglen, total - 44 * seglen, 40, merged, used)
    assert grown == whole_len and merged[:grown] == whole[:whole_len]
    assert len(IP(bytes(merged[:grown]))[TCP].payload) == 1420 * 46


@both_builds
def test_extend_refuses_what_does_not_continue(build):
    original = super_packet(1432 * 6, flags="A")
    segmented = bytearray(20_000)
    total, seglen, _count = build.segment_tcp4(original, len(original), 1432, segmented)
    first, second = memoryview(segmented)[: 3 * seglen], bytearray(segmented[3 * seglen : total])
    merged = bytearray(70_000)
    used = build.merge_tcp4(first, 3, seglen, 3 * seglen, 40, merged)
    before = bytes(merged)
    gap = bytearray(second)
    gap[24:28] = (123).to_bytes(4, "big")
    other_port = bytearray(second)
    other_port[22] ^= 1
    for run in (gap, other_port):
        assert build.extend_tcp4(run, 3, seglen, len(second), 40, merged, used) == 0
    merged[33] = 0x18  # the merged packet ends with PSH: nothing may follow
    assert build.extend_tcp4(second, 3, seglen, len(second), 40, merged, used) == 0
    merged[33] = 0x10
    assert bytes(merged) == before
    big = super_packet(1432 * 45, flags="A")
    segmented_big = bytearray(200_000)
    total_big, _, _ = build.segment_tcp4(big, len(big), 1432, segmented_big)
    used_big = build.merge_tcp4(segmented_big, 44, seglen, 44 * seglen, 40, merged)
    tail = memoryview(segmented_big)[44 * seglen : total_big]
    assert build.extend_tcp4(tail, 1, seglen, len(tail), 40, merged, used_big)  # 45 segments fit
    assert build.extend_tcp4(second, 3, seglen, len(second), 40, merged, used_big) == 0  # beyond 64 KB


@settings(max_examples=300, deadline=None)
@given(first=st.integers(1, 30), second=st.integers(41, 20000), mss=st.sampled_from([1432, 1447, 536]),
       mutations=st.lists(st.tuples(st.integers(0, 65535), st.integers(1, 255)), max_size=3),
       psh=st.booleans())
def test_builds_extend_identically(first, second, mss, mutations, psh):
    original = super_packet(first * mss, flags="PA" if psh else "A")
    segmented = bytearray(100_000)
    total, seglen, count = C.segment_tcp4(original, len(original), mss, segmented)
    follow = super_packet(second, seq=1000 + first * mss)
    tail = bytearray(100_000)
    tail_total, _, tail_count = C.segment_tcp4(follow, len(follow), mss, tail)
    for offset, flip in mutations:
        tail[offset % tail_total] ^= flip
    results = []
    for build in (C, REF):
        merged = bytearray(70_000)
        used = build.merge_tcp4(segmented, count, seglen, total, seglen - mss, merged) if count >= 2 else 0
        if not used:
            return
        try:
            grown = build.extend_tcp4(tail, tail_count, seglen, tail_total, seglen - mss, merged, used)
        except ValueError:
            grown = -1
        results.append((grown, bytes(merged)))
    assert results[0] == results[1]


# --- IPv6: TSO6 segmentation and GRO merging of plain TCP/IPv6 ---------------------------------

from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop  # noqa: E402

from flanneld_py.core.packet import check_ipv6  # noqa: E402


def super_packet6(payload_len: int, flags: str = "PA", seq: int = 1000, options=None, tc: int = 0,
                  fl: int = 0x12345) -> bytearray:
    rng = random.Random(payload_len)
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=99, flags=flags, window=500, options=options or [])
    pkt = IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:9::8", hlim=63, tc=tc, fl=fl) / tcp
    return bytearray(bytes(pkt / Raw(rng.randbytes(payload_len))))


def assert_valid6(segment: bytes) -> IPv6:
    assert check_ipv6(bytearray(segment), len(segment)) is None  # the payload length matches
    parsed = IPv6(segment)
    rebuilt = IPv6(segment)
    del rebuilt[TCP].chksum
    assert IPv6(bytes(rebuilt))[TCP].chksum == parsed[TCP].chksum, "TCP checksum wrong"
    return parsed


def coalesce6(build, batch, count: int, seglen: int, total: int, out: bytearray) -> int:
    hlen, run = build.tcp_flow_run(batch, count, seglen, total)
    return build.merge_tcp6(batch, count, seglen, total, hlen, out) if run == count >= 2 else 0


@pytest.mark.parametrize("payload_len, mss", [(64000, 1428), (1428 * 3, 1428), (5000, 1220), (100, 1428),
                                              (7001, 1001), (300, 7), (30000, 88)])
@both_builds
def test_tso6_segments_are_valid_packets_that_rebuild_the_stream(build, payload_len, mss):
    original = super_packet6(payload_len, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    out = bytearray(200_000)
    total, seglen, count = build.segment_tcp6(original, len(original), mss, out)
    segments = split(out, total, seglen)
    assert len(segments) == count == -(-payload_len // mss)
    parsed = [assert_valid6(s) for s in segments]
    first = IPv6(bytes(original))
    assert b"".join(bytes(p[TCP].payload) for p in parsed) == bytes(first[TCP].payload)
    for index, seg in enumerate(parsed):
        assert seg[TCP].seq == first[TCP].seq + index * mss
        assert (seg.hlim, seg.tc, seg.fl, seg.src, seg.dst) == (first.hlim, first.tc, first.fl, first.src, first.dst)
        assert seg[TCP].options == first[TCP].options and seg[TCP].ack == first[TCP].ack
        assert ("P" in seg[TCP].flags) == (index == count - 1)
    assert all(len(s) == seglen for s in segments[:-1])


@both_builds
def test_tso6_fin_and_cwr_flags_follow_the_kernel(build):
    original = super_packet6(4000, flags="FPAC")
    out = bytearray(20_000)
    total, seglen, _count = build.segment_tcp6(original, len(original), 1428, out)
    flags = [IPv6(s)[TCP].flags for s in split(out, total, seglen)]
    assert "C" in flags[0] and not any("C" in f for f in flags[1:])
    assert "F" in flags[-1] and not any("F" in f for f in flags[:-1])


@settings(max_examples=60, deadline=None)
@given(payload_len=st.integers(1, 20000), mss=st.integers(500, 1440), seq=st.integers(0, 2**32 - 1))
@both_builds
def test_tso6_segmentation_property(build, payload_len, mss, seq):
    original = super_packet6(payload_len, seq=seq)
    out = bytearray(60_000)
    total, seglen, count = build.segment_tcp6(original, len(original), mss, out)
    segments = split(out, total, seglen)
    data = b"".join(bytes(assert_valid6(s)[TCP].payload) for s in segments)
    assert data == bytes(IPv6(bytes(original))[TCP].payload)
    assert IPv6(segments[-1])[TCP].seq == (seq + (count - 1) * mss) % 2**32


def ipv6_with_extension(payload: int, extension) -> bytearray:
    pkt = IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:9::8", hlim=63) / extension
    return bytearray(bytes(pkt / TCP(sport=40000, dport=5201, seq=1, ack=99, flags="A") / Raw(b"x" * payload)))


@both_builds
def test_ipv6_with_extension_headers_is_neither_split_nor_merged(build):
    """As IPv4 with options is no run, IPv6 with extension headers is neither: segment_tcp6 refuses
    it (the loop drops and counts it) and a GRO read of such segments goes one by one."""
    for extension in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()):
        packet = ipv6_with_extension(5000, extension)
        with pytest.raises(ValueError, match="not a plain TCP/IPv6 packet"):
            build.segment_tcp6(packet, len(packet), 1400, bytearray(20_000))
        segment = ipv6_with_extension(1000, extension)
        assert build.tcp_flow_run(bytes(segment) * 3, 3, len(segment), 3 * len(segment)) == (0, 0)
    with pytest.raises(ValueError, match="not a plain TCP/IPv6 packet"):
        ipv4 = super_packet(5000)
        build.segment_tcp6(ipv4 + bytes(40), len(ipv4) + 40, 1400, bytearray(20_000))


@both_builds
def test_gro6_merge_rebuilds_one_super_packet(build):
    original = super_packet6(1428 * 10 + 100)
    out = bytearray(40_000)
    total, seglen, count = build.segment_tcp6(original, len(original), 1428, out)
    merged = bytearray(70_000)
    length = coalesce6(build, out, count, seglen, total, merged)
    assert length == len(original)
    packet = bytes(merged[:length])
    assert check_ipv6(bytearray(packet), len(packet)) is None
    parsed = IPv6(packet)
    assert bytes(parsed[TCP].payload) == bytes(IPv6(bytes(original))[TCP].payload)
    assert parsed[TCP].seq == 1000 and "P" in parsed[TCP].flags and parsed.fl == 0x12345
    # the checksum field holds the IPv6 pseudo-header sum for the kernel to finish (CHECKSUM_PARTIAL)
    pseudo = (int.from_bytes(packet[8:40], "big") + 6 + len(packet) - 40) % 0xFFFF
    assert parsed[TCP].chksum == (pseudo or 0xFFFF)
    assert packet[:56] == bytes(original[:56]) and packet[58:] == bytes(original[58:])


@both_builds
def test_gro6_refuses_gaps_mixed_flows_and_changed_headers(build):
    original = super_packet6(1428 * 4, flags="A")
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp6(original, len(original), 1428, out)
    assert build.tcp_flow_run(out, count, seglen, total) == (60, count)
    for offset, what in ((seglen + 44, "sequence"), (2 * seglen + 42, "port"), (2 * seglen + 1, "traffic class"),
                         (3 * seglen + 3, "flow label"), (seglen + 7, "hop limit"), (seglen + 5, "payload length"),
                         (2 * seglen + 20, "source"), (seglen + 39, "destination"), (seglen + 49, "ack")):
        broken = bytearray(out)
        broken[offset] ^= 1
        assert build.tcp_flow_run(broken, count, seglen, total)[1] < count, what
    syn = bytearray(out)
    syn[53] = 0x02
    assert build.tcp_flow_run(syn, count, seglen, total) == (0, 0)


@both_builds
def test_gro6_run_ends_at_psh_and_extend_continues_a_flow(build):
    """A flow split over two GRO reads, merged then extended, gives the bytes of one merge."""
    original = super_packet6(1420 * 46, flags="PA")
    segmented = bytearray(200_000)
    total, seglen, count = build.segment_tcp6(original, len(original), 1420, segmented)
    whole = bytearray(70_000)
    whole_len = build.merge_tcp6(segmented, count, seglen, total, 60, whole)
    assert whole_len == len(original)
    first, second = memoryview(segmented)[: 44 * seglen], memoryview(segmented)[44 * seglen : total]
    merged = bytearray(70_000)
    used = build.merge_tcp6(first, 44, seglen, 44 * seglen, 60, merged)
    assert build.tcp_flow_run(second, 2, seglen, total - 44 * seglen) == (60, 2)
    grown = build.extend_tcp6(second, 2, seglen, total - 44 * seglen, 60, merged, used)
    assert grown == whole_len and merged[:grown] == whole[:whole_len]
    merged[53] = 0x18  # ends with PSH: nothing may follow
    assert build.extend_tcp6(second, 2, seglen, total - 44 * seglen, 60, merged, used) == 0
    ipv4 = bytearray(70_000)
    segmented4 = bytearray(200_000)
    big4 = super_packet(1420 * 4, flags="A")
    total4, seglen4, _ = build.segment_tcp4(big4, len(big4), 1420, segmented4)
    used4 = build.merge_tcp4(segmented4, 3, seglen4, 3 * seglen4, 40, ipv4)
    before = bytes(ipv4)
    assert build.extend_tcp6(second, 2, seglen, total - 44 * seglen, 60, ipv4, used4) == 0  # other family
    assert bytes(ipv4) == before


@both_builds
def test_inbound_flow6_applies_the_one_by_one_rules(build):
    from ipaddress import IPv6Network

    def engine(own6: str = "fd00:10:244:9::/64"):
        e = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.9.0/24"), 8285,
                   IPv6Network("fd00:10:244::/48"), IPv6Network(own6))
        e.set_peer(IPv4Network("10.244.7.0/24"), "198.51.100.7", IPv6Network("fd00:10:244:7::/64"), "2001:db8::7")
        return e

    original = super_packet6(1428 * 6 + 99)
    out = bytearray(20_000)
    total, seglen, count = build.segment_tcp6(original, len(original), 1428, out)
    assert build.tcp_flow_run(out, count, seglen, total) == (60, count)
    fast, slow = engine(), engine()
    peer = fast.inbound_flow(out, count, total, "198.51.100.7")
    assert peer is not None and (peer.rx_packets, peer.rx_bytes) == (count, total)
    for seg in split(out, total, seglen):
        assert slow.inbound(bytearray(seg), len(seg), "198.51.100.7") is not None
    (sp,) = slow.peers.values()
    assert (sp.rx_packets, sp.rx_bytes) == (count, total)
    assert fast.inbound_flow(out, count, total, "2001:db8::7") is not None  # its PublicIPv6 too
    assert fast.inbound_flow(out, count, total, "198.51.100.8") is None  # not a peer
    assert engine("fd00:10:244:10::/64").inbound_flow(out, count, total, "198.51.100.7") is None  # not ours
    stranger = bytearray(out)
    stranger[8 + 7] ^= 0x40  # from fd00:10:244:47::5: no peer's subnet
    assert fast.inbound_flow(stranger, count, total, "198.51.100.7") is None
    assert sum(fast.drops) == 0


@st.composite
def super_packets6(draw) -> tuple[bytearray, int]:
    """A TCP/IPv6 super-packet with any TCP options and flags, sometimes with an extension header."""
    tcp_options = draw(st.sampled_from([[], [("MSS", 1400)], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
                                        [("SAckOK", b""), ("WScale", 7), ("NOP", None)]]))
    payload = draw(st.integers(0, 9000))
    tcp = TCP(sport=40000, dport=5201, seq=draw(st.integers(0, 2**32 - 1)), ack=99, flags=draw(st.integers(0, 255)),
              window=500, options=tcp_options)
    ip = IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:9::8", hlim=63, tc=draw(st.integers(0, 255)))
    if draw(st.booleans()) and draw(st.booleans()):
        ip = ip / IPv6ExtHdrDestOpt()
    packet = bytearray(bytes(ip / tcp / Raw(random.Random(payload).randbytes(payload))))
    return packet, draw(st.integers(64, 1500))


@settings(max_examples=300, deadline=None)
@given(super_packets6())
def test_builds_segment_ipv6_identically(case):
    packet, mss = case
    outs = []
    for build in (C, REF):
        out = bytearray(4 * 65536)
        try:
            total, seglen, count = build.segment_tcp6(bytearray(packet), len(packet), mss, out)
            outs.append(((total, seglen, count), bytes(out[:total])))
        except ValueError as exc:
            outs.append(str(exc))
    assert outs[0] == outs[1]


@settings(max_examples=300, deadline=None)
@given(payload=st.integers(61, 12000), mss=st.sampled_from([1400, 1428, 1447, 1220, 88]),
       mutations=st.lists(st.tuples(st.integers(0, 65535), st.integers(1, 255)), max_size=3),
       cut=st.integers(0, 3), psh=st.booleans())
def test_builds_judge_and_merge_ipv6_gro_batches_identically(payload, mss, mutations, cut, psh):
    """IPv6 batches as a GRO read holds them, some with bytes changed or the last cut short: the
    same runs and merged bytes from both builds (the loop's counters: tests/test_udp_loop.py)."""
    original = super_packet6(payload, flags="PA" if psh else "A")
    out = bytearray(200_000)
    total, seglen, count = C.segment_tcp6(original, len(original), mss, out)
    for offset, flip in mutations:
        out[offset % total] ^= flip
    total = max(1, total - cut)
    batch = memoryview(out)[:total]
    verdicts = [build.tcp_flow_run(batch, count, seglen, total) for build in (C, REF)]
    assert verdicts[0] == verdicts[1]
    hlen, run = verdicts[0]
    if run >= 2:
        run_bytes = min(run * seglen, total)
        merged = [bytearray(70_000), bytearray(70_000)]
        lengths = [build.merge_tcp6(batch, run, seglen, run_bytes, hlen, into) for build, into in zip((C, REF), merged)]
        assert lengths[0] == lengths[1] and merged[0][: lengths[0]] == merged[1][: lengths[1]]


@settings(max_examples=200, deadline=None)
@given(first=st.integers(1, 30), second=st.integers(61, 20000), mss=st.sampled_from([1428, 1447, 536]),
       mutations=st.lists(st.tuples(st.integers(0, 65535), st.integers(1, 255)), max_size=3),
       psh=st.booleans())
def test_builds_extend_ipv6_identically(first, second, mss, mutations, psh):
    original = super_packet6(first * mss, flags="PA" if psh else "A")
    segmented = bytearray(100_000)
    total, seglen, count = C.segment_tcp6(original, len(original), mss, segmented)
    follow = super_packet6(second, seq=1000 + first * mss)
    tail = bytearray(100_000)
    tail_total, _, tail_count = C.segment_tcp6(follow, len(follow), mss, tail)
    for offset, flip in mutations:
        tail[offset % tail_total] ^= flip
    if count < 2:
        return
    results = []
    for build in (C, REF):
        merged = bytearray(70_000)
        used = build.merge_tcp6(segmented, count, seglen, total, seglen - mss, merged)
        try:
            grown = build.extend_tcp6(tail, tail_count, seglen, tail_total, seglen - mss, merged, used)
        except ValueError:
            grown = -1
        results.append((grown, bytes(merged)))
    assert results[0] == results[1]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=300), n=st.integers(-5, 400), a=st.integers(-5, 400),
       b=st.integers(-5, 400), c=st.integers(-5, 400), h=st.integers(-5, 120), six=st.booleans())
def test_compiled_ipv6_stages_stay_inside_their_buffers(data, n, a, b, c, h, six):
    """As for IPv4: any lengths with any bytes (often starting like an IPv6 TCP packet) give a
    result or a ValueError, never an access outside the buffers (``.ci/sanitizers`` runs this)."""
    if six and len(data) > 6:
        data = bytes([0x60]) + data[1:6] + bytes([6]) + data[7:]
    out = bytearray(len(data) + 64)
    calls = [
        lambda: C.segment_tcp6(bytearray(data), n, a, out),
        lambda: C.tcp_flow_run(data, a, b, c),
        lambda: C.merge_tcp6(data, a, b, c, h, out),
        lambda: C.extend_tcp6(data, a, b, c, h, out, n),
    ]
    for call in calls:
        try:
            call()
        except ValueError:
            pass
