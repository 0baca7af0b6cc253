"""Unit tests of bench/'s pure parts: parsers, statistics, ratios, report rendering."""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from bench.__main__ import parse_modes
from bench.cni_latency import summarize
from bench.datapath import figures_from_round
from bench.figures import DATAPATH_FIGURES, MAY_BE_ZERO, figure
from bench.machine import parse_cpuinfo_model, parse_meminfo_gib, parse_os_release
from bench.measure import (
    CpuSample,
    CpuTimes,
    DaemonCpu,
    MeasureError,
    cpu_usage,
    parse_iperf3_tcp,
    parse_iperf3_udp,
    parse_pid_stat,
    parse_ping,
    parse_proc_stat,
    parse_schedstat,
    parse_vmhwm_kib,
)
from bench.modes import plugin_mode, split_plugin_mode
from bench.progress import Progress
from bench.report import add_ipv6_ratios, add_ratios, render_report, side_by_side_pairs, summarize_mode, write_outputs
from bench.runner import rotate
from bench.scale import (
    cpu_seconds,
    fake_leases,
    peer_subnets_from_log,
    scale_ratios,
    scale_subnet_len,
)
from bench.scale_agent import carries_probe
from bench.stats import median, percentile, ratio

# --- stats ----------------------------------------------------------------------------------


def test_median_odd_even_and_empty() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


