"""The fast lane (``_lane.c``) held to the engine, and its thread driven through real descriptors.

Differential: the same frames go through the engine alone (the reference) and
through the lane first, with the engine taking whatever the lane hands over (as
the loop runs them); both must end with the same bytes, the same verdicts and the
same counters, and the lane must forward every plain IPv4 packet itself. The bulk
path (super-packets, checksums to complete, GRO reads) is held the same way to the
loop (:class:`Pump` on in-memory edges): same datagrams to the same peers, same
flannel0 frames, same counters.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from udp_fakes import MemoryTun, MemoryUdp

from flanneld_py.backend.udp import _lane
from flanneld_py.backend.udp import lane as lane_module
from flanneld_py.backend.udp.engine import Engine, Peer
from flanneld_py.backend.udp.lane import FastLane
from flanneld_py.backend.udp.loop import BatchStats, Pump
from flanneld_py.backend.udp.offload import segment_tcp4
from flanneld_py.backend.udp.tun import KernelTun
from flanneld_py.backend.udp.udpconn import KernelUdp, gso_control, open_udp
from flanneld_py.backend.udp.vnet import GSO_TCPV4, VNET_HDR_LEN
from flanneld_py.core.packet import Drop

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.1.0/24")
PEERS = {IPv4Network("10.244.2.0/24"): "192.0.2.2", IPv4Network("10.244.3.0/24"): "192.0.2.3",
         IPv4Network("10.244.4.0/24"): "0.0.0.0"}  # the last publishes no PublicIP: it stays with the engine
PLAIN_VNET = bytes(VNET_HDR_LEN)


def make_engine(port: int = 8285) -> Engine:
    engine = Engine(NETWORK, OWN, port, IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:1::/64"))
    for subnet, public_ip in PEERS.items():
        engine.set_peer(subnet, public_ip, IPv6Network(f"fd00:10:0:{subnet.network_address.packed[2]}::/64"))
    return engine


@pytest.fixture
def descriptors() -> Iterator[tuple[int, int]]:
    """Descriptors the lane can poll (its thread is not started in the differential tests)."""
    tun, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield tun.fileno(), udp.fileno()
    finally:
        for sock in (tun, other, udp):
            sock.close()


def make_lane(engine: Engine, fds: tuple[int, int], vnet: bool) -> FastLane:
    lane = FastLane(_lane, engine, fds, (bytearray(70000), bytearray(70000)), vnet, False,
                    (lambda _size: None, lambda _read: None), (lambda: None, lambda: None),
                    (BatchStats(), BatchStats()))
    lane.push_peers()
    return lane


def counters(engine: Engine) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    return list(engine.drops), [(p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes) for p in engine.peers.values()]


def outbound_packets() -> list[bytes]:
    """Packets a pod may send into flannel0: plain forwards and every kind the engine treats otherwise."""
    packets = [bytes(IP(src="10.244.1.5", dst=dst, ttl=ttl) / ICMP() / Raw(b"x" * size))
               for dst in ("10.244.2.7", "10.244.3.9", "10.244.4.2", "10.244.9.1", "10.244.1.3", "192.0.2.50")
               for ttl in (0, 1, 2, 64) for size in (0, 56)]
    packets += [bytes(IP(src="10.244.1.5", dst="10.244.2.7", ihl=6, options=b"\x01\x01\x01\x00") / UDP() / b"hi"),
                bytes(IP(src="10.244.1.5", dst="10.244.2.7") / TCP(flags="A")),
                bytes(IPv6(src="fd00:10:0:1::5", dst="fd00:10:0:2::7") / UDP() / b"v6"),
                bytes(IP(dst="10.244.2.7"))[:19], b"\x45", b"", bytes(40)]
    return packets


def inbound_packets() -> list[tuple[bytes, str]]:
    """Datagrams a peer (or anyone) may send to the socket, with their outer source."""
    good = IP(src="10.244.2.7", dst="10.244.1.5") / ICMP() / Raw(b"y" * 20)
    cases = [(bytes(good), "192.0.2.2"), (bytes(good), "192.0.2.3"), (bytes(good), "198.51.100.9"),
             (bytes(IP(src="10.244.3.7", dst="10.244.1.5") / UDP() / b"ok"), "192.0.2.3"),
             (bytes(IP(src="10.244.2.7", dst="10.244.3.5") / UDP()), "192.0.2.2"),
             (bytes(IP(src="10.244.2.7", dst="10.244.1.5", ihl=7, options=b"\x01" * 8) / UDP()), "192.0.2.2"),
             (bytes(IPv6(src="fd00:10:0:2::7", dst="fd00:10:0:1::5") / UDP()), "192.0.2.2"),
             (bytes(good)[:19], "192.0.2.2"), (b"", "192.0.2.2")]
    bad_sum = bytearray(bytes(good))
    bad_sum[10] ^= 0xFF
    long_total = bytearray(bytes(good))
    long_total[3] += 1
    bad_ihl = bytearray(bytes(good))
    bad_ihl[0] = 0x44
    cases += [(bytes(b), "192.0.2.2") for b in (bad_sum, long_total, bad_ihl)]
    return cases


def through_engine(engine: Engine, frame: bytes, vnet: bool) -> bytes | None:
    """The reference: the packet the engine forwards (None: dropped or answered)."""
    packet = bytearray(frame[VNET_HDR_LEN:] if vnet else frame)
    if vnet and (len(frame) < VNET_HDR_LEN or frame[0] & 1 or frame[1] & 0x7F):
        return None  # the offload path's (tun.py): not what the engine alone sees
    return bytes(packet) if engine.outbound(packet, len(packet)) is not None else None


def through_lane(lane: FastLane, engine: Engine, frame: bytes, vnet: bool) -> tuple[bytes | None, bool]:
    """The lane first, the engine for what it hands over: (forwarded packet, forwarded by the lane)."""
    buf = bytearray(frame)
    if lane._lane.forward_out(buf, len(buf))[0] >= 0:
        return bytes(buf[VNET_HDR_LEN:] if vnet else buf), True
    assert buf == frame, "a handed-over frame must be untouched"
    return through_engine(engine, frame, vnet), False


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_outbound_same_bytes_verdicts_and_counters(descriptors: tuple[int, int], vnet: bool) -> None:
    reference, engine = make_engine(), make_engine()
    lane = make_lane(engine, descriptors, vnet)
    for packet in outbound_packets():
        for head in ((PLAIN_VNET, b"\x01" + bytes(9), b"\x00\x01" + bytes(8)) if vnet else (b"",)):
            frame = head + packet
            expected = through_engine(reference, frame, vnet)
            got, by_lane = through_lane(lane, engine, frame, vnet)
            assert got == expected, frame.hex()
            plain = (expected is not None and not head.strip(b"\x00") and packet[0] >> 4 == 4
                     and not IP(packet).dst.startswith("10.244.4."))
            assert by_lane == plain, f"the lane must forward exactly the plain forwards: {frame.hex()}"
    lane.sync_counters()
    assert counters(engine) == counters(reference)


def test_inbound_same_verdicts_and_counters(descriptors: tuple[int, int]) -> None:
    reference, engine = make_engine(), make_engine()
    lane = make_lane(engine, descriptors, vnet=False)
    for packet, source in inbound_packets():
        expected = reference.inbound(bytearray(packet), len(packet), source)
        by_lane = lane._lane.forward_in(packet, len(packet), source)
        if by_lane >= 0:
            assert expected is not None and engine.peers[int(expected.subnet.network_address)] is lane._peers[by_lane]
        else:
            engine.inbound(bytearray(packet), len(packet), source)
            assert expected is None or packet[0] >> 4 == 6, f"a plain IPv4 forward handed over: {packet.hex()}"
    lane.sync_counters()
    assert counters(engine) == counters(reference)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=80), ttl=st.integers(0, 255), dst=st.sampled_from([2, 3, 4, 9]),
       source=st.sampled_from(["192.0.2.2", "192.0.2.3", "192.0.2.9"]))
def test_random_frames_agree(data: bytes, ttl: int, dst: int, source: str) -> None:
    """Arbitrary bytes, and IPv4 headers with arbitrary tails: the lane never forwards what the
    engine would not, and forwards the same bytes when it does."""
    tun, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        reference, engine = make_engine(), make_engine()
        lane = make_lane(engine, (tun.fileno(), udp.fileno()), vnet=False)
        header = bytes(IP(src=f"10.244.{dst}.3", dst=f"10.244.{dst}.7", ttl=ttl, len=20 + len(data)))
        for frame in (data, header + data, header[:10] + data[:10] + header[20:] + data):
            assert through_lane(lane, engine, frame, False)[0] == through_engine(reference, frame, False)
            expected = reference.inbound(bytearray(frame), len(frame), source)
            if lane._lane.forward_in(frame, len(frame), source) < 0:
                engine.inbound(bytearray(frame), len(frame), source)
            else:
                assert expected is not None
        lane.sync_counters()
        assert counters(engine) == counters(reference)
    finally:
        for sock in (tun, other, udp):
            sock.close()


def test_peer_changes_reach_the_lane_and_keep_counters(descriptors: tuple[int, int]) -> None:
    engine = make_engine()
    lane = make_lane(engine, descriptors, vnet=False)
    packet = bytes(IP(src="10.244.1.5", dst="10.244.5.7") / ICMP())
    assert lane._lane.forward_out(bytearray(packet), len(packet))[0] == -1
    peer = engine.set_peer(IPv4Network("10.244.5.0/24"), "192.0.2.5")
    lane.push_peers()  # the loop does this in its next turn (engine.on_peers_changed)
    assert lane._peers[lane._lane.forward_out(bytearray(packet), len(packet))[0]] is peer
    engine.remove_peer(IPv4Network("10.244.5.0/24"))
    lane.push_peers()  # the removed table's count is folded on the swap
    assert lane._lane.forward_out(bytearray(packet), len(packet))[0] == -1
    assert (peer.tx_packets, peer.tx_bytes) == (1, len(packet))


def test_switch() -> None:
    assert lane_module.load("off") is None
    assert lane_module.load("on") is _lane
    assert lane_module.load("lone") is _lane and not lane_module.bulk_path_on("lone")
    assert lane_module.bulk_path_on("auto") and lane_module.bulk_path_on("on")
    with pytest.raises(ValueError, match="choose auto, on, off or lone"):
        lane_module.load("fast")


# --- the thread, through real descriptors ---------------------------------------------------


class Node:
    """A pump with the lane on: flannel0 a SEQPACKET pair, the overlay socket on loopback, and one
    peer, 10.244.2.0/24, whose socket is ``remote``."""

    def __init__(self, vnet: bool, gso_gro: bool = False, conn6: KernelUdp | None = None) -> None:
        self.remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.remote.bind(("127.0.0.1", 0))
        self.remote.settimeout(10)
        self.pod, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pod.settimeout(10)
        device.setblocking(False)
        self.tun = KernelTun(os.dup(device.fileno()), "flannel0", offload=vnet)
        device.close()
        if gso_gro:
            self.conn = open_udp("127.0.0.1", 0, offload=True)
            assert self.conn.gso and self.conn.gro
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.conn = KernelUdp(sock)
        self.engine = Engine(NETWORK, OWN, self.remote.getsockname()[1])
        self.peer = self.engine.set_peer(IPv4Network("10.244.2.0/24"), "127.0.0.1")
        self.conn6 = conn6
        self.pump = Pump(self.engine, self.tun, self.conn, conn6=conn6, lane=_lane)
        self.head = PLAIN_VNET if vnet else b""

    def close(self) -> None:
        self.pump.stop()
        self.tun.close()
        for sock in (self.conn.sock, self.remote, self.pod):
            sock.close()
        if self.conn6 is not None:
            self.conn6.close()


async def receive(sock: socket.socket) -> bytes:
    return await asyncio.to_thread(sock.recv, 70000)


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_thread_forwards_and_hands_over(vnet: bool) -> None:
    async def scenario(node: Node) -> None:
        node.pump.start()
        try:
            await exchange(node)
        finally:
            node.pump.stop()

    async def exchange(node: Node) -> None:
        echo = IP(src="10.244.1.5", dst="10.244.2.7", ttl=64) / ICMP() / Raw(b"ping")
        node.pod.send(node.head + bytes(echo))
        sent = IP(await receive(node.remote))
        assert (sent.dst, sent.ttl, sent[Raw].load) == ("10.244.2.7", 63, b"ping")
        reply = bytes(IP(src="10.244.2.7", dst="10.244.1.5") / ICMP(type=0) / Raw(b"pong"))
        node.remote.sendto(reply, node.conn.sock.getsockname())
        assert await receive(node.pod) == node.head + reply
        node.pump.sync_counters()
        assert (node.peer.tx_packets, node.peer.rx_packets) == (1, 1)
        assert node.pump.tun_batches.wakeups >= 1 and node.pump.udp_batches.wakeups >= 1
        # anything else goes to the loop: a bad checksum is counted, a packet without a route answered
        bad = bytearray(reply)
        bad[10] ^= 0xFF
        node.remote.sendto(bad, node.conn.sock.getsockname())
        node.pod.send(node.head + bytes(IP(src="10.244.1.5", dst="10.244.7.7") / ICMP()))
        answer = IP((await receive(node.pod))[len(node.head):])
        assert (answer[ICMP].type, answer[ICMP].code) == (3, 0)
        for _ in range(200):
            if node.engine.drops[Drop.BAD_CHECKSUM]:
                break
            await asyncio.sleep(0.01)
        assert node.engine.drops[Drop.BAD_CHECKSUM] == 1 and node.engine.drops[Drop.NO_ROUTE] == 1
        # and once both are idle, the lane has them again
        await asyncio.sleep(lane_module.HOLD * 4)
        assert node.pump.lane is not None and not any(node.pump.lane._held)
        node.pod.send(node.head + bytes(echo))
        assert IP(await receive(node.remote)).ttl == 63
        node.pump.sync_counters()
        assert node.peer.tx_packets == 2

    node = Node(vnet)
    try:
        asyncio.run(scenario(node))
    finally:
        node.close()


def test_random_traffic_through_the_thread_is_counted_like_the_engine() -> None:
    """A mix of plain and other packets both ways: what leaves and the counters match the engine's."""
    rng = random.Random(16)
    out = [packet for packet in outbound_packets() if packet]  # a TUN read is never empty
    into = [p for p, source in inbound_packets() if source == "192.0.2.2"]

    async def scenario(node: Node) -> None:
        reference = Engine(NETWORK, OWN, 8285)
        ref_peer = reference.set_peer(IPv4Network("10.244.2.0/24"), "127.0.0.1")
        node.pump.start()
        try:
            await traffic(node, reference, ref_peer)
        finally:
            node.pump.stop()

    async def traffic(node: Node, reference: Engine, ref_peer: Peer) -> None:
        for _ in range(60):
            packet = rng.choice(out)
            reference.outbound(bytearray(packet), len(packet))
            node.pod.send(node.head + packet)
            datagram = bytes(IP(src="10.244.2.7", dst="10.244.1.5") / UDP() / b"z") if rng.random() < 0.5 \
                else rng.choice(into)
            reference.inbound(bytearray(datagram), len(datagram), "127.0.0.1")
            node.remote.sendto(datagram, node.conn.sock.getsockname())
            await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
        def state(engine: Engine, peer: Peer) -> tuple[object, ...]:
            return peer.tx_packets, peer.tx_bytes, peer.rx_packets, peer.rx_bytes, list(engine.drops)

        for _ in range(1000):  # the last packets may still be on their way
            node.pump.sync_counters()
            if state(node.engine, node.peer) == state(reference, ref_peer):
                break
            await asyncio.sleep(0.01)
        assert state(node.engine, node.peer) == state(reference, ref_peer)

    node = Node(vnet=False)
    try:
        asyncio.run(scenario(node))
    finally:
        node.close()


