"""What a run leaves in --out: results.json, report.md and PNG charts.

Summaries and ratios are pure functions of the rounds' figures (tested in
``tests/test_bench_units.py``); only :func:`write_outputs` touches files, and
matplotlib is imported there, with the Agg backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .cni_latency import OURS
from .figures import (CNI_FIGURES, DATAPATH_FIGURES, IPV6_PAIRS, SCALE_CROSS_RATIOS, SCALE_FIGURES,
                      SCALE_IN_TURN_RATIOS, Figure, figure)
from .modes import split_plugin_mode
from .stats import median, ratio

__all__ = [
    "REFERENCE_MODES",
    "add_ipv6_ratios",
    "add_ratios",
    "cni_lines",
    "render_report",
    "side_by_side_pairs",
    "summarize_mode",
    "write_outputs",
]

REFERENCE_MODES = ("vxlan", "bare")
CHARTS = ("throughput.png", "latency.png", "packet_rate.png", "cpu.png")


def summarize_mode(rounds: Sequence[Mapping[str, float]], errors: Sequence[Mapping[str, Any]],
                   expected_rounds: int) -> dict[str, Any]:
    """Every figure's per-round values and median; status ok / partial / failed.

    ``rounds`` are the successful rounds' figures, ``errors`` the failed
    rounds ({"round": n, "error": text}).
    """
    figures: dict[str, Any] = {}
    for fig in DATAPATH_FIGURES:
        values = [r[fig.key] for r in rounds if fig.key in r]
        if values:
            figures[fig.key] = {"label": fig.label, "unit": fig.unit, "better": fig.better,
                                "rounds": values, "median": median(values)}
    if not rounds:
        status = "failed"
    elif errors or len(rounds) < expected_rounds:
        status = "partial"
    else:
        status = "ok"
    return {"status": status, "figures": figures, "errors": list(errors)}


def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    """Add ``ratios`` to every mode: its median over each reference mode's median, per figure.

    A reference that did not run (or failed) gives no ratios; the mode's own
    entry against itself is 1.0 by construction.
    """
    for summary in modes.values():
        summary["ratios"] = {}
        for ref in REFERENCE_MODES:
            ref_figures = modes.get(ref, {}).get("figures", {})
            if not ref_figures:
                continue
            out = {}
            for key, entry in summary["figures"].items():
                value = ratio(entry["median"], ref_figures.get(key, {}).get("median"))
                if value is not None:
                    out[key] = value
            summary["ratios"][f"vs_{ref}"] = out


def add_ipv6_ratios(modes: dict[str, dict[str, Any]]) -> None:
    """Add ``ratios.ipv6_vs_ipv4`` to every mode measured over IPv6: each IPv6 figure's median over
    the same mode's IPv4 figure (keyed by the IPv4 figure), from the same run."""
    for summary in modes.values():
        got = summary["figures"]
        out = {}
        for six, four in IPV6_PAIRS:
            value = ratio(got.get(six, {}).get("median"), got.get(four, {}).get("median"))
            if value is not None:
                out[four] = value
        if out:
            summary.setdefault("ratios", {})["ipv6_vs_ipv4"] = out


# --- report.md -------------------------------------------------------------------------------


def _median(modes: Mapping[str, Any], mode: str, key: str) -> float | None:
    entry = modes.get(mode, {}).get("figures", {}).get(key)
    return None if entry is None else entry["median"]