@pytest.mark.parametrize("pct", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(pct: float) -> None:
    numpy = pytest.importorskip("numpy")
    values = [0.31, 0.12, 5.0, 0.2, 0.25, 0.27, 0.3, 0.9, 0.11, 0.15, 0.4]
    assert percentile(values, pct) == pytest.approx(float(numpy.percentile(values, pct)))


def test_percentile_edges() -> None:
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ratio() -> None:
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


# --- iperf3 -----------------------------------------------------------------------------------

TCP_DOC: dict[str, Any] = {
    "start": {"test_start": {"protocol": "TCP", "num_streams": 4}},
    "end": {
        "sum_sent": {"bytes": 6052642816, "seconds": 2.000662, "bits_per_second": 24202560216.5, "retransmits": 13},
        "sum_received": {"bytes": 6052576904, "seconds": 2.000751, "bits_per_second": 24201220057.8},
    },
}
UDP_DOC: dict[str, Any] = {
    "end": {
        "sum": {"packets": 1338460, "lost_packets": 279146, "lost_percent": 20.85, "seconds": 2.000083},
        "sum_sent": {"packets": 1338460, "lost_packets": 0, "lost_percent": 0, "seconds": 2.00005},
        "sum_received": {"bytes": 67796096, "packets": 1338460, "lost_packets": 279146,
                         "lost_percent": 20.855759604321385, "seconds": 2.000083},
    },
}


def test_parse_iperf3_tcp_reads_the_receiver() -> None:
    result = parse_iperf3_tcp(TCP_DOC)
    assert result.bytes == 6052576904
    assert result.gbps == pytest.approx(24.2012, rel=1e-4)
    assert result.retransmits == 13


def test_parse_iperf3_udp_counts_delivered_packets() -> None:
    result = parse_iperf3_udp(UDP_DOC)
    assert result.delivered == 1338460 - 279146
    assert result.delivered_pps == pytest.approx((1338460 - 279146) / 2.000083)
    assert result.lost_percent == pytest.approx(20.8557, rel=1e-4)


@pytest.mark.parametrize("parse", [parse_iperf3_tcp, parse_iperf3_udp])
def test_parse_iperf3_errors(parse: Any) -> None:
    with pytest.raises(MeasureError, match="unable to connect"):
        parse({"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"})
    with pytest.raises(MeasureError, match="no receiver sum"):
        parse({"end": {}})
    with pytest.raises(MeasureError, match="no time"):
        parse({"end": {"sum_received": {"bytes": 1, "bits_per_second": 1, "seconds": 0, "packets": 1,
                                        "lost_packets": 0, "lost_percent": 0}}})


# --- ping ---------------------------------------------------------------------------------------

PING_OUT = """PING 10.244.9.2 (10.244.9.2) 56(84) bytes of data.
64 bytes from 10.244.9.2: icmp_seq=1 ttl=62 time=0.412 ms
64 bytes from 10.244.9.2: icmp_seq=2 ttl=62 time=0.205 ms
64 bytes from 10.244.9.2: icmp_seq=3 ttl=62 time=12.5 ms
64 bytes from 10.244.9.2: icmp_seq=5 ttl=62 time=0.300 ms

--- 10.244.9.2 ping statistics ---
5 packets transmitted, 4 received, 20% packet loss, time 41ms
rtt min/avg/max/mdev = 0.205/3.354/12.500/5.280 ms
"""


def test_parse_ping_reads_every_reply() -> None:
    result = parse_ping(PING_OUT)
    assert result.rtts_ms == (0.412, 0.205, 12.5, 0.3)
    assert (result.transmitted, result.received) == (5, 4)
    assert result.p50_us == pytest.approx(356.0)
    assert result.p99_us == pytest.approx(percentile([0.412, 0.205, 12.5, 0.3], 99) * 1000)


def test_parse_ping_without_replies() -> None:
    with pytest.raises(MeasureError, match="no reply"):
        parse_ping("PING x\n\n--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss\n")


# --- /proc ----------------------------------------------------------------------------------------


def test_parse_pid_stat_with_odd_comm() -> None:
    fields = ["S", "1", "2", "3"] + ["0"] * 7 + ["345", "67"] + ["0"] * 30
    text = "4242 (py (thr) x) " + " ".join(fields) + "\n"
    assert parse_pid_stat(text) == (345, 67)


def test_parse_proc_stat_and_kernel_share() -> None:
    text = "cpu  100 2 300 4000 5 6 70 8 0 0\ncpu0 50 1 150 2000 2 3 35 4 0 0\nintr 1 2\n"
    times = parse_proc_stat(text)
    assert times == CpuTimes(100, 2, 300, 4000, 5, 6, 70, 8)
    assert times.kernel == 300 + 6 + 70
    with pytest.raises(MeasureError):
        parse_proc_stat("intr 1 2\n")


def test_parse_vmhwm_and_schedstat() -> None:
    status = "Name:\tpython3\nVmPeak:\t  200000 kB\nVmHWM:\t   73136 kB\nVmRSS:\t   70000 kB\n"
    assert parse_vmhwm_kib(status) == 73136
    with pytest.raises(MeasureError):
        parse_vmhwm_kib("Name:\tkthreadd\n")
    assert parse_schedstat("3237206452 50156 2\n") == 3237206452


def _sample(kernel: tuple[int, int, int], daemons: dict[int, tuple[int, int, int]]) -> CpuSample:
    system, irq, softirq = kernel
    return CpuSample(CpuTimes(0, 0, system, 0, 0, irq, softirq, 0),
                     {pid: DaemonCpu(*values) for pid, values in daemons.items()})


def test_cpu_usage_splits_daemons_and_kernel() -> None:
    before = _sample((1000, 10, 100), {1: (50, 20, 2_000_000_000), 2: (10, 5, 500_000_000)})
    after = _sample((1300, 10, 200), {1: (150, 80, 4_000_000_000), 2: (10, 25, 1_000_000_000)})
    usage = cpu_usage(before, after, clk_tck=100)
    assert usage.daemons == pytest.approx(2.5)
    assert usage.daemon_stime == pytest.approx(0.8)
    assert usage.kernel == pytest.approx((400 - 80) / 100)
    assert usage.total == pytest.approx(2.5 + 3.2)


def test_cpu_usage_never_negative_and_same_daemons() -> None:
    before = _sample((0, 0, 0), {1: (0, 0, 0)})
    after = _sample((5, 0, 0), {1: (0, 9, 90_000_000)})
    assert cpu_usage(before, after, clk_tck=100).kernel == 0.0
    with pytest.raises(MeasureError):
        cpu_usage(before, _sample((0, 0, 0), {2: (0, 0, 0)}))


# --- figures, summaries, ratios ---------------------------------------------------------------------


def _raw_round(gbps: float = 2.0, daemons: bool = True, ipv6: bool = True) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "tcp_1": {"gbps": gbps, "bytes": 750_000_000},
        "tcp_4": {"gbps": gbps * 2, "bytes": 1_250_000_000},
        "cpu": {"daemons_s": 4.0, "kernel_s": 2.0, "bytes": 2_000_000_000},
        "udp64": {"delivered_pps": 50_000.0, "lost_percent": 12.5},
        "ping": {"p50_us": 400.0, "p99_us": 900.0},
    }
    if ipv6:
        raw["tcp_1_v6"] = {"gbps": gbps * 0.75, "bytes": 560_000_000}
        raw["ping_v6"] = {"p50_us": 500.0, "p99_us": 900.0}
    if daemons:
        raw["daemon_peak_rss_kib"] = [70_000, 75_776]
    return raw


