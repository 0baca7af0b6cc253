"""``--peers N``: how flanneld-py copes with a big cluster.

For each selected flanneld-py mode, a two-node lab whose etcd already holds N
peer leases (subnets from the top of the range, PublicIPs on the underlay
that need not exist, a unique VTEP MAC each for vxlan; the subnet length is
made long enough for N + the events) before the daemons start. Measured:

* start-up to ready: daemon launched -> subnet file written and CNI socket up
  (the lab's readiness), and -> all N + 1 peers in the datapath (kernel routes
  for vxlan/host-gw; for udp the daemon's ``peer added`` lines, as its peers
  live in its own table). The slower of the two nodes.
* lease event to route: K more leases written one at a time; from the put
  being sent to the route being in place (see :mod:`bench.scale_agent`), p50/p99.
* TCP single-stream pod to pod with all N peers present, then again after the
  fake leases are deleted (in transactions of 100) and both daemons are back
  to one peer each; the time that took is kept too. If they are not back
  within 60 s + 0.3 s per peer, the 2-node figure is missing and the error
  says how many peers were still there (status "partial").
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flanneld_py.lab.cluster import ETCD_HOST, PREFIX, Cluster, Node
from flanneld_py.lab.netns import run

from .measure import Endpoint, MeasureError, parse_iperf3_tcp, run_iperf3
from .modes import ModeError, wait_reachable
from .stats import median, percentile

__all__ = ["ScaleSpec", "fake_leases", "measure_scale", "peer_subnets_from_log", "scale_subnet_len"]

NETWORK = IPv4Network("10.244.0.0/16")
REPO = Path(__file__).resolve().parents[1]
_ADDED = re.compile(r"peer added: (\S+)")
_REMOVED = re.compile(r"peer removed: (\S+)")


def scale_subnet_len(count: int, network: IPv4Network = NETWORK) -> int:
    """The shortest subnet length (at least /24) that leaves room for ``count`` subnets.

    flannel hands out every subnet but the first and the last.

    Raises:
        ValueError: not even /28 subnets would do.
    """
    length = max(24, network.prefixlen + math.ceil(math.log2(count + 2)))
    if length > 28:
        raise ValueError(f"{network} cannot hold {count} subnets of /28 or larger")
    return length


def fake_leases(mode: str, subnet_len: int, count: int, skip: Sequence[str] = (),
                network: IPv4Network = NETWORK, first_index: int = 0) -> list[list[str]]:
    """``count`` flannel lease records ``[key name, JSON value]`` for peers that need not exist.

    Subnets from the top of the range down, skipping ``skip``; PublicIPs cycle
    through 198.51.100.10-209 (on the underlay, so host-gw accepts them).
    """
    taken = {IPv4Network(s) for s in skip}
    out: list[list[str]] = []
    subnets = list(network.subnets(new_prefix=subnet_len))[1:-1]
    for subnet in reversed(subnets):
        if len(out) == count:
            break
        if subnet in taken:
            continue
        index = first_index + len(out)
        data: dict[str, Any] | None = None
        if mode == "vxlan":
            data = {"VNI": 1, "VtepMAC": "02:fb:" + ":".join(f"{(index >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))}
        value = {"PublicIP": f"198.51.100.{10 + index % 200}", "PublicIPv6": None, "BackendType": mode,
                 "BackendData": data}
        out.append([f"{subnet.network_address}-{subnet_len}", json.dumps(value, separators=(",", ":"))])
    if len(out) < count:
        raise ValueError(f"only {len(out)} free /{subnet_len} subnets for {count} leases")
    return out


def peer_subnets_from_log(text: str) -> set[str]:
    """The peers a udp daemon holds, replayed from its ``peer added``/``peer removed`` lines."""
    peers: set[str] = set()
    for line in text.splitlines():
        if (match := _ADDED.search(line)) is not None:
            peers.add(match.group(1))
        elif (match := _REMOVED.search(line)) is not None:
            peers.discard(match.group(1))
    return peers


def _peer_count(mode: str, node: Node, subnet_len: int, own: str | None) -> int:
    if mode == "udp":
        return len(peer_subnets_from_log(node.log_text()))
    routes = json.loads(node.netns.ip("-j", "route", "show").stdout or "[]")
    count = 0
    for route in routes:
        dst = route.get("dst", "")
        if "/" in dst and dst.endswith(f"/{subnet_len}") and dst != own and IPv4Network(dst).subnet_of(NETWORK):
            count += 1
    return count


def _own_subnet(node: Node) -> str | None:
    try:
        return str(node.subnet_env().subnet)
    except (FileNotFoundError, ValueError):
        return None


def _agent(cluster: Cluster, command: str, payload: object, *extra: str, timeout: float = 120) -> str:
    path = Path(cluster.workdir) / f"scale-{command}.json"
    path.write_text(json.dumps(payload))
    node = cluster.nodes[0]
    argv = node.netns.argv(sys.executable, "-m", "bench.scale_agent", f"{ETCD_HOST}:2379", PREFIX, command,
                           str(path), *extra)
    return run(argv, timeout=timeout, cwd=str(REPO)).stdout


def _wait_peers(mode: str, cluster: Cluster, subnet_len: int, want: int, timeout: float,
                started: float | None = None) -> dict[str, dict[str, float]]:
    """Poll every node until it holds ``want`` peers; per node: seconds to ready and to ``want`` peers."""
    times: dict[str, dict[str, float]] = {node.name: {} for node in cluster.nodes}
    origin = started if started is not None else time.monotonic()
    deadline = origin + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            got = times[node.name]
            if node.daemon is not None and node.daemon.poll() is not None:
                raise ModeError(f"flanneld-py on {node.name} exited {node.daemon.returncode}: {node.log_text()[-2000:]}")
            now = time.monotonic() - origin
            if "ready" not in got and os.path.exists(node.subnet_file) and os.path.exists(node.cni_socket):
                got["ready"] = now
            if "converged" not in got and _peer_count(mode, node, subnet_len, _own_subnet(node)) == want:
                got["converged"] = now
        if all("converged" in t and ("ready" in t or started is None) for t in times.values()):
            return times
        time.sleep(0.05)
    counts = {n.name: _peer_count(mode, n, subnet_len, _own_subnet(n)) for n in cluster.nodes}
    raise ModeError(f"{mode}: peers did not reach {want} within {timeout:g}s (have {counts})")


def _tcp(src: Endpoint, dst: Endpoint, seconds: float, repeats: int) -> list[float]:
    return [parse_iperf3_tcp(run_iperf3(src, dst, [], seconds)).gbps for _ in range(repeats)]


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    peers: int  # fake peer leases in etcd before the daemons start
    events: int  # lease events timed one by one
    seconds: float  # per iperf3 test
    repeats: int  # iperf3 tests per peer count


def measure_scale(mode: str, spec: ScaleSpec, tag: str, step: Callable[[str], None]) -> dict[str, Any]:
    """One mode's scale figures (keys of :data:`bench.figures.SCALE_FIGURES`) and raw values.

    Raises:
        ModeError: the lab, a daemon or a measurement failed.
    """
    peers, events, seconds, repeats = spec.peers, spec.events, spec.seconds, spec.repeats
    subnet_len = scale_subnet_len(peers + events + 8)
    config = {"Network": str(NETWORK), "SubnetLen": subnet_len, "Backend": {"Type": mode}}
    step(f"scale {mode}: etcd with {peers} peer leases")
    with Cluster(nodes=2, config=config, tag=tag) as cluster:
        fakes = fake_leases(mode, subnet_len, peers)
        _agent(cluster, "fill", fakes)
        step(f"scale {mode}: daemons start with {peers} peers")
        started = time.monotonic()
        for node in cluster.nodes:
            cluster.start_daemon(node, wait=False)
        startup = _wait_peers(mode, cluster, subnet_len, peers + 1, timeout=120 + peers * 0.1, started=started)
        step(f"scale {mode}: {events} lease events")
        real = [name.replace("-", "/") for name in cluster.leases()]
        event_leases = fake_leases(mode, subnet_len, events, skip=real + [f.replace("-", "/") for f, _ in fakes],
                                   first_index=peers)
        observe = f"log:{cluster.nodes[0].log_path}" if mode == "udp" else "routes"
        out = _agent(cluster, "events", event_leases, "--observe", observe, timeout=60 + events * 25)
        latencies = json.loads(out)["latencies_ms"]
        step(f"scale {mode}: TCP with {peers + events} peers")
        pods = [cluster.add_pod(node) for node in cluster.nodes]
        src, dst = (Endpoint(pod.netns, str(pod.ip.ip)) for pod in pods)
        wait_reachable(src, dst)
        many = _tcp(src, dst, seconds, repeats)
        step(f"scale {mode}: leases deleted, TCP with 2 nodes")
        cleared = time.monotonic()
        _agent(cluster, "clear", [name for name, _ in fakes + event_leases])
        few: list[float] = []
        removal: float | None = None
        errors: list[str] = []
        try:
            _wait_peers(mode, cluster, subnet_len, 1, timeout=60 + peers * 0.3)
            removal = time.monotonic() - cleared
            few = _tcp(src, dst, seconds, repeats)
        except ModeError as exc:
            errors.append(f"after deleting the {peers + events} leases: {exc}")
    try:
        figures = {
            "startup_ready_s": max(t["ready"] for t in startup.values()),
            "startup_converged_s": max(t["converged"] for t in startup.values()),
            "event_p50_ms": percentile(latencies, 50),
            "event_p99_ms": percentile(latencies, 99),
            "tcp_1_gbps_n_peers": median(many),
        }
    except (KeyError, ValueError) as exc:
        raise MeasureError(f"scale {mode}: incomplete measurement ({exc})") from None
    if removal is not None:
        figures["bulk_delete_s"] = removal
    if few:
        figures["tcp_1_gbps_2_peers"] = median(few)
    return {
        "status": "partial" if errors else "ok",
        "errors": errors,
        "peers": peers,
        "events": events,
        "subnet_len": subnet_len,
        "figures": figures,
        "raw": {"startup_s": startup, "event_latencies_ms": latencies, "tcp_1_gbps_n_peers": many,
                "tcp_1_gbps_2_peers": few, "bulk_delete_s": removal},
    }
