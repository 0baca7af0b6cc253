"""End to end for the kernel backends (vxlan, host-gw) and the udp backend's drift repair.

Three nodes in namespaces with real etcd and the real daemon. What is checked
is the kernel state each daemon keeps (``ip -j route/neigh``, ``bridge -j
fdb``), traffic across it, and how that state follows peers, hand edits,
restarts and shutdowns. One cluster per backend; the tests of a module share
it, in order, and each leaves it as it found it except the last (peer removal).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from lab_helpers import ip_json, start

from flanneld_py.lab.checks import ping_matrix, tcp_transfer, wait_until
from flanneld_py.lab.cluster import PREFIX, Cluster, Node, Pod
from flanneld_py.lab.netns import run

pytestmark = [pytest.mark.netns, pytest.mark.slow]

KERNEL_BACKENDS = ["vxlan", "host-gw"]
RTPROT_FLANNEL = "252"
VXLAN_DEV = "flannel.1"
WAIT = 20.0  # seconds: a generous deadline for a condition (the daemons converge in well under 1 s)


# --- helpers -----------------------------------------------------------------------------------


def stop(cluster: Cluster, node: Node, sig: int = signal.SIGTERM) -> int | None:
    return cluster.stop_daemon(node, sig, timeout=10)


def our_routes(node: Node) -> dict[str, dict]:  # type: ignore[type-arg]
    return {r["dst"]: r for r in ip_json(node, "route", "show", "proto", RTPROT_FLANNEL)}


def permanent_neighbours(node: Node) -> dict[str, str]:
    if not device_exists(node):
        return {}
    return {n["dst"]: n["lladdr"] for n in ip_json(node, "neigh", "show", "dev", VXLAN_DEV, "nud", "permanent")}


def fdb(node: Node) -> set[tuple[str, str]]:
    if not device_exists(node):
        return set()
    out = run(["bridge", "-n", node.netns.name, "-j", "fdb", "show", "dev", VXLAN_DEV]).stdout
    return {(e["mac"], e["dst"]) for e in json.loads(out or "[]") if "dst" in e}


def device_exists(node: Node) -> bool:
    return node.netns.ip("link", "show", VXLAN_DEV, check=False).returncode == 0


def device_mac(node: Node) -> str:
    return str(ip_json(node, "link", "show", VXLAN_DEV)[0]["address"])


def lease_of(cluster: Cluster, node: Node) -> dict:  # type: ignore[type-arg]
    env = node.subnet_env()
    return cluster.leases()[f"{env.subnet.network_address}-{env.subnet.prefixlen}"]


@dataclass(frozen=True)
class Peer:
    subnet: str
    gateway: str  # the subnet's network address (the VTEP address on flannel.1)
    public_ip: str
    mac: str | None


def peers_of(cluster: Cluster, node: Node) -> list[Peer]:
    out = []
    for other in cluster.nodes:
        if other is node or other.daemon is None:
            continue
        subnet = other.subnet_env().subnet
        data = lease_of(cluster, other).get("BackendData") or {}
        out.append(Peer(str(subnet), str(subnet.network_address), other.address, data.get("VtepMAC")))
    return out


def missing_entries(kind: str, node: Node, peers: list[Peer]) -> list[str]:
    """What ``node``'s kernel lacks for ``peers`` (empty when everything is in place)."""
    routes, missing = our_routes(node), []
    if kind == "host-gw":
        for peer in peers:
            route = routes.get(peer.subnet)
            if route is None or route.get("gateway") != peer.public_ip or route.get("dev") != "eth0":
                missing.append(f"route {peer.subnet} via {peer.public_ip} dev eth0 (have {route})")
        return missing
    neighbours, forwarding = permanent_neighbours(node), fdb(node)
    for peer in peers:
        route = routes.get(peer.subnet)
        if (route is None or route.get("gateway") != peer.gateway or route.get("dev") != VXLAN_DEV
                or "onlink" not in route.get("flags", [])):
            missing.append(f"route {peer.subnet} via {peer.gateway} dev {VXLAN_DEV} onlink (have {route})")
        if neighbours.get(peer.gateway) != peer.mac:
            missing.append(f"neigh {peer.gateway} lladdr {peer.mac} (have {neighbours.get(peer.gateway)})")
        if (peer.mac, peer.public_ip) not in forwarding:
            missing.append(f"fdb {peer.mac} dst {peer.public_ip}")
    return missing