def test_figures_from_round() -> None:
    figures = figures_from_round(_raw_round())
    assert set(figures) == {f.key for f in DATAPATH_FIGURES}
    assert figures["cpu_s_per_gb"] == pytest.approx(3.0)
    assert figures["daemon_cpu_s_per_gb"] == pytest.approx(2.0)
    assert figures["kernel_cpu_s_per_gb"] == pytest.approx(1.0)
    assert figures["daemon_peak_rss_mib"] == pytest.approx(74.0)
    bare = figures_from_round(_raw_round(daemons=False))
    assert "daemon_cpu_s_per_gb" not in bare and "daemon_peak_rss_mib" not in bare
    assert {f.key for f in DATAPATH_FIGURES if not f.daemon_only} == set(bare)
    ipv4_only = figures_from_round(_raw_round(ipv6=False))  # a mode without IPv6, or --no-ipv6
    assert {f.key for f in DATAPATH_FIGURES if not f.ipv6} == set(ipv4_only)
    assert (figures["tcp_1_gbps_v6"], figures["rtt_p50_us_v6"]) == (1.5, 500.0)


def test_ipv6_ratios_are_each_modes_ipv6_figure_over_its_ipv4_one() -> None:
    modes = {
        "udp": summarize_mode([figures_from_round(_raw_round(g)) for g in (2.0, 4.0)], [], 2),
        "c-relay": summarize_mode([figures_from_round(_raw_round(1.0, ipv6=False))], [], 1),
    }
    results = _results(modes)  # add_ratios first, as the runner
    add_ipv6_ratios(modes)
    assert modes["udp"]["ratios"]["ipv6_vs_ipv4"] == pytest.approx(
        {"tcp_1_gbps": 0.75, "rtt_p50_us": 1.25, "rtt_p99_us": 1.0})
    assert "ipv6_vs_ipv4" not in modes["c-relay"]["ratios"]
    report = render_report(results)
    assert "## IPv6 next to IPv4" in report and "TCP, 1 stream, IPv6 (Gbit/s)" in report
    (udp_row,) = [line for line in report.splitlines() if line.startswith("| udp |")]
    assert "0.75×" in udp_row and "1.25×" in udp_row
    assert not [line for line in report.splitlines() if line.startswith("| c-relay |")]


def test_summarize_mode_medians_and_status() -> None:
    rounds = [figures_from_round(_raw_round(g)) for g in (1.0, 3.0, 2.0)]
    summary = summarize_mode(rounds, [], 3)
    assert summary["status"] == "ok"
    assert summary["figures"]["tcp_1_gbps"]["rounds"] == [1.0, 3.0, 2.0]
    assert summary["figures"]["tcp_1_gbps"]["median"] == 2.0
    assert summarize_mode(rounds[:2], [{"round": 3, "error": "x"}], 3)["status"] == "partial"
    failed = summarize_mode([], [{"round": 1, "error": "backend 'vxlan' is not available"}], 1)
    assert failed["status"] == "failed" and failed["figures"] == {}


def test_add_ratios_uses_medians_of_the_same_run() -> None:
    modes = {
        "udp": summarize_mode([figures_from_round(_raw_round(2.0))], [], 1),
        "vxlan": summarize_mode([figures_from_round(_raw_round(8.0))], [], 1),
        "bare": summarize_mode([figures_from_round(_raw_round(10.0, daemons=False))], [], 1),
    }
    add_ratios(modes)
    assert modes["udp"]["ratios"]["vs_vxlan"]["tcp_1_gbps"] == pytest.approx(0.25)
    assert modes["udp"]["ratios"]["vs_bare"]["tcp_1_gbps"] == pytest.approx(0.2)
    assert modes["udp"]["ratios"]["vs_vxlan"]["tcp_4_gbps"] == pytest.approx(4.0 / 16.0)
    assert modes["bare"]["ratios"]["vs_vxlan"]["tcp_1_gbps"] == pytest.approx(10.0 / 8.0)
    assert "daemon_peak_rss_mib" not in modes["udp"]["ratios"]["vs_bare"]  # bare has no daemon