def _ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _machine_line(machine: Mapping[str, Any]) -> str:
    parts = [
        machine.get("cpu_model", "unknown CPU"),
        f"{machine.get('cpus', '?')} CPUs",
        f"{machine.get('memory_gib', '?')} GiB",
        f"Linux {machine.get('kernel', '?')}",
        machine.get("os", ""),
        f"Python {machine.get('python', '?')}",
        machine.get("iperf3", ""),
    ]
    if machine.get("virtualization"):
        parts.append(f"virtualization: {machine['virtualization']}")
    if machine.get("loadavg_at_start"):
        load = f"load average {' '.join(machine['loadavg_at_start'])} at start"
        if machine.get("loadavg_at_end"):
            load += f", {' '.join(machine['loadavg_at_end'])} at end"
        parts.append(load)
    return ", ".join(p for p in parts if p)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_report(results: Mapping[str, Any]) -> str:
    """report.md: the medians table, ratios, CNI and scale tables, failures, one line per method note."""
    options = results["options"]
    modes: Mapping[str, Any] = results["modes"]
    order = [m for m in options["modes"] if m in modes]
    lines = [
        "# flanneld-py datapath bench",
        "",
        f"{results['started_at']} · {options['rounds']} round(s), medians · "
        f"{options['seconds']:g} s per iperf3 test, {options['ping_count']} pings"
        f"{' · --quick' if options['quick'] else ''} · flanneld-py {results['machine'].get('flanneld_py', '?')}",
        "",
        f"Machine: {_machine_line(results['machine'])}.",
        "",
        "Pod to pod across two nodes (bare: node to node on the underlay, the ceiling).",
        "",
    ]
    cols = [figure(k) for k in ("tcp_1_gbps", "tcp_4_gbps", "udp64_pps", "udp64_loss_pct", "rtt_p50_us",
                                "rtt_p99_us", "cpu_s_per_gb", "daemon_cpu_s_per_gb", "daemon_peak_rss_mib")]
    header = ["mode"] + [f"{c.label} ({c.display_unit})" for c in cols]
    rows = []
    for mode in order:
        summary = modes[mode]
        if summary["status"] == "failed":
            rows.append([f"**{mode}**"] + ["failed"] + ["—"] * (len(cols) - 1))
            continue
        mark = " (partial)" if summary["status"] == "partial" else ""
        rows.append([f"**{mode}**{mark}"] + [c.show(_median(modes, mode, c.key)) for c in cols])
    lines += _table(header, rows)
    ratio_keys = ("tcp_1_gbps", "tcp_4_gbps", "udp64_pps", "rtt_p50_us", "cpu_s_per_gb")
    for ref in REFERENCE_MODES:
        if ref not in modes or modes[ref]["status"] == "failed":
            continue
        lines += ["", f"Each mode's median over {ref}'s (same run; >1 means more: better for throughput, "
                      "worse for latency and CPU):", ""]
        rows = []
        for mode in order:
            got = modes[mode].get("ratios", {}).get(f"vs_{ref}", {})
            rows.append([mode] + [_ratio_text(got.get(k)) for k in ratio_keys])
        lines += _table(["mode"] + [f"{figure(k).label}" for k in ratio_keys], rows)
    lines += _ipv6_section(modes, order)
    lines += _side_by_side_section(modes, order)
    lines += cni_lines(results.get("cni"))
    lines += _scale_section(results.get("scale"))
    failures = results.get("failures", [])
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {f['what']}: {f['error']}" for f in failures]
    lines += [
        "",
        "Method: iperf3 (TCP 1 stream and `-P 4`; UDP `-u -l 64 -b 0`, packets delivered = receiver's packets − lost), "
        "`ping -i 0.01` (every reply's time), CPU per GB over both TCP tests: daemons' on-CPU time "
        "(/proc/PID/task/*/schedstat) + machine-wide system+irq+softirq (/proc/stat) less the daemons' own "
        "system time, per GB received; peak RSS = VmHWM of the larger daemon. Modes alternate within each round. "
        "Raw per-round values: results.json. How to read: bench/README.md.",
        "",
    ]
    return "\n".join(lines)


