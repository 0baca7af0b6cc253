"""``python3 -m flanneld_py.lab demo``: a local cluster in namespaces, pods talking, a short benchmark.

Builds an underlay switch with etcd, N nodes each running the real daemon,
two pods per node wired by the real CNI plugin; shows the leases, a full-mesh
ping, a checksummed TCP transfer and DNS across nodes; then runs a quick
bench of the udp path against kernel vxlan. Everything is torn down on exit,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .checks import dns_check, ping_matrix, tcp_transfer
from .cluster import Cluster


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def demo(nodes: int, backend: str, run_bench: bool) -> int:
    failures = 0
    with Cluster(nodes=nodes, backend={"Type": backend}) as cluster:
        _say(f"{nodes} nodes on underlay 198.51.100.0/24, etcd at {cluster.etcd_endpoint}, backend {backend}")
        start = time.monotonic()
        cluster.start_all()
        print(f"all daemons ready in {time.monotonic() - start:.1f}s")
        for name, lease in sorted(cluster.leases().items()):
            print(f"  lease {name:>16}  PublicIP {lease['PublicIP']}  {lease['BackendType']}")
        _say("two pods per node through the flannel-py CNI plugin")
        for node in cluster.nodes:
            for _ in range(2):
                pod = cluster.add_pod(node)
                print(f"  {pod.name:>6} on {node.name}: {pod.ip}")
        pods = cluster.all_pods()
        _say("full-mesh ping between pods")
        matrix = ping_matrix(pods)
        print("        " + " ".join(f"{p.name:>6}" for p in pods))
        for a in pods:
            cells = ["     -" if a is b else ("    ok" if matrix[(a.name, b.name)] else "  FAIL") for b in pods]
            print(f"  {a.name:>6}" + " ".join(cells))
        failures += sum(not ok for ok in matrix.values())
        _say("20 MB over TCP between pods on different nodes")
        src, dst = cluster.nodes[0].pods[0], cluster.nodes[-1].pods[0]
        result = tcp_transfer(src, dst, 20 * 1024 * 1024)
        verdict = "intact" if result.intact else "CORRUPTED"
        print(f"  {src.name} -> {dst.name}: sha256 {result.sent.split()[0][:16]}... {verdict}, {result.seconds:.2f}s")
        failures += not result.intact
        _say("DNS: dnsmasq in a pod on one node, dig from a pod on another")
        answer = dns_check(cluster.nodes[0].pods[1], cluster.nodes[-1].pods[1])
        print(f"  demo.cluster.local -> {answer or 'NO ANSWER'}")
        failures += answer != "10.96.0.10"
    if run_bench:
        _say("a short benchmark: udp against kernel vxlan (python3 -m bench --quick)")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = os.path.join(root, "bench", "out", "demo")
        proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--modes", "udp,vxlan", "--rounds", "1",
                               "--out", out], cwd=root)
        failures += proc.returncode != 0
        report = os.path.join(out, "report.md")
        if os.path.exists(report):
            with open(report) as handle:
                print(handle.read())
    _say("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m flanneld_py.lab")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("demo", help="bring up a local cluster, show pods talking, run a short benchmark")
    run.add_argument("--nodes", type=int, default=3)
    run.add_argument("--backend", choices=("udp", "vxlan", "host-gw"), default="udp")
    run.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    try:
        return demo(args.nodes, args.backend, not args.no_bench)
    except KeyboardInterrupt:
        print("\ninterrupted; everything was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
