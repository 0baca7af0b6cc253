"""The udp hot loop in-process, through its two edges: flannel0 as :class:`MemoryTun` (the real
virtio-net handling over in-memory queues), the socket as :class:`MemoryUdp` (each send call
recorded) or, where the kernel's GSO/GRO handling is the point, a real loopback socket.
Checked: datagrams on the wire, how many sends and TUN writes carry them, counters, drops."""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Network

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw
from udp_fakes import MemoryTun, MemoryUdp

from flanneld_py.backend.udp.engine import Engine
from flanneld_py.backend.udp.loop import Pump
from flanneld_py.backend.udp.offload import segment_tcp4
from flanneld_py.backend.udp.udpconn import gso_control, open_udp
from flanneld_py.backend.udp.vnet import (
    GSO_NONE,
    GSO_TCPV4,
    NEEDS_CSUM,
    VNET_HDR,
    VNET_HDR_LEN,
)
from flanneld_py.core.packet import Drop

OWN, REMOTE = IPv4Network("10.244.7.0/24"), IPv4Network("10.244.9.0/24")
PEER_IP = "127.0.0.1"


def make_pump(conn, port: int = 8285) -> tuple[Pump, MemoryTun]:
    engine = Engine(IPv4Network("10.244.0.0/16"), OWN, port)
    engine.set_peer(REMOTE, PEER_IP)
    tun = MemoryTun(offload=True)
    return Pump(engine, tun, conn), tun


def peer_of(pump: Pump):
    (peer,) = pump.engine.peers.values()
    return peer


def tcp_packet(payload: int, data_offset: int | None = None, src: str = "10.244.7.5", dst: str = "10.244.9.8",
               seq: int = 7, flags: str = "PA") -> bytearray:
    tcp = TCP(sport=40000, dport=5201, seq=seq, flags=flags)
    if data_offset is not None:
        tcp.dataofs = data_offset
    return bytearray(bytes(IP(src=src, dst=dst, ttl=64, flags="DF") / tcp / Raw(b"z" * payload)))


def tso(packet: bytearray, mss: int) -> bytes:
    """A flannel0 read of a TCP super-packet: the virtio-net header, then the packet."""
    return VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16) + packet


def assert_valid_segments(datagrams: list[bytes], mtu: int) -> bytes:
    """Every datagram one valid routed TCP/IPv4 packet within ``mtu``; their payload, in order."""
    payload = b""
    for datagram in datagrams:
        assert len(datagram) <= mtu
        inner = IP(datagram)
        assert inner.len == len(datagram) and inner.ttl == 63  # routed: TTL decremented once
        fresh = IP(datagram)
        del fresh.chksum, fresh[TCP].chksum
        fresh = IP(bytes(fresh))
        assert (fresh.chksum, fresh[TCP].chksum) == (inner.chksum, inner[TCP].chksum)
        payload += bytes(inner[TCP].payload)
    return payload


# --- flannel0 -> UDP ----------------------------------------------------------------------

def test_super_packet_leaves_as_mss_sized_valid_packets_over_a_real_socket():
    peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_sock.bind((PEER_IP, 0))
    peer_sock.settimeout(0.3)
    conn = open_udp(PEER_IP, 0, offload=True)
    try:
        pump, tun = make_pump(conn, peer_sock.getsockname()[1])
        tun.inject(tso(tcp_packet(5000), 1400))
        pump._on_tun()
        datagrams = []
        try:
            while True:
                datagrams.append(peer_sock.recv(65536))
        except TimeoutError:
            pass
    finally:
        conn.close()
        peer_sock.close()
    assert [len(d) for d in datagrams] == [1440, 1440, 1440, 840]
    assert assert_valid_segments(datagrams, 1440) == b"z" * 5000
    assert (peer_of(pump).tx_packets, peer_of(pump).tx_bytes) == (4, sum(map(len, datagrams)))
    assert sum(pump.engine.drops) == 0


