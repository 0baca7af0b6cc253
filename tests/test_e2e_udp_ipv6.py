"""End to end: a dual-stack udp cluster in namespaces (underlay 198.51.100.0/24 plus
2001:db8::/64, pods 10.244.0.0/16 and fd00:10:244::/56), the real daemon, etcd and CNI plugin.

IPv6 pod traffic crosses flannel0 and the udp backend: ping6 between every pair of pods, a TCP
transfer over IPv6 whose sha256 both ends agree on, IPv4 unchanged next to it, and ICMPv6
"no route" for an address of the IPv6 network that no node holds. IPv6 pod packets cross the
IPv6 underlay (each node's socket on its PublicIPv6); the IPv4 underlay's turn for IPv6 is
covered by tests/test_udp_engine.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Network, IPv6Interface

import pytest

from flanneld_py.core.lease import format_subnet_key
from flanneld_py.lab.checks import ping_matrix, wait_until
from flanneld_py.lab.cluster import PREFIX, Cluster, Node, Pod
from lab_helpers import start, status

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

DUAL = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "udp"}}
WAIT = 30.0

SERVE6 = """
import hashlib, socket, sys
with socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6) as server:
    server.settimeout(120)
    print("listening", flush=True)
    conn, _ = server.accept()
    digest, total = hashlib.sha256(), 0
    with conn:
        while chunk := conn.recv(1 << 18):
            digest.update(chunk)
            total += len(chunk)
