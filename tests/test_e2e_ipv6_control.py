"""IPv6's control plane with real daemons in namespaces: a dual-stack underlay (198.51.100.0/24
plus 2001:db8::/64), pods 10.244.0.0/16 and fd00:10:244::/56, the lab's real etcd.

A dual-stack node without an IPv6 address is refused in one line (vxlan and host-gw run IPv6 end to
end in test_e2e_ipv6_kernel.py, udp in test_e2e_udp_ipv6.py; the backend family gate has
its unit tests in test_backend_families.py). Compatibility is checked against flannel's
own flanneld v0.20.2: its dual-stack vxlan lease is parsed by our code exactly, and a
dual-stack record in our format is one flanneld takes (it programs both routes to it).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from flanneld_py.core.lease import LeaseAttrs, format_subnet_key, parse_lease_key
from flanneld_py.core.netconfig import parse_network_config
from flanneld_py.core.subnetenv import SubnetEnv
from flanneld_py.lab.checks import wait_until
from flanneld_py.lab.cluster import PREFIX, Cluster, Node

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

DUAL = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
FLANNELD_XZ = Path(__file__).resolve().parents[1].parent / "shared" / "flannel" / "flanneld-v0.20.2-linux-amd64.xz"


def give_ipv6(node: Node) -> str:
    """The node's underlay IPv6 address (documentation range), without duplicate detection's delay."""
    address = f"2001:db8::{node.index}"
    node.netns.ip("-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    return address


def refusal(cluster: Cluster, node: Node) -> list[str]:
    """Start our daemon, wait for it to exit 1, and return its error lines."""
    cluster.start_daemon(node, wait=False)
    assert node.daemon is not None
    code = node.daemon.wait(timeout=30)
    assert code == 1, node.log_text()[-2000:]
    return [line for line in node.log_text().splitlines() if " ERROR " in line or "error" in line.lower()]


def test_our_daemon_refuses_a_dual_stack_node_without_ipv6_in_one_line():
    with Cluster(nodes=1, config={**DUAL, "Backend": {"Type": "udp"}}) as cluster:
        (without_v6,) = cluster.nodes
        errors = refusal(cluster, without_v6)
        assert len(errors) == 1, errors
        assert "interface eth0 has no global IPv6 address" in errors[0] and "--public-ipv6" in errors[0]
        assert cluster.leases() == {}, "a refused daemon claims nothing"


@pytest.fixture(scope="module")
def flanneld(tmp_path_factory) -> str:
    """``$FLANNELD_BIN`` (as the lab's mixed clusters take it), else the shared binary unpacked."""
    if os.environ.get("FLANNELD_BIN"):
        return os.environ["FLANNELD_BIN"]
    if not FLANNELD_XZ.is_file():
        pytest.skip(f"flannel's flanneld is not here ({FLANNELD_XZ})")
    target = tmp_path_factory.mktemp("flanneld") / "flanneld"
    with lzma.open(FLANNELD_XZ) as packed, open(target, "wb") as out:
        shutil.copyfileobj(packed, out)
    target.chmod(0o755)
    return str(target)


def flanneld_cluster(binary: str, nodes: int = 1) -> Cluster:
    def argv(cluster: Cluster, node: Node, extra: tuple[str, ...]) -> list[str]:
        return [binary, f"--etcd-endpoints={cluster.etcd_endpoint}", f"--etcd-prefix={PREFIX}", "--iface=eth0",
                f"--subnet-file={node.subnet_file}", *extra]

    return Cluster(nodes=nodes, config={**DUAL, "Backend": {"Type": "vxlan"}}, daemon_argv_builder=argv,
                   wait_for_cni_socket=False)


def start_flanneld(cluster: Cluster, node: Node) -> None:
    """flanneld v0.20.2 sometimes panics in its first seconds (see ../shared/flannel/README.md):
    a second start is allowed."""
    for _ in range(2):
        cluster.start_daemon(node, wait=False)
        if wait_until(lambda: os.path.exists(node.subnet_file) or node.daemon.poll() is not None, 30):
            time.sleep(2)
            if node.daemon is not None and node.daemon.poll() is None:
                return
        cluster.stop_daemon(node)
    raise RuntimeError(f"flanneld did not start on {node.name}:\n{node.log_text()[-3000:]}")


def test_flanneld_dual_stack_lease_is_read_exactly_by_our_parser(flanneld):
    with flanneld_cluster(flanneld) as cluster:
        node = cluster.nodes[0]
        address6 = give_ipv6(node)
        start_flanneld(cluster, node)
        assert cluster.etcd is not None
        raw = cluster.etcd.ctl("get", "--prefix", f"{PREFIX}/subnets/").stdout.splitlines()
        assert len(raw) == 2, raw
        name, value = raw[0].rsplit("/", 1)[1], raw[1].encode()
        subnet, subnet6 = parse_lease_key(name)
        config = parse_network_config(json.dumps(DUAL))
        assert config.ipv6 is not None and subnet6 is not None
        assert config.holds_subnet(subnet) and config.ipv6.holds_subnet(subnet6)
        assert format_subnet_key(subnet, subnet6) == name
        attrs = LeaseAttrs.from_json(value)
        assert attrs.public_ip == IPv4Address(node.address) and attrs.public_ipv6 == IPv6Address(address6)
        assert attrs.backend_type == "vxlan" and attrs.backend_v6_data["VNI"] == 1
        assert attrs.to_json() == value, "our writer gives back flanneld's bytes"
        env = SubnetEnv.parse(Path(node.subnet_file).read_text())
        assert (env.subnet, env.ipv6_subnet, env.ipv6_network) == (subnet, subnet6, config.ipv6.network)


def test_flanneld_takes_a_dual_stack_record_in_our_format(flanneld):
    with flanneld_cluster(flanneld) as cluster:
        node = cluster.nodes[0]
        give_ipv6(node)
        subnet, subnet6 = IPv4Network("10.244.200.0/24"), IPv6Network("fd00:10:244:c8::/64")
        ours = LeaseAttrs(IPv4Address("198.51.100.9"), "vxlan", {"VNI": 1, "VtepMAC": "02:00:5e:00:53:09"},
                          IPv6Address("2001:db8::9"), {"VNI": 1, "VtepMAC": "02:00:5e:00:53:99"})
        assert cluster.etcd is not None
        cluster.etcd.ctl("put", f"{PREFIX}/subnets/{format_subnet_key(subnet, subnet6)}", ours.to_json().decode())
        start_flanneld(cluster, node)

        def routes(*family: str) -> str:
            return node.netns.ip(*family, "route", "show").stdout

        assert wait_until(lambda: f"{subnet} via {subnet.network_address} dev flannel.1" in routes(), 20), routes()
        assert wait_until(lambda: f"{subnet6} via {subnet6.network_address} dev flannel-v6.1" in routes("-6"), 20), \
            routes("-6")
        neighbours = node.netns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").stdout
        assert "02:00:5e:00:53:99" in neighbours, neighbours
        assert node.daemon is not None and node.daemon.poll() is None, node.log_text()[-2000:]