def test_a_64k_super_packet_leaves_as_valid_datagrams_within_the_mtu():
    """A pod's TSO super-packet of 65535 bytes (46 segments at MTU 1472: more than one UDP GSO
    send holds) leaves as MTU-sized valid packets, in order, all counted."""
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    tun.inject(tso(tcp_packet(65535 - 40), 1432))
    pump._on_tun()
    datagrams = conn.datagrams
    assert [len(d) for d in datagrams[:-1]] == [1472] * 45 and len(datagrams) == 46
    assert assert_valid_segments(datagrams, 1472) == b"z" * (65535 - 40)
    assert [len(s.datagrams) for s in conn.sends] == [44, 2]
    assert (peer_of(pump).tx_packets, peer_of(pump).tx_bytes) == (46, sum(map(len, datagrams)))
    assert sum(pump.engine.drops) == 0


def test_a_send_run_spans_super_packets_to_one_peer():
    """Two 46-segment super-packets read in one wakeup leave in three GSO sends (44 + 44 + 4),
    not four: the first one's tail waits for the second's segments."""
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    tun.inject(tso(tcp_packet(46 * 1420, seq=7, flags="A"), 1420))
    tun.inject(tso(tcp_packet(46 * 1420, seq=7 + 46 * 1420, flags="A"), 1420))
    pump._on_tun()
    assert [len(s.datagrams) for s in conn.sends] == [44, 44, 4]
    assert assert_valid_segments(conn.datagrams, 1460) == b"z" * (92 * 1420)
    assert peer_of(pump).tx_packets == 92 and sum(pump.engine.drops) == 0


def test_without_gso_every_datagram_is_its_own_send():
    conn = MemoryUdp(gso=False)
    pump, tun = make_pump(conn)
    tun.inject(tso(tcp_packet(5000), 1400))
    pump._on_tun()
    assert [len(s.data) for s in conn.sends] == [1440, 1440, 1440, 840]


def test_small_packets_of_one_size_to_one_peer_share_a_send():
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    for _ in range(5):
        tun.inject(bytes(VNET_HDR_LEN) + tcp_packet(100))
    tun.inject(bytes(VNET_HDR_LEN) + tcp_packet(300))
    pump._on_tun()
    assert [(len(s.datagrams), s.seglen) for s in conn.sends] == [(5, 140), (1, 340)]
    assert peer_of(pump).tx_packets == 6


@pytest.mark.parametrize("header, packet", [
    (VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16), tcp_packet(5000, data_offset=2)),  # TCP header < 20
    (VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 200), tcp_packet(50)),  # checksum field past the end
    (VNET_HDR.pack(0, 4, 60, 1400, 0, 0), tcp_packet(50)),  # TCPv6 GSO on an IPv4 overlay
    (b"\x01\x01\x00", b""),  # shorter than the virtio-net header
], ids=["tcp-data-offset", "csum-offset", "gso-tcpv6", "short-read"])
def test_read_whose_offload_header_does_not_fit_is_counted_and_dropped(header, packet):
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    tun.inject(header + packet)
    pump._on_tun()
    assert conn.sends == []
    drops = pump.engine.drops
    assert drops[Drop.BAD_OFFLOAD_HEADER] + drops[Drop.NOT_IPV4] == 1 and sum(drops) == 1
    assert (peer_of(pump).tx_packets, peer_of(pump).tx_bytes) == (0, 0)


# --- UDP -> flannel0 ----------------------------------------------------------------------

def remote_flow(payload: int, mss: int = 1420) -> tuple[bytearray, int, int]:
    """A remote pod's super-packet segmented as its node sends it: (segments, total, seglen)."""
    original = tcp_packet(payload, src="10.244.9.8", dst="10.244.7.5", seq=11)
    original[8] = 63  # TTL as the sending node leaves it
    original[10:12] = b"\0\0"
    segmented = bytearray(200_000)
    total, seglen, _count = segment_tcp4(original, len(original), mss, segmented)
    return segmented, total, seglen