print(digest.hexdigest(), total, flush=True)
"""


def ipv6_of(pod: Pod) -> str:
    return str(IPv6Interface(next(e["address"] for e in pod.result["ips"] if ":" in e["address"])).ip)


def prepare(node: Node) -> None:
    """IPv6 forwarding on, and the node's underlay IPv6 address (no duplicate detection's delay)."""
    node.netns.sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    node.netns.ip("-6", "addr", "add", f"2001:db8::{node.index}/64", "dev", "eth0", "nodad")


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=3, config=DUAL) as lab:
        for node in lab.nodes:
            prepare(node)
        start(lab, *lab.nodes)
        for node in lab.nodes:
            lab.add_pod(node)
            lab.add_pod(node)
        yield lab


def test_leases_carry_both_subnets_and_public_ipv6(cluster):
    leases = cluster.leases()
    assert len(leases) == 3 and all("&fd00:10:244:" in key for key in leases)
    assert sorted(lease["PublicIPv6"] for lease in leases.values()) == ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
    for node in cluster.nodes:
        env = node.subnet_env()
        assert env.ipv6_subnet is not None and env.mtu == 1500 - 48  # room for the IPv6 underlay


def test_full_mesh_ping6_and_ping(cluster):
    pods = cluster.all_pods()
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    failed6 = [(a.name, b.name) for a, b in pairs
               if a.sh("ping", "-6", "-c", "2", "-W", "2", "-i", "0.2", ipv6_of(b), check=False).returncode != 0]
    assert not failed6, f"unreachable over IPv6: {failed6}"
    failed4 = [pair for pair, ok in ping_matrix(pods, count=1).items() if not ok]
    assert not failed4, f"unreachable over IPv4: {failed4}"


@pytest.mark.parametrize("ends", [(0, 1), (2, 0)])
def test_tcp_over_ipv6_arrives_intact(cluster, ends):
    src, dst = cluster.nodes[ends[0]].pods[0], cluster.nodes[ends[1]].pods[1]
    server = subprocess.Popen(dst.netns.argv(sys.executable, "-c", SERVE6, "5006"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        send = ("import hashlib, random, socket, sys\n"
                "rng, digest = random.Random(7), hashlib.sha256()\n"
                "with socket.create_connection((sys.argv[1], 5006), timeout=30) as conn:\n"
                "    for _ in range(80):\n"
                "        chunk = rng.randbytes(1 << 18); conn.sendall(chunk); digest.update(chunk)\n"
                "print(digest.hexdigest(), 80 << 18)\n")
        sent = src.sh(sys.executable, "-c", send, ipv6_of(dst), timeout=180).stdout.strip()
        received, _ = server.communicate(timeout=180)
        assert sent == received.strip() and sent, f"sent {sent!r}, received {received!r}"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_racing_key_that_repeats_a_nodes_ipv6_subnet_and_goes_leaves_that_node_reachable(cluster):
    """Two nodes racing for one IPv6 subnet both write a key for a moment; the later one deletes
    its key and claims another. Written here by hand, as the losing racer writes it: the
    other nodes must keep routing the subnet to its holder, through the key and after it."""
    holder, observer = cluster.nodes[0], cluster.nodes[2]
    assert cluster.etcd is not None
    subnet6 = holder.subnet_env().ipv6_subnet
    key = f"{PREFIX}/subnets/{format_subnet_key(IPv4Network('10.244.250.0/24'), subnet6)}"
    value = {"PublicIP": "198.51.100.250", "PublicIPv6": "2001:db8::fa", "BackendType": "udp"}
    cluster.etcd.ctl("put", key, json.dumps(value))
    try:
        assert wait_until(lambda: "peer added: 10.244.250.0/24" in observer.log_text(), WAIT), observer.log_text()[-3000:]
        assert observer.pods[0].sh("ping", "-6", "-c", "2", "-W", "2", "-i", "0.2", ipv6_of(holder.pods[0]),
                                   check=False).returncode == 0
    finally:
        cluster.etcd.ctl("del", key)
    assert wait_until(lambda: "peer removed: 10.244.250.0/24" in observer.log_text(), WAIT)
    for src, dst in ((observer.pods[0], holder.pods[0]), (holder.pods[1], observer.pods[1])):
        ping = src.sh("ping", "-6", "-c", "2", "-W", "2", "-i", "0.2", ipv6_of(dst), check=False)
        assert ping.returncode == 0, f"{src.name} -> {dst.name}: {ping.stdout}\n{observer.log_text()[-3000:]}"


def test_an_unleased_ipv6_address_is_answered_no_route_and_counted(cluster):
    node = cluster.nodes[0]
    before = status(node)["drops"].get("no_route", 0)
    proc = node.pods[0].sh("ping", "-6", "-c", "1", "-W", "2", "fd00:10:244:ff::1", check=False)
    assert proc.returncode != 0
    assert "unreachable" in proc.stdout.lower() or "no route" in proc.stdout.lower(), proc.stdout
    assert wait_until(lambda: status(node)["drops"].get("no_route", 0) > before, WAIT)
    assert status(node)["drops"].get("not_a_peer", 0) == 0


def test_ipv6_pods_over_the_ipv4_underlay_get_the_ipv4_underlays_mtu():
    """No IPv6 underlay socket (each node's --public-ipv6 is on no interface of it, as behind NAT):
    IPv6 pod packets cross the IPv4 underlay, so flannel0 and the pods get interface MTU - 28, not
    - 48, and a full-size IPv6 packet (1472 bytes, don't fragment) still crosses."""
    extra = {n: (f"--public-ipv6=2001:db8::99:{n}",) for n in (1, 2)}
    with Cluster(nodes=2, config=DUAL, node_daemon_args=extra) as lab:
        start(lab, *lab.nodes)
        for node in lab.nodes:
            assert "IPv6 pod traffic crosses the IPv4 underlay" in node.log_text()
            assert node.subnet_env().mtu == 1500 - 28
            assert '"mtu":1472' in node.netns.ip("-j", "link", "show", "flannel0").stdout
        a, b = (lab.add_pod(node) for node in lab.nodes)
        assert wait_until(lambda: a.sh("ping", "-6", "-c", "1", "-W", "2", ipv6_of(b), check=False).returncode == 0,
                          WAIT)
        full = a.sh("ping", "-6", "-c", "2", "-W", "2", "-M", "do", "-s", str(1472 - 48), ipv6_of(b), check=False)
        assert full.returncode == 0, full.stdout + full.stderr
        assert status(lab.nodes[1])["drops"].get("not_a_peer", 0) == 0