def test_stop_joins_the_thread_and_leaves_the_descriptors() -> None:
    node = Node(vnet=False)

    async def scenario() -> None:
        node.pump.start()
        node.pump.stop()

    try:
        asyncio.run(scenario())
        os.fstat(node.tun.fd)  # still ours to close
        assert node.pump.lane is not None
        with pytest.raises(ValueError, match="closed"):
            node.pump.lane._lane.resume(0)
    finally:
        node.close()


def test_a_handed_frame_with_a_bad_offload_header_is_counted_once() -> None:
    async def scenario(node: Node) -> None:
        node.pump.start()
        try:
            packet = bytes(IP(src="10.244.1.5", dst="10.244.2.7") / UDP() / b"data")
            bad = struct.pack("<BBHHHH", 1, 0, 0, 0, 200, 6)  # checksum start beyond the packet
            node.pod.send(bad + packet)
            for _ in range(500):
                if node.engine.drops[Drop.BAD_OFFLOAD_HEADER]:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert node.engine.drops[Drop.BAD_OFFLOAD_HEADER] == 1
        finally:
            node.pump.stop()

    node = Node(vnet=True)
    try:
        asyncio.run(scenario(node))
    finally:
        node.close()


def _epoll_descriptors() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                found.add(int(name))
        except OSError:
            pass
    return found


