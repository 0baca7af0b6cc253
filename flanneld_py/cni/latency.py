"""How long a runtime waits on a CNI plugin: ours against the reference bridge + host-local.

Both plugins are driven the same way, as a runtime does: one exec per
command with CNI_* in the environment and the config on stdin, timed from
fork to exit, from inside a throwaway node namespace (pods in their own)::

    python3 -m flanneld_py.cni.latency --pods 50

prints a JSON report (p50/p90 of ADD and DEL in ms). ``compare()`` is the
same thing for bench/. Needs root; removes every namespace and file it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from ..core.subnetenv import SubnetEnv
from ..lab.cluster import cni_plugin_argv
from ..lab.netns import Netns, unique_tag

__all__ = ["Plugin", "PluginTiming", "compare", "time_plugins"]

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path("/usr/lib/cni")
# After each plugin's DELs: lets flanneld-py finish removing pods (it does so after answering
# DEL), so that neither the other plugin nor the next ADD is timed while the kernel is busy.
SETTLE_SECONDS = 1.5


@dataclass(frozen=True, slots=True)
class PluginTiming:
    add_ms: list[float]
    del_ms: list[float]
    version_ms: list[float]  # VERSION: the plugin's own start-up, no pod work

    def summary(self) -> dict[str, float]:
        return {"add_p50": percentile(self.add_ms, 50), "add_p90": percentile(self.add_ms, 90),
                "del_p50": percentile(self.del_ms, 50), "del_p90": percentile(self.del_ms, 90),
                "version_p50": percentile(self.version_ms, 50)}


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))], 2)


@dataclass(frozen=True, slots=True)
class Plugin:
    argv: list[str]
    config: dict[str, Any]
    ifname: str = "eth0"  # plugins sharing the pods need names of their own


def time_plugins(plugins: dict[str, Plugin], netns_paths: Sequence[str], cni_path: str = str(REFERENCE),
                 label: str = "lat") -> dict[str, PluginTiming]:
    """ADD every namespace, then DEL every one, then VERSION as often; one timed exec each.

    Runs in the caller's namespace. The plugins take turns command by
    command, with a pause after DEL, so that no plugin's leftover work
    (flanneld-py removes veths after answering) lands on another's clock.
    """
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": cni_path}
    stdin = {name: json.dumps(plugin.config).encode() for name, plugin in plugins.items()}

    def run(name: str, command: str, index: int, netns: str) -> float:
        env = {**base, "CNI_COMMAND": command, "CNI_CONTAINERID": f"{label}-{index}", "CNI_NETNS": netns,
               "CNI_IFNAME": plugins[name].ifname}
        start = time.perf_counter()
        proc = subprocess.run(plugins[name].argv, input=stdin[name], env=env, capture_output=True, check=False)
        elapsed = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {command} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
        return elapsed

    samples: dict[str, dict[str, list[float]]] = {command: {name: [] for name in plugins}
                                                  for command in ("ADD", "DEL", "VERSION")}
    for command, timings in samples.items():
        for name in plugins:
            timings[name] += [run(name, command, index, path) for index, path in enumerate(netns_paths)]
            if command == "DEL":
                time.sleep(SETTLE_SECONDS)
    return {name: PluginTiming(samples["ADD"][name], samples["DEL"][name], samples["VERSION"][name])
            for name in plugins}


def compare(pods: int = 50, rounds: int = 1, sync_del: bool = False) -> dict[str, Any]:
    """flannel-py (shim + CniServer) against /usr/lib/cni/bridge + host-local, same node, same pods.

    ``sync_del``: run the server with ``--sync-del`` (DEL waits for the kernel).
    """
    tag = unique_tag()
    workdir = Path(tempfile.mkdtemp(prefix=f"cnilat-{tag}-"))
    namespaces: list[Netns] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        node = Netns.create(f"cnilat-{tag}-node")
        namespaces.append(node)
        for i in range(pods):
            namespaces.append(Netns.create(f"cnilat-{tag}-p{i}"))
        paths = [ns.path for ns in namespaces[1:]]
        subnet_file = workdir / "subnet.env"
        node_subnet = SubnetEnv(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.5.0/24"), 1472, True)
        subnet_file.write_text(node_subnet.render())
        socket_path = str(workdir / "cni.sock")
        server = _start_server(node, socket_path, workdir, ["--sync-del"] if sync_del else [])
        ours = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel-py", "bridge": "cni0",
                "isDefaultGateway": True, "hairpinMode": True, "subnetFile": str(subnet_file),
                "dataDir": str(workdir / "ours"), "daemonSocket": socket_path}
        reference = {"cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "cniref",
                     "isDefaultGateway": True, "hairpinMode": True, "mtu": 1472,
                     "ipam": {"type": "host-local", "subnet": "10.244.6.0/24", "dataDir": str(workdir / "ref")}}
        plan = {"paths": paths, "rounds": rounds, "plugins": {
            "flannel-py": {"argv": cni_plugin_argv(), "config": ours},
            "bridge+host-local": {"argv": [str(REFERENCE / "bridge")], "config": reference, "ifname": "eth1"},
        }}
        plan_file = workdir / "plan.json"
        plan_file.write_text(json.dumps(plan))
        proc = node.sh(sys.executable, "-m", "flanneld_py.cni.latency", "--run-plan", str(plan_file), timeout=600)
        return {"pods": pods, "rounds": rounds, "sync_del": sync_del, **json.loads(proc.stdout)}
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
        for ns in reversed(namespaces):
            ns.delete()
        shutil.rmtree(workdir, ignore_errors=True)


def _start_server(node: Netns, socket_path: str, workdir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - the child keeps it
    server = node.popen(sys.executable, "-m", "flanneld_py.cni.server", "--socket", socket_path, *args,
                        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                        env={**os.environ, "PYTHONPATH": str(REPO)})
    log.close()
    deadline = time.monotonic() + 15
    while not os.path.exists(socket_path):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"CNI server did not start: {(workdir / 'server.log').read_text()}")
        time.sleep(0.05)
    return server


def _run_plan(plan_file: str) -> dict[str, Any]:
    """Inside the node namespace: warm the plugins up, then time them."""
    plan = json.loads(Path(plan_file).read_text())
    plugins = {name: Plugin(**spec) for name, spec in plan["plugins"].items()}
    time_plugins(plugins, plan["paths"][:2], label="warm")
    totals = {name: PluginTiming([], [], []) for name in plugins}
    for round_no in range(plan["rounds"]):
        time.sleep(SETTLE_SECONDS)
        for name, timing in time_plugins(plugins, plan["paths"], label=f"r{round_no}").items():
            for mine, more in zip((totals[name].add_ms, totals[name].del_ms, totals[name].version_ms),
                                  (timing.add_ms, timing.del_ms, timing.version_ms)):
                mine += more
    return {name: timing.summary() for name, timing in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m flanneld_py.cni.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sync-del", action="store_true", help="the server's DEL waits for the kernel")
    parser.add_argument("--run-plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    report = _run_plan(args.run_plan) if args.run_plan else compare(args.pods, args.rounds, args.sync_del)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

