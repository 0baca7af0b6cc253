"""One round of one mode: the datapath figures between a testbed's two endpoints.

Order inside a round: TCP 1 stream, TCP 4 streams (CPU sampled tightly around
both), UDP 64-byte flood, ping; then, on a dual-stack testbed, TCP 1 stream and
ping over IPv6 between the same two pods. Each figure comes from the tool's own
output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .measure import (
    CpuUsage,
    TcpResult,
    cpu_sample,
    cpu_usage,
    parse_iperf3_tcp,
    parse_iperf3_udp,
    peak_rss_kib,
    run_iperf3,
    run_ping,
)
from .modes import Testbed

__all__ = ["Plan", "figures_from_round", "measure_round"]


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each test runs."""

    seconds: float = 10.0  # per iperf3 test
    ping_count: int = 1000  # at 10 ms intervals
    scale_events: int = 30  # lease events timed by --peers
    cni_pods: int = 50

    @classmethod
    def quick(cls) -> Plan:
        return cls(seconds=3.0, ping_count=200, scale_events=10, cni_pods=50)


def _tcp(bed: Testbed, streams: int, seconds: float) -> tuple[dict[str, Any], CpuUsage]:
    args = ["-P", str(streams)] if streams > 1 else []
    before = cpu_sample(bed.daemon_pids)
    doc = run_iperf3(bed.src, bed.dst, args, seconds)
    after = cpu_sample(bed.daemon_pids)
    return _tcp_record(parse_iperf3_tcp(doc)), cpu_usage(before, after)


def _tcp_record(result: TcpResult) -> dict[str, Any]:
    return {"bytes": result.bytes, "seconds": result.seconds, "gbps": result.gbps, "retransmits": result.retransmits}


def measure_round(bed: Testbed, plan: Plan, step: Callable[[str], None]) -> dict[str, Any]:
    """Run every test once on ``bed``; the raw numbers of this round (see :func:`figures_from_round`)."""
    step("TCP, 1 stream")
    tcp1, cpu1 = _tcp(bed, 1, plan.seconds)
    step("TCP, 4 streams")
    tcp4, cpu4 = _tcp(bed, 4, plan.seconds)
    step("UDP, 64-byte packets")
    udp = parse_iperf3_udp(run_iperf3(bed.src, bed.dst, ["-u", "-l", "64", "-b", "0"], plan.seconds))
    step("ping")
    ping = run_ping(bed.src, bed.dst, plan.ping_count)
    ipv6 = _measure_ipv6(bed, plan, step)
    raw: dict[str, Any] = {
        "tcp_1": tcp1,
        "tcp_4": tcp4,
        "cpu": {
            "daemons_s": cpu1.daemons + cpu4.daemons,
            "kernel_s": cpu1.kernel + cpu4.kernel,
            "daemon_stime_s": cpu1.daemon_stime + cpu4.daemon_stime,
            "bytes": tcp1["bytes"] + tcp4["bytes"],
        },
        "udp64": {"packets": udp.packets, "lost": udp.lost, "seconds": udp.seconds,
                  "lost_percent": udp.lost_percent, "delivered_pps": udp.delivered_pps},
        "ping": {"transmitted": ping.transmitted, "received": ping.received,
                 "p50_us": ping.p50_us, "p99_us": ping.p99_us,
                 "min_us": min(ping.rtts_ms) * 1000, "max_us": max(ping.rtts_ms) * 1000},
    }
    raw.update(ipv6)
    if bed.daemon_pids:
        raw["daemon_peak_rss_kib"] = [peak_rss_kib(pid) for pid in bed.daemon_pids]
    return raw


def _measure_ipv6(bed: Testbed, plan: Plan, step: Callable[[str], None]) -> dict[str, Any]:
    """TCP 1 stream and ping over IPv6 on a dual-stack testbed (its CPU is not in the CPU figures)."""
    if bed.src6 is None or bed.dst6 is None:
        return {}
    step("TCP, 1 stream, IPv6")
    tcp = _tcp_record(parse_iperf3_tcp(run_iperf3(bed.src6, bed.dst6, [], plan.seconds)))
    step("ping, IPv6")
    ping = run_ping(bed.src6, bed.dst6, plan.ping_count)
    return {
        "tcp_1_v6": tcp,
        "ping_v6": {"transmitted": ping.transmitted, "received": ping.received, "p50_us": ping.p50_us,
                    "p99_us": ping.p99_us},
    }


def figures_from_round(raw: dict[str, Any]) -> dict[str, float]:
    """The round's figures (keys of :data:`bench.figures.DATAPATH_FIGURES`) from its raw numbers."""
    gigabytes = raw["cpu"]["bytes"] / 1e9
    figures = {
        "tcp_1_gbps": raw["tcp_1"]["gbps"],
        "tcp_4_gbps": raw["tcp_4"]["gbps"],
        "udp64_pps": raw["udp64"]["delivered_pps"],
        "udp64_loss_pct": raw["udp64"]["lost_percent"],
        "rtt_p50_us": raw["ping"]["p50_us"],
        "rtt_p99_us": raw["ping"]["p99_us"],
        "cpu_s_per_gb": (raw["cpu"]["daemons_s"] + raw["cpu"]["kernel_s"]) / gigabytes,
        "kernel_cpu_s_per_gb": raw["cpu"]["kernel_s"] / gigabytes,
    }
    if "tcp_1_v6" in raw:
        figures["tcp_1_gbps_v6"] = raw["tcp_1_v6"]["gbps"]
        figures["rtt_p50_us_v6"] = raw["ping_v6"]["p50_us"]
        figures["rtt_p99_us_v6"] = raw["ping_v6"]["p99_us"]
    if "daemon_peak_rss_kib" in raw:
        figures["daemon_cpu_s_per_gb"] = raw["cpu"]["daemons_s"] / gigabytes
        figures["daemon_peak_rss_mib"] = max(raw["daemon_peak_rss_kib"]) / 1024
    return figures
