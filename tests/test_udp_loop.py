"""The udp hot loop's egress callback in-process: a pipe stands in for flannel0's queue
(one write, one read: one packet) and loopback UDP sockets for the peer, so the loop's own
handling is checked without namespaces: segments on the wire, counters, and the drop of
super-packets whose virtio-net header does not fit the packet."""

from __future__ import annotations

import os
import socket
from ipaddress import IPv4Network

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from flanneld_py.backend.udp.engine import Engine
from flanneld_py.backend.udp.loop import Pump
from flanneld_py.backend.udp.tun import TunDevice
from flanneld_py.backend.udp.udpconn import open_udp
from flanneld_py.backend.udp.vnet import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HDR
from flanneld_py.core.packet import Drop


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
