"""Property-based tests (hypothesis) of everything that reads bytes from the wire
or records from etcd: no input may raise, every datagram is either forwarded or
counted as exactly one drop, and whatever is accepted satisfies the rules.

Pure functions only (no sockets, no namespaces): the packet checks, the udp
engine's ingress and egress, the GRO batch paths and the lease watcher.
"""

from __future__ import annotations

import json
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flanneld_py.backend.udp.engine import Engine, Peer
from flanneld_py.backend.udp import offload
from flanneld_py.core.lease import BadRecord, KeyDeleted, KeyPut, LeaseAdded, LeaseRemoved, LeaseWatcher
from flanneld_py.core.netconfig import ConfigError, parse_network_config
from flanneld_py.core.packet import Drop, check_ipv4, check_ipv6, checksum, decrement_ttl

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.7.0/24")
PEERS = {IPv4Network("10.244.8.0/24"): "198.51.100.8", IPv4Network("10.244.9.0/24"): "198.51.100.9"}
SOURCES = ["198.51.100.8", "198.51.100.9", "198.51.100.200", "192.0.2.1"]
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def engine() -> Engine:
    e = Engine(NETWORK, OWN, 8285)
    for subnet, ip in PEERS.items():
        e.set_peer(subnet, ip)
    return e


def header(src: int, dst: int, payload_len: int, *, ttl: int = 64, proto: int = 17, frag: int = 0,
           ident: int = 0, ihl: int = 5, options: bytes = b"") -> bytearray:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + payload_len, ident, frag, ttl, proto, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed) + options)
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return hdr


addresses = st.one_of(
    st.integers(0, 2**32 - 1),
    st.builds(lambda net, host: int(net.network_address) + host,
              st.sampled_from([OWN, *PEERS, IPv4Network("10.244.200.0/24")]), st.integers(0, 255)),
)


@st.composite
def valid_packets(draw: st.DrawFn) -> bytearray:
    """Well-formed IPv4 packets (maybe with options or fragment bits) between any addresses."""
    optlen = draw(st.sampled_from([0, 4, 8, 40]))
    payload = draw(st.binary(max_size=200))
    hdr = header(draw(addresses), draw(addresses), len(payload), ttl=draw(st.integers(0, 255)),
                 proto=draw(st.integers(0, 255)), frag=draw(st.integers(0, 0xFFFF)),
                 ident=draw(st.integers(0, 0xFFFF)), ihl=5 + optlen // 4, options=b"\x01" * optlen)
    return hdr + payload


@st.composite
def hostile(draw: st.DrawFn) -> bytearray:
    """Anything: random bytes, or a valid packet then cut, padded or with one byte changed."""
    kind = draw(st.sampled_from(["random", "cut", "pad", "flip", "valid"]))
    if kind == "random":
        return bytearray(draw(st.binary(max_size=300)))
    packet = draw(valid_packets())
    if kind == "cut":
        return packet[: draw(st.integers(0, len(packet)))]
    if kind == "pad":
        return packet + draw(st.binary(min_size=1, max_size=40))
    if kind == "flip":
        index = draw(st.integers(0, len(packet) - 1))
        packet[index] ^= draw(st.integers(1, 255))
    return packet


# --- the packet checks --------------------------------------------------------------


@FAST
@given(hostile())
def test_check_ipv4_never_raises_and_accepts_only_sound_headers(data: bytearray) -> None:
    verdict = check_ipv4(data, len(data))
    assert verdict is None or isinstance(verdict, Drop)
    if verdict is None:
        ihl = (data[0] & 15) * 4
        assert data[0] >> 4 == 4 and 20 <= ihl <= len(data)
        assert struct.unpack_from("!H", data, 2)[0] == len(data)
        assert checksum(bytes(data[:10]) + b"\0\0" + bytes(data[12:ihl])) == struct.unpack_from("!H", data, 10)[0]


@FAST
@given(valid_packets(), st.data())
def test_every_single_byte_change_of_a_header_is_caught(packet: bytearray, data: st.DataObject) -> None:
    assert check_ipv4(packet, len(packet)) is None
    ihl = (packet[0] & 15) * 4
    index = data.draw(st.integers(0, ihl - 1))
    packet[index] ^= data.draw(st.integers(1, 255))
    assert check_ipv4(packet, len(packet)) is not None


@FAST
@given(valid_packets())
def test_decrement_ttl_keeps_the_checksum_valid(packet: bytearray) -> None:
    ttl = packet[8]
    if decrement_ttl(packet):
        assert packet[8] == ttl - 1
        assert check_ipv4(packet, len(packet)) is None
    else:
        assert ttl <= 1 and packet[8] == ttl


# --- IPv6 ------------------------------------------------------------------------------

OWN6 = IPv6Network("fd00:10:244:7::/64")
PEERS6 = {IPv4Network("10.244.8.0/24"): (IPv6Network("fd00:10:244:8::/64"), "2001:db8::8")}
SOURCES6 = [*SOURCES, "2001:db8::8", "2001:db8::66"]


def engine6() -> Engine:
    e = Engine(NETWORK, OWN, 8285, IPv6Network("fd00:10:244::/48"), OWN6)
    for subnet, ip in PEERS.items():
        subnet6, ip6 = PEERS6.get(subnet, (None, None))
        e.set_peer(subnet, ip, subnet6, ip6)
    e.icmp_budget.burst = e.icmp_budget.tokens = 10**6  # the property is about the replies, not their rate
    return e


addresses6 = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.sampled_from([bytes(16), b"\xff\x02" + bytes(13) + b"\x01", b"\xfe\x80" + bytes(13) + b"\x01"]),
    st.builds(lambda net, host: (int(net.network_address) + host).to_bytes(16, "big"),
              st.sampled_from([OWN6, PEERS6[IPv4Network("10.244.8.0/24")][0], IPv6Network("fd00:10:244:200::/64")]),
              st.integers(0, 2**64 - 1)),
)