def test_a_thread_that_fails_leaves_both_descriptors_to_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """The thread's epoll descriptor is replaced by /dev/null (its next epoll_wait fails with EINVAL):
    the loop takes flannel0 and the socket for good, and traffic keeps flowing both ways."""
    echo = IP(src="10.244.1.5", dst="10.244.2.7", ttl=64) / ICMP() / Raw(b"ping")
    reply = bytes(IP(src="10.244.2.7", dst="10.244.1.5") / ICMP(type=0) / Raw(b"pong"))

    async def scenario(node: Node, lane_fd: int) -> None:
        node.pump.start()
        try:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, lane_fd)  # the number stays valid: the lane's close closes the copy
            os.close(null)
            node.pod.send(bytes(echo))  # the thread forwards it, then its epoll_wait fails
            assert IP(await receive(node.remote)).ttl == 63
            assert node.pump.lane is not None
            for _ in range(500):
                if node.pump.lane._failed:
                    break
                await asyncio.sleep(0.01)
            assert node.pump.lane._failed and all(node.pump.lane._held)
            await asyncio.sleep(lane_module.HOLD * 4)  # idle: nothing is given back to a dead thread
            assert all(node.pump.lane._held)
            for _ in range(3):
                node.pod.send(bytes(echo))
                assert IP(await receive(node.remote)).ttl == 63
                node.remote.sendto(reply, node.conn.sock.getsockname())
                assert await receive(node.pod) == reply
        finally:
            node.pump.stop()

    before = _epoll_descriptors()
    node = Node(vnet=False)  # the lane makes its epoll descriptor here
    try:
        (lane_fd,) = _epoll_descriptors() - before
        with caplog.at_level("ERROR"):
            asyncio.run(scenario(node, lane_fd))
        node.pump.sync_counters()
        assert (node.peer.tx_packets, node.peer.rx_packets) == (4, 3)
        assert "udp fast lane stopped (epoll_wait: Invalid argument)" in caplog.text
    finally:
        node.close()


