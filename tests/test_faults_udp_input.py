"""Hostile and broken input on the udp backend's port 8285, end to end.

100,000 datagrams (random bytes, truncated and oversized packets, bad header
lengths, bad checksums, IPv6, fragments, inner sources outside the sender's
subnet, inner destinations elsewhere, GRO/GSO batches of all of these) are
sent from a namespace that is not a peer and from a peer's namespace. The
daemon must stay up, its drop counters must account for every datagram
exactly (per reason, against an oracle written from the documented rules),
nothing from the non-peer may reach a pod, and pod traffic (pings from a
third node, so that they are not counted with the flood) must carry on.

The sender waits, every ``WINDOW`` datagrams, until the daemon has counted all
it sent so far: the daemon's socket never holds more than a window, so the
kernel never has to drop one for want of room on any machine, and a datagram
the daemon lost shows as a count that never arrives. The rate the daemon
drained is printed as a figure, not asserted.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld_py.core.packet import checksum
from flanneld_py.lab.cluster import Cluster, Node
from flanneld_py.lab.netns import Netns

from flanneld_py.lab.checks import time_until
from lab_helpers import (
    alive,
    background,
    continuous_ping,
    dump,
    paced_transfer,
    reachable,
    start,
    status,
    udp_snmp,
    underlay_host,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PER_SENDER = 50_000
INTRUDER = "198.51.100.200"
MAX_GSO_SEGMENTS = 32
# datagrams in flight at most: a window of these (even the 20 oversized ones of up to 60 kB
# first) takes a few MB of the daemon's 8 MiB receive buffer
WINDOW = 1000

# The sender: records are <u8 gso><u16 seglen><u32 length><bytes>; a gso record is
# one sendmsg with UDP_SEGMENT (the receiver's GRO socket gets it as one batch). After
# each window it prints "sent <datagrams so far>" and waits for a line on stdin.
SENDER = r"""
import socket, struct, sys, time
path, target, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
data = open(path, "rb").read()
offset, sent, paused = 0, 0, 0
while offset < len(data):
    gso, seglen, length = struct.unpack_from("!BHI", data, offset)
    offset += 7
    payload = data[offset:offset + length]
    offset += length
    while True:
        try:
            if gso:
                sock.sendmsg([payload], [(17, 103, struct.pack("=H", seglen))], 0, (target, 8285))
                sent += -(-length // seglen)
            else:
                sock.sendto(payload, (target, 8285))
                sent += 1
            break
        except BlockingIOError:
            time.sleep(0.001)
    if sent - paused >= window:
        print("sent", sent, flush=True)
        sys.stdin.readline()
        paused = sent
print("done", sent, flush=True)
"""


@dataclass
class Flood:
    """Datagrams to send, in order, and what the rules say must become of each."""

    records: list[tuple[int, int, bytes]]  # (gso, seglen, payload)
    expected: Counter  # type: ignore[type-arg]  # drop reason label (or "forwarded") -> count
    classes: Counter  # type: ignore[type-arg]  # what was sent, by class

    @property
    def datagrams(self) -> int:
        return sum(self.expected.values())

    def write(self, path: str) -> None:
        with open(path, "wb") as out:
            for gso, seglen, payload in self.records:
                out.write(struct.pack("!BHI", gso, seglen, len(payload)) + payload)


def ip_header(src: str, dst: str, payload_len: int, *, proto: int = 17, frag: int = 0x4000, ttl: int = 64,
              ihl: int = 5) -> bytearray:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + payload_len, 0x1234, frag, ttl, proto, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed))
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return hdr


def udp_packet(src: str, dst: str, dport: int, payload: bytes, frag: int = 0x4000) -> bytes:
    udp = struct.pack("!HHHH", 4242, dport, 8 + len(payload), 0) + payload
    return bytes(ip_header(src, dst, len(udp), frag=frag) + udp)


def verdict(data: bytes, source: str, peers: dict[IPv4Network, str], own: IPv4Network) -> str:
    """The oracle: the documented ingress rules, in their documented order."""
    if source not in peers.values():
        return "not_a_peer"
    n = len(data)
    if n and data[0] >> 4 == 6:
        return verdict6(data)
    if n < 20:
        return "too_short"
    if data[0] >> 4 != 4:
        return "not_ipv4"
    ihl = (data[0] & 15) * 4
    if ihl < 20 or ihl > n:
        return "bad_header_length"
    if struct.unpack_from("!H", data, 2)[0] != n:
        return "bad_total_length"
    if checksum(data[:10] + b"\0\0" + data[12:ihl]) != struct.unpack_from("!H", data, 10)[0]:
        return "bad_checksum"
    src, dst = IPv4Address(data[12:16]), IPv4Address(data[16:20])
    if not any(src in subnet and ip == source for subnet, ip in peers.items()):
        return "source_not_in_peer_subnet"
    if dst not in own:
        return "destination_not_local"
    return "forwarded"


def verdict6(data: bytes) -> str:
    """The IPv6 ingress rules for a node whose peers publish no IPv6 subnet (this cluster is IPv4)."""
    if len(data) < 40:
        return "too_short"
    if struct.unpack_from("!H", data, 4)[0] + 40 != len(data):
        return "bad_total_length"
    if data[8] == 0xFF or not any(data[8:24]):
        return "bad_ipv6_header"
    return "source_not_in_peer_subnet"


def build_flood(seed: int, count: int, source: str, peers: dict[IPv4Network, str], own: IPv4Network,
                peer_subnet: IPv4Network, victim_ip: str) -> Flood:
    """``count`` datagrams of every hostile class, as ``source`` would send them to the victim's node."""
    rng = random.Random(seed)
    sender_host = str(peer_subnet.network_address + 77)  # inside the peer's subnet: the spoofable part
    nowhere = str(own.network_address + 250)  # in the victim's subnet, no pod there
    outside = str(IPv4Network("10.244.0.0/16").network_address + (250 << 8) + 9)
    # valid packets to the pod's listener only from the non-peer: a peer's would rightly arrive
    dport = 9998 if source in peers.values() else 9999

    def valid(dst: str = nowhere, size: int | None = None) -> bytes:
        return udp_packet(sender_host, dst, 9998, rng.randbytes(size if size is not None else rng.randint(0, 400)))

    def one(kind: str) -> bytes:
        if kind == "random":
            return rng.randbytes(rng.randint(0, 1400))
        if kind == "truncated":
            packet = valid()
            return packet[: rng.randint(0, len(packet) - 1)]
        if kind == "oversized":
            # a datagram far beyond the overlay MTU (IP-fragmented on the underlay), its
            # inner header claiming more or less than that
            packet = bytearray(valid(size=rng.randint(9000, 60000)))
            if rng.random() < 0.5:
                struct.pack_into("!H", packet, 2, rng.randint(0, 65535))
            return bytes(packet)
        if kind == "bad_header_length":
            packet = bytearray(valid())
            packet[0] = 0x40 | rng.choice([0, 1, 2, 3, 4, 15])
            if packet[0] & 15 == 15:
                packet = packet[:40]
                struct.pack_into("!H", packet, 2, 40)
            return bytes(packet)
        if kind == "bad_checksum":
            packet = bytearray(valid())
            packet[10] ^= rng.randint(1, 255)
            return bytes(packet)
        if kind == "ipv6":
            payload = rng.randbytes(rng.randint(0, 200))
            return struct.pack("!IHBB16s16s", 0x60000000, len(payload), 17, 64, bytes(16), bytes(16)) + payload
        if kind == "fragment":
            frag = rng.choice([0x2000, 0x2000 | rng.randint(1, 0x1FFF), rng.randint(1, 0x1FFF)])
            return udp_packet(sender_host, nowhere, 9998, rng.randbytes(rng.randint(8, 600)), frag=frag)
        if kind == "source_outside":
            src = rng.choice([outside, "8.8.8.8", str(own.network_address + 3), "10.244.0.1"])
            return udp_packet(src, victim_ip, 9999, rng.randbytes(rng.randint(0, 300)))
        if kind == "destination_elsewhere":
            return udp_packet(sender_host, rng.choice([outside, "192.0.2.1", "10.245.0.1"]), 9999, b"x" * 20)
        if kind == "spoofed_to_pod":
            return udp_packet(sender_host, victim_ip, dport, b"evil")
        raise AssertionError(kind)

    def segment(inner: str, size: int, index: int, seglen: int) -> bytes:
        """One datagram of a GSO batch, exactly ``size`` bytes, its IP length matching when it has one."""
        if inner == "random" or size < 20:
            return rng.randbytes(size)
        hdr = ip_header(sender_host, nowhere, size - 20, proto=6 if inner == "tcp" else 17,
                        frag=0x2000 if inner == "fragment" else 0x4000)
        if inner == "spoofed_to_pod" and size >= 28:
            return udp_packet(sender_host, victim_ip, dport, bytes(size - 28))
        if inner == "bad_checksum":
            hdr[10] ^= 0x5A
        body = bytes(size - 20)
        if inner == "tcp" and size >= 40:  # a TCP-looking flow with a hostile data offset
            body = struct.pack("!HHIIBBHHH", 1, 2, index * (seglen - 40), 0, rng.randint(0, 4) << 4,
                               0x10, 100, 0, 0) + bytes(size - 40)
        return bytes(hdr) + body

    kinds = {
        "random": 14, "truncated": 12, "bad_header_length": 9, "bad_checksum": 10, "ipv6": 8, "fragment": 9,
        "source_outside": 9, "destination_elsewhere": 8, "spoofed_to_pod": 6, "gso_batch": 3,
    }
    names, weights = zip(*kinds.items())
    records: list[tuple[int, int, bytes]] = []
    expected: Counter = Counter()  # type: ignore[type-arg]
    classes: Counter = Counter()  # type: ignore[type-arg]
    made = 0
    for _ in range(20):  # a few oversized ones first
        records.append((0, 0, one("oversized")))
        classes["oversized"] += 1
    made += 20
    while made < count:
        kind = rng.choices(names, weights)[0]
        if kind == "gso_batch":
            segments = min(rng.randint(2, MAX_GSO_SEGMENTS), count - made)
            if segments < 2:
                kind = "random"
            else:
                seglen = rng.randint(20, 1400)
                inner = rng.choice(["bad_checksum", "random", "fragment", "spoofed_to_pod", "tcp"])
                parts = [segment(inner, seglen if part < segments - 1 else rng.randint(1, seglen), part, seglen)
                         for part in range(segments)]
                records.append((1, seglen, b"".join(parts)))
                for part in parts:
                    expected[verdict(part, source, peers, own)] += 1
                classes[f"gso_{inner}"] += segments
                made += segments
                continue
        data = one(kind)
        records.append((0, 0, data))
        classes[kind] += 1
        made += 1
    for gso, _seglen, payload in records:
        if not gso:
            expected[verdict(payload, source, peers, own)] += 1
    return Flood(records, expected, classes)


def counters(node: Node, peer_subnet: str) -> tuple[Counter, int]:  # type: ignore[type-arg]
    doc = status(node)
    rx = sum(p["rx_packets"] for p in doc["peers"] if p["subnet"] == peer_subnet)
    return Counter(doc["drops"]), rx


def counted(node: Node, peer_subnet: str) -> int:
    """Datagrams the daemon has dealt with: dropped (any reason) or forwarded from ``peer_subnet``."""
    drops, rx = counters(node, peer_subnet)
    return sum(drops.values()) + rx


def flood(node: Node, netns: Netns, path: str, peer_subnet: str) -> tuple[int, float]:
    """Send the records in ``path`` from ``netns`` to ``node``, a window at a time; (datagrams, seconds)."""
    base = counted(node, peer_subnet)
    argv = netns.argv(sys.executable, "-c", SENDER, path, node.address, str(WINDOW))
    t0 = time.monotonic()
    with background(argv, stdin=True) as sender:
        assert sender.stdin is not None and sender.stdout is not None
        while True:
            word, number = sender.stdout.readline().split()
            sent = int(number)
            # a generous deadline: a daemon that lost datagrams never gets there
            if time_until(lambda: counted(node, peer_subnet) - base >= sent, 60, 0.02) is None:
                raise AssertionError(f"of {sent} datagrams sent the daemon counted {counted(node, peer_subnet) - base}"
                                     f"; kernel: {udp_snmp(node.netns)}\n{node.log_text()[-3000:]}")
            if word == "done":
                return sent, time.monotonic() - t0
            sender.stdin.write("\n")
            sender.stdin.flush()


LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
out = open(sys.argv[1], "a")
print("ready", flush=True)
while True:
    data = s.recv(65536)
    out.write(data[:16].hex() + "\n")
    out.flush()
"""


def test_hostile_datagrams_are_all_counted_and_none_from_a_non_peer_reaches_a_pod():
    with Cluster(nodes=3) as lab, tempfile.TemporaryDirectory(prefix="flanneld-faults-") as tmp:
        victim, friend, third = lab.nodes
        start(lab, victim, friend, third)
        p1, p2, p3 = lab.add_pod(victim), lab.add_pod(friend), lab.add_pod(third)
        assert time_until(lambda: reachable(p2, p1) and reachable(p3, p1), 30) is not None, dump(lab)
        own = victim.subnet_env().subnet
        peer_subnet = friend.subnet_env().subnet
        peers = {peer_subnet: friend.address, third.subnet_env().subnet: third.address}
        victim_ip = str(p1.ip.ip)

        floods = {
            "non-peer": build_flood(1, PER_SENDER, INTRUDER, peers, own, peer_subnet, victim_ip),
            "peer": build_flood(2, PER_SENDER, friend.address, peers, own, peer_subnet, victim_ip),
        }
        assert set(floods["non-peer"].expected) == {"not_a_peer"}
        results = {}
        heard = os.path.join(tmp, "heard")
        listener_argv = p1.netns.argv(sys.executable, "-c", LISTENER, heard)
        with underlay_host(lab, "x", INTRUDER) as intruder, background(listener_argv) as listener, \
                continuous_ping(p3, p1, seconds=None) as pings:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            for name, netns in (("non-peer", intruder), ("peer", friend.netns)):
                planned = floods[name]
                path = os.path.join(tmp, f"{name}.bin")
                planned.write(path)
                drops0, rx0 = counters(victim, str(peer_subnet))
                kernel0 = udp_snmp(victim.netns)
                sent, took = flood(victim, netns, path, str(peer_subnet))
                drops1, rx1 = counters(victim, str(peer_subnet))
                kernel1 = udp_snmp(victim.netns)
                assert sent == planned.datagrams
                delta = drops1 - drops0
                delta.update({k: 0 for k in planned.expected})
                kernel_dropped = kernel1["RcvbufErrors"] - kernel0["RcvbufErrors"]
                results[name] = (planned, delta, rx1 - rx0, kernel_dropped, took)
                assert alive(victim), f"daemon died under the {name} flood:\n{victim.log_text()[-3000:]}"
            stats = pings()
            # the listener saw nothing from the floods: only the one datagram the real overlay carries now
            p2.sh(sys.executable, "-c", f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                        f".sendto(b'hi', ('{victim_ip}', 9999))")
            assert time_until(lambda: os.path.exists(heard) and open(heard).read().strip(), 30) is not None
        with open(heard) as handle:
            lines = handle.read().split()
        # anything of the floods that reached the pod came before the overlay's datagram
        assert lines == [b"hi".hex()], f"the pod received {len(lines)} datagrams; only the overlay's one may arrive"

        for name, (planned, delta, rx, kernel_dropped, took) in results.items():
            expected_drops = {k: v for k, v in planned.expected.items() if k != "forwarded"}
            got_drops = {k: delta[k] for k in expected_drops}
            # the window keeps the socket from filling, so none may be lost there
            assert kernel_dropped == 0, f"{name}: the kernel dropped {kernel_dropped} datagrams (socket buffer full)"
            assert got_drops == expected_drops, f"{name}: drops {dict(delta)} != expected {expected_drops}"
            unexpected = {k: v for k, v in delta.items() if k not in expected_drops and v}
            assert not unexpected, f"{name}: unexpected drops {unexpected}"
            # nothing but the flood comes from the friend's subnet meanwhile (the pings come from the third node)
            assert rx == planned.expected["forwarded"], f"{name}: forwarded {rx} != {planned.expected['forwarded']}"
            assert sum(got_drops.values()) + rx == planned.datagrams
        log = victim.log_text()
        assert "Traceback" not in log and "Exception in callback" not in log, log[-4000:]
        assert all(alive(node) for node in lab.nodes)
        # pod traffic carried on: at most 1% of the pings lost (they share the daemon's socket with
        # a window of the flood, never more)
        assert stats.sent > 0 and stats.lost <= stats.sent // 100, f"pod traffic suffered: {stats}"
        with paced_transfer(p2, p1, 4 << 20, seconds=1) as finish:
            sent_digest, received_digest = finish(60)
        assert sent_digest == received_digest
        for name, (planned, delta, rx, kernel_dropped, took) in results.items():
            print(f"\nFIGURE hostile-{name}: {planned.datagrams} datagrams, all counted, drained at "
                  f"{planned.datagrams / took:,.0f}/s ({WINDOW} in flight at most): "
                  f"{dict(sorted((k, v) for k, v in planned.expected.items()))}; "
                  f"classes {dict(sorted(planned.classes.items()))}")
        print(f"FIGURE hostile-pods: pings during the floods {stats.received}/{stats.sent}, "
              f"transfer after intact")
