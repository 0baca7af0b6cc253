"""The udp hot loop's egress callback in-process: a pipe stands in for flannel0's queue
(one write, one read: one packet) and loopback UDP sockets for the peer, so the loop's own
handling is checked without namespaces: segments on the wire, counters, and the drop of
super-packets whose virtio-net header does not fit the packet."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from ipaddress import IPv4Network

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from flanneld_py.backend.udp.engine import Engine
from flanneld_py.backend.udp.loop import Pump
from flanneld_py.backend.udp.tun import TunDevice
from flanneld_py.backend.udp.offload import segment_tcp4
from flanneld_py.backend.udp.udpconn import gso_control, open_udp
from flanneld_py.backend.udp.vnet import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HDR
from flanneld_py.core.packet import Drop


F_SETPIPE_SZ = 1031


@pytest.fixture
def rig():
    """(pump, write a flannel0 read, the peer's socket, the peer)."""
    peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_sock.bind(("127.0.0.1", 0))
    peer_sock.settimeout(0.3)
    engine = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), peer_sock.getsockname()[1])
    peer = engine.set_peer(IPv4Network("10.244.9.0/24"), "127.0.0.1")
    conn = open_udp("127.0.0.1", 0, offload=True)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)  # room for a 64 KB super-packet
    os.set_blocking(read_end, False)
    pump = Pump(engine, TunDevice(read_end, "flannel0", offload=True), conn)
    yield pump, lambda data: os.write(write_end, data), peer_sock, peer
    for fd in (read_end, write_end):
        os.close(fd)
    conn.close()
    peer_sock.close()


def tcp_packet(payload: int, data_offset: int | None = None) -> bytearray:
    tcp = TCP(sport=40000, dport=5201, seq=7, flags="PA")
    if data_offset is not None:
        tcp.dataofs = data_offset
    return bytearray(bytes(IP(src="10.244.7.5", dst="10.244.9.8", ttl=64) / tcp / Raw(b"z" * payload)))


def received(sock: socket.socket) -> list[bytes]:
    datagrams = []
    try:
        while True:
            datagrams.append(sock.recv(65536))
    except TimeoutError:
        return datagrams


def test_super_packet_leaves_as_mss_sized_valid_packets(rig):
    pump, write, peer_sock, peer = rig
    packet = tcp_packet(5000)
    write(VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16) + packet)
    pump._on_tun_offload()
    datagrams = received(peer_sock)
    assert [len(d) for d in datagrams] == [1440, 1440, 1440, 840]
    payload = b""
    for datagram in datagrams:
        inner = IP(datagram)
        assert inner.ttl == 63  # routed: TTL decremented once, checksums valid
        fresh = IP(datagram)
        del fresh.chksum, fresh[TCP].chksum
        fresh = IP(bytes(fresh))
        assert (fresh.chksum, fresh[TCP].chksum) == (inner.chksum, inner[TCP].chksum)
        payload += bytes(inner[TCP].payload)
    assert payload == b"z" * 5000
    assert (peer.tx_packets, peer.tx_bytes) == (4, sum(map(len, datagrams)))
    assert sum(pump.engine.drops) == 0


@pytest.mark.parametrize("header, packet", [
    (VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16), tcp_packet(5000, data_offset=2)),  # TCP header < 20
    (VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 200), tcp_packet(50)),  # checksum field past the end
], ids=["tcp-data-offset", "csum-offset"])
def test_read_whose_offload_header_does_not_fit_is_counted_and_dropped(rig, header, packet):
    pump, write, peer_sock, peer = rig
    write(header + packet)
    pump._on_tun_offload()
    assert received(peer_sock) == []
    assert pump.engine.drops[Drop.BAD_OFFLOAD_HEADER] == 1 and sum(pump.engine.drops) == 1
    assert (peer.tx_packets, peer.tx_bytes) == (0, 0)


def test_a_64k_super_packet_leaves_as_valid_datagrams_within_the_mtu(rig):
    """A pod's TSO super-packet of 65535 bytes (46 segments at MTU 1472: more than one UDP GSO
    send holds) leaves as MTU-sized valid packets, in order, all counted."""
    pump, write, peer_sock, peer = rig
    packet = tcp_packet(65535 - 40)
    write(VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1432, 20, 16) + packet)
    pump._on_tun_offload()
    datagrams = received(peer_sock)
    assert len(datagrams) == 46 and all(len(d) <= 1472 for d in datagrams)
    assert [len(d) for d in datagrams[:-1]] == [1472] * 45
    payload = b""
    for datagram in datagrams:
        inner = IP(datagram)
        fresh = IP(datagram)
        del fresh.chksum, fresh[TCP].chksum
        fresh = IP(bytes(fresh))
        assert (fresh.chksum, fresh[TCP].chksum) == (inner.chksum, inner[TCP].chksum)
        payload += bytes(inner[TCP].payload)
    assert payload == b"z" * (65535 - 40)
    assert (peer.tx_packets, peer.tx_bytes) == (46, sum(map(len, datagrams)))
    assert sum(pump.engine.drops) == 0


@pytest.fixture
def ingress_rig():
    """(pump whose flannel0 is a datagram socketpair, its far end, a peer socket that sends with
    UDP GSO, the pump's address, the peer) for the UDP -> flannel0 direction."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    engine = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), sender.getsockname()[1])
    peer = engine.set_peer(IPv4Network("10.244.9.0/24"), "127.0.0.1")
    conn = open_udp("127.0.0.1", 0, offload=True)
    tun_end, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (tun_end, far_end):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tun_end.setblocking(False)
    far_end.settimeout(0.3)
    pump = Pump(engine, TunDevice(tun_end.fileno(), "flannel0", offload=True), conn)
    yield pump, far_end, sender, conn.sock.getsockname(), peer
    for sock in (sender, tun_end, far_end, conn.sock):
        sock.close()


def test_a_flow_split_over_two_gro_reads_is_written_as_one_super_packet(ingress_rig):
    """A sender's 64 KB super-packet takes two GSO sends (44 + 2 segments); the receiving loop
    merges the second read into the first and writes one super-packet, counters for 46."""
    pump, far_end, sender, address, peer = ingress_rig
    original = bytearray(bytes(IP(src="10.244.9.8", dst="10.244.7.5", ttl=63, flags="DF")
                               / TCP(sport=5201, dport=40000, seq=7, flags="PA") / Raw(b"q" * (46 * 1420))))
    segmented = bytearray(200_000)
    total, seglen, count = segment_tcp4(original, len(original), 1420, segmented)
    assert (count, seglen) == (46, 1460)
    for start, end in ((0, 44 * seglen), (44 * seglen, total)):
        sender.sendmsg([segmented[start:end]], gso_control(seglen), 0, address)
    time.sleep(0.05)
    pump._on_udp_offload()
    writes = []
    try:
        while True:
            writes.append(far_end.recv(1 << 17))
    except TimeoutError:
        pass
    assert len(writes) == 1
    flags, gso_type, hdr_len, gso_size, _start, _offset = VNET_HDR.unpack_from(writes[0], 0)
    assert (flags, gso_type, hdr_len, gso_size) == (NEEDS_CSUM, GSO_TCPV4, 40, 1420)
    merged = IP(writes[0][VNET_HDR.size :])
    assert merged.len == len(writes[0]) - VNET_HDR.size and bytes(merged[TCP].payload) == b"q" * (46 * 1420)
    assert "P" in merged[TCP].flags and merged.ttl == 63
    assert (peer.rx_packets, peer.rx_bytes) == (46, total)
    assert sum(pump.engine.drops) == 0