def test_add_ratios_without_references() -> None:
    modes = {"udp": summarize_mode([figures_from_round(_raw_round())], [], 1),
             "vxlan": summarize_mode([], [{"round": 1, "error": "boom"}], 1)}
    add_ratios(modes)
    assert modes["udp"]["ratios"] == {}


def _results(modes: dict[str, Any]) -> dict[str, Any]:
    add_ratios(modes)
    return {
        "started_at": "2026-01-01T00:00:00+00:00",
        "options": {"modes": list(modes), "rounds": 1, "quick": True, "seconds": 3.0, "ping_count": 200},
        "machine": {"cpu_model": "Test CPU", "cpus": 2, "memory_gib": 4.0, "kernel": "6.1", "flanneld_py": "0.1.0"},
        "modes": modes,
        "cni": {"status": "ok", "pods": 50, "plugins": {
            "flannel-py": {"figures": summarize([10.0, 12.0], [28.0, 29.0], [1.0])},
            "bridge+host-local": {"figures": summarize([20.0, 22.0], [30.0, 31.0], [2.0])}},
            "answer_first": {"figures": summarize([10.0, 12.0], [3.0, 4.0]),
                             "del_until_gone": {"p50_ms": 25.0, "p99_ms": 27.0}},
            "ratios": {"add_p50_ms": 0.5}},
        "scale": {"status": "not run"},
        "failures": [{"what": "vxlan, round 1", "error": "ModeError: backend not available"}],
    }


def test_render_report_shows_every_mode_and_failures() -> None:
    modes = {
        "bare": summarize_mode([figures_from_round(_raw_round(10.0, daemons=False))], [], 1),
        "vxlan": summarize_mode([], [{"round": 1, "error": "ModeError: backend not available"}], 1),
        "udp": summarize_mode([figures_from_round(_raw_round(2.0))], [], 1),
    }
    text = render_report(_results(modes))
    assert "| **bare** | 10.00 | 20.00 |" in text
    assert "| **vxlan** | failed |" in text
    assert "| udp | 0.20× |" in text  # vs bare
    assert "Each mode's median over vxlan's" not in text  # vxlan failed: no ratio table for it
    assert "ModeError: backend not available" in text
    assert "| flannel-py (DEL waits for its removal: `--sync-del`) | 11.0 | 12.0 | 28.5 | 29.0 | 1.0 |" in text
    assert "| bridge+host-local | 21.0 | 22.0 | 30.5 | 31.0 | 2.0 |" in text
    assert "| flannel-py, DEL answering first (the default; not like for like) | 11.0 | 12.0 | 3.5 | 4.0 | — |" in text
    assert "p50 25.0 / p99 27.0 ms" in text
    assert "Test CPU, 2 CPUs" in text


def test_render_report_puts_flannels_scale_modes_beside_ours_with_ratios() -> None:
    results = _results({"udp": summarize_mode([figures_from_round(_raw_round(2.0))], [], 1)})
    modes = {"vxlan": {"status": "ok", "figures": {"startup_converged_s": 1.0, "event_p50_ms": 5.0, "bulk_add_s": 0.8}},
             "flannel-vxlan": {"status": "partial", "figures": {"startup_converged_s": 2.0, "event_p50_ms": 5.0}}}
    results["scale"] = {"status": "partial", "peers": 1000, "modes": modes, "ratios": scale_ratios(modes)}
    text = render_report(results)
    assert "## Scale: 1000 peer leases" in text
    assert "| flannel-vxlan (partial) | — | 2.00 |" in text
    assert ("vxlan over flannel-vxlan: start-up to all peers in place 0.50×, lease event to traffic, p50 1.00×, "
            "N leases added at once over flanneld's start-up to all peers in place 0.40×.") in text
