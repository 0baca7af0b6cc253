"""End to end: ``python3 -m bench --quick --modes udp,vxlan,c-relay --rounds 1`` in real namespaces.

Checks that every output file exists, that every figure is present and
positive (loss may honestly be zero), that the numbers hang together, and
that nothing the run made is left behind: no namespace of its tags, no
process it started (iperf3, flanneld-py, etcd, ...). Its processes are told
from those of other runs on the machine by a token in their environment,
which every process the bench starts inherits, also one that was orphaned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench.figures import CNI_FIGURES, DATAPATH_FIGURES, MAY_BE_ZERO

REPO = Path(__file__).resolve().parents[1]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


RUN_TOKEN = "FLANNELD_BENCH_TEST_RUN"  # in the environment of every process one bench run starts


def _processes(names: tuple[str, ...]) -> dict[int, str]:
    found = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmdline for name in names):
            found[int(pid)] = cmdline
    return found


def _started_by(token: str) -> dict[int, str]:
    """The live processes whose environment holds ``RUN_TOKEN=token``: those a run started,
    even orphaned or in a namespace, and no one else's (a zombie's environment reads empty)."""
    needle = f"{RUN_TOKEN}={token}".encode()
    found = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        found[int(pid)] = cmdline
    return found


def test_leftover_check_sees_only_the_runs_own_processes_also_orphaned() -> None:
    """Another run's process (here one without the token) is no leftover; ours is, also after
    its parent exited (as a server the bench forgot would be)."""
    token = uuid.uuid4().hex
    spawn = "sleep 300 </dev/null >/dev/null 2>&1 & echo $!"  # the shell exits: its sleep is an orphan
    pids: list[int] = []
    try:
        for env in ({**os.environ, RUN_TOKEN: token}, {**os.environ, RUN_TOKEN: uuid.uuid4().hex}, dict(os.environ)):
            out = subprocess.run(["sh", "-c", spawn], env=env, capture_output=True, text=True, check=True).stdout
            pids.append(int(out))
        left = _started_by(token)
        assert list(left) == [pids[0]] and "sleep 300" in left[pids[0]], (left, pids)
    finally:
        for pid in pids:
            os.kill(pid, 9)
    assert not _started_by(token)  # killed: gone (or a zombie of init's, which reads empty)


def _check_figure(where: str, entry: dict[str, Any], key: str) -> None:
    values = entry["rounds"] + [entry["median"]]
    for value in values:
        assert isinstance(value, (int, float)), f"{where} {key}: {value!r}"
        if key in MAY_BE_ZERO:
            assert value >= 0, f"{where} {key} = {value}"
        else:
            assert value > 0, f"{where} {key} = {value}"


@pytest.mark.netns
@pytest.mark.slow
def test_quick_bench_udp_vxlan_c_relay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    token = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--modes", "udp,vxlan,c-relay", "--rounds", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,  # a hang guard, not a speed check
        env={**os.environ, RUN_TOKEN: token},
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "bench done" in proc.stderr  # the progress output

    for name in ("results.json", "report.md", "throughput.png", "latency.png", "packet_rate.png", "cpu.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("throughput.png", "latency.png", "packet_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    assert results["machine"]["cpus"] >= 1 and results["machine"]["kernel"]
    assert set(results["modes"]) == {"udp", "vxlan", "c-relay"}
    for mode, summary in results["modes"].items():
        assert summary["status"] == "ok", summary["errors"]
        for fig in DATAPATH_FIGURES:
            if fig.ipv6 and mode == "c-relay":  # IPv4 only
                assert fig.key not in summary["figures"]
                continue
            assert fig.key in summary["figures"], f"{mode} lacks {fig.key}"
            _check_figure(mode, summary["figures"][fig.key], fig.key)
            assert len(summary["figures"][fig.key]["rounds"]) == 1
        raw = summary["raw_rounds"][0]
        assert raw["tcp_1"]["bytes"] > 0 and raw["ping"]["received"] > 0
        # figures are the tools' own numbers: the median of one round is that round's value
        assert summary["figures"]["tcp_1_gbps"]["median"] == raw["tcp_1"]["gbps"]
    # every ratio is that mode's median over vxlan's median of the same run
    vxlan = results["modes"]["vxlan"]["figures"]
    for mode in ("udp", "c-relay"):
        summary = results["modes"][mode]
        for key, value in summary["ratios"]["vs_vxlan"].items():
            assert value == pytest.approx(summary["figures"][key]["median"] / vxlan[key]["median"]), (mode, key)
        assert "tcp_1_gbps" in summary["ratios"]["vs_vxlan"], mode
    # IPv6 next to IPv4: dual-stack labs for udp and vxlan, each IPv6 figure over its own IPv4 one
    for mode in ("udp", "vxlan"):
        summary = results["modes"][mode]
        assert summary["raw_rounds"][0]["ping_v6"]["received"] > 0
        figures = summary["figures"]
        assert summary["ratios"]["ipv6_vs_ipv4"]["tcp_1_gbps"] == pytest.approx(
            figures["tcp_1_gbps_v6"]["median"] / figures["tcp_1_gbps"]["median"])
    assert "## IPv6 next to IPv4" in (out / "report.md").read_text()

    cni = results["cni"]
    assert cni["status"] == "ok" and cni["pods"] == 50
    for plugin in ("flannel-py", "bridge+host-local"):
        entry = cni["plugins"][plugin]
        assert len(entry["add_ms"]) == 50 and len(entry["del_ms"]) == 50
        for fig in CNI_FIGURES:
            assert entry["figures"][fig.key] > 0, (plugin, fig.key)
    assert set(cni["ratios"]) == {fig.key for fig in CNI_FIGURES}
    first = cni["answer_first"]  # our default DEL, on a line of its own
    assert len(first["del_ms"]) == 50 and first["figures"]["del_p50_ms"] > 0

    report = (out / "report.md").read_text()
    for needle in ("| **udp** |", "| **vxlan** |", "| **c-relay** |", "flannel-py", "bridge+host-local", "Machine:"):
        assert needle in report

    # nothing left behind
    tags = results["run"]["tags"]
    assert tags
    left = sorted(ns for ns in _namespaces() if any(ns.startswith(f"fp{tag}") for tag in tags))
    assert not left, f"namespaces left behind: {left}"
    leftover = _processes(tuple(f"flanneld-lab-{tag}-" for tag in tags))
    assert not leftover, f"processes left behind: {leftover}"
    started = _started_by(token)  # iperf3 servers and clients among them; another bench's are not
    assert not started, f"processes of this run left behind: {started}"
    dirs = [p.name for p in Path(tempfile.gettempdir()).glob("flanneld-lab-*")
            if any(p.name.startswith(f"flanneld-lab-{tag}-") for tag in tags)]
    assert not dirs, f"work directories left behind: {dirs}"
