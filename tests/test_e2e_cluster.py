"""End to end: 3 nodes in namespaces, real etcd, the real daemon and CNI plugin, real traffic.

Runs once per backend. Each module-scoped cluster has two pods per node.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from flanneld_py.lab.checks import dns_check, ping_matrix, tcp_transfer, wait_until
from flanneld_py.lab.cluster import Cluster, Node, Pod
from flanneld_py.lab.netns import Netns
from lab_helpers import start, status

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# (backend type, flags for every node, flags for single nodes by index): the udp path runs
# with offloads on (default), off, and mixed, and must behave the same either way. In the mixed
# cluster n3 moves one packet per read and per datagram with no GRO, as flannel's own UDP
# backend does, and the transfer and ping tests cross between it and the offloaded nodes.
BACKENDS = {
    "udp": ("udp", (), {}),
    "udp-no-offload": ("udp", ("--offload=false",), {}),
    "udp-mixed-offload": ("udp", (), {3: ("--offload=false",)}),
    "vxlan": ("vxlan", (), {}),
    "host-gw": ("host-gw", (), {}),
}
WAIT = 30.0  # seconds: a generous deadline for a condition, not a speed claim


@pytest.fixture(scope="module", params=list(BACKENDS))
def cluster(request):
    backend, flags, node_flags = BACKENDS[request.param]
    with Cluster(nodes=3, backend={"Type": backend}, daemon_args=flags, node_daemon_args=node_flags) as lab:
        lab.backend_type = backend
        start(lab, *lab.nodes)
        for node in lab.nodes:
            lab.add_pod(node)
            lab.add_pod(node)
        yield lab


def test_leases_are_flannel_records(cluster):
    leases = cluster.leases()
    assert len(leases) == 3
    public = sorted(lease["PublicIP"] for lease in leases.values())
    assert public == ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
    for node in cluster.nodes:
        env = node.subnet_env()
        assert f"{env.subnet.network_address}-{env.subnet.prefixlen}" in leases
        assert str(env.network) == "10.244.0.0/16"
        assert all(lease["BackendType"] == cluster.backend_type for lease in leases.values())


def test_full_mesh_pod_ping(cluster):
    matrix = ping_matrix(cluster.all_pods(), count=2)
    failed = [pair for pair, ok in matrix.items() if not ok]
    assert not failed, f"unreachable pod pairs: {failed}"


def test_tcp_transfer_arrives_intact(cluster):
    src, dst = cluster.nodes[0].pods[0], cluster.nodes[2].pods[1]
    result = tcp_transfer(src, dst, 50 * 1024 * 1024)
    assert result.intact, f"sent {result.sent!r}, received {result.received!r}"
    back = tcp_transfer(dst, src, 20 * 1024 * 1024)  # the other way: data and ACKs swap paths
    assert back.intact, f"sent {back.sent!r}, received {back.received!r}"


def test_dns_across_nodes(cluster):
    assert dns_check(cluster.nodes[1].pods[0], cluster.nodes[0].pods[1]) == "10.96.0.10"


def test_restart_keeps_subnet_and_traffic(cluster):
    node = cluster.nodes[1]
    before = node.subnet_env().subnet
    assert cluster.stop_daemon(node, signal.SIGTERM, timeout=WAIT) == 0, node.log_text()[-2000:]  # exit 0: no stop watchdog fired
    start(cluster, node)
    assert node.subnet_env().subnet == before
    assert len(cluster.leases()) == 3
    a, b = cluster.nodes[0].pods[0], node.pods[0]
    assert wait_until(lambda: a.ping(str(b.ip.ip)) and b.ping(str(a.ip.ip)), WAIT)


def _unreachable_from(pod: Pod, target: Pod) -> bool:
    proc = pod.sh("ping", "-c", "1", "-W", "1", str(target.ip.ip), check=False)
    return proc.returncode != 0


def _peer_route_gone(node: Node, subnet: str) -> bool:
    return not any(route.get("dst") == subnet for route in node.routes())


def test_removed_peer_disappears(cluster):
    # how fast an event reaches the kernel is a bench figure (bench/scale.py); here, that it does
    gone = cluster.nodes[2]
    subnet = gone.subnet_env().subnet
    cluster.stop_daemon(gone, signal.SIGKILL)
    cluster.etcd.ctl("del", f"/coreos.com/network/subnets/{subnet.network_address}-{subnet.prefixlen}")
    watcher = cluster.nodes[0]
    if cluster.backend_type == "udp":
        # flannel0 routes the whole Network; a peer that is gone answers "net unreachable" at once.
        def gone_now() -> bool:
            proc = watcher.pods[0].sh("ping", "-c", "1", "-W", "1", str(gone.pods[0].ip.ip), check=False)
            return "Unreachable" in proc.stdout
    else:
        def gone_now() -> bool:
            return all(_peer_route_gone(n, str(subnet)) for n in cluster.nodes[:2])
    assert wait_until(gone_now, WAIT), "peer still routed after its lease was deleted"
    # bring it back for the tests that follow: same subnet from its subnet file
    start(cluster, gone)
    assert gone.subnet_env().subnet == subnet
    assert wait_until(lambda: watcher.pods[0].ping(str(gone.pods[0].ip.ip)), WAIT)


def _listen_until_marker(pod: Pod, port: int) -> subprocess.Popen[str]:
    """Counts datagrams to ``port`` until one says b"hi" (sent last, through the real overlay)."""
    code = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',%d)); s.settimeout(%f)\n"
        "print('ready',flush=True); n=0\n"
        "while s.recv(2048)!=b'hi': n+=1\n"
        "print(n,flush=True)\n" % (port, WAIT)
    )
    proc = subprocess.Popen(pod.netns.argv(sys.executable, "-c", code), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_datagram_from_non_peer_never_reaches_a_pod(cluster):
    if cluster.backend_type != "udp":
        pytest.skip("the ingress check belongs to the udp backend")
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    victim = cluster.nodes[0].pods[0]
    friend = cluster.nodes[1].pods[0]
    listener = _listen_until_marker(victim, 9999)
    dropped_before = status(cluster.nodes[0])["drops"].get("not_a_peer", 0)
    with Netns.create(f"fp{cluster.tag}x") as intruder:
        cluster.plug_into_underlay(intruder, "x", "198.51.100.200")
        inner = bytes(IP(src=str(friend.ip.ip), dst=str(victim.ip.ip)) / UDP(sport=1, dport=9999) / Raw(b"evil"))
        sender = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "data=bytes.fromhex(sys.argv[1])\n"
            "for _ in range(50): s.sendto(data,('198.51.100.1',8285))\n"
        )
        intruder.sh(sys.executable, "-c", sender, inner.hex())
        # every one of the 50 reached the daemon and was dropped as not_a_peer (nothing else on
        # this cluster sends to port 8285 from outside the leases)
        assert wait_until(lambda: status(cluster.nodes[0])["drops"].get("not_a_peer", 0) - dropped_before == 50,
                          WAIT), status(cluster.nodes[0])["drops"]
        # a control packet through the real overlay, sent after them, proves the listener hears
        # legitimate traffic (anything of the intruder's that got through would come before it)
        friend.sh(sys.executable, "-c",
                  f"import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'hi',('{victim.ip.ip}',9999))")
        out, _ = listener.communicate(timeout=WAIT + 10)
    assert listener.returncode == 0, "the listener never heard the real peer's datagram"
    assert out.strip() == "0", f"pod received {out.strip()} datagrams from the intruder"