def converged(kind: str, cluster: Cluster, timeout: float) -> list[str]:
    """Wait until every running node has every peer's entries; what is still missing otherwise."""
    problems: list[str] = []

    def check() -> bool:
        problems.clear()
        for node in cluster.nodes:
            if node.daemon is not None:
                problems.extend(f"{node.name}: {m}" for m in missing_entries(kind, node, peers_of(cluster, node)))
        return not problems

    wait_until(check, timeout)
    return problems


def endpoints(cluster: Cluster) -> list[Pod]:
    """One pod per node through the real CNI plugin; a CNI failure fails the test."""
    return [cluster.add_pod(node) for node in cluster.nodes]


# --- the kernel backends --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=KERNEL_BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster]]:
    kind = request.param
    with Cluster(nodes=3, backend={"Type": kind}) as cluster:
        start(cluster, *cluster.nodes)
        assert converged(kind, cluster, timeout=WAIT) == []
        yield kind, cluster


def test_every_node_has_every_peers_entries(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    assert converged(kind, cluster, timeout=WAIT) == []
    for node in cluster.nodes:
        env = node.subnet_env()
        if kind == "vxlan":
            assert env.mtu == 1450
            (link,) = ip_json(node, "-d", "link", "show", VXLAN_DEV)
            assert link["mtu"] == 1450
            info = link["linkinfo"]["info_data"]
            assert (info["id"], info["port"], info["local"], info.get("learning")) == (1, 8472, node.address, False)
            addrs = ip_json(node, "addr", "show", "dev", VXLAN_DEV)[0]["addr_info"]
            assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
                (str(env.subnet.network_address), 32)]
            assert lease_of(cluster, node)["BackendData"] == {"VNI": 1, "VtepMAC": device_mac(node)}
        else:
            assert env.mtu == 1500
            assert lease_of(cluster, node)["BackendType"] == "host-gw"


def test_traffic_crosses_nodes(lab: tuple[str, Cluster]) -> None:
    _, cluster = lab
    eps = endpoints(cluster)
    matrix = ping_matrix(eps, count=1)
    assert [pair for pair, ok in matrix.items() if not ok] == []
    result = tcp_transfer(eps[0], eps[2], 2 * 1024 * 1024, port=5201)
    assert result.intact, f"sent {result.sent!r}, received {result.received!r}"


