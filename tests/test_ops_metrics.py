"""/metrics rendering from a hand-made snapshot: names, labels, values, histogram buckets."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flanneld_py.backend.base import PeerStats
from flanneld_py.ops.metrics import batch_buckets, build_registry
from flanneld_py.ops.snapshot import BatchView, Snapshot


def snapshot() -> Snapshot:
    return Snapshot(
        taken_at=1_800_000_000.0, phase="running", ready=True, backend="udp", network="10.244.0.0/16",
        subnet="10.244.7.0/24", lease_expires_at=1_800_086_400.0, datapath_up=True,
        etcd_errors=3, etcd_reconnects=2, etcd_silence=1.5,
        peers=(
            PeerStats(IPv4Network("10.244.8.0/24"), "198.51.100.8", tx_packets=5, tx_bytes=420, rx_packets=4,
                      rx_bytes=336),
            PeerStats(IPv4Network("10.244.9.0/24"), "198.51.100.9"),
        ),
        drops={"no_route": 2, "not_a_peer": 0},
        batches={"tun": BatchView(6, (0, 3, 2, 0, 0, 0, 0, 1)), "udp": BatchView(1, (1, 0, 0, 0, 0, 0, 0, 0))},
        peer_events=2, ip_masq=True, ipmasq_repairs=1,
    )


def samples(snap: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(build_registry(lambda: snap, process=False)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_per_peer_counters():
    got = samples(snapshot())
    peer8 = (("peer_ip", "198.51.100.8"), ("peer_subnet", "10.244.8.0/24"))
    assert got[("flanneld_peer_sent_packets_total", peer8)] == 5
    assert got[("flanneld_peer_sent_bytes_total", peer8)] == 420
    assert got[("flanneld_peer_received_packets_total", peer8)] == 4
    assert got[("flanneld_peer_received_bytes_total", peer8)] == 336
    peer9 = (("peer_ip", "198.51.100.9"), ("peer_subnet", "10.244.9.0/24"))
    assert got[("flanneld_peer_sent_packets_total", peer9)] == 0


def test_daemon_level_metrics():
    got = samples(snapshot())
    assert got[("flanneld_dropped_packets_total", (("reason", "no_route"),))] == 2
    assert got[("flanneld_dropped_packets_total", (("reason", "not_a_peer"),))] == 0
    assert got[("flanneld_routes", ())] == 2
    assert got[("flanneld_ready", ())] == 1
    assert got[("flanneld_lease_expiry_timestamp_seconds", ())] == 1_800_086_400.0
    assert got[("flanneld_etcd_request_errors_total", ())] == 3
    assert got[("flanneld_etcd_reconnects_total", ())] == 2
    assert got[("flanneld_etcd_last_answer_age_seconds", ())] == 1.5
    assert got[("flanneld_peer_events_total", ())] == 2
    assert got[("flanneld_ipmasq_repairs_total", ())] == 1
    info = (("backend", "udp"), ("network", "10.244.0.0/16"), ("subnet", "10.244.7.0/24"), ("version", "0.1.0"))
    assert got[("flanneld_info", info)] == 1


def test_batch_histogram_is_cumulative():
    got = samples(snapshot())
    tun = {le: got[("flanneld_batch_size_packets_bucket", (("direction", "tun"), ("le", le)))]
           for le in ("0.0", "1.0", "3.0", "7.0", "63.0", "+Inf")}
    assert tun == {"0.0": 0, "1.0": 3, "3.0": 5, "7.0": 5, "63.0": 5, "+Inf": 6}
    assert batch_buckets(BatchView(0, (0,) * 8))[-1] == ("+Inf", 0.0)


def test_before_the_lease_only_what_is_known():
    got = samples(Snapshot(taken_at=0.0, phase="waiting for network config", ready=False))
    assert got[("flanneld_ready", ())] == 0
    assert got[("flanneld_routes", ())] == 0
    assert ("flanneld_lease_expiry_timestamp_seconds", ()) not in got
    assert ("flanneld_etcd_last_answer_age_seconds", ()) not in got


def test_process_metrics_are_included():
    text = generate_latest(build_registry(snapshot)).decode()
    assert "process_resident_memory_bytes" in text


def test_ipv6_info_only_with_ipv6():
    assert not any(name == "flanneld_ipv6_info" for name, _ in samples(snapshot()))
    dual = replace(snapshot(), ipv6_network="fd00:10:244::/56", subnet6="fd00:10:244:7::/64", public_ipv6="2001:db8::1")
    info6 = (("ipv6_network", "fd00:10:244::/56"), ("ipv6_subnet", "fd00:10:244:7::/64"), ("public_ipv6", "2001:db8::1"))
    assert samples(dual)[("flanneld_ipv6_info", info6)] == 1


def test_peer_labels_name_both_families_and_ipv6_only_peers():
    snap = replace(snapshot(), peers=(
        PeerStats(IPv4Network("10.244.8.0/24"), "198.51.100.8", tx_packets=1,
                  subnet6=IPv6Network("fd00:10:244:8::/64"), public_ipv6="2001:db8::8"),
        PeerStats(IPv4Network("0.0.0.0/0"), "0.0.0.0", tx_packets=2,  # flannel's IPv6-only lease
                  subnet6=IPv6Network("fd00:10:244:9::/64"), public_ipv6="2001:db8::9"),
    ))
    got = samples(snap)
    dual = (("peer_ip", "198.51.100.8, 2001:db8::8"), ("peer_subnet", "10.244.8.0/24, fd00:10:244:8::/64"))
    v6only = (("peer_ip", "2001:db8::9"), ("peer_subnet", "fd00:10:244:9::/64"))
    assert got[("flanneld_peer_sent_packets_total", dual)] == 1
    assert got[("flanneld_peer_sent_packets_total", v6only)] == 2
