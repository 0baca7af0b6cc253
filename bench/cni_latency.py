"""CNI ADD and DEL latency: ``flannel-py`` against the reference ``bridge`` + ``host-local``.

A one-node lab runs the real daemon (flannel-py hands each request to it over
its unix socket). Inside the node's namespace an agent (``python3 -m
bench.cni_latency --agent PLAN``) plays the container runtime: one exec per
command, CNI_* in the environment, the config on stdin, timed from fork to
exit. Both plugins get a warm-up ADD/DEL first, then the pods are added
alternately (ours, reference, ours, ...) into fresh namespaces of their own,
then deleted in the same order, so drift on the machine hits both alike.
After each DEL the agent waits, off the clock, until that plugin's veth has
left its bridge: flannel-py answers DEL before the kernel has removed the
veth (see the CNI section of the README), and that removal must not be
billed to the next plugin's timing. The wait is kept as ``del_settle_ms``.

flannel-py runs as its shebang says (``python3 -I -S``, with this Python);
the reference plugins are Debian's ``containernetworking-plugins`` in
/usr/lib/cni.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flanneld_py.lab.cluster import Cluster, cni_plugin_argv
from flanneld_py.lab.netns import Netns, run

from .modes import REFERENCE_CNI
from .stats import percentile

__all__ = ["OURS", "REFERENCE", "measure_cni", "summarize"]

OURS = "flannel-py"
REFERENCE = "bridge+host-local"
REPO = Path(__file__).resolve().parents[1]


def summarize(add_ms: Sequence[float], del_ms: Sequence[float]) -> dict[str, float]:
    """p50/p99 of ADD and DEL (keys of :data:`bench.figures.CNI_FIGURES`)."""
    return {
        "add_p50_ms": percentile(add_ms, 50),
        "add_p99_ms": percentile(add_ms, 99),
        "del_p50_ms": percentile(del_ms, 50),
        "del_p99_ms": percentile(del_ms, 99),
    }


def _free_subnet(taken: Sequence[str], network: str = "10.244.0.0/16") -> str:
    used = {IPv4Network(s) for s in taken}
    for subnet in reversed(list(IPv4Network(network).subnets(new_prefix=24))[1:-1]):
        if not any(subnet.overlaps(u) for u in used):
            return str(subnet)
    raise RuntimeError("no free /24 left for the reference plugin")


def measure_cni(pods: int, tag: str, step: Callable[[str], None]) -> dict[str, Any]:
    """Time ``pods`` ADDs and DELs of each plugin on one lab node; raw times and figures.

    Raises:
        RuntimeError: the lab, the daemon or a plugin failed.
    """
    step("CNI: one-node lab")
    with Cluster(nodes=1, backend={"Type": "udp"}, tag=tag) as cluster:
        cluster.start_all()
        node = cluster.nodes[0]
        step(f"CNI: {2 * pods + 2} pod namespaces")
        namespaces: list[Netns] = []
        try:
            for name in ["wo", "wr"] + [f"{kind}{i}" for i in range(pods) for kind in ("o", "r")]:
                namespaces.append(Netns.create(f"fp{tag}c{name}"))
            leases = [name.replace("-", "/") for name in cluster.leases()]
            workdir = Path(cluster.workdir)
            ours = cluster.cni_config(node)
            reference = {
                "cniVersion": "1.0.0", "name": f"ref-{tag}", "type": "bridge", "bridge": "cniref0",
                "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
                "mtu": node.subnet_env().mtu,
                "ipam": {"type": "host-local", "subnet": _free_subnet(leases), "dataDir": str(workdir / "ref-ipam")},
            }
            paths = {ns.name.removeprefix(f"fp{tag}c"): ns.path for ns in namespaces}
            plan = {
                "pods": pods,
                "tag": tag,
                "plugins": {
                    OURS: {"argv": cni_plugin_argv(), "config": ours,
                           "warm": paths["wo"], "pods": [paths[f"o{i}"] for i in range(pods)]},
                    REFERENCE: {"argv": [os.path.join(REFERENCE_CNI, "bridge")], "config": reference,
                                "warm": paths["wr"], "pods": [paths[f"r{i}"] for i in range(pods)]},
                },
            }
            plan_file = workdir / "cni-plan.json"
            plan_file.write_text(json.dumps(plan))
            step(f"CNI: {pods} ADDs and DELs per plugin")
            proc = run(node.netns.argv(sys.executable, "-m", "bench.cni_latency", "--agent", str(plan_file)),
                       timeout=60 + pods * 10, cwd=str(REPO))
            times = json.loads(proc.stdout)
        finally:
            for ns in reversed(namespaces):
                ns.delete()
    out: dict[str, Any] = {"pods": pods, "plugins": {}}
    for name, timing in times.items():
        gone = [d + s for d, s in zip(timing["del_ms"], timing["del_settle_ms"])]
        out["plugins"][name] = {
            "figures": summarize(timing["add_ms"], timing["del_ms"]),
            "del_until_gone": {"p50_ms": percentile(gone, 50), "p99_ms": percentile(gone, 99)},
            **timing,
        }
    return out


# --- the agent, inside the node's namespace ------------------------------------------------


def _exec(argv: Sequence[str], config: bytes, command: str, netns: str, container_id: str) -> float:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": REFERENCE_CNI,
    }
    start = time.perf_counter()
    proc = subprocess.run(list(argv), input=config, env=env, capture_output=True, check=False, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[-1]} {command} failed ({proc.returncode}): "
                           f"{proc.stdout.decode(errors='replace')} {proc.stderr.decode(errors='replace')}")
    return elapsed


def bridge_ports(bridge: str) -> int:
    """How many ports ``bridge`` has in this namespace (0 if it does not exist yet)."""
    try:
        return len(os.listdir(f"/sys/class/net/{bridge}/brif"))
    except FileNotFoundError:
        return 0


def _settle(bridge: str, want: int, timeout: float = 5.0) -> float:
    """Wait (untimed for the figures) until ``bridge`` is down to ``want`` ports; ms it took."""
    start = time.perf_counter()
    while bridge_ports(bridge) > want:
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{bridge} still has {bridge_ports(bridge)} ports {timeout:g}s after DEL (want {want})")
        time.sleep(0.0005)
    return (time.perf_counter() - start) * 1000


def run_agent(plan: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Warm each plugin up, then ADD pod i with each plugin in turn, then DEL them the same way.

    After every DEL the agent waits, off the clock, until the plugin's veth is
    gone from its bridge, so a plugin that answers DEL before the kernel is
    done does not slow the next plugin's timing; that wait is recorded as
    ``del_settle_ms`` (DEL answered to veth gone).
    """
    plugins = plan["plugins"]
    configs = {name: json.dumps(spec["config"]).encode() for name, spec in plugins.items()}
    bridges = {name: spec["config"]["bridge"] for name, spec in plugins.items()}
    for name, spec in plugins.items():
        _exec(spec["argv"], configs[name], "ADD", spec["warm"], f"warm-{plan['tag']}")
        _exec(spec["argv"], configs[name], "DEL", spec["warm"], f"warm-{plan['tag']}")
        _settle(bridges[name], 0)
    out: dict[str, dict[str, list[float]]] = {
        name: {"add_ms": [], "del_ms": [], "del_settle_ms": []} for name in plugins}
    pods = plan["pods"]
    for i in range(pods):
        for name, spec in plugins.items():
            out[name]["add_ms"].append(
                _exec(spec["argv"], configs[name], "ADD", spec["pods"][i], f"bench-{plan['tag']}-{i}"))
    for i in range(pods):
        for name, spec in plugins.items():
            out[name]["del_ms"].append(
                _exec(spec["argv"], configs[name], "DEL", spec["pods"][i], f"bench-{plan['tag']}-{i}"))
            out[name]["del_settle_ms"].append(_settle(bridges[name], pods - i - 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.cni_latency")
    parser.add_argument("--agent", required=True, help="plan file written by measure_cni (internal)")
    args = parser.parse_args(argv)
    plan = json.loads(Path(args.agent).read_text())
    print(json.dumps(run_agent(plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