# --- the bulk path: the lane's offload stages against the loop's -------------------------------

PEER2 = ("192.0.2.2", 8285)


class Twins:
    """The reference, a loop alone on in-memory edges, and the same loop behind the lane's bulk
    path (the lane's rules run on each frame or read first; the loop takes what it hands over),
    each with its own engine. The lane's flannel0 writes go to a SEQPACKET pair, read back in order."""

    def __init__(self, gso: bool = True) -> None:
        self.ref = Pump(make_engine(), MemoryTun(offload=True), MemoryUdp(gso=gso))
        self.pump = Pump(make_engine(), MemoryTun(offload=True), MemoryUdp(gso=gso))
        self.device, self.written = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.written.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.lane = FastLane(_lane, self.pump.engine, (self.device.fileno(), self.udp.fileno()),
                             (self.pump.tun.read_buffer, self.pump._udp_view), True, True,
                             (lambda _size: None, lambda _read: None), (lambda: None, lambda: None),
                             (BatchStats(), BatchStats()), self.pump._bulk_path())
        self.lane.push_peers()
        self.taken = 0  # frames and datagrams the lane forwarded itself

    def close(self) -> None:
        self.lane._lane.close()
        for sock in (self.device, self.written, self.udp):
            sock.close()

    def out(self, frame: bytes) -> None:
        """One flannel0 frame in one wakeup: the same datagrams to the same peers, the same replies."""
        self.ref.tun.inject(frame)
        self.ref._on_tun()
        expected = sends(self.ref.conn), self.ref.tun.frames[:]
        buf = bytearray(frame)
        index, length, seglen = self.lane._lane.forward_out(buf, len(buf))
        if index >= 0:
            self.taken += 1
            split = frame[1] & 0x7F == GSO_TCPV4
            data = bytes(self.pump._run.view[:length] if split else buf[VNET_HDR_LEN : VNET_HDR_LEN + length])
            got = [(data[at : at + seglen], self.lane._peers[index].addr) for at in range(0, length, seglen)], []
        else:
            assert buf == frame, "a handed-over frame must be untouched"
            self.pump.tun.inject(frame)
            self.pump._on_tun()
            got = sends(self.pump.conn), self.pump.tun.frames[:]
        assert got == expected, frame[:64].hex()
        for pump in (self.ref, self.pump):
            pump.conn.sends.clear()
            pump.tun.frames.clear()

    def into(self, reads: list[tuple[bytes, int, str]]) -> None:
        """Reads of one wakeup (a GRO run or one datagram each): the same frames written to flannel0."""
        for read in reads:
            self.ref.conn.inject(*read)
        self.ref._on_udp()
        view = self.pump._udp_view
        for at, (data, seglen, source) in enumerate(reads):
            seglen = min(seglen, len(data))
            view[: len(data)] = data
            start, taken = self.lane._lane.forward_read(view, len(data), seglen, source)
            self.taken += taken
            if start < max(1, -(-len(data) // seglen) if seglen else 1):
                for rest in reads[at + 1 :]:  # the loop holds the socket from here on
                    self.pump.conn.inject(*rest)
                self.pump._on_udp_handed((len(data), seglen, source, start))
                break
        else:
            self.lane._lane.flush()
        got = lane_writes(self.written) + self.pump.tun.frames
        assert got == self.ref.tun.frames
        for pump in (self.ref, self.pump):
            pump.tun.frames.clear()

    def assert_same_counters(self) -> None:
        self.lane.sync_counters()
        assert counters(self.pump.engine) == counters(self.ref.engine)


def sends(conn: MemoryUdp) -> list[tuple[bytes, tuple[str, int]]]:
    return [(datagram, send.addr) for send in conn.sends for datagram in send.datagrams]


def lane_writes(sock: socket.socket) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(sock.recv(70000))
        except BlockingIOError:
            return frames


@pytest.fixture
def twins() -> Iterator[Twins]:
    made = Twins()
    try:
        yield made
    finally:
        made.close()


def pod_tcp(payload: int, dst: str = "10.244.2.7", ttl: int = 64, flags: str = "A", seq: int = 1000,
            options: list[tuple[str, object]] | None = None) -> bytes:
    return bytes(IP(src="10.244.1.5", dst=dst, ttl=ttl, flags="DF") /
                 TCP(sport=40000, dport=5201, seq=seq, flags=flags, options=options or []) / Raw(b"p" * payload))


def partial(packet: bytes) -> bytes:
    """A CHECKSUM_PARTIAL frame as a pod's stack hands it over: the L4 checksum field holds the
    pseudo-header sum; the virtio-net header says where to finish it."""
    ip = IP(packet)
    l4 = bytearray(bytes(ip.payload))
    offset = 16 if ip.proto == 6 else 6
    pseudo = socket.inet_aton(ip.src) + socket.inet_aton(ip.dst) + struct.pack("!BBH", 0, ip.proto, len(l4))
    total = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    l4[offset : offset + 2] = struct.pack("!H", total)
    ihl = ip.ihl * 4
    return struct.pack("<BBHHHH", 1, 0, 0, 0, ihl, offset) + packet[:ihl] + bytes(l4)


def tso_frame(packet: bytes, mss: int, kind: int = GSO_TCPV4) -> bytes:
    return struct.pack("<BBHHHH", 1, kind, 40, mss, 20, 16) + packet


def outbound_bulk_frames() -> list[bytes]:
    """Frames of a TCP transfer from a pod, and every way one can differ from the plain case."""
    frames = [tso_frame(pod_tcp(payload), mss) for payload in (1, 1448, 1449, 44 * 1448, 45 * 1448 - 7)
              for mss in (1448, 536)]
    frames += [tso_frame(pod_tcp(3000, flags="PA"), 1000), tso_frame(pod_tcp(3000, flags="FPAC"), 1000),
               tso_frame(pod_tcp(2000, options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]), 500),
               tso_frame(pod_tcp(3000, dst="10.244.4.2"), 1000),  # a peer without a PublicIP: the loop's
               tso_frame(pod_tcp(3000, dst="10.244.9.2"), 1000),  # no route: ICMP from the loop
               tso_frame(pod_tcp(3000, ttl=1), 1000), tso_frame(pod_tcp(3000), 0), tso_frame(pod_tcp(60000), 1),
               tso_frame(pod_tcp(3000), 1000, kind=4), tso_frame(pod_tcp(3000), 1000, kind=3),
               tso_frame(pod_tcp(3000)[:30], 1000), tso_frame(b"", 1000),
               tso_frame(bytes(IPv6(src="fd00:10:0:1::5", dst="fd00:10:0:2::7") / TCP() / Raw(b"6" * 3000)), 1000, 4)]
    bad_offset = bytearray(pod_tcp(3000))
    bad_offset[32] = 0x30  # TCP data offset 3
    frames.append(tso_frame(bytes(bad_offset), 1000))
    for packet in (pod_tcp(0), pod_tcp(100, flags="PA"), bytes(IP(src="10.244.1.5", dst="10.244.2.7") / UDP() / b"u"),
                   bytes(IP(src="10.244.1.5", dst="10.244.3.7") / UDP(sport=1, dport=2) / b"\xff\xff"),
                   pod_tcp(100, dst="10.244.9.9"), pod_tcp(10, ttl=1)):
        frames.append(partial(packet))
    ok = partial(pod_tcp(10))
    for start, offset in ((0, 10), (8, 4), (19, 0), (20, 16), (40, 0), (len(ok), 0), (500, 6), (20, 1000)):
        frames.append(ok[:6] + struct.pack("<HH", start, offset) + ok[VNET_HDR_LEN:])
    frames.append(ok[:1] + b"\x80" + ok[2:])  # the ECN bit of the GSO type, without GSO
    return frames


def test_bulk_outbound_same_datagrams_replies_and_counters(twins: Twins) -> None:
    frames = outbound_bulk_frames()
    for frame in frames:
        twins.out(frame)
    twins.assert_same_counters()
    # the lane takes the transfer's frames: every plain super-packet and checksum to finish
    assert twins.taken >= 10 + 3 + 4
    assert twins.pump.engine.peers[int(IPv4Network("10.244.2.0/24").network_address)].tx_packets > 100


def test_without_gso_the_lane_sends_the_same_datagrams() -> None:
    made = Twins(gso=False)
    try:
        assert made.pump._bulk_path().gso_segments == 0
        for frame in outbound_bulk_frames()[:10]:
            made.out(frame)
        made.assert_same_counters()
    finally:
        made.close()


def peer_flow(payload: int, mss: int = 1448, src: str = "10.244.2.7", dst: str = "10.244.1.5", flags: str = "PA",
              seq: int = 77) -> tuple[bytes, int]:
    """A remote pod's super-packet as its node sends it: (datagrams back to back, datagram size)."""
    original = bytearray(bytes(IP(src=src, dst=dst, ttl=63, flags="DF") /
                               TCP(sport=5201, dport=40000, seq=seq, flags=flags) / Raw(b"q" * payload)))
    out = bytearray(300_000)
    total, seglen, _count = segment_tcp4(original, len(original), mss, out)
    return bytes(out[:total]), seglen


def ack(source: str = "10.244.2.7", ack_no: int = 5) -> bytes:
    return bytes(IP(src=source, dst="10.244.1.5", ttl=63) / TCP(sport=5201, dport=40000, flags="A", ack=ack_no))


def test_bulk_inbound_same_frames_and_counters(twins: Twins) -> None:
    flow, seglen = peer_flow(46 * 1400, mss=1400)
    data, data_seglen = peer_flow(10 * 1448, seq=500_000)
    acks = b"".join(ack(ack_no=i) for i in range(5))
    bad = bytearray(data)
    bad[3 * data_seglen + 10] ^= 0xFF  # the fourth datagram's IP checksum
    foreign, _ = peer_flow(4 * 1448, src="10.244.3.7")  # from 192.0.2.3's subnet, sent by 192.0.2.2
    psh_inside = peer_flow(3 * 1448, flags="PA")[0] + peer_flow(3 * 1448, seq=77 + 3 * 1448)[0]
    v6, _ = IPv6(src="fd00:10:0:2::7", dst="fd00:10:0:1::5") / UDP() / b"x", None
    wakeups = [
        [(flow[: 44 * seglen], seglen, "192.0.2.2"), (flow[44 * seglen :], seglen, "192.0.2.2")],  # one super-packet
        [(data, data_seglen, "192.0.2.2")], [(acks, len(ack()), "192.0.2.2")], [(ack(), 2000, "192.0.2.2")],
        [(flow[: 2 * seglen], seglen, "192.0.2.2"), (ack(), 2000, "192.0.2.2"), (flow[2 * seglen :], seglen, "192.0.2.2")],
        [(bytes(bad), data_seglen, "192.0.2.2")], [(foreign, seglen, "192.0.2.2")], [(foreign, seglen, "192.0.2.3")],
        [(data, data_seglen, "198.51.100.9")], [(psh_inside, seglen, "192.0.2.2")],
        [(data, data_seglen, "192.0.2.2"), (bytes(v6), 2000, "192.0.2.2"), (data, data_seglen, "192.0.2.2")],
        [(data, data_seglen, "192.0.2.2"), (b"", 0, "192.0.2.2")],
        [(acks + ack(source="10.244.3.7"), len(ack()), "192.0.2.2")],
        [(data[: 2 * data_seglen] + acks, data_seglen, "192.0.2.2")],
    ]
    for reads in wakeups:
        twins.into(reads)
    twins.assert_same_counters()
    assert twins.taken >= 46 + 10 + 5


@settings(max_examples=150, deadline=None)
@given(segments=st.integers(1, 45), mss=st.sampled_from([536, 1400, 1448]), cuts=st.lists(st.integers(1, 44), max_size=3),
       mutations=st.lists(st.tuples(st.integers(0, 44), st.sampled_from(["ip_sum", "psh", "src", "dst", "seq", "ttl",
                                                                         "short", "options"])), max_size=3),
       source=st.sampled_from(["192.0.2.2", "192.0.2.2", "192.0.2.3"]), lone=st.booleans())
def test_random_gro_reads_agree(segments: int, mss: int, cuts: list[int], mutations: list[tuple[int, str]],
                                source: str, lone: bool) -> None:
    """A peer's flow split into GRO reads at random points, with datagrams broken in random ways:
    the lane then the loop write the same frames to flannel0, with the same counters, as the loop."""
    segments = min(segments, 65000 // (mss + 40))  # one GRO read holds at most 64 KB
    flow, seglen = peer_flow(segments * mss - mss // 3, mss=mss)
    datagrams = [bytearray(flow[at : at + seglen]) for at in range(0, len(flow), seglen)]
    for index, kind in mutations:
        if index >= len(datagrams):
            continue
        d = datagrams[index]
        if kind == "ip_sum":
            d[10] ^= 0x01
        elif kind == "psh":
            d[33] |= 0x08
        elif kind == "src":
            d[14] = 3
        elif kind == "dst":
            d[18] = 9
        elif kind == "seq":
            d[27] ^= 0x01
        elif kind == "ttl":
            d[8] -= 1
        elif kind == "short" and len(d) > 60:
            del d[len(d) - 7 :]
        elif kind == "options":
            d[0] = 0x46
    reads: list[tuple[bytes, int, str]] = []
    edges = sorted({0, *(c for c in cuts if c < len(datagrams)), len(datagrams)})
    for first, end in itertools.pairwise(edges):
        run = datagrams[first:end]
        if all(len(d) == seglen for d in run[:-1]) and len(run[-1]) <= seglen:
            reads.append((b"".join(run), seglen, source))
        else:  # a GRO read holds equal datagrams but the last: these go one by one
            reads += [(bytes(d), len(d), source) for d in run]
        if lone:
            reads.append((ack(), 2000, source))
    made = Twins()
    try:
        for at in range(0, len(reads), 30):
            made.into(reads[at : at + 30])
        made.assert_same_counters()
    finally:
        made.close()


@settings(max_examples=150, deadline=None)
@given(payload=st.integers(0, 9000), mss=st.sampled_from([0, 1, 88, 536, 1448, 9000]), ttl=st.sampled_from([1, 2, 64]),
       dst=st.sampled_from([2, 3, 4, 9]), flags=st.integers(0, 3), kind=st.sampled_from([0, 1, 4, 0x81]),
       start=st.integers(0, 80), offset=st.integers(0, 40), tcp=st.booleans())
def test_random_flannel0_frames_agree(payload: int, mss: int, ttl: int, dst: int, flags: int, kind: int,
                                      start: int, offset: int, tcp: bool) -> None:
    """Frames with any virtio-net header over TCP and UDP packets: the lane then the loop send the
    same datagrams to the same peers, with the same counters, as the loop alone."""
    if tcp:
        packet = pod_tcp(payload, dst=f"10.244.{dst}.7", ttl=ttl)
    else:
        packet = bytes(IP(src="10.244.1.5", dst=f"10.244.{dst}.7", ttl=ttl) / UDP() / Raw(b"u" * payload))
    made = Twins()
    try:
        made.out(struct.pack("<BBHHHH", flags, kind, 40, mss, start, offset) + packet)
        made.out(partial(packet))
        made.assert_same_counters()
    finally:
        made.close()


def test_the_thread_moves_a_tcp_transfer_both_ways_without_the_loop() -> None:
    """Over real descriptors with UDP GSO and GRO: a pod's super-packet leaves as MSS-sized datagrams
    and a peer's GSO send reaches the pod as one merged super-packet, all in the lane's thread
    (nothing handed over), counted as the loop counts them."""
    flood = [bytes(IP(src="10.244.1.5", dst="10.244.2.7") / UDP(sport=9, dport=9) / (bytes([i]) * 3)) for i in range(6)]

    async def scenario(node: Node) -> None:
        for packet in flood:  # queued before the thread's first wakeup: gathered into one GSO send
            node.pod.send(partial(packet))
        node.pump.start()
        try:
            await transfer(node)
        finally:
            node.pump.stop()

    async def transfer(node: Node) -> None:
        got = [await receive(node.remote) for _ in flood]
        assert [IP(d)[UDP].load for d in got] == [IP(p)[UDP].load for p in flood]
        for datagram in got:
            fresh = IP(datagram)
            del fresh[UDP].chksum
            assert IP(bytes(fresh))[UDP].chksum == IP(datagram)[UDP].chksum
        packet = bytearray(pod_tcp(10 * 1448, flags="PA"))
        node.pod.send(tso_frame(bytes(packet), 1448))
        datagrams = [IP(await receive(node.remote)) for _ in range(10)]
        assert [len(d[TCP].payload) for d in datagrams] == [1448] * 10 and {d.ttl for d in datagrams} == {63}
        flow, seglen = peer_flow(20 * 1400, mss=1400)
        node.remote.sendmsg([flow], gso_control(seglen), 0, node.conn.sock.getsockname())
        frame = await receive(node.pod)
        assert struct.unpack_from("<BBHHHH", frame) == (1, GSO_TCPV4, 40, 1400, 20, 16)
        assert bytes(IP(frame[VNET_HDR_LEN:])[TCP].payload) == b"q" * (20 * 1400)
        assert node.pump.lane is not None and not any(node.pump.lane._held)
        node.pump.sync_counters()
        assert (node.peer.tx_packets, node.peer.rx_packets, node.peer.rx_bytes) == (16, 20, len(flow))
        assert sum(node.engine.drops) == 0

    node = Node(vnet=True, gso_gro=True)
    try:
        asyncio.run(scenario(node))
    finally:
        node.close()


def test_with_an_ipv6_socket_the_lane_reads_into_buffers_of_its_own() -> None:
    """The IPv6 socket's reads run on the loop while the thread reads the IPv4 socket: the lane then
    gets receive and merge buffers of its own, and a read it hands over reaches the loop intact."""
    async def scenario(node: Node) -> None:
        node.pump.start()
        try:
            packet = bytearray(bytes(IP(src="10.244.2.7", dst="10.244.1.5", ttl=63) / UDP() / b"data"))
            packet[10] ^= 0xFF  # handed to the loop, which must see these bytes to count a bad checksum
            node.remote.sendto(packet, node.conn.sock.getsockname())
            for _ in range(500):
                if sum(node.engine.drops):
                    break
                await asyncio.sleep(0.01)
            assert node.engine.drops[Drop.BAD_CHECKSUM] == 1 and sum(node.engine.drops) == 1
            packet[10] ^= 0xFF
            node.remote.sendto(packet, node.conn.sock.getsockname())
            assert await receive(node.pod) == packet
        finally:
            node.pump.stop()

    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock6.bind(("::1", 0))
    sock6.setblocking(False)
    node = Node(vnet=False, conn6=KernelUdp(sock6))
    try:
        assert node.pump._lane_udp_view is not node.pump._udp_view
        assert node.pump._lane_merge_view is not node.pump._merge_view
        asyncio.run(scenario(node))
        node.pump.sync_counters()
        assert node.peer.rx_packets == 1
    finally:
        node.close()


def test_the_bulk_path_asks_for_all_its_buffers_and_a_virtio_net_header(descriptors: tuple[int, int]) -> None:
    base = (*descriptors, bytearray(70000), bytearray(70000))
    with pytest.raises(ValueError, match="the bulk path takes"):
        _lane.Lane(*base, True, True, 0xFFFFFF00, 0x0AF40100, send_buffer=bytearray(1000))
    with pytest.raises(ValueError, match="the bulk path takes"):
        _lane.Lane(*base, False, True, 0xFFFFFF00, 0x0AF40100, send_buffer=bytearray(1000),
                   merge_buffer=bytearray(70000), segment_room=1000)
    with pytest.raises(ValueError, match="the bulk path takes"):  # a room larger than the buffer
        _lane.Lane(*base, True, True, 0xFFFFFF00, 0x0AF40100, send_buffer=bytearray(1000),
                   merge_buffer=bytearray(70000), segment_room=2000)
    _lane.Lane(*base, True, True, 0xFFFFFF00, 0x0AF40100, send_buffer=bytearray(1000),
               merge_buffer=bytearray(70000), segment_room=1000).close()