def _ipv6_section(modes: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """Each dual-stack mode's IPv6 figures next to its IPv4 ones, with the ratio IPv6 / IPv4."""
    shown = [m for m in order if modes[m].get("ratios", {}).get("ipv6_vs_ipv4")]
    if not shown:
        return []
    header = ["mode"]
    for six, four in IPV6_PAIRS:
        header += [f"{figure(four).label} ({figure(four).display_unit})",
                   f"{figure(six).label} ({figure(six).display_unit})", "IPv6 / IPv4"]
    rows = []
    for mode in shown:
        got = modes[mode]["ratios"]["ipv6_vs_ipv4"]
        row = [mode]
        for six, four in IPV6_PAIRS:
            row += [figure(four).show(_median(modes, mode, four)), figure(six).show(_median(modes, mode, six)),
                    _ratio_text(got.get(four))]
        rows.append(row)
    return ["", "## IPv6 next to IPv4", "",
            "The same two pods (nodes, for bare) over IPv6 in the same dual-stack lab and round: TCP 1 stream and "
            "ping, and the IPv6 figure over the IPv4 one (>1: more; better for throughput, worse for latency).",
            ""] + _table(header, rows)


def side_by_side_pairs(order: Sequence[str]) -> list[tuple[str, str]]:
    """(mode, against) pairs a reader compares directly: pods wired by another plugin against the
    same backend's pods wired by flannel-py, and our udp against flannel's own (flannel-udp)."""
    pairs = []
    for mode in order:
        base, plugin = split_plugin_mode(mode)
        if plugin is not None and base in order:
            pairs.append((mode, base))
    if "udp" in order and "flannel-udp" in order:
        pairs.append(("udp", "flannel-udp"))
    return pairs


SIDE_BY_SIDE_KEYS = ("tcp_1_gbps", "tcp_4_gbps", "udp64_pps", "rtt_p50_us")


def _side_by_side_section(modes: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    rows = []
    for mode, against in side_by_side_pairs(order):
        tcp = figure("tcp_1_gbps")
        rows.append([mode, against, tcp.show(_median(modes, mode, tcp.key)), tcp.show(_median(modes, against, tcp.key))]
                    + [_ratio_text(ratio(_median(modes, mode, k), _median(modes, against, k))) for k in SIDE_BY_SIDE_KEYS])
    if not rows:
        return []
    header = ["mode", "against", f"TCP, 1 stream ({figure('tcp_1_gbps').display_unit})", "against's"]
    header += [f"{figure(k).label} ratio" for k in SIDE_BY_SIDE_KEYS]
    return ["", "## Side by side", "",
            "Pods wired by another CNI plugin against the same backend's pods wired by flannel-py, and "
            "flanneld-py's udp against flannel's own daemon (medians of the same run; ratio = mode / against):",
            ""] + _table(header, rows)


def cni_lines(cni: Mapping[str, Any] | None) -> list[str]:
    """The CNI section of report.md: like for like first, our answer-first DEL on a line of its own."""
    if not cni or cni.get("status") == "not run":
        return []
    lines = ["", f"## CNI ADD/DEL latency ({cni.get('pods', '?')} pods, ms)", ""]
    if cni.get("status") != "ok":
        return lines + [f"failed: {cni.get('error', 'unknown error')}"]
    rows = []
    for name, entry in cni["plugins"].items():
        label = f"{name} (DEL waits for its removal: `--sync-del`)" if name == OURS else name
        rows.append([label] + [fig.show(entry["figures"].get(fig.key)) for fig in CNI_FIGURES])
    first = cni.get("answer_first")
    if first:
        rows.append(["flannel-py, DEL answering first (the default; not like for like)"]
                    + [fig.show(first["figures"].get(fig.key)) for fig in CNI_FIGURES])
    lines += _table(["plugin"] + [fig.label for fig in CNI_FIGURES], rows)
    lines += ["", "Like for like: both plugins wire a bridge with gateway and default route, hairpin mode and a "
                  "per-pod masquerade chain, and finish all removal inside DEL; every removal is complete "
                  "before the next command (off the clock)."]
    if first:
        gone = first["del_until_gone"]
        lines += [f"The default answer-first DEL replies once the pod is queued for removal; from the answer "
                  f"until the removal is complete: p50 {gone['p50_ms']:.1f} / p99 {gone['p99_ms']:.1f} ms."]
    ratios = cni.get("ratios", {})
    if ratios:
        lines += ["", "flannel-py over bridge+host-local, like for like: " + ", ".join(
            f"{figure(k).label} {_ratio_text(v)}" for k, v in ratios.items()) + "."]
    return lines


def _scale_section(scale: Mapping[str, Any] | None) -> list[str]:
    if not scale or scale.get("status") == "not run":
        return []
    lines = ["", f"## Scale: {scale['peers']} peer leases", ""]
    rows = []
    for mode, entry in scale["modes"].items():
        if entry.get("status") == "failed":
            rows.append([mode, "failed"] + ["—"] * (len(SCALE_FIGURES) - 1))
            continue
        mark = " (partial)" if entry.get("status") == "partial" else ""
        rows.append([mode + mark] + [fig.show(entry["figures"].get(fig.key)) for fig in SCALE_FIGURES])
    lines += _table(["mode"] + [f"{fig.label} ({fig.display_unit})" for fig in SCALE_FIGURES], rows)
    for backend, ratios in scale.get("ratios", {}).items():
        lines += ["", f"{backend} over flannel-{backend}: " + ", ".join(
            f"{_scale_ratio_label(k)} {_ratio_text(v)}" for k, v in ratios.items()) + "."]
    return lines


def _scale_ratio_label(key: str) -> str:
    if key in SCALE_IN_TURN_RATIOS:
        return SCALE_IN_TURN_RATIOS[key]
    return SCALE_CROSS_RATIOS[key][2] if key in SCALE_CROSS_RATIOS else figure(key).label


# --- files -------------------------------------------------------------------------------------


def _bar_chart(path: str, title: str, ylabel: str, modes: Sequence[str], series: Sequence[tuple[Figure, str]],
               data: Mapping[str, Any], log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, (spec, name) in enumerate(series):
        xs, heights, points = [], [], []
        for j, mode in enumerate(modes):
            entry = data.get(mode, {}).get("figures", {}).get(spec.key)
            if entry is None:
                continue
            x = j + (i - (len(series) - 1) / 2) * width
            xs.append(x)
            heights.append(entry["median"] * spec.show_scale)
            points += [(x, v * spec.show_scale) for v in entry["rounds"]]
        bars = ax.bar(xs, heights, width * 0.95, label=name)
        ax.bar_label(bars, fmt=f"%.{spec.decimals}f", fontsize=8, padding=2)
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, color="black", zorder=3)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.99, 0.01, "bars: median; dots: each round", ha="right", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stacked_cpu_chart(path: str, modes: Sequence[str], data: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def med(mode: str, key: str) -> float:
        entry = data.get(mode, {}).get("figures", {}).get(key)
        return 0.0 if entry is None else float(entry["median"])

    kernel = [med(m, "kernel_cpu_s_per_gb") for m in modes]
    daemons = [med(m, "daemon_cpu_s_per_gb") for m in modes]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.bar(range(len(modes)), kernel, 0.6, label="kernel (system + irq + softirq)")
    bars = ax.bar(range(len(modes)), daemons, 0.6, bottom=kernel, label="daemons (both nodes)")
    ax.bar_label(bars, labels=[f"{med(m, 'cpu_s_per_gb'):.2f}" for m in modes], fontsize=8, padding=2)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("CPU seconds per GB")
    ax.set_title("CPU per GB moved (TCP tests), medians")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_charts(out: str, results: Mapping[str, Any]) -> list[str]:
    modes = [m for m in results["options"]["modes"] if results["modes"].get(m, {}).get("figures")]
    if not modes:  # --scale-only: no datapath figures to draw
        return []
    data = results["modes"]
    paths = [os.path.join(out, name) for name in CHARTS]
    _bar_chart(paths[0], "TCP throughput, pod to pod", "Gbit/s", modes,
               [(figure("tcp_1_gbps"), "1 stream"), (figure("tcp_4_gbps"), "4 streams")], data)
    _bar_chart(paths[1], "Round-trip latency (ping), log scale", "µs", modes,
               [(figure("rtt_p50_us"), "p50"), (figure("rtt_p99_us"), "p99")], data, log=True)
    _bar_chart(paths[2], "UDP 64-byte packets delivered", "kpps", modes, [(figure("udp64_pps"), "delivered")], data)
    _stacked_cpu_chart(paths[3], modes, data)
    return paths


def _missing_dirs(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _give_to_sudo_user(paths: Sequence[str]) -> None:
    """Run with sudo, what the bench made belongs to the user who ran sudo (who can then
    move or delete it without sudo); otherwise it stays as made."""
    uid, gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if os.geteuid() != 0 or not uid.isdigit() or not gid.isdigit():
        return
    for path in paths:
        os.chown(path, int(uid), int(gid))


def write_outputs(out: str, results: dict[str, Any]) -> list[str]:
    """Write results.json, report.md and the charts into ``out``; the paths written."""
    made = _missing_dirs(os.path.abspath(out))
    os.makedirs(out, exist_ok=True)
    written = []
    report_path = os.path.join(out, "report.md")
    with open(report_path, "w") as handle:
        handle.write(render_report(results))
    written.append(report_path)
    written += write_charts(out, results)
    results["files"] = [os.path.basename(p) for p in written] + ["results.json"]
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=False)
        handle.write("\n")
    written.append(json_path)
    _give_to_sudo_user(made + written)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python3 -m bench.report DIR``: render report.md and the charts again from DIR/results.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m bench.report", description=main.__doc__)
    parser.add_argument("dir", help="a directory holding results.json")
    args = parser.parse_args(argv)
    with open(os.path.join(args.dir, "results.json")) as handle:
        results = json.load(handle)
    for path in write_outputs(args.dir, results):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