def test_plugin_modes_name_their_backend_and_plugin() -> None:
    assert plugin_mode("udp", "flannel") == "udp+flannel-cni"
    assert split_plugin_mode("udp+flannel-cni") == ("udp", "flannel")
    assert split_plugin_mode("host-gw+bridge-cni") == ("host-gw", "bridge")
    assert split_plugin_mode("flannel-udp") == ("flannel-udp", None)


def test_side_by_side_pairs_other_plugins_with_their_backend_and_udp_with_flannels() -> None:
    order = ["vxlan", "udp", "flannel-udp", "udp+flannel-cni", "vxlan+flannel-cni", "host-gw+flannel-cni"]
    assert side_by_side_pairs(order) == [("udp+flannel-cni", "udp"), ("vxlan+flannel-cni", "vxlan"),
                                         ("udp", "flannel-udp")]  # host-gw did not run: no pair
    assert side_by_side_pairs(["udp", "vxlan"]) == []


def test_render_report_side_by_side_ratios() -> None:
    modes = {
        "udp": summarize_mode([figures_from_round(_raw_round(4.0))], [], 1),
        "flannel-udp": summarize_mode([figures_from_round(_raw_round(0.5))], [], 1),
        "udp+flannel-cni": summarize_mode([figures_from_round(_raw_round(3.0))], [], 1),
    }
    text = render_report(_results(modes))
    assert "## Side by side" in text
    assert "| udp+flannel-cni | udp | 3.00 | 4.00 | 0.75× | 0.75× | 1.00× | 1.00× |" in text
    assert "| udp | flannel-udp | 4.00 | 0.50 | 8.00× |" in text
    assert "## Side by side" not in render_report(_results({"udp": modes["udp"]}))


