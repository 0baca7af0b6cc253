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

import tempfile
from collections.abc import Iterator

import pytest
from lab_helpers import unreachable

from flanneld_py.lab.checks import tcp_transfer
from flanneld_py.lab.cluster import Cluster, Pod
from flanneld_py.lab.flannel import (
    FlannelMissing,
    flannel_cni_binary,
    flannel_cni_plugin,
    flanneld_argv_builder,
    flanneld_binary,
    start_nodes,
)

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
