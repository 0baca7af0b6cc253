"""End to end on an IPv6-only underlay: nodes whose eth0 has no IPv4 address, IPv6-only pods.

Three nodes on ``2001:db8::/64`` alone (etcd on ``[2001:db8::fe]:2379``, each node's IPv6
default route via the switch), the config ``EnableIPv4: false`` with an ``IPv6Network``, real
etcd, the real daemon, pods wired by flannel-py. The daemons get no ``--iface``: node 1 takes
the IPv6 default route's interface, node 2 ``--iface-regex`` on its IPv6 address, node 3
``--iface-can-reach`` etcd's IPv6 address (flannel v0.20.2's ipv6Stack rules). One cluster per
backend (vxlan over ``flannel-v6.1``, host-gw via the peers' PublicIPv6, udp over the IPv6
underlay socket), shared by the module's tests in order; the last test removes a node.
Checked: the lease record byte for byte as flanneld writes an IPv6-only one, the devices and
MTUs, full-mesh ping6, TCP over IPv6 with matching sha256, drift repair (flannel0's IPv6
network route for udp), restart and a node leaving; vxlan's DirectRouting over the IPv6
underlay. A dual-stack config on this underlay is refused in one line, as flannel refuses it.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest
from lab_helpers import ip_json, routed_directly6, routes6, start, status, subnet6, unreachable

from flanneld_py.core.lease import format_subnet_key
from flanneld_py.lab.checks import tcp_transfer, wait_until
from flanneld_py.lab.cluster import ETCD_HOST6, PREFIX, Cluster, Node, Pod

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

NETWORK6 = "fd00:10:244::/48"
WAIT = 30.0  # seconds: a generous deadline for a condition
ZERO = IPv4Network("0.0.0.0/0")  # the IPv4 half of an IPv6-only lease key
Lab = tuple[str, Cluster, list[Pod]]

# the underlay flags of each node (no --iface): node 1 falls back on the IPv6 default route
FLAGS = {2: ("--iface-regex=^2001:db8::2$",), 3: (f"--iface-can-reach={ETCD_HOST6}",)}


def ipv6_only_config(kind: str) -> dict:  # type: ignore[type-arg]
    return {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": kind}}


def without_iface(cluster: Cluster, node: Node, extra: tuple[str, ...]) -> list[str]:
    """flanneld-py as the lab runs it, less ``--iface=eth0`` (the node's own flags choose)."""
    return [arg for arg in cluster.default_daemon_argv(node, extra) if arg != "--iface=eth0"]


def lease_key(node: Node) -> str:
    return format_subnet_key(ZERO, subnet6(node))


def raw_lease(cluster: Cluster, node: Node) -> str:
    assert cluster.etcd is not None
    return cluster.etcd.ctl("get", "--print-value-only", f"{PREFIX}/subnets/{lease_key(node)}").stdout.strip()


def peer_routes_missing(kind: str, cluster: Cluster) -> list[str]:
    """The IPv6 routes to running peers that some node lacks (udp: the IPv6 network's route on
    flannel0, its peers live inside the daemon)."""
    missing: list[str] = []
    for node in cluster.nodes:
        if node.daemon is None:
            continue
        routes = routes6(node)
        if kind == "udp":
            if routes.get(NETWORK6, {}).get("dev") != "flannel0":
                missing.append(f"{node.name}: {NETWORK6} dev flannel0 (have {routes})")
            continue
        for peer in cluster.nodes:
            if peer is node or peer.daemon is None:
                continue
            route = routes.get(str(subnet6(peer)))
            want = (peer.address6, "eth0") if kind == "host-gw" else (str(subnet6(peer).network_address), "flannel-v6.1")
            if route is None or (route.get("gateway"), route.get("dev")) != want:
                missing.append(f"{node.name}: {subnet6(peer)} via {want} (have {route})")
    return missing


def converged(kind: str, cluster: Cluster) -> list[str]:
    problems: list[str] = []

    def check() -> bool:
        problems[:] = peer_routes_missing(kind, cluster)
        return not problems

    wait_until(check, WAIT)
    return problems


@pytest.fixture(scope="module", params=["vxlan", "host-gw", "udp"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    kind = request.param
    with Cluster(nodes=3, config=ipv6_only_config(kind), underlay6_only=True, daemon_argv_builder=without_iface,
                 node_daemon_args=FLAGS) as cluster:
        for node in cluster.nodes:
            assert not any(entry.get("addr_info") for entry in ip_json(node, "-4", "addr", "show", "dev", "eth0"))
        start(cluster, *cluster.nodes)
        assert converged(kind, cluster) == []
        yield kind, cluster, [cluster.add_pod(node) for node in cluster.nodes]


def test_each_node_chose_eth0_by_ipv6_and_published_flannels_ipv6_only_record(lab: Lab) -> None:
    kind, cluster, pods = lab
    for node, pod in zip(cluster.nodes, pods, strict=True):
        assert f"using interface eth0 ({node.address6}, mtu 1500), IPv6 only" in node.log_text()
        raw = raw_lease(cluster, node)
        if kind == "vxlan":
            (link,) = ip_json(node, "-d", "link", "show", "flannel-v6.1")
            info = link["linkinfo"]["info_data"]
            assert (info["id"], info["port"], info["local6"], link["mtu"]) == (1, 8472, node.address6, 1500 - 70)
            tail = f',"BackendV6Data":{{"VNI":1,"VtepMAC":"{link["address"]}"}}}}'
            assert node.netns.ip("link", "show", "flannel.1", check=False).returncode != 0
        else:
            tail = "}"
        assert raw == f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{node.address6}","BackendType":"{kind}"{tail}'
        env = node.subnet_env()
        assert env.subnet is None and env.mtu == {"vxlan": 1430, "host-gw": 1500, "udp": 1500 - 48}[kind]
        assert pod.ip is None and pod.ip6 is not None and pod.ip6.ip in subnet6(node)
        assert ip_json(node, "-4", "route", "show", "proto", "252") == []  # no IPv4 entries at all
        if kind == "udp":
            (link,) = ip_json(node, "addr", "show", "dev", "flannel0")
            assert link["mtu"] == 1500 - 48 and link["addr_info"] == []  # neither an IPv4 nor an IPv6 address
            assert status(node)["drops"].get("not_a_peer", 0) == 0
            for peer in cluster.nodes:
                if peer is not node:
                    assert f"peer added: {subnet6(peer)} via {peer.address6}" in node.log_text()


def test_ping6_between_every_pair_of_pods(lab: Lab) -> None:
    _, _, pods = lab
    assert unreachable(pods, ipv6=True, timeout=WAIT) == []


def test_tcp_over_ipv6_arrives_intact_both_ways(lab: Lab) -> None:
    _, _, pods = lab
    for src, dst in ((pods[0], pods[2]), (pods[2], pods[1])):
        result = tcp_transfer(src, dst, 4 * 1024 * 1024, port=5306, ipv6=True)
        assert result.intact, f"{src.name} -> {dst.name}: sent {result.sent!r}, received {result.received!r}"


def test_a_route_deleted_by_hand_comes_back(lab: Lab) -> None:
    """udp: flannel0's IPv6 network route (the keeper's); vxlan, host-gw: a peer's IPv6 route."""
    kind, cluster, pods = lab
    node = cluster.nodes[0]
    dst = NETWORK6 if kind == "udp" else str(subnet6(cluster.nodes[1]))
    node.netns.ip("-6", "route", "del", dst)
    assert dst not in routes6(node)
    assert converged(kind, cluster) == []
    assert wait_until(lambda: f"drift repaired: restored route {dst}" in node.log_text(), WAIT), node.log_text()[-2000:]
    assert unreachable(pods, ipv6=True, timeout=WAIT) == []


def test_restart_keeps_the_ipv6_subnet_and_traffic(lab: Lab) -> None:
    kind, cluster, pods = lab
    node = cluster.nodes[1]
    before, raw = subnet6(node), raw_lease(cluster, node)
    assert cluster.stop_daemon(node, timeout=10) == 0, node.log_text()[-2000:]
    start(cluster, node)
    assert subnet6(node) == before and raw_lease(cluster, node) == raw  # same record (vxlan: same VTEP MAC)
    assert converged(kind, cluster) == []
    assert unreachable(pods, ipv6=True, timeout=WAIT) == []


def test_a_node_that_leaves_takes_its_entries_with_it(lab: Lab) -> None:
    kind, cluster, pods = lab
    assert cluster.etcd is not None
    gone = cluster.nodes[2]
    key, sn6 = lease_key(gone), subnet6(gone)
    cluster.stop_daemon(gone, signal.SIGKILL)
    cluster.etcd.ctl("del", f"{PREFIX}/subnets/{key}")
    rest = cluster.nodes[:2]
    if kind == "udp":
        assert wait_until(lambda: all(len(status(n)["peers"]) == 1 for n in rest), WAIT)
        proc = pods[0].sh("ping", "-6", "-c", "1", "-W", "2", str(sn6.network_address + 2), check=False)
        assert proc.returncode != 0
    else:
        assert wait_until(lambda: all(str(sn6) not in routes6(n) for n in rest), WAIT), [routes6(n) for n in rest]
    assert converged(kind, cluster) == []
    assert unreachable(pods[:2], ipv6=True, timeout=WAIT) == []


def test_a_dual_stack_config_on_an_ipv6_only_underlay_is_refused_in_one_line() -> None:
    config = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "udp"}}
    with Cluster(nodes=1, config=config, underlay6_only=True) as cluster:
        (node,) = cluster.nodes
        cluster.start_daemon(node, wait=False)
        assert node.daemon is not None
        try:
            code = node.daemon.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon kept running:\n{node.log_text()[-2000:]}")
        errors = [line for line in node.log_text().splitlines() if "EnableIPv4=true" in line]
        assert code == 1 and len(errors) == 1, node.log_text()[-2000:]
        assert "the underlay interface eth0 has no IPv4 address" in errors[0] and "EnableIPv4=false" in errors[0]
        assert "Traceback" not in node.log_text() and cluster.leases() == {}


def test_vxlan_direct_routing_on_an_ipv6_only_underlay_uses_plain_ipv6_routes() -> None:
    config = ipv6_only_config("vxlan")
    config["Backend"]["DirectRouting"] = True
    with Cluster(nodes=2, config=config, underlay6_only=True) as cluster:
        start(cluster, *cluster.nodes)
        a, b = cluster.nodes

        assert wait_until(lambda: routed_directly6(a, b) and routed_directly6(b, a), WAIT), (routes6(a), routes6(b))
        pods = [cluster.add_pod(node) for node in cluster.nodes]
        assert unreachable(pods, ipv6=True, timeout=WAIT) == []