def test_write_outputs_makes_every_file(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    modes = {"udp": summarize_mode([figures_from_round(_raw_round(g)) for g in (1.0, 2.0)], [], 2),
             "vxlan": summarize_mode([figures_from_round(_raw_round(9.0))], [], 1)}
    results = _results(modes)
    written = write_outputs(str(tmp_path), results)
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["cpu.png", "latency.png", "packet_rate.png", "report.md", "results.json", "throughput.png"]
    for path in written:
        assert os.path.getsize(path) > 0
    with open(tmp_path / "throughput.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["modes"]["udp"]["figures"]["tcp_1_gbps"]["median"] == 1.5


def test_write_outputs_under_sudo_gives_what_it_made_to_the_user(tmp_path: Any, monkeypatch: Any) -> None:
    pytest.importorskip("matplotlib")
    if os.geteuid() != 0:
        pytest.skip("needs root: it changes file owners as a run with sudo does")
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65533")
    results = _results({"udp": summarize_mode([figures_from_round(_raw_round(1.0))], [], 1)})
    written = write_outputs(str(tmp_path / "out" / "demo"), results)
    for path in [tmp_path / "out", tmp_path / "out" / "demo", *written]:
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (65534, 65533), path
    assert os.stat(tmp_path).st_uid == 0  # it existed before: left as it was


def test_figure_table() -> None:
    assert figure("udp64_pps").show(46119.8) == "46"
    assert figure("tcp_1_gbps").show(None) == "—"
    assert MAY_BE_ZERO <= {f.key for f in DATAPATH_FIGURES}
    with pytest.raises(KeyError):
        figure("nope")


# --- run plumbing -----------------------------------------------------------------------------------


def test_rotate_alternates_the_first_mode() -> None:
    modes = ("bare", "host-gw", "vxlan", "udp")
    assert rotate(modes, 0) == list(modes)
    assert rotate(modes, 1) == ["host-gw", "vxlan", "udp", "bare"]
    assert rotate(modes, 4) == list(modes)
    assert rotate((), 3) == []


def test_parse_modes() -> None:
    assert parse_modes("udp, vxlan,udp") == ("udp", "vxlan")
    with pytest.raises(argparse.ArgumentTypeError, match="gre"):
        parse_modes("udp,gre")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_modes(" , ")


def test_progress_prints_one_line_per_step_off_a_terminal() -> None:
    stream = io.StringIO()
    ticks = iter([0.0, 61.0, 62.0])
    progress = Progress(4, stream=stream, clock=lambda: next(ticks))
    progress.context = "round 1/1 · udp"
    progress.step("TCP, 1 stream")
    progress.note("FAILED x")
    assert stream.getvalue() == "[  1/4 1m01s] round 1/1 · udp · TCP, 1 stream\nFAILED x\n"


# --- CNI and scale helpers -------------------------------------------------------------------------


def test_cni_summarize() -> None:
    figures = summarize([float(v) for v in range(1, 101)], [5.0] * 50)
    assert figures["add_p50_ms"] == pytest.approx(50.5)
    assert figures["add_p99_ms"] == pytest.approx(99.01)
    assert figures["del_p99_ms"] == 5.0
    assert "version_p50_ms" not in figures  # not timed: no figure
    assert summarize([1.0], [2.0], [3.0, 1.0, 2.0])["version_p50_ms"] == 2.0


def test_scale_subnet_len() -> None:
    assert scale_subnet_len(10) == 24
    assert scale_subnet_len(254) == 24
    assert scale_subnet_len(255) == 25
    assert scale_subnet_len(1000) == 26
    with pytest.raises(ValueError):
        scale_subnet_len(20000)


def test_fake_leases_are_valid_unique_and_skip_taken() -> None:
    leases = fake_leases("vxlan", 26, 300, skip=["10.244.255.128/26"])
    names = [name for name, _ in leases]
    assert len(set(names)) == 300
    assert "10.244.255.128-26" not in names and "10.244.255.192-26" not in names  # taken; last is never handed out
    values = [json.loads(v) for _, v in leases]
    assert len({v["BackendData"]["VtepMAC"] for v in values}) == 300
    assert all(v["BackendType"] == "vxlan" and v["PublicIP"].startswith("198.51.100.") for v in values)
    for name in names:
        subnet = IPv4Network(name.replace("-", "/"))
        assert subnet.subnet_of(IPv4Network("10.244.0.0/16")) and subnet.prefixlen == 26
    assert json.loads(fake_leases("host-gw", 24, 1)[0][1])["BackendData"] is None
    with pytest.raises(ValueError):
        fake_leases("udp", 24, 300)


LOG = """2026-11-26 01:22:59,285 INFO flanneld: lease acquired: 10.244.2.0/24 (etcd lease f24a, ttl 86400s)
2026-11-26 01:22:59,300 INFO backend.udp.backend: peer added: 10.244.190.0/24 via 198.51.100.2
2026-11-26 01:23:00,010 INFO backend.udp.backend: peer added: 10.244.9.0/24 via 198.51.100.10
2026-11-26 01:23:01,500 INFO backend.udp.backend: peer removed: 10.244.9.0/24 (was 198.51.100.10)
"""


def test_peer_subnets_from_log_replays_adds_and_removes() -> None:
    assert peer_subnets_from_log(LOG) == {"10.244.190.0/24"}


def _frame(dst: str, payload: bytes = b"", proto: int = 1, dport: int = 0) -> bytes:
    """An Ethernet frame with an IPv4 header to ``dst`` (and a UDP header when ``dport`` is given)."""
    udp = struct.pack("!HHHH", dport, dport, 8 + len(payload), 0) if dport else b""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0, 64, 17 if dport else proto, 0,
                     IPv4Address("198.51.100.1").packed, IPv4Address(dst).packed)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp + payload


def test_carries_probe_sees_the_probe_routed_in_udp_or_in_vxlan() -> None:
    probe, peer = IPv4Address("10.244.9.5").packed, IPv4Address("198.51.100.20").packed
    inner = _frame("10.244.9.5", proto=17)[14:]
    assert carries_probe(_frame("10.244.9.5", proto=17), probe, peer)  # host-gw: as it is
    assert carries_probe(_frame("198.51.100.20", inner, dport=8285), probe, peer)  # udp backend
    vxlan = b"\x08\0\0\0\0\0\x01\0" + b"\x02" * 12 + b"\x08\x00" + inner
    assert carries_probe(_frame("198.51.100.20", vxlan, dport=8472), probe, peer)
    assert not carries_probe(_frame("198.51.100.21", vxlan, dport=8472), probe, peer)  # another peer
    assert not carries_probe(_frame("198.51.100.20", inner, dport=2379), probe, peer)  # not a tunnel
    other = _frame("10.244.9.6", proto=17)[14:]
    assert not carries_probe(_frame("198.51.100.20", other, dport=8285), probe, peer)
    assert not carries_probe(b"\x02" * 12 + b"\x86\xdd" + b"\0" * 40, probe, peer)  # IPv6


def test_cpu_seconds_and_scale_ratios() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    stat = f"42 (flanneld (x)) S 1 42 42 0 -1 4194560 100 0 0 0 {3 * ticks} {ticks} 0 0 20 0 3 0 100"
    assert cpu_seconds(stat) == 4.0
    modes = {"vxlan": {"figures": {"startup_converged_s": 1.0, "event_p50_ms": 2.0}},
             "flannel-vxlan": {"figures": {"startup_converged_s": 4.0, "event_p50_ms": 8.0, "bulk_add_s": 1.0}},
             "host-gw": {"figures": {"startup_converged_s": 1.0, "bulk_add_s": 0.5}}}
    assert scale_ratios(modes) == {"vxlan": {"startup_converged_s": 0.25, "event_p50_ms": 0.25}}
    modes["vxlan"]["figures"]["bulk_add_s"] = 3.0  # the bulk add is held against flanneld's start-up
    assert scale_ratios(modes)["vxlan"]["bulk_add_over_flanneld_startup"] == 0.75


def test_scale_ratios_take_the_start_ups_in_turn_from_our_own_lab() -> None:
    """flanneld's start-ups in turn with ours, in our lab: their ratio needs no flannel lab beside it."""
    modes = {"vxlan": {"figures": {"startup_converged_s": 0.4, "flanneld_startup_converged_s": 1.0,
                                   "startup_over_flanneld_in_turn": 0.4}},
             "host-gw": {"figures": {"startup_converged_s": 0.2}}}
    assert scale_ratios(modes) == {"vxlan": {"startup_over_flanneld_in_turn": 0.4}}
    modes["flannel-vxlan"] = {"figures": {"startup_converged_s": 0.8}}
    assert scale_ratios(modes)["vxlan"] == {"startup_over_flanneld_in_turn": 0.4, "startup_converged_s": 0.5}
    results = _results({})
    results["scale"] = {"status": "ok", "peers": 1000, "modes": modes, "ratios": scale_ratios(modes)}
    assert ("vxlan over flannel-vxlan: start-up to all peers in place over flanneld's, each start-up over "
            "flanneld's just before it in the same lab (median) 0.40×, start-up to all peers in place 0.50×."
            ) in render_report(results)


def test_machine_parsers() -> None:
    assert parse_cpuinfo_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"
    assert parse_meminfo_gib("MemTotal:       24683520 kB\n") == 23.5
    assert parse_os_release('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') == \
        "Debian GNU/Linux 12 (bookworm)"


def test_python_m_bench_names_a_missing_requirement_in_one_line(monkeypatch) -> None:
    import bench.__main__ as bench_main

    assert bench_main.missing_requirement() is None  # the test venv has them all
    monkeypatch.setattr(bench_main, "REQUIREMENTS", (("no_such_module_for_bench", "install the x extra"),))
    assert bench_main.missing_requirement() == "install the x extra"


def test_a_scale_only_run_writes_the_report_and_results_without_charts(tmp_path: Any) -> None:
    results = _results({})
    results["cni"] = {"status": "not run", "why": "--scale-only"}
    modes = {"vxlan": {"status": "ok", "figures": {"startup_converged_s": 1.0, "startup_after_ready_s": 0.25}},
             "flannel-vxlan": {"status": "ok", "figures": {"startup_converged_s": 2.0, "startup_after_ready_s": 1.0}}}
    results["scale"] = {"status": "ok", "peers": 1000, "modes": modes, "ratios": scale_ratios(modes)}
    written = sorted(os.path.basename(p) for p in write_outputs(str(tmp_path), results))
    assert written == ["report.md", "results.json"]
    text = (tmp_path / "report.md").read_text()
    assert "## CNI" not in text and "ready to all peers in place 0.25×" in text


def test_scale_only_needs_peers(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--scale-only"])
    assert "--scale-only needs --peers N" in capsys.readouterr().err
