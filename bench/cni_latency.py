"""CNI ADD and DEL latency: ``flannel-py`` against the reference ``bridge`` + ``host-local``.

The project's one CNI latency tool: ``bench`` runs it, and on its own (root)::

    python3 -m bench.cni_latency --pods 50

Inside a node namespace an agent (``--agent PLAN``, internal) plays the
container runtime: one exec per command, CNI_* in the environment, the config
on stdin, timed from fork to exit. flannel-py's shim hands each request to the
daemon's CNI server (``python3 -m flanneld_py.cni.server``, the ``CniServer``
the daemon runs, without the rest of the daemon); the reference plugins are
Debian's ``containernetworking-plugins`` in /usr/lib/cni.

Like for like: both plugins wire the same features (a bridge with the
gateway, default route, hairpin mode, a per-pod masquerade chain) and do all
of their removal inside DEL: our server runs with ``--sync-del`` for the
headline figures. After a warm-up ADD/DEL each, the pods are added taking
turns (ours, reference, ours, ...) into fresh namespaces of their own, then
deleted in the same order, so drift on the machine hits both alike. Before
each next command the agent waits, off the clock, until the last DEL's
removal is complete (veth off the bridge, address file and masquerade chain
gone), so no plugin's leftover work lands on another's clock. Then VERSION
as often: each plugin's start-up alone.

A second, separately labelled phase times our DEL as the daemon serves it by
default: answered once the pod is queued for removal, the removal after it
(``answer_first``, with ``del_settle_ms``: answer to removal complete).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flanneld_py.core.subnetenv import SubnetEnv
from flanneld_py.lab.checks import wait_until
from flanneld_py.lab.cluster import cni_plugin_argv
from flanneld_py.lab.netns import Netns, run, unique_tag
from flanneld_py.unixsock import socket_answers

from .figures import CNI_FIGURES
from .modes import REFERENCE_CNI
from .stats import percentile, ratio

__all__ = ["OURS", "REFERENCE", "measure_cni", "summarize"]

OURS = "flannel-py"
REFERENCE = "bridge+host-local"
REPO = Path(__file__).resolve().parents[1]
NETWORK = IPv4Network("10.244.0.0/16")
OUR_SUBNET = IPv4Network("10.244.5.0/24")
REFERENCE_SUBNET = IPv4Network("10.244.6.0/24")
MTU = 1472
# nat chains each plugin makes per pod for its masquerading
CHAIN_PREFIX = {OURS: "FLP-", REFERENCE: "CNI-"}
REMOVAL_TIMEOUT = 30.0  # s: a generous deadline for a DEL's removal to finish


def summarize(add_ms: Sequence[float], del_ms: Sequence[float],
              version_ms: Sequence[float] = ()) -> dict[str, float]:
    """p50/p99 of ADD and DEL, and p50 of VERSION if timed (keys of :data:`bench.figures.CNI_FIGURES`)."""
    out = {
        "add_p50_ms": percentile(add_ms, 50),
        "add_p99_ms": percentile(add_ms, 99),
        "del_p50_ms": percentile(del_ms, 50),
        "del_p99_ms": percentile(del_ms, 99),
    }
    if version_ms:
        out["version_p50_ms"] = percentile(version_ms, 50)
    return out


def plugin_configs(workdir: Path, subnet_file: Path, socket_path: str, tag: str) -> dict[str, dict[str, Any]]:
    """The two configs, with the same features: gateway, default route, hairpin, masquerade, MTU."""
    return {
        OURS: {"cniVersion": "1.0.0", "name": f"cbr0-{tag}", "type": "flannel-py", "bridge": "cni0",
               "isDefaultGateway": True, "hairpinMode": True, "ipMasq": True, "subnetFile": str(subnet_file),
               "dataDir": str(workdir / "ours"), "daemonSocket": socket_path},
        REFERENCE: {"cniVersion": "1.0.0", "name": f"ref-{tag}", "type": "bridge", "bridge": "cniref0",
                    "isGateway": True, "isDefaultGateway": True, "hairpinMode": True, "ipMasq": True, "mtu": MTU,
                    "ipam": {"type": "host-local", "subnet": str(REFERENCE_SUBNET),
                             "dataDir": str(workdir / "ref")}},
    }


def measure_cni(pods: int, tag: str, step: Callable[[str], None]) -> dict[str, Any]:
    """Time ``pods`` ADDs, DELs and VERSIONs of each plugin in one node namespace; raw times and figures.

    Raises:
        RuntimeError: a namespace, the CNI server or a plugin failed.
    """
    step(f"CNI: a node and {3 * pods + 2} pod namespaces")
    workdir = Path(tempfile.mkdtemp(prefix=f"flanneld-lab-{tag}-cni-"))
    namespaces: list[Netns] = []
    try:
        node = Netns.create(f"fp{tag}cn")
        namespaces.append(node)
        node.ip("link", "set", "lo", "up")
        names = ["wo", "wr"] + [f"{kind}{i}" for i in range(pods) for kind in ("o", "r", "a")]
        for name in names:
            namespaces.append(Netns.create(f"fp{tag}c{name}"))
        paths = {ns.name.removeprefix(f"fp{tag}c"): ns.path for ns in namespaces[1:]}
        subnet_file = workdir / "subnet.env"
        subnet_file.write_text(SubnetEnv(NETWORK, OUR_SUBNET, MTU, False).render())
        socket_path = str(workdir / "cni.sock")
        configs = plugin_configs(workdir, subnet_file, socket_path, tag)

        def plan(phase: str, plugins: Sequence[str], pod_kind: dict[str, str], version: bool) -> dict[str, Any]:
            return {"tag": f"{tag}-{phase}", "version": version, "plugins": {
                name: {"argv": cni_plugin_argv() if name == OURS else [os.path.join(REFERENCE_CNI, "bridge")],
                       "config": configs[name], "warm": paths["wo" if name == OURS else "wr"],
                       "pods": [paths[f"{pod_kind[name]}{i}"] for i in range(pods)]}
                for name in plugins}}

        step(f"CNI: {pods} ADDs, DELs and VERSIONs per plugin, our DEL waiting for its removal")
        with cni_server(node, socket_path, workdir, sync_del=True):
            headline = run_plan(node, workdir, plan("sync", (OURS, REFERENCE), {OURS: "o", REFERENCE: "r"},
                                                    version=True), pods)
        step(f"CNI: {pods} ADDs and DELs, our DEL answering first")
        with cni_server(node, socket_path, workdir, sync_del=False):
            first = run_plan(node, workdir, plan("first", (OURS,), {OURS: "a"}, version=False), pods)[OURS]
    finally:
        for ns in reversed(namespaces):
            ns.delete()
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"pods": pods, "plugins": {}}
    for name, timing in headline.items():
        out["plugins"][name] = {"figures": summarize(timing["add_ms"], timing["del_ms"], timing["version_ms"]),
                                **timing}
    ours, ref = out["plugins"][OURS]["figures"], out["plugins"][REFERENCE]["figures"]
    out["ratios"] = {f.key: ratio(ours[f.key], ref[f.key]) for f in CNI_FIGURES}  # like for like
    gone = [d + s for d, s in zip(first["del_ms"], first["del_settle_ms"])]
    out["answer_first"] = {"figures": summarize(first["add_ms"], first["del_ms"]),
                           "del_until_gone": {"p50_ms": percentile(gone, 50), "p99_ms": percentile(gone, 99)},
                           **first}
    return out


@contextmanager
def cni_server(node: Netns, socket_path: str, workdir: Path, sync_del: bool) -> Iterator[None]:
    """The daemon's CNI server on its own in ``node``, stopped on the way out."""
    with open(workdir / "server.log", "ab") as log:
        server = node.popen(sys.executable, "-m", "flanneld_py.cni.server", "--socket", socket_path,
                            *(["--sync-del"] if sync_del else []), stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        if not wait_until(lambda: server.poll() is not None or socket_answers(socket_path), 30) \
                or server.poll() is not None:
            raise RuntimeError(f"CNI server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_plan(node: Netns, workdir: Path, plan: dict[str, Any], pods: int) -> dict[str, dict[str, list[float]]]:
    plan_file = workdir / f"plan-{plan['tag']}.json"
    plan_file.write_text(json.dumps(plan))
    proc = run(node.argv(sys.executable, "-m", "bench.cni_latency", "--agent", str(plan_file)),
               timeout=120 + pods * 10, cwd=str(REPO))
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


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


def pod_state(name: str, config: dict[str, Any]) -> tuple[int, int, int]:
    """What ``name``'s pods hold in this namespace: (bridge ports, address files, masquerade chains)."""
    try:
        ports = len(os.listdir(f"/sys/class/net/{config['bridge']}/brif"))
    except FileNotFoundError:
        ports = 0
    data_dir = config.get("dataDir") or config["ipam"]["dataDir"]
    store = Path(data_dir) / config["name"]
    addresses = sum(1 for f in store.iterdir() if re.fullmatch(r"[0-9.]+", f.name)) if store.is_dir() else 0
    rules = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    chains = sum(1 for line in rules.splitlines() if line.startswith(f"-N {CHAIN_PREFIX[name]}"))
    return ports, addresses, chains


def _removed(name: str, config: dict[str, Any], left: int) -> float:
    """Wait (off the clock) until at most ``left`` pods of ``name`` remain wired; ms it took."""
    start = time.perf_counter()
    if not wait_until(lambda: all(count <= left for count in pod_state(name, config)), REMOVAL_TIMEOUT, 0.001):
        raise RuntimeError(f"{name}: {pod_state(name, config)} (ports, addresses, chains) "
                           f"{REMOVAL_TIMEOUT:g}s after DEL, want {left} each")
    return (time.perf_counter() - start) * 1000


def run_agent(plan: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Warm each plugin up, ADD pod i with each plugin in turn, DEL them the same way, then VERSION.

    After every DEL the agent waits, off the clock, until the removal is
    complete, recorded as ``del_settle_ms`` (DEL answered to removal done).
    """
    plugins = plan["plugins"]
    configs = {name: json.dumps(spec["config"]).encode() for name, spec in plugins.items()}
    for name, spec in plugins.items():
        _exec(spec["argv"], configs[name], "ADD", spec["warm"], f"warm-{plan['tag']}")
        _exec(spec["argv"], configs[name], "DEL", spec["warm"], f"warm-{plan['tag']}")
        _removed(name, spec["config"], 0)
    out: dict[str, dict[str, list[float]]] = {
        name: {"add_ms": [], "del_ms": [], "del_settle_ms": [], "version_ms": []} for name in plugins}
    pods = len(next(iter(plugins.values()))["pods"])
    for i in range(pods):
        for name, spec in plugins.items():
            out[name]["add_ms"].append(
                _exec(spec["argv"], configs[name], "ADD", spec["pods"][i], f"bench-{plan['tag']}-{i}"))
    for i in range(pods):
        for name, spec in plugins.items():
            out[name]["del_ms"].append(
                _exec(spec["argv"], configs[name], "DEL", spec["pods"][i], f"bench-{plan['tag']}-{i}"))
            out[name]["del_settle_ms"].append(_removed(name, spec["config"], pods - i - 1))
    if plan["version"]:
        for _ in range(pods):
            for name, spec in plugins.items():
                out[name]["version_ms"].append(_exec(spec["argv"], configs[name], "VERSION", "", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.cni_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--agent", help=argparse.SUPPRESS)  # a plan file written by measure_cni
    args = parser.parse_args(argv)
    if args.agent:
        print(json.dumps(run_agent(json.loads(Path(args.agent).read_text()))))
        return 0
    from .report import cni_lines  # only for the stand-alone report

    results = measure_cni(args.pods, unique_tag(), lambda label: print(label, file=sys.stderr, flush=True))
    print("\n".join(cni_lines({**results, "status": "ok"})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