def test_entries_deleted_by_hand_come_back(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    node, peer = cluster.nodes[0], peers_of(cluster, cluster.nodes[0])[0]
    node.netns.ip("route", "del", peer.subnet)
    if kind == "vxlan":
        node.netns.ip("neigh", "del", peer.gateway, "dev", VXLAN_DEV)
        run(["bridge", "-n", node.netns.name, "fdb", "del", str(peer.mac), "dev", VXLAN_DEV, "dst", peer.public_ip])
    assert wait_until(lambda: missing_entries(kind, node, [peer]) == [], 10), missing_entries(kind, node, [peer])
    assert "drift repaired: restored route " + peer.subnet in node.log_text()


def test_vxlan_device_deleted_by_hand_comes_back_with_its_mac(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    if kind != "vxlan":
        pytest.skip("host-gw makes no device")
    node = cluster.nodes[2]
    mac = device_mac(node)
    node.netns.ip("link", "del", VXLAN_DEV)
    assert wait_until(lambda: device_exists(node), 10), node.log_text()[-2000:]
    assert device_mac(node) == mac
    assert converged(kind, cluster, timeout=WAIT) == []
    assert f"{VXLAN_DEV} was deleted; recreated it with VTEP MAC {mac}" in node.log_text()


def test_unusable_peer_is_refused_with_one_log_line(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    assert cluster.etcd is not None
    taken = set(cluster.leases())
    name = next(f"10.244.{i}.0-24" for i in range(200, 255) if f"10.244.{i}.0-24" not in taken)
    if kind == "host-gw":
        record = {"PublicIP": "203.0.113.9", "PublicIPv6": None, "BackendType": "host-gw", "BackendData": None}
        expected = "refused: its PublicIP 203.0.113.9 is not on eth0's segment 198.51.100.0/24"
    else:
        record = {"PublicIP": "198.51.100.9", "PublicIPv6": None, "BackendType": "udp", "BackendData": None}
        expected = "uses backend 'udp', not vxlan; ignoring it"
    node = cluster.nodes[0]
    cluster.etcd.ctl("put", f"{PREFIX}/subnets/{name}", json.dumps(record))
    try:
        assert wait_until(lambda: expected in node.log_text(), WAIT), node.log_text()[-2000:]
        assert name.replace("-", "/") not in our_routes(node)
    finally:
        cluster.etcd.ctl("del", f"{PREFIX}/subnets/{name}")


def test_restart_keeps_subnet_vtep_mac_and_kernel_state(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    node = cluster.nodes[1]
    subnet, routes = node.subnet_env().subnet, set(our_routes(node))
    mac = device_mac(node) if kind == "vxlan" else None
    assert stop(cluster, node) == 0, node.log_text()[-2000:]
    assert set(our_routes(node)) == routes  # default: kernel state kept across a restart
    start(cluster, node)
    assert node.subnet_env().subnet == subnet
    if kind == "vxlan":
        assert device_mac(node) == mac
        assert lease_of(cluster, node)["BackendData"]["VtepMAC"] == mac
        assert "reusing VTEP MAC" in node.log_text()
    assert converged(kind, cluster, timeout=WAIT) == []


def test_cleanup_on_exit_removes_everything(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    node = cluster.nodes[1]
    stop(cluster, node)
    start(cluster, node, extra=("--cleanup-on-exit",))
    assert our_routes(node)
    assert stop(cluster, node) == 0, node.log_text()[-2000:]
    assert our_routes(node) == {}
    assert not device_exists(node)
    # back to normal; for vxlan the new VTEP MAC must replace the old one on the peers
    start(cluster, node)
    assert converged(kind, cluster, timeout=WAIT) == []
    if kind == "vxlan":
        for other in (cluster.nodes[0], cluster.nodes[2]):
            assert len(fdb(other)) == 2 and len(permanent_neighbours(other)) == 2


def test_removed_peer_disappears_from_the_others(lab: tuple[str, Cluster]) -> None:
    kind, cluster = lab
    assert cluster.etcd is not None
    gone = cluster.nodes[2]
    subnet = gone.subnet_env().subnet
    stop(cluster, gone, signal.SIGKILL)
    cluster.etcd.ctl("del", f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}")
    rest = cluster.nodes[:2]

    def vanished() -> bool:
        return all(
            str(subnet) not in our_routes(n)
            and str(subnet.network_address) not in permanent_neighbours(n)
            and not any(dst == gone.address for _, dst in fdb(n))
            for n in rest
        )

    assert wait_until(vanished, WAIT), [our_routes(n) for n in rest]
    assert converged(kind, cluster, timeout=WAIT) == []
    assert all(f"peer removed: {subnet}" in n.log_text() for n in rest)


def test_vxlan_direct_routing_uses_plain_routes_on_one_segment() -> None:
    with Cluster(nodes=2, backend={"Type": "vxlan", "DirectRouting": True}) as cluster:
        start(cluster, *cluster.nodes)
        a, b = cluster.nodes

        def direct(node: Node, peer: Node) -> bool:
            route = our_routes(node).get(str(peer.subnet_env().subnet))
            return route is not None and route.get("gateway") == peer.address and route.get("dev") == "eth0"

        # both ways: the reply needs the peer's route as much as the request needs ours
        assert wait_until(lambda: direct(a, b) and direct(b, a), WAIT), (our_routes(a), our_routes(b))
        assert permanent_neighbours(a) == {} and fdb(a) == set()
        source, target = str(a.subnet_env().subnet.network_address), str(b.subnet_env().subnet.network_address)
        assert wait_until(lambda: a.netns.sh("ping", "-c1", "-W1", "-I", source, target,
                                             check=False).returncode == 0, WAIT)


# --- udp ---------------------------------------------------------------------------------------------


def test_udp_backend_restores_its_network_route() -> None:
    with Cluster(nodes=1, backend={"Type": "udp"}) as cluster:
        node = cluster.nodes[0]
        start(cluster, node)
        address = f"{node.subnet_env().subnet.network_address}/32"

        def present() -> tuple[bool, bool]:
            routed = any(r.get("dst") == "10.244.0.0/16" and r.get("dev") == "flannel0" for r in node.routes())
            addrs = ip_json(node, "addr", "show", "dev", "flannel0")[0]["addr_info"]
            return routed, any(f"{a['local']}/{a['prefixlen']}" == address for a in addrs)

        assert present() == (True, True)
        node.netns.ip("route", "del", "10.244.0.0/16", "dev", "flannel0")
        node.netns.ip("addr", "del", address, "dev", "flannel0")
        assert wait_until(lambda: present() == (True, True), 10), (node.routes(), node.log_text()[-2000:])
        log = node.log_text()
        assert "drift repaired: restored route 10.244.0.0/16 dev flannel0" in log
        assert f"drift repaired: restored address {address} dev flannel0" in log