@st.composite
def valid_packets6(draw: st.DrawFn) -> bytearray:
    """IPv6 packets whose payload length fits, between any addresses, any next header (ICMPv6 often)."""
    next_header = draw(st.one_of(st.just(58), st.integers(0, 255)))
    payload = draw(st.binary(max_size=200))
    if next_header == 58 and draw(st.booleans()):
        payload = bytes([draw(st.integers(0, 255))]) + payload
    return bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, draw(st.integers(0, 255)),
                                 draw(addresses6), draw(addresses6)) + payload)


@st.composite
def hostile6(draw: st.DrawFn) -> bytearray:
    """An IPv6 packet, maybe cut, padded or with one byte changed (the version nibble kept)."""
    packet = draw(valid_packets6())
    kind = draw(st.sampled_from(["cut", "pad", "flip", "valid"]))
    if kind == "cut":
        return packet[: draw(st.integers(1, len(packet)))]
    if kind == "pad":
        return packet + draw(st.binary(min_size=1, max_size=40))
    if kind == "flip":
        index = draw(st.integers(1, len(packet) - 1))
        packet[index] ^= draw(st.integers(1, 255))
    return packet


@FAST
@given(st.lists(st.tuples(st.one_of(hostile6(), hostile()), st.sampled_from(SOURCES6)), max_size=30))
def test_ipv6_inbound_counts_every_datagram_once_and_accepts_only_peer_to_us(batch) -> None:  # type: ignore[no-untyped-def]
    e = engine6()
    accepted = 0
    for data, source in batch:
        peer = e.inbound(memoryview(data), len(data), source)
        if peer is None:
            continue
        accepted += 1
        if data[0] >> 4 != 6:
            continue  # IPv4: the property above
        assert check_ipv6(data, len(data)) is None
        subnet6, ip6 = PEERS6[peer.subnet]
        assert source in (peer.public_ip, ip6)
        assert IPv6Address(bytes(data[8:24])) in subnet6 and IPv6Address(bytes(data[24:40])) in OWN6
    assert accepted + sum(e.drops) == len(batch)
    assert sum(p.rx_packets for p in e.peers.values()) == accepted