def test_a_flow_split_over_two_gro_reads_is_written_as_one_super_packet():
    """A sender's 64 KB super-packet takes two GSO sends (44 + 2 segments); the receiving loop
    extends the first read's merge with the second and writes one super-packet."""
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    segmented, total, seglen = remote_flow(46 * 1420)
    conn.inject(segmented[: 44 * seglen], seglen, PEER_IP)
    conn.inject(segmented[44 * seglen : total], seglen, PEER_IP)
    pump._on_udp()
    (frame,) = tun.frames
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(frame, 0)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV4, 40, 1420, 20, 16)
    merged = IP(frame[VNET_HDR_LEN:])
    assert merged.len == len(frame) - VNET_HDR_LEN and bytes(merged[TCP].payload) == b"z" * (46 * 1420)
    assert "P" in merged[TCP].flags
    assert (peer_of(pump).rx_packets, peer_of(pump).rx_bytes) == (46, total)
    assert sum(pump.engine.drops) == 0


def test_a_run_of_another_flow_is_written_before_the_next_is_merged():
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    first, first_total, seglen = remote_flow(10 * 1420)
    conn.inject(first[:first_total], seglen, PEER_IP)
    conn.inject(bytes(IP(src="10.244.9.8", dst="10.244.7.6", ttl=63) / TCP(flags="S")), seglen, PEER_IP)
    pump._on_udp()
    assert len(tun.frames) == 2
    assert VNET_HDR.unpack_from(tun.frames[0], 0)[1] == GSO_TCPV4
    assert tun.frames[1][:VNET_HDR_LEN] == bytes(VNET_HDR_LEN) and IP(tun.frames[1][VNET_HDR_LEN:])[TCP].flags == "S"
    assert peer_of(pump).rx_packets == 11 and sum(pump.engine.drops) == 0


def test_a_bad_datagram_inside_a_gro_read_is_dropped_alone():
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    segmented, total, seglen = remote_flow(6 * 1420)
    segmented[3 * seglen + 10] ^= 0xFF  # the fourth segment's IP checksum
    conn.inject(segmented[:total], seglen, PEER_IP)
    pump._on_udp()
    assert pump.engine.drops[Drop.BAD_CHECKSUM] == 1 and sum(pump.engine.drops) == 1
    assert peer_of(pump).rx_packets == 5
    sizes = [len(IP(f[VNET_HDR_LEN:])[TCP].payload) for f in tun.frames]
    assert sizes == [3 * 1420, 2 * 1420]


