"""``--peers N``: how the daemons cope with a big cluster, flanneld-py's modes beside flannel's.

For each mode (flanneld-py's vxlan, host-gw and udp; with ``--flanneld``
also flannel's own daemon as ``flannel-vxlan`` and ``flannel-host-gw``), a
two-node lab whose etcd already holds N peer leases in flannel's own records
(subnets from the top of the range, PublicIPs on the underlay that need not
exist, a unique VTEP MAC each for vxlan). Measured, on node 0 unless said:

* start-up: node 0's daemon launched alone -> subnet file written (ready),
  and -> all N peers in its kernel (routes, and for vxlan also the neighbour
  and FDB entries: :func:`bench.scale_agent.count_peer_entries`, the same
  count for both daemons). For udp, whose peers live in the daemon's own
  table, its ``peer added`` lines. Then node 1 starts and both reach N + 1.
* CPU per drift pass: node 0's daemon CPU over an idle 10 s, per 5 s (the
  reconcile interval: one full pass each).
* lease event to traffic: K more leases written one at a time; from the put
  being sent to the first probe packet to the new subnet leaving node 0 for
  that peer (:mod:`bench.scale_agent`: one outside observer for every mode),
  p50/p99; then again while 100 other leases change every second.
* TCP single-stream pod to pod with all peers present; all leases deleted at
  once -> every peer entry gone (bulk delete); TCP again with 2 nodes; all N
  leases written again at once -> all in place (bulk add), from the first
  transaction sent and from the last one's commit, with the agent's commit
  time between them; the bulk add is also reported over flanneld's start-up
  in the same run (issue 18's bound: at most half of it).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flanneld_py.core.lease import format_subnet_key
from flanneld_py.lab.cluster import ETCD_HOST, PREFIX, Cluster, Node
from flanneld_py.lab.flannel import bridge_plugin, flanneld_argv_builder

from .figures import SCALE_CROSS_RATIOS, SCALE_IN_TURN_RATIOS
from .measure import Endpoint, MeasureError, parse_iperf3_tcp, run_iperf3
from .modes import ModeError, wait_reachable
from .stats import median, percentile, ratio

__all__ = [
    "FLANNEL_SCALE_MODES",
    "ScaleSpec",
    "cpu_seconds",
    "fake_leases",
    "measure_scale",
    "peer_subnets_from_log",
    "scale_ratios",
    "scale_subnet_len",
]

NETWORK = IPv4Network("10.244.0.0/16")
REPO = Path(__file__).resolve().parents[1]
FLANNEL_SCALE_MODES = ("flannel-vxlan", "flannel-host-gw")
CHURN_LEASES = 100  # leases rewritten every second during the churn events
IDLE_SECONDS = 10.0  # two reconcile intervals
RECONCILE_INTERVAL = 5.0
_ADDED = re.compile(r"peer added: (\S+)")
_REMOVED = re.compile(r"peer removed: (\S+)")


def scale_subnet_len(count: int, network: IPv4Network = NETWORK) -> int:
    """The shortest subnet length (at least /24) that leaves room for ``count`` subnets.

    flannel hands out every subnet but the first and the last.

    Raises:
        ValueError: not even /30 subnets would do.
    """
    length = max(24, network.prefixlen + math.ceil(math.log2(count + 2)))
    if length > 30:
        raise ValueError(f"{network} cannot hold {count} subnets of /30 or larger")
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


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from the text of ``/proc/PID/stat``."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


STARTUPS = 5  # one start-up swings with the machine and with flanneld's start-up panics; the median does not


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    peers: int  # fake peer leases in etcd before the daemons start
    events: int  # lease events timed one by one (twice: quiet, then under churn)
    seconds: float  # per iperf3 test
    repeats: int  # iperf3 tests per peer count
    startups: int = STARTUPS  # node 0's start-ups, each as a fresh node; their median is reported


class _Lab:
    """One mode's two-node lab and the agent that counts, writes and observes inside node 0."""

    def __init__(self, mode: str, cluster: Cluster, subnet_len: int) -> None:
        self.mode = mode
        self.backend = mode.removeprefix("flannel-")
        self.cluster = cluster
        self.subnet_len = subnet_len
        self.notes: list[str] = []
        self.restarts_left = 1  # flanneld restarts allowed in the current start-up
        self._flanneld_nodes: set[int] = set()  # nodes of a flanneld-py lab running flanneld for now

    def _argv(self, node: Node, command: str, payload: object, extra: Sequence[str]) -> list[str]:
        path = Path(self.cluster.workdir) / f"scale-{node.name}-{command}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(payload))
        return node.netns.argv(sys.executable, "-m", "bench.scale_agent", f"{ETCD_HOST}:2379", PREFIX, command,
                               str(path), *extra)

    def agent(self, command: str, payload: object = (), *extra: str, node: Node | None = None,
              timeout: float = 120) -> dict[str, Any]:
        argv = self._argv(node or self.cluster.nodes[0], command, payload, extra)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), check=False)
        if proc.returncode != 0:
            raise ModeError(f"scale agent {command}: {proc.stderr.strip()[-1000:]}{self._dead_daemons()}")
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    def _dead_daemons(self) -> str:
        dead = [n for n in self.cluster.nodes if n.daemon is not None and n.daemon.poll() is not None]
        return "".join(f"; the daemon on {n.name} exited {n.daemon.returncode}: {n.log_text()[-1500:]}"
                       for n in dead if n.daemon is not None)

    def start_counting(self, node: Node, want: int, timeout: float) -> subprocess.Popen[str]:
        """The agent waiting for ``want`` peers on ``node``, already running when this returns."""
        argv = self._argv(node, "count", [], ("--kind", self.backend, "--subnet-len", str(self.subnet_len),
                                              "--want", str(want), "--timeout", str(timeout)))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        assert proc.stdout is not None
        if not proc.stdout.readline():  # it is counting before the clock starts
            raise ModeError(f"scale agent count did not start: {proc.communicate()[1].strip()[-1000:]}")
        return proc

    def counted(self, proc: subprocess.Popen[str], timeout: float, watch: Node | None = None) -> float:
        """Wall-clock time the counting agent saw its peers (restarts ``watch``'s flanneld once if it dies early)."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if watch is not None and watch.daemon is not None and watch.daemon.poll() is not None:
                self._restart_once(watch)
            elif watch is None and (dead := self._dead_daemons()):
                proc.kill()
                proc.communicate()
                raise ModeError(f"{self.mode}: while waiting for the kernel{dead}")
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        assert proc.stdout is not None and proc.stderr is not None
        # read through the same text buffers start_counting read its first line from
        out, err = proc.stdout.read(), proc.stderr.read()
        if proc.wait() != 0:
            raise ModeError(f"{self.mode}: {err.strip()[-1000:] or 'the count did not finish in time'}")
        return float(json.loads(out.strip().splitlines()[-1])["at"])

    def _restart_once(self, node: Node) -> None:
        """flanneld v0.20.2 sometimes panics in its etcd watch at start-up: one restart per start-up, noted."""
        assert node.daemon is not None
        if not self.runs_flanneld(node) or self.restarts_left == 0:
            raise ModeError(f"the daemon on {node.name} exited {node.daemon.returncode}: {node.log_text()[-2000:]}")
        self.restarts_left -= 1
        self.notes.append(f"flanneld on {node.name} exited {node.daemon.returncode} at start-up; restarted once")
        self.cluster.start_daemon(node, wait=False)

    def runs_flanneld(self, node: Node) -> bool:
        return self.mode.startswith("flannel-") or node.index in self._flanneld_nodes

    def start_ups(self, node: Node, peers: int, timeout: float, count: int,
                  flanneld: str | None = None) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """``count`` start-ups of ``node``'s daemon (:meth:`start_up`), the node fresh each time
        but the first; with ``flanneld``, each after one of flanneld's on the same node.

        In turn and in one lab, so that a machine that speeds up or slows down (a shared
        host does, by a factor of two over hours) weighs on both sides of each pair alike:
        the ratio reported is the median of the pairs' ratios. flanneld goes first, so the
        daemon left running is the lab's own. Returns (the lab daemon's start-ups, flanneld's).
        """
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for _ in range(count):
            if flanneld is not None:
                self.cluster.set_node_daemon(node, flanneld_argv_builder(flanneld, "--ip-masq=false"))
                self._flanneld_nodes.add(node.index)
                theirs.append(self.start_up(node, peers, timeout, fresh=bool(ours or theirs)))
                self.cluster.set_node_daemon(node, None)
                self._flanneld_nodes.discard(node.index)
            ours.append(self.start_up(node, peers, timeout, fresh=bool(ours or theirs)))
        return ours, theirs

    def start_up(self, node: Node, peers: int, timeout: float, fresh: bool) -> tuple[float, float]:
        """Start ``node``'s daemon; seconds from launch to ready and to all ``peers`` in place.

        With ``fresh``, the daemon running there is stopped first and the node made new again:
        its lease deleted, its subnet file gone, flannel's devices and the peer routes removed,
        so that each start-up is a first start against the same leases, not a restart."""
        if fresh:
            self.forget(node)
        self.restarts_left = 1
        counter = self.start_counting(node, peers, timeout) if self.backend != "udp" else None
        launched = time.time()
        self.cluster.start_daemon(node, wait=False)
        self.cluster.wait_ready(node, timeout=timeout)
        ready = time.time()
        if counter is not None:
            converged = self.counted(counter, timeout + 5, watch=node)
        else:
            converged = self.wait_udp_peers([node], peers, timeout)
        return ready - launched, converged - launched

    def forget(self, node: Node) -> None:
        """Stop ``node``'s daemon and leave the node as it was before its first start."""
        subnet = node.subnet_env().subnet
        self.cluster.stop_daemon(node)
        assert self.cluster.etcd is not None and subnet is not None
        self.cluster.etcd.ctl("del", f"{PREFIX}/subnets/{format_subnet_key(subnet)}")
        os.remove(node.subnet_file)
        for device in ("flannel.1", "flannel0"):
            node.netns.ip("link", "del", device, check=False)
        node.netns.ip("route", "flush", "root", str(NETWORK))  # host-gw's peer routes

    def wait_udp_peers(self, nodes: Sequence[Node], want: int, timeout: float) -> float:
        """For udp: the wall-clock time every node's log showed ``want`` peers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(peer_subnets_from_log(n.log_text())) == want for n in nodes):
                return time.time()
            time.sleep(0.02)
        counts = {n.name: len(peer_subnets_from_log(n.log_text())) for n in nodes}
        raise ModeError(f"udp: peers did not reach {want} within {timeout:g}s (have {counts})")

    def wait_peers(self, want: int, timeout: float, nodes: Sequence[Node] | None = None) -> float:
        """Wall-clock time ``nodes`` (default: both) all held ``want`` peers."""
        nodes = list(nodes or self.cluster.nodes)
        if self.backend == "udp":
            return self.wait_udp_peers(nodes, want, timeout)
        counters = [(self.start_counting(node, want, timeout), node) for node in nodes]
        return max(self.counted(proc, timeout + 5) for proc, _ in counters)

    def add_pods(self) -> tuple[Endpoint, Endpoint]:
        pods = []
        for node in self.cluster.nodes:
            if self.mode.startswith("flannel-"):
                pods.append(self.cluster.add_pod(node, plugin=bridge_plugin()))
            else:
                pods.append(self.cluster.add_pod(node))
        src, dst = (Endpoint(pod.netns, str(pod.ip.ip)) for pod in pods)
        wait_reachable(src, dst)
        return src, dst

    def idle_cpu_per_pass_ms(self) -> float:
        """node 0's daemon CPU per reconcile interval while nothing changes (after one interval to settle)."""
        daemon = self.cluster.nodes[0].daemon
        assert daemon is not None
        stat = f"/proc/{daemon.pid}/stat"
        time.sleep(RECONCILE_INTERVAL + 1)  # the first pass after the last change still has work to do
        before = cpu_seconds(Path(stat).read_text())
        time.sleep(IDLE_SECONDS)
        used = cpu_seconds(Path(stat).read_text()) - before
        return used * 1000 / (IDLE_SECONDS / RECONCILE_INTERVAL)