def _icmp6_checksum_ok(reply: bytes) -> bool:
    """The ICMPv6 checksum, computed here independently: pseudo-header plus message sums to 0xFFFF."""
    message = reply[40:] + b"\0" * (len(reply) % 2)
    words = reply[8:40] + struct.pack("!IxxxB", len(reply) - 40, 58) + message
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@FAST
@given(st.lists(hostile6(), max_size=20))
def test_ipv6_outbound_never_raises_and_answers_only_with_valid_icmpv6(packets: list[bytearray]) -> None:
    e = engine6()
    answered: list[bytearray] = []
    for data in packets:
        buf = bytearray(data) + bytearray(64)
        before = len(e.replies)
        e.outbound(buf, len(data))
        if len(e.replies) > before:
            answered.append(data)
    for reply, invoking in zip(e.take_replies(), answered, strict=True):
        assert check_ipv6(reply, len(reply)) is None and len(reply) <= 1280
        assert reply[6] == 58 and reply[40] in (1, 3) and _icmp6_checksum_ok(reply)
        assert reply[24:40] == invoking[8:24] and reply[48:] == invoking[: 1280 - 48]
        assert not (invoking[6] == 58 and len(invoking) > 40 and invoking[40] < 128)  # never about an error


# --- the engine -----------------------------------------------------------------------


@FAST
@given(st.lists(st.tuples(hostile(), st.sampled_from(SOURCES)), max_size=30))
def test_inbound_counts_every_datagram_once_and_accepts_only_peer_to_us(batch) -> None:  # type: ignore[no-untyped-def]
    e = engine()
    accepted = 0
    for data, source in batch:
        peer = e.inbound(memoryview(data), len(data), source)
        if peer is None:
            continue
        accepted += 1
        src, dst = struct.unpack_from("!II", data, 12)
        assert source == peer.public_ip and PEERS[peer.subnet] == source
        assert IPv4Address(src) in peer.subnet and IPv4Address(dst) in OWN
        assert check_ipv4(data, len(data)) is None
    assert accepted + sum(e.drops) == len(batch)
    assert sum(p.rx_packets for p in e.peers.values()) == accepted
    assert e.drops[Drop.NOT_A_PEER] == sum(1 for _, s in batch if s not in PEERS.values())


@FAST
@given(st.lists(hostile(), max_size=20))
def test_outbound_never_raises_and_answers_only_with_valid_icmp(packets: list[bytearray]) -> None:
    e = engine()
    for data in packets:
        buf = bytearray(data) + bytearray(64)  # headroom, as the hot loop's buffers have
        e.outbound(buf, len(data))
    for reply in e.take_replies():
        assert check_ipv4(reply, len(reply)) is None
        assert reply[9] == 1


def _batch(segments: list[bytes], seglen: int) -> tuple[memoryview, int]:
    raw = b"".join(s.ljust(seglen, b"\0")[:seglen] for s in segments[:-1]) + segments[-1]
    return memoryview(bytearray(raw)), len(raw)


@st.composite
def gro_batches(draw: st.DrawFn) -> tuple[list[bytes], int]:
    """What one GRO read can hold: equal-size datagrams from one sender, the last maybe shorter."""
    seglen = draw(st.integers(20, 160))
    count = draw(st.integers(2, 8))
    src = draw(st.sampled_from([int(n.network_address) + 5 for n in PEERS] + [0x0AF4C80A]))
    dst = draw(st.sampled_from([int(OWN.network_address) + 9, 0x0AF40909]))
    segments = []
    for index in range(count):
        size = seglen if index < count - 1 else draw(st.integers(1, seglen))
        kind = draw(st.sampled_from(["good", "good", "tcp", "hostile", "badsum"]))
        if kind == "hostile":
            segment = bytes(draw(hostile()))
        elif kind == "badsum":
            bad = header(src, dst, max(0, size - 20))
            bad[10] ^= draw(st.integers(1, 255))
            segment = bytes(bad)
        elif kind == "tcp":
            offset = draw(st.integers(0, 15))
            tcp = struct.pack("!HHIIBBHHH", 1, 2, draw(st.integers(0, 2**32 - 1)), 0, offset << 4,
                              draw(st.sampled_from([0x10, 0x18, 0x02])), 1000, 0, 0)
            segment = bytes(header(src, dst, max(0, size - 20), proto=6)) + tcp
        else:
            segment = bytes(header(src, dst, max(0, size - 20)))
        segments.append(segment.ljust(size, b"\0")[:size])
    return segments, seglen