def test_a_gro_read_over_a_real_socket_reaches_flannel0_merged():
    """The kernel's UDP GRO hands the loop one read per GSO send, with the segment size."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind((PEER_IP, 0))
    conn = open_udp(PEER_IP, 0, offload=True)
    try:
        pump, tun = make_pump(conn, sender.getsockname()[1])
        segmented, total, seglen = remote_flow(46 * 1420)
        for start, end in ((0, 44 * seglen), (44 * seglen, total)):
            sender.sendmsg([segmented[start:end]], gso_control(seglen), 0, conn.sock.getsockname())
        time.sleep(0.05)
        pump._on_udp()
    finally:
        conn.close()
        sender.close()
    (frame,) = tun.frames
    assert bytes(IP(frame[VNET_HDR_LEN:])[TCP].payload) == b"z" * (46 * 1420)
    assert peer_of(pump).rx_packets == 46 and sum(pump.engine.drops) == 0


def test_an_empty_datagram_after_a_merged_run_is_counted_as_too_short():
    conn = MemoryUdp()
    pump, tun = make_pump(conn)
    segmented, total, seglen = remote_flow(4 * 1420)
    conn.inject(segmented[:total], seglen, PEER_IP)
    conn.inject(b"", 0, PEER_IP)
    pump._on_udp()
    assert len(tun.frames) == 1 and pump.engine.drops[Drop.TOO_SHORT] == 1 and sum(pump.engine.drops) == 1


# --- IPv6 pod traffic ------------------------------------------------------------------------

from ipaddress import IPv6Network  # noqa: E402

from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6, IPv6ExtHdrHopByHop  # noqa: E402

OWN6, REMOTE6 = IPv6Network("fd00:10:244:7::/64"), IPv6Network("fd00:10:244:9::/64")
ZERO6 = bytes(VNET_HDR_LEN)  # a plain flannel0 read: no offload asked for


def make_pump6(conn) -> tuple[Pump, MemoryTun]:
    engine = Engine(IPv4Network("10.244.0.0/16"), OWN, 8285, IPv6Network("fd00:10:244::/48"), OWN6)
    engine.set_peer(REMOTE, PEER_IP, REMOTE6, "2001:db8::9")
    tun = MemoryTun(offload=True)
    return Pump(engine, tun, conn), tun


def tcp6_packet(payload: int, src: str = "fd00:10:244:7::5", dst: str = "fd00:10:244:9::8", seq: int = 7,
                hlim: int = 64) -> bytearray:
    return bytearray(bytes(IPv6(src=src, dst=dst, hlim=hlim) / TCP(sport=40000, dport=5201, seq=seq, flags="PA")
                           / Raw(b"z" * payload)))


def test_ipv6_from_a_pod_leaves_over_the_ipv4_underlay_with_its_checksum_completed():
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    packet = tcp6_packet(1000)
    sent_checksum = IPv6(bytes(packet))[TCP].chksum
    # CHECKSUM_PARTIAL, as the kernel hands it over: the field holds the pseudo-header sum only
    partial = bytearray(packet)
    pseudo = int.from_bytes(partial[8:40], "big") + len(partial) - 40 + 6
    partial[56:58] = (pseudo % 0xFFFF or 0xFFFF).to_bytes(2, "big")
    tun.inject(VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 40, 16) + partial)
    tun.inject(ZERO6 + tcp6_packet(10, dst="fd00:10:244:200::1"))  # no such peer: ICMPv6 back
    pump._on_tun()
    (datagram,) = conn.datagrams
    assert conn.sends[0].addr == (PEER_IP, 8285)
    inner = IPv6(datagram)
    assert inner.hlim == 63 and inner[TCP].chksum == sent_checksum
    assert peer_of(pump).tx_packets == 1 and pump.engine.drops[Drop.NO_ROUTE] == 1
    (reply,) = tun.frames
    assert IPv6(reply[VNET_HDR_LEN:]).haslayer(ICMPv6DestUnreach)


def test_ipv6_from_a_peer_reaches_flannel0_one_by_one_also_from_a_gro_read():
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    segments = [bytes(tcp6_packet(1000, src="fd00:10:244:9::8", dst="fd00:10:244:7::5", seq=7 + 1000 * i))
                for i in range(4)]
    conn.inject(b"".join(segments), len(segments[0]), PEER_IP)
    conn.inject(segments[0], len(segments[0]), "2001:db8::9")  # its PublicIPv6 is its address too
    conn.inject(bytes(tcp6_packet(10, src="fd00:10:244:8::1", dst="fd00:10:244:7::5")), 1500, PEER_IP)
    pump._on_udp()
    assert [frame[VNET_HDR_LEN:] for frame in tun.frames] == segments + segments[:1]
    assert peer_of(pump).rx_packets == 5
    assert pump.engine.drops[Drop.SOURCE_NOT_IN_PEER_SUBNET] == 1 and sum(pump.engine.drops) == 1


def test_ipv6_crosses_an_ipv6_underlay_both_ways_over_real_sockets():
    peer_sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    peer_sock.bind(("::1", 0))
    peer_sock.settimeout(5)
    port = peer_sock.getsockname()[1]
    conn, conn6 = open_udp(PEER_IP, 0, offload=True), open_udp("::1", 0, offload=True)
    try:
        engine = Engine(IPv4Network("10.244.0.0/16"), OWN, port, IPv6Network("fd00:10:244::/48"), OWN6,
                        underlay6=True)
        engine.set_peer(REMOTE, PEER_IP, REMOTE6, "::1")
        tun = MemoryTun(offload=True)
        pump = Pump(engine, tun, conn, conn6=conn6)
        out = tcp6_packet(500)
        tun.inject(ZERO6 + out)
        pump._on_tun()
        datagram, source = peer_sock.recvfrom(65536)
        assert IPv6(datagram).hlim == 63 and datagram[8:] == bytes(out[8:])
        assert source[0] == "::1" and source[1] == conn6.sock.getsockname()[1]  # left by the IPv6 socket

        back = bytes(tcp6_packet(500, src="fd00:10:244:9::8", dst="fd00:10:244:7::5"))
        peer_sock.sendto(back, ("::1", conn6.sock.getsockname()[1]))
        deadline = time.monotonic() + 5
        while not tun.frames and time.monotonic() < deadline:
            pump._on_udp(conn6)
        assert [frame[VNET_HDR_LEN:] for frame in tun.frames] == [back]
        assert peer_of(pump).rx_packets == 1 and sum(engine.drops) == 0
    finally:
        peer_sock.close()
        conn.close()
        conn6.close()


# --- IPv6 with offloads: TSO6 super-packets out, GRO runs merged in ----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flanneld_py.backend.udp import loop as loop_module  # noqa: E402
from flanneld_py.backend.udp import offload  # noqa: E402
from flanneld_py.backend.udp.vnet import GSO_TCPV6  # noqa: E402


def tso6(packet: bytearray, mss: int) -> bytes:
    return VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV6, 60, mss, 40, 16) + packet


def remote_flow6(payload: int, mss: int = 1400, flags: str = "PA") -> tuple[bytearray, int, int]:
    """A remote pod's IPv6 super-packet segmented as its node sends it: (segments, total, seglen)."""
    original = bytearray(bytes(IPv6(src="fd00:10:244:9::8", dst="fd00:10:244:7::5", hlim=63)
                               / TCP(sport=5201, dport=40000, seq=11, flags=flags) / Raw(b"z" * payload)))
    segmented = bytearray(200_000)
    total, seglen, _count = offload.segment_tcp6(original, len(original), mss, segmented)
    return segmented, total, seglen


