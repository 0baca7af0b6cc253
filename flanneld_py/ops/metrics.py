"""Prometheus metrics, read from a :class:`~.snapshot.Snapshot` at scrape time.

The hot loop keeps plain ints (per-peer counters, drop counters, batch
histograms); nothing touches a prometheus object per packet. This collector
turns one snapshot into metric families when Prometheus scrapes.

Metric names (all ``flanneld_``): ``info``, ``ready``, ``routes``,
``peer_sent_packets_total``, ``peer_sent_bytes_total``,
``peer_received_packets_total``, ``peer_received_bytes_total``,
``dropped_packets_total``, ``lease_expiry_timestamp_seconds``,
``etcd_request_errors_total``, ``etcd_reconnects_total``,
``etcd_last_answer_age_seconds``, ``batch_size_packets`` (histogram),
``peer_events_total``, ``ipmasq_repairs_total``, ``forward_repairs_total``,
``node_problem`` (one series per known problem, 1 while present); plus the
``process_*`` set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .diagnose import PROBLEMS
from .snapshot import BatchView, Snapshot

__all__ = ["DaemonCollector", "batch_buckets", "build_registry"]

# Upper bounds of BatchStats' power-of-two buckets: 0, 1, 2-3, 4-7, ..., 32-63, 64+.
BATCH_BOUNDS = ("0.0", "1.0", "3.0", "7.0", "15.0", "31.0", "63.0", "+Inf")


def batch_buckets(view: BatchView) -> list[tuple[str, float]]:
    """Cumulative histogram buckets from BatchStats' per-bucket counts."""
    out, total = [], 0
    for bound, count in zip(BATCH_BOUNDS, view.buckets):
        total += count
        out.append((bound, float(total)))
    return out


class DaemonCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: registering it must not take a snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        info = GaugeMetricFamily("flanneld_info", "Version, backend type, network and subnet of this daemon.",
                                 labels=["version", "backend", "network", "subnet"])
        info.add_metric([snap.version, snap.backend or "", snap.network or "", snap.subnet or ""], 1)
        yield info
        if snap.ipv6_network is not None:
            info6 = GaugeMetricFamily("flanneld_ipv6_info", "IPv6 network, subnet and public IPv6 address of this "
                                      "daemon (EnableIPv6).", labels=["ipv6_network", "ipv6_subnet", "public_ipv6"])
            info6.add_metric([snap.ipv6_network, snap.subnet6 or "", snap.public_ipv6 or ""], 1)
            yield info6
        yield GaugeMetricFamily("flanneld_ready", "1 once the lease is held, the subnet file written and "
                                "the datapath up.", value=1 if snap.ready and snap.phase == "running" else 0)
        yield GaugeMetricFamily("flanneld_routes", "Peer subnets in the datapath's route table.",
                                value=len(snap.peers))
        yield from self._peers(snap)
        drops = CounterMetricFamily("flanneld_dropped_packets", "Packets the datapath dropped, by reason.",
                                    labels=["reason"])
        for reason, count in sorted(snap.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        if snap.lease_expires_at is not None:
            yield GaugeMetricFamily("flanneld_lease_expiry_timestamp_seconds",
                                    "When the subnet lease expires unless renewed (Unix time).",
                                    value=snap.lease_expires_at)
        yield CounterMetricFamily("flanneld_etcd_request_errors", "etcd requests that failed.",
                                  value=snap.etcd_errors)
        yield CounterMetricFamily("flanneld_etcd_reconnects", "Times the etcd client moved to the next endpoint.",
                                  value=snap.etcd_reconnects)
        if snap.etcd_silence is not None:
            yield GaugeMetricFamily("flanneld_etcd_last_answer_age_seconds", "Seconds since etcd last answered.",
                                    value=snap.etcd_silence)
        batches = HistogramMetricFamily("flanneld_batch_size_packets",
                                        "Packets moved per hot-loop wakeup, by direction (tun: flannel0 to UDP).",
                                        labels=["direction"])
        for direction, view in sorted(snap.batches.items()):
            batches.add_metric([direction], batch_buckets(view), sum_value=None)
        yield batches
        yield CounterMetricFamily("flanneld_peer_events", "Lease events applied to the datapath.",
                                  value=snap.peer_events)
        yield CounterMetricFamily("flanneld_ipmasq_repairs", "Times missing masquerade rules were restored.",
                                  value=snap.ipmasq_repairs)
        yield CounterMetricFamily("flanneld_forward_repairs", "Times missing FORWARD accept rules were restored.",
                                  value=snap.forward_repairs)
        problems = GaugeMetricFamily("flanneld_node_problem", "1 while a node setting breaks the overlay "
                                     "(ip_forward_disabled, forward_policy_drop).", labels=["problem"])
        present = {p.code for p in snap.problems}
        for code in PROBLEMS:
            problems.add_metric([code], 1 if code in present else 0)
        yield problems

    def _peers(self, snap: Snapshot) -> Iterator[Metric]:
        labels = ["peer_subnet", "peer_ip"]
        families = {
            "tx_packets": CounterMetricFamily("flanneld_peer_sent_packets", "Packets sent to a peer.", labels=labels),
            "tx_bytes": CounterMetricFamily("flanneld_peer_sent_bytes", "Bytes (inner packets) sent to a peer.",
                                            labels=labels),
            "rx_packets": CounterMetricFamily("flanneld_peer_received_packets", "Packets received from a peer.",
                                              labels=labels),
            "rx_bytes": CounterMetricFamily("flanneld_peer_received_bytes",
                                            "Bytes (inner packets) received from a peer.", labels=labels),
        }
        for peer in snap.peers:
            values = [peer.subnets, peer.addresses]  # both families: "10.244.1.0/24, fd00:10:244:1::/64"
            families["tx_packets"].add_metric(values, peer.tx_packets)
            families["tx_bytes"].add_metric(values, peer.tx_bytes)
            families["rx_packets"].add_metric(values, peer.rx_packets)
            families["rx_bytes"].add_metric(values, peer.rx_bytes)
        yield from families.values()


def build_registry(source: Callable[[], Snapshot], process: bool = True) -> CollectorRegistry:
    """A private registry (not the global default) with our collector and ``process_*``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source))
    if process:
        ProcessCollector(registry=registry)
    return registry
