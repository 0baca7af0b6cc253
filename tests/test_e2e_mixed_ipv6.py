"""Mixed dual-stack clusters: flanneld-py nodes next to flannel's flanneld v0.20.2, IPv4 and IPv6.

One cluster per kernel backend (vxlan, host-gw) on a dual-stack underlay, config with
``EnableIPv6``:

    n1  flanneld-py        pod wired by flannel-py
    n2  flanneld-py        pod wired by flannel's CNI plugin (reads FLANNEL_IPV6_SUBNET)
    n3  flanneld v0.20.2   pod wired by flannel's CNI plugin

Each of flanneld and flanneld-py must take the other's dual-stack lease (``PublicIPv6``,
``BackendV6Data``) and build its IPv6 datapath from it. The binaries come from
``../shared/flannel/`` (or ``$FLANNELD_BIN`` / ``$FLANNEL_CNI_BIN``); without them the
module skips with the reason.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator

import pytest
from lab_helpers import unreachable

from flanneld_py.lab.checks import tcp_transfer, wait_until
from flanneld_py.lab.cluster import PREFIX, Cluster, Pod
from flanneld_py.lab.flannel import (
    FlannelMissing,
    flannel_cni_binary,
    flannel_cni_plugin,
    flanneld_argv_builder,
    flanneld_binary,
    start_flanneld,
    start_nodes,
)
from flanneld_py.lab.netns import run

pytestmark = [pytest.mark.netns, pytest.mark.slow]

WAIT = 30.0  # seconds: flanneld may take a while to take a lease


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def pods(request: pytest.FixtureRequest) -> Iterator[list[Pod]]:
    with tempfile.TemporaryDirectory(prefix="flannel-bin-") as folder:
        try:
            flanneld, plugin = flanneld_binary(folder), flannel_cni_plugin(flannel_cni_binary(folder))
        except FlannelMissing as exc:
            pytest.skip(f"flannel's binaries: {exc}")
        config = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/48",
                  "Backend": {"Type": request.param}}
        with Cluster(nodes=3, config=config, underlay6=True, node_daemons={3: flanneld_argv_builder(flanneld)}) as lab:
            start_nodes(lab)
            yield [lab.add_pod(node, plugin) for node, plugin in zip(lab.nodes, (None, plugin, plugin), strict=True)]



def test_every_pod_has_both_families(pods: list[Pod]) -> None:
    for pod in pods:
        env = pod.node.subnet_env()
        assert env.subnet is not None and env.ipv6_subnet is not None
        assert pod.ip.ip in env.subnet and pod.ip6 is not None and pod.ip6.ip in env.ipv6_subnet


def test_ping_and_ping6_between_flanneld_and_flanneld_py_pods(pods: list[Pod]) -> None:
    assert unreachable(pods, ipv6=False, timeout=WAIT) == []
    assert unreachable(pods, ipv6=True, timeout=WAIT) == []


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_both_ways_between_flanneld_and_flanneld_py(pods: list[Pod], ipv6: bool) -> None:
    ours, theirs = pods[0], pods[2]
    for src, dst in ((ours, theirs), (theirs, ours)):
        result = tcp_transfer(src, dst, 2 * 1024 * 1024, port=5207, ipv6=ipv6)
        assert result.intact, f"{src.name} -> {dst.name}: sent {result.sent!r}, received {result.received!r}"


def test_ipv6_only_vxlan_on_an_ipv6_only_underlay_flanneld_and_flanneld_py_write_one_record() -> None:
    """flanneld v0.20.2 on an IPv6-only underlay: it picks eth0 by its IPv6 address, and its lease
    is byte for byte what flanneld-py writes for an IPv6-only vxlan node; flanneld-py takes that
    lease (route, neighbour and FDB entry on flannel-v6.1).

    No traffic is checked: in etcd mode flanneld v0.20.2 cannot take a peer's IPv6-only lease. Its
    etcd parser marks every lease EnableIPv4, so it handles a peer's lease as IPv4 first and
    calls AddARP on the flannel.1 device it never made (log, with -v=4: "adding subnet: 0.0.0.0/0
    PublicIP: 0.0.0.0 VtepMAC: " then "calling AddARP: 0.0.0.0, ", and nothing after); and it
    reuses any lease whose PublicIP equals its own, which on an IPv6-only network is every lease
    (0.0.0.0): started after another node it takes over that node's subnet ("Found lease (ip:
    0.0.0.0/0 ipv6: ...) for current IP (0.0.0.0), reusing"). So flanneld starts first here."""
    with tempfile.TemporaryDirectory(prefix="flannel-bin-") as folder:
        try:
            flanneld = flanneld_binary(folder)
        except FlannelMissing as exc:
            pytest.skip(f"flannel's binaries: {exc}")
        config = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/48",
                  "Backend": {"Type": "vxlan"}}
        with Cluster(nodes=2, config=config, underlay6_only=True,
                     node_daemons={1: flanneld_argv_builder(flanneld)}) as lab:
            theirs, ours = lab.nodes
            start_flanneld(lab, theirs)
            assert "Using interface with name eth0 and v6 address 2001:db8::1" in theirs.log_text()
            lab.start_daemon(ours)
            assert lab.etcd is not None
            raw = {}
            for node in lab.nodes:
                env = node.subnet_env()
                assert env.subnet is None and env.ipv6_subnet is not None
                key = f"{PREFIX}/subnets/0.0.0.0-0&{env.ipv6_subnet.network_address}-{env.ipv6_subnet.prefixlen}"
                mac = json.loads(node.netns.ip("-j", "link", "show", "flannel-v6.1").stdout)[0]["address"]
                raw[node.name] = lab.etcd.ctl("get", "--print-value-only", key).stdout.strip()
                assert raw[node.name] == ('{"PublicIP":"0.0.0.0","PublicIPv6":"' + str(node.address6) + '",'
                                          '"BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"' + mac + '"}}')
            sn6 = theirs.subnet_env().ipv6_subnet
            assert sn6 is not None
            gateway = str(sn6.network_address)

            def took_their_lease() -> bool:
                route = ours.netns.ip("-6", "route", "show", str(sn6)).stdout
                neigh = ours.netns.ip("-6", "neigh", "show", gateway, "dev", "flannel-v6.1").stdout
                fdb = run(["bridge", "-n", ours.netns.name, "fdb", "show", "dev", "flannel-v6.1"]).stdout
                return (f"via {gateway} dev flannel-v6.1" in route and "onlink" in route and "PERMANENT" in neigh
                        and f"dst {theirs.address6}" in fdb)

            assert wait_until(took_their_lease, WAIT), ours.log_text()[-2000:]