def test_a_tso6_super_packet_leaves_as_mss_sized_valid_ipv6_packets():
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    tun.inject(tso6(tcp6_packet(46 * 1400), 1400))
    pump._on_tun()
    datagrams = conn.datagrams
    assert len(datagrams) == 46 and {s.addr for s in conn.sends} == {(PEER_IP, 8285)}
    payload = b""
    for datagram in datagrams:
        inner = IPv6(datagram)
        assert inner.plen == len(datagram) - 40 and inner.hlim == 63 and len(datagram) <= 1460
        fresh = IPv6(datagram)
        del fresh[TCP].chksum
        assert IPv6(bytes(fresh))[TCP].chksum == inner[TCP].chksum
        payload += bytes(inner[TCP].payload)
    assert payload == b"z" * (46 * 1400)
    assert (peer_of(pump).tx_packets, sum(pump.engine.drops)) == (46, 0)


@pytest.mark.parametrize("frame", [
    tso6(bytearray(bytes(IPv6(src="fd00:10:244:7::5", dst="fd00:10:244:9::8") / IPv6ExtHdrHopByHop()
                         / TCP(flags="A") / Raw(b"x" * 3000))), 1400),  # an extension header: not ours to split
    VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 60, 1400, 40, 16) + tcp6_packet(3000),  # TSO of the other family
], ids=["extension-header", "tcpv4-gso-on-ipv6"])
def test_a_tso6_read_we_cannot_split_is_counted_and_dropped(frame):
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    tun.inject(frame)
    pump._on_tun()
    assert conn.sends == [] and pump.engine.drops[Drop.BAD_OFFLOAD_HEADER] == 1 and sum(pump.engine.drops) == 1
    assert (peer_of(pump).tx_packets, peer_of(pump).tx_bytes) == (0, 0)


def test_an_ipv6_flow_split_over_two_gro_reads_is_written_as_one_tcpv6_super_packet():
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    segmented, total, seglen = remote_flow6(46 * 1400)
    conn.inject(segmented[: 44 * seglen], seglen, PEER_IP)
    conn.inject(segmented[44 * seglen : total], seglen, "2001:db8::9")  # either of its addresses
    pump._on_udp()
    (frame,) = tun.frames
    assert VNET_HDR.unpack_from(frame, 0) == (NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16)
    merged = IPv6(frame[VNET_HDR_LEN:])
    assert merged.plen == len(frame) - VNET_HDR_LEN - 40 and bytes(merged[TCP].payload) == b"z" * (46 * 1400)
    assert "P" in merged[TCP].flags
    assert (peer_of(pump).rx_packets, peer_of(pump).rx_bytes) == (46, total) and sum(pump.engine.drops) == 0


