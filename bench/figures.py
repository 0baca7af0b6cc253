"""What the bench reports: every figure's key, label, unit and which way is better.

The one table that results.json, report.md, the charts and the tests share.
A figure's raw value is stored in ``unit``; ``show`` scales it for people.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CNI_FIGURES", "DATAPATH_FIGURES", "IPV6_PAIRS", "MAY_BE_ZERO", "SCALE_CROSS_RATIOS", "SCALE_FIGURES",
           "SCALE_IN_TURN_RATIOS", "Figure", "figure"]


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    daemon_only: bool = False  # no value for ``bare`` (no daemon there)
    ipv6: bool = False  # measured over IPv6: only for the modes with a dual-stack lab (IPV6_MODES)
    show_scale: float = 1.0  # displayed value = raw * show_scale
    show_unit: str = ""
    decimals: int = 2

    def show(self, value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value * self.show_scale:.{self.decimals}f}"

    @property
    def display_unit(self) -> str:
        return self.show_unit or self.unit


DATAPATH_FIGURES: tuple[Figure, ...] = (
    Figure("tcp_1_gbps", "TCP, 1 stream", "Gbit/s", "higher"),
    Figure("tcp_4_gbps", "TCP, 4 streams", "Gbit/s", "higher"),
    Figure("udp64_pps", "UDP 64 B delivered", "packets/s", "higher", show_scale=1e-3, show_unit="kpps", decimals=0),
    Figure("udp64_loss_pct", "UDP 64 B loss", "%", "lower", decimals=1),
    Figure("rtt_p50_us", "RTT p50", "µs", "lower", decimals=0),
    Figure("rtt_p99_us", "RTT p99", "µs", "lower", decimals=0),
    Figure("cpu_s_per_gb", "CPU per GB (daemons + kernel)", "s/GB", "lower"),
    Figure("kernel_cpu_s_per_gb", "kernel CPU per GB", "s/GB", "lower"),
    Figure("daemon_cpu_s_per_gb", "daemons' CPU per GB", "s/GB", "lower", daemon_only=True, decimals=3),
    Figure("daemon_peak_rss_mib", "daemon peak RSS", "MiB", "lower", daemon_only=True, decimals=0),
    Figure("tcp_1_gbps_v6", "TCP, 1 stream, IPv6", "Gbit/s", "higher", ipv6=True),
    Figure("rtt_p50_us_v6", "RTT p50, IPv6", "µs", "lower", ipv6=True, decimals=0),
    Figure("rtt_p99_us_v6", "RTT p99, IPv6", "µs", "lower", ipv6=True, decimals=0),
)

# Each IPv6 figure beside the IPv4 figure it is compared with (ratio IPv6 / IPv4, same mode, same run).
IPV6_PAIRS: tuple[tuple[str, str], ...] = (
    ("tcp_1_gbps_v6", "tcp_1_gbps"),
    ("rtt_p50_us_v6", "rtt_p50_us"),
    ("rtt_p99_us_v6", "rtt_p99_us"),
)

CNI_FIGURES: tuple[Figure, ...] = (
    Figure("add_p50_ms", "ADD p50", "ms", "lower", decimals=1),
    Figure("add_p99_ms", "ADD p99", "ms", "lower", decimals=1),
    Figure("del_p50_ms", "DEL p50", "ms", "lower", decimals=1),
    Figure("del_p99_ms", "DEL p99", "ms", "lower", decimals=1),
    Figure("version_p50_ms", "start-up alone (VERSION) p50", "ms", "lower", decimals=1),
)

SCALE_FIGURES: tuple[Figure, ...] = (
    Figure("startup_ready_s", "start-up to ready", "s", "lower"),
    Figure("startup_converged_s", "start-up to all peers in place", "s", "lower"),
    Figure("startup_after_ready_s", "ready to all peers in place", "s", "lower"),
    Figure("flanneld_startup_converged_s", "flanneld's start-up to all peers in place, in turn in this lab", "s",
           "lower"),
    Figure("idle_cpu_ms_per_pass", "idle CPU per 5 s (drift pass)", "ms", "lower", decimals=1),
    Figure("event_p50_ms", "lease event to traffic, p50", "ms", "lower", decimals=1),
    Figure("event_p99_ms", "lease event to traffic, p99", "ms", "lower", decimals=1),
    Figure("churn_p50_ms", "same under 100 changes/s, p50", "ms", "lower", decimals=1),
    Figure("churn_p99_ms", "same under 100 changes/s, p99", "ms", "lower", decimals=1),
    Figure("tcp_1_gbps_n_peers", "TCP 1 stream, N peers", "Gbit/s", "higher"),
    Figure("bulk_delete_s", "all leases deleted to every entry gone", "s", "lower"),
    Figure("tcp_1_gbps_2_peers", "TCP 1 stream, 2 nodes only", "Gbit/s", "higher"),
    Figure("bulk_add_s", "N leases added at once to all in place", "s", "lower"),
    Figure("bulk_add_commit_s", "of which etcd commits them all", "s", "lower"),
    Figure("bulk_add_after_commit_s", "last commit to all in place", "s", "lower"),
)

# Ratios of one figure of ours over a different one of flanneld's, same backend, same run:
# key -> (our figure, flanneld's figure, label). Issue 18's bound on the bulk add is half of
# flanneld's start-up.
SCALE_CROSS_RATIOS: dict[str, tuple[str, str, str]] = {
    "bulk_add_over_flanneld_startup": ("bulk_add_s", "startup_converged_s",
                                       "N leases added at once over flanneld's start-up to all peers in place"),
}

# Ratios one of our modes measures in its own lab, where flanneld starts in turn with ours
# (bench.scale._Lab.start_ups): key -> label. Each is the median of the ratios of neighbouring
# start-ups, so that a machine that changes speed during the run changes both sides of each.
SCALE_IN_TURN_RATIOS: dict[str, str] = {
    "startup_over_flanneld_in_turn": "start-up to all peers in place over flanneld's, each start-up over "
                                     "flanneld's just before it in the same lab (median)",
}

# Figures whose honest value can be exactly zero (a lossless run).
MAY_BE_ZERO: frozenset[str] = frozenset({"udp64_loss_pct"})

_BY_KEY = {f.key: f for f in DATAPATH_FIGURES + CNI_FIGURES + SCALE_FIGURES}


def figure(key: str) -> Figure:
    """The figure named ``key``.

    Raises:
        KeyError: no such figure.
    """
    return _BY_KEY[key]