def _tcp(src: Endpoint, dst: Endpoint, seconds: float, repeats: int) -> list[float]:
    return [parse_iperf3_tcp(run_iperf3(src, dst, [], seconds)).gbps for _ in range(repeats)]


def _cluster(mode: str, config: dict[str, Any], tag: str, flanneld: str | None) -> Cluster:
    if not mode.startswith("flannel-"):
        return Cluster(nodes=2, config=config, tag=tag)
    if not flanneld:
        raise ModeError(f"mode {mode} needs --flanneld PATH")
    return Cluster(nodes=2, config=config, tag=tag, daemon_argv_builder=flanneld_argv_builder(flanneld, "--ip-masq=false"),
                   wait_for_cni_socket=False)


def measure_scale(mode: str, spec: ScaleSpec, tag: str, step: Callable[[str], None],
                  flanneld: str | None = None) -> dict[str, Any]:
    """One mode's scale figures (keys of :data:`bench.figures.SCALE_FIGURES`) and raw values.

    Raises:
        ModeError: the lab, a daemon or a measurement failed.
    """
    peers, events = spec.peers, spec.events
    backend = mode.removeprefix("flannel-")
    subnet_len = scale_subnet_len(peers + 2 * events + 8)
    config = {"Network": str(NETWORK), "SubnetLen": subnet_len, "Backend": {"Type": backend}}
    # flanneld's start-ups, in turn with ours in our lab: the start-up ratio to trust (see start_ups)
    in_turn = flanneld if f"flannel-{backend}" in FLANNEL_SCALE_MODES and not mode.startswith("flannel-") else None
    step(f"scale {mode}: etcd with {peers} peer leases, node 0 starts"
         + (", in turn with flanneld" if in_turn else ""))
    limit = 120 + peers * 0.1
    raw: dict[str, Any] = {}
    figures: dict[str, float] = {}
    errors: list[str] = []
    with _cluster(mode, config, tag, flanneld) as cluster:
        lab = _Lab(mode, cluster, subnet_len)
        fakes = fake_leases(backend, subnet_len, peers)
        lab.agent("fill", fakes)
        first, second = cluster.nodes
        starts, flanneld_starts = lab.start_ups(first, peers, limit, spec.startups, in_turn)
        raw["startups_s"] = [{"ready": ready, "converged": converged} for ready, converged in starts]
        figures["startup_ready_s"] = median([ready for ready, _ in starts])
        figures["startup_converged_s"] = median([converged for _, converged in starts])
        figures["startup_after_ready_s"] = median([max(0.0, converged - ready) for ready, converged in starts])
        if flanneld_starts:
            raw["flanneld_startups_s"] = [{"ready": ready, "converged": converged}
                                          for ready, converged in flanneld_starts]
            figures["flanneld_startup_converged_s"] = median([converged for _, converged in flanneld_starts])
            figures["startup_over_flanneld_in_turn"] = median(
                [ours / theirs for (_, ours), (_, theirs) in zip(starts, flanneld_starts)])
        step(f"scale {mode}: node 1 starts, idle CPU")
        cluster.start_daemon(second, wait=False)
        lab.wait_peers(peers + 1, limit)
        figures["idle_cpu_ms_per_pass"] = lab.idle_cpu_per_pass_ms()

        step(f"scale {mode}: {events} lease events, then {events} under churn")
        real = [name.replace("-", "/") for name in cluster.leases()]
        taken = real + [f.replace("-", "/") for f, _ in fakes]
        quiet = fake_leases(backend, subnet_len, 2 * events, skip=taken, first_index=peers)
        quiet, busy = quiet[:events], quiet[events:]
        extra = ("--timeout", "20")
        churn_path = Path(cluster.workdir) / "scale-churn.json"
        churn_path.write_text(json.dumps(fakes[:CHURN_LEASES]))
        for key, leases, churn in (("event", quiet, ()), ("churn", busy, ("--churn", str(churn_path)))):
            out = lab.agent("events", leases, *extra, *churn, timeout=60 + events * 25)
            raw[f"{key}_latencies_ms"] = out["latencies_ms"]
            errors += [f"lease event lost: {why}" for why in out["lost"]]
        lab.agent("fill", fakes[:CHURN_LEASES])  # the churned leases as they were
        everyone = fakes + quiet + busy

        step(f"scale {mode}: TCP with {len(everyone)} peers")
        src, dst = lab.add_pods()
        raw["tcp_1_gbps_n_peers"] = _tcp(src, dst, spec.seconds, spec.repeats)

        step(f"scale {mode}: all leases deleted, TCP with 2 nodes, {peers} added at once")
        try:
            gone = 30 + peers * 0.01
            counters = [lab.start_counting(n, 1, gone) for n in cluster.nodes] if backend != "udp" else []
            cleared = lab.agent("clear", everyone)["started"]
            done = (max(lab.counted(c, gone + 5) for c in counters) if counters
                    else lab.wait_udp_peers(cluster.nodes, 1, gone))
            figures["bulk_delete_s"] = done - cleared
            raw["tcp_1_gbps_2_peers"] = _tcp(src, dst, spec.seconds, spec.repeats)
            counters = [lab.start_counting(first, peers + 1, limit)] if backend != "udp" else []
            added = lab.agent("fill", fakes)
            done = lab.counted(counters[0], limit + 5) if counters else lab.wait_udp_peers([first], peers + 1, limit)
            figures["bulk_add_s"] = done - added["started"]
            figures["bulk_add_commit_s"] = added["committed"] - added["started"]
            figures["bulk_add_after_commit_s"] = max(0.0, done - added["committed"])
        except ModeError as exc:
            errors.append(f"after deleting the {len(everyone)} leases: {exc}")
        notes = lab.notes
    try:
        figures |= {
            "event_p50_ms": percentile(raw["event_latencies_ms"], 50),
            "event_p99_ms": percentile(raw["event_latencies_ms"], 99),
            "churn_p50_ms": percentile(raw["churn_latencies_ms"], 50),
            "churn_p99_ms": percentile(raw["churn_latencies_ms"], 99),
            "tcp_1_gbps_n_peers": median(raw["tcp_1_gbps_n_peers"]),
        }
        if raw.get("tcp_1_gbps_2_peers"):
            figures["tcp_1_gbps_2_peers"] = median(raw["tcp_1_gbps_2_peers"])
    except (KeyError, ValueError) as exc:
        raise MeasureError(f"scale {mode}: incomplete measurement ({exc})") from None
    return {
        "status": "partial" if errors else "ok",
        "errors": errors,
        "notes": notes,
        "peers": peers,
        "events": events,
        "subnet_len": subnet_len,
        "figures": figures,
        "raw": raw,
    }


RATIO_FIGURES = ("startup_converged_s", "startup_after_ready_s", "event_p50_ms", "event_p99_ms", "churn_p50_ms", "churn_p99_ms",
                 "bulk_delete_s", "bulk_add_s", "idle_cpu_ms_per_pass")


def scale_ratios(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per kernel backend run with flanneld: our figures over flanneld's (below 1: ours is faster),
    from flannel's own lab for that backend, and the start-ups taken in turn in ours."""
    out: dict[str, dict[str, float | None]] = {}
    for theirs in FLANNEL_SCALE_MODES:
        ours = theirs.removeprefix("flannel-")
        if ours not in modes:
            continue
        mine, ref = modes[ours].get("figures", {}), modes.get(theirs, {}).get("figures", {})
        ratios = {k: mine[k] for k in SCALE_IN_TURN_RATIOS if k in mine}
        ratios |= {k: ratio(mine[k], ref[k]) for k in RATIO_FIGURES if k in mine and k in ref}
        ratios |= {k: ratio(mine[a], ref[b]) for k, (a, b, _) in SCALE_CROSS_RATIOS.items() if a in mine and b in ref}
        if ratios:
            out[ours] = ratios
    return out