def test_an_ipv6_run_from_outside_the_peers_subnet_is_dropped_datagram_by_datagram():
    conn = MemoryUdp()
    pump, tun = make_pump6(conn)
    segmented, total, seglen = remote_flow6(5 * 1400, flags="A")
    for at in range(0, total, seglen):
        segmented[at + 14] ^= 0x01  # inner source fd00:10:244:109::8: no peer's subnet
    conn.inject(segmented[:total], seglen, PEER_IP)
    pump._on_udp()
    assert tun.frames == [] and pump.engine.drops[Drop.SOURCE_NOT_IN_PEER_SUBNET] == 5
    assert sum(pump.engine.drops) == 5 and peer_of(pump).rx_packets == 0


def test_an_ipv4_merge_is_written_before_an_ipv6_run_of_the_same_read_batch():
    conn = MemoryUdp()
    engine = Engine(IPv4Network("10.244.0.0/16"), OWN, 8285, IPv6Network("fd00:10:244::/48"), OWN6)
    engine.set_peer(REMOTE, PEER_IP, REMOTE6, "2001:db8::9")
    tun = MemoryTun(offload=True)
    pump = Pump(engine, tun, conn)
    four, four_total, four_seglen = remote_flow(5 * 1420)
    six, six_total, six_seglen = remote_flow6(5 * 1400)
    conn.inject(four[: 3 * four_seglen], four_seglen, PEER_IP)  # no PSH yet: waits to be extended
    conn.inject(six[:six_total], six_seglen, PEER_IP)
    pump._on_udp()
    assert [VNET_HDR.unpack_from(f, 0)[1] for f in tun.frames] == [GSO_TCPV4, GSO_TCPV6]
    assert peer_of(pump).rx_packets == 3 + 5 and sum(engine.drops) == 0


def _run_pump_with(build, tun_frames: list[bytes], reads: list[tuple[bytes, int, str]]):
    """Frames written and datagrams sent by a loop whose stages come from ``build``, and its counters."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("segment_tcp4", "segment_tcp6", "tcp_flow_run", "merge_tcp4", "merge_tcp6", "extend_tcp4",
                     "extend_tcp6"):
            patch.setattr(loop_module, name, getattr(build, name))
        conn = MemoryUdp()
        pump, tun = make_pump6(conn)
        for frame in tun_frames:
            tun.inject(frame)
        for data, seglen, source in reads:
            conn.inject(data, seglen, source)
        pump._on_tun()
        pump._on_udp()
        peer = peer_of(pump)
        counters = (peer.tx_packets, peer.tx_bytes, peer.rx_packets, peer.rx_bytes, list(pump.engine.drops))
        return tun.frames, conn.datagrams, counters


@settings(max_examples=60, deadline=None)
@given(payload=st.integers(1, 20000), mss=st.sampled_from([1400, 1220, 536]), psh=st.booleans(),
       split_at=st.integers(1, 50), mutations=st.lists(st.tuples(st.integers(0, 65535), st.integers(1, 255)),
                                                      max_size=2))
def test_both_builds_give_the_loop_the_same_ipv6_bytes_and_counters(payload, mss, psh, split_at, mutations):
    """The C and reference stages under the real loop, on the same IPv6 traffic both ways (a TSO6
    super-packet out, a flow in over two GRO reads, some bytes changed): identical frames,
    datagrams, peer counters and drops."""
    segmented, total, seglen = remote_flow6(payload, mss, "PA" if psh else "A")
    for offset, flip in mutations:
        segmented[offset % total] ^= flip
    cut = min(split_at * seglen, total)
    reads = [(bytes(segmented[:cut]), seglen, PEER_IP)]
    if cut < total:
        reads.append((bytes(segmented[cut:total]), seglen, PEER_IP))
    frames = [tso6(tcp6_packet(payload), mss)]
    results = [_run_pump_with(build, frames, reads)
               for build in (offload.load("c")[1], offload.load("python")[1])]
    assert results[0] == results[1]