@FAST
@given(gro_batches(), st.sampled_from(SOURCES))
def test_gro_batch_paths_never_raise_and_agree_with_one_by_one(case, source: str) -> None:  # type: ignore[no-untyped-def]
    segments, seglen = case
    batch, total = _batch(segments, seglen)
    count = len(segments)
    one_by_one = engine()
    singles = [one_by_one.inbound(memoryview(bytearray(s)), len(s), source) for s in segments]
    hlen, run = offload.tcp_flow_run(batch, count, seglen, total)
    assert 0 <= run <= count
    assert (hlen, run) == offload.load("python")[1].tcp_flow_run(batch, count, seglen, total), "the builds disagree"
    e = engine()
    if run:
        peer = e.inbound_flow(batch, run, min(run * seglen, total), source)
        if peer is not None:
            assert all(isinstance(s, Peer) for s in singles[:run]), "a run was accepted that one by one is not"
    peer = e.inbound_batch(batch, count, seglen, total, source)
    assert peer is None or isinstance(peer, Peer), f"inbound_batch returned {peer!r}"
    if peer is not None:
        assert all(isinstance(s, Peer) for s in singles), "a batch was accepted that one by one is not"


# --- etcd records -----------------------------------------------------------------------

names = st.one_of(
    st.text(max_size=30),
    st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}-24", *[st.integers(0, 300)] * 4),
    st.sampled_from(["10.244.8.0-24", "10.244.9.0-24", "10.244.7.0-24", "10.99.0.0-24", "10.244.8.0-26",
                     "10.244.8.0-24&fd00::-64", "0.0.0.0-0&fd00::-64", "10.244.8.0-24&fd00::1-64",
                     "10.244.8.0-24&fd00::-200", "config", "10.244.8.0/24"]),
)
values = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'{"PublicIP": 5}', b'{"PublicIP": null}',
                     b'{"PublicIP": "198.51.100.8", "BackendType": 7}', b"\xff\xfe",
                     b'{"PublicIP": "198.51.100.8", "BackendType": "udp"}']),
    st.builds(lambda doc: json.dumps(doc).encode(),
              st.dictionaries(st.sampled_from(["PublicIP", "BackendType", "BackendData"]),
                              st.one_of(st.none(), st.integers(), st.text(max_size=15), st.booleans()))),
)
events = st.lists(st.one_of(st.builds(KeyPut, names, values), st.builds(KeyDeleted, names)), max_size=25)


@FAST
@given(events, events)
def test_lease_watcher_never_raises_and_reports_each_broken_record_once(snapshot, updates) -> None:  # type: ignore[no-untyped-def]
    config = parse_network_config(b'{"Network": "10.244.0.0/16"}')
    watcher = LeaseWatcher(config, own_subnet=OWN)
    seen: list[tuple[str, str]] = []
    out = watcher.reset(e for e in snapshot if isinstance(e, KeyPut))
    out += watcher.update(updates)
    out += watcher.update(updates)  # the same broken records again: no new reports
    for event in out:
        if isinstance(event, BadRecord):
            seen.append((event.name, event.reason))
        else:
            assert isinstance(event, (LeaseAdded, LeaseRemoved))
            assert event.lease.subnet != OWN and event.lease.subnet.subnet_of(NETWORK)
    assert len(seen) == len(set(seen))
    assert all(subnet.subnet_of(NETWORK) for subnet, _ in watcher.leases)


@FAST
@given(st.one_of(st.binary(max_size=120), values,
                 st.builds(lambda doc: json.dumps(doc).encode(),
                           st.dictionaries(st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax",
                                                            "Backend", "EnableIPv6", "EnableIPv4", "IPv6Network",
                                                            "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"]),
                                           st.one_of(st.none(), st.integers(-5, 130), st.text(max_size=20),
                                                     st.booleans(), st.just({"Type": "udp", "Port": 70000}),
                                                     st.sampled_from(["10.244.0.0/16", "10.0.0.0/30", "10.244.3.0",
                                                                      "fd00::/56", "fd00::/125", "fd00::100"]))))))
def test_network_config_is_parsed_or_refused_with_a_config_error(raw: bytes) -> None:
    try:
        config = parse_network_config(raw)
    except ConfigError as exc:
        assert str(exc).startswith("network config: ")
        return
    assert config.subnet_count >= 1
    if config.ipv6 is not None:
        assert config.ipv6.holds_subnet(config.ipv6.subnet_min) and config.ipv6.holds_subnet(config.ipv6.subnet_max)
    assume(config.subnet_len <= 30)
