"""Mixed clusters: flanneld-py nodes next to flannel's own flanneld v0.20.2, with pods wired by
flannel-py, by flannel's own CNI plugin v1.1.2 and by the reference bridge + host-local plugins.

One cluster per backend (udp with offloads on, vxlan, vxlan with DirectRouting, host-gw), shared
by the module's tests in order; the last one takes the flanneld node away:

    n1  flanneld-py        pod wired by flannel-py
    n2  flanneld-py        pod wired by flannel's CNI plugin (kube-flannel.yml's config)
    n3  flanneld-py        pod wired by bridge + host-local, configured from the subnet file
    n4  flanneld v0.20.2   pod wired by flannel's CNI plugin (flanneld serves no flannel-py socket)

Every daemon runs with ``--ip-masq``, as kube-flannel.yml runs flanneld. The binaries come from
``../shared/flannel/`` (or ``$FLANNELD_BIN`` / ``$FLANNEL_CNI_BIN``, see ``flanneld_py.lab.flannel``);
without flannel's plugin, n2 is left out and n4's pod is wired by bridge; without flanneld, n4 is
left out and its tests skip: the other plugins' pods on flanneld-py nodes are tested either way.
"""

from __future__ import annotations

import re
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from flanneld_py.core.lease import format_subnet_key
from flanneld_py.lab.checks import ping_matrix, tcp_transfer, wait_until
from flanneld_py.lab.cluster import Cluster, CniPlugin, DaemonArgv, Node, Pod
from flanneld_py.lab.flannel import (
    FlannelMissing,
    bridge_plugin,
    flannel_cni_binary,
    flannel_cni_plugin,
    flanneld_argv_builder,
    flanneld_binary,
    start_flanneld,
    start_nodes,
)
from lab_helpers import PREFIX, dump, peer_subnets

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = {
    "udp": {"Type": "udp"},
    "vxlan": {"Type": "vxlan"},
    "vxlan-direct-routing": {"Type": "vxlan", "DirectRouting": True},
    "host-gw": {"Type": "host-gw"},
}
RTPROT_FLANNEL = "252"
KLOG_ERROR = re.compile(r"[EF]\d{4} ")  # flanneld's error and fatal lines: E1201 21:40:46.520525 ...
TRANSFER_BYTES = 4 * 1024 * 1024


@dataclass
class Binaries:
    flanneld: str | None
    flannel_cni: str | None
    missing: list[str]


@pytest.fixture(scope="module")
def binaries() -> Iterator[Binaries]:
    with tempfile.TemporaryDirectory(prefix="flannel-bin-") as folder:
        missing: list[str] = []

        def find(binary: Callable[[str], str]) -> str | None:
            try:
                return binary(folder)
            except FlannelMissing as exc:
                missing.append(str(exc))
                return None

        yield Binaries(find(flanneld_binary), find(flannel_cni_binary), missing)


@dataclass
class Mixed:
    lab: Cluster
    backend: str
    py_nodes: list[Node]
    flanneld_node: Node | None
    flanneld: DaemonArgv | None
    missing: tuple[str, ...] = ()

    def flanneld_pod(self) -> Pod:
        if self.flanneld_node is None:
            pytest.skip("no flanneld v0.20.2: " + "; ".join(self.missing))
        return self.flanneld_node.pods[0]


@pytest.fixture(scope="module", params=list(BACKENDS))
def mixed(request: pytest.FixtureRequest, binaries: Binaries) -> Iterator[Mixed]:
    backend = BACKENDS[request.param]
    plugins: list[CniPlugin | None] = [None, bridge_plugin()]  # n1 flannel-py, then n2, n3, ...
    flannel_plugin = flannel_cni_plugin(binaries.flannel_cni) if binaries.flannel_cni else None
    if flannel_plugin is not None:
        plugins.insert(1, flannel_plugin)
    node_daemons = {}
    flanneld = flanneld_argv_builder(binaries.flanneld, "--ip-masq") if binaries.flanneld else None
    if flanneld is not None:
        node_daemons[len(plugins) + 1] = flanneld
        plugins.append(flannel_plugin or bridge_plugin())
    with Cluster(nodes=len(plugins), backend=backend, daemon_args=("--ip-masq",),
                 node_daemons=node_daemons) as lab:
        py_nodes = [node for node in lab.nodes if node.serves_cni]
        flanneld_node = next((node for node in lab.nodes if not node.serves_cni), None)
        start_nodes(lab)  # flanneld last and alone: it loses leases written while it runs close together
        for node, plugin in zip(lab.nodes, plugins):
            lab.add_pod(node, plugin)
        yield Mixed(lab, request.param, py_nodes, flanneld_node, flanneld, tuple(binaries.missing))


def lease_key(node: Node) -> str:
    return format_subnet_key(node.subnet_env().subnet)


def transfer_intact(src: Pod, dst: Pod) -> None:
    result = tcp_transfer(src, dst, TRANSFER_BYTES)
    assert result.intact, f"{src.name} -> {dst.name}: sent {result.sent!r}, received {result.received!r}"


def wait_full_mesh(mixed: Mixed, timeout: float = 45.0) -> None:
    pods = mixed.lab.all_pods()
    failed: list[tuple[str, str]] = []

    def all_reached() -> bool:
        failed[:] = [pair for pair, ok in ping_matrix(pods, count=1).items() if not ok]
        return not failed

    assert wait_until(all_reached, timeout, 0.5), f"unreachable pod pairs: {failed}\n{dump(mixed.lab)}"


# --- the tests, in order ------------------------------------------------------------------


def test_full_mesh_ping_between_pods_of_every_node_and_plugin(mixed: Mixed) -> None:
    wait_full_mesh(mixed)


def test_each_daemon_takes_the_others_leases(mixed: Mixed) -> None:
    """flanneld-py serves flanneld's lease as a peer; flanneld ignores none of ours."""
    node = mixed.flanneld_pod().node
    leases = mixed.lab.leases()
    theirs = leases[lease_key(node)]
    if mixed.backend == "udp":  # the record issue 12 was about
        assert "BackendType" not in theirs, theirs
    for py in mixed.py_nodes:
        assert wait_until(lambda: str(node.subnet_env().subnet) in peer_subnets(py), 10), dump(mixed.lab)
        assert "ignoring it" not in py.log_text(), py.log_text()[-3000:]
    flanneld_log = node.log_text()
    assert "gnoring non-" not in flanneld_log, flanneld_log[-3000:]
    errors = [line for line in flanneld_log.splitlines() if KLOG_ERROR.match(line)]
    assert not errors, errors


def test_tcp_between_flanneld_pod_and_flanneld_py_pod_both_ways(mixed: Mixed) -> None:
    theirs, ours = mixed.flanneld_pod(), mixed.py_nodes[0].pods[0]
    transfer_intact(theirs, ours)
    transfer_intact(ours, theirs)


def test_tcp_between_pods_of_other_plugins_on_flanneld_py_nodes(mixed: Mixed) -> None:
    ours, *others = (node.pods[0] for node in mixed.py_nodes)
    for other in others:
        transfer_intact(other, ours)
        transfer_intact(ours, other)


def test_flanneld_py_restart_keeps_working_with_flanneld(mixed: Mixed) -> None:
    theirs = mixed.flanneld_pod()
    node = mixed.py_nodes[0]
    before = node.subnet_env().subnet
    assert mixed.lab.stop_daemon(node, signal.SIGTERM) == 0, node.log_text()[-3000:]
    mixed.lab.start_daemon(node)
    assert node.subnet_env().subnet == before
    wait_full_mesh(mixed)
    transfer_intact(theirs, node.pods[0])


def test_rolling_the_flanneld_node_over_to_flanneld_py_and_back(mixed: Mixed) -> None:
    """The migration procedure: stop flanneld, start flanneld-py on the node (same flags, same
    subnet file); its lease, subnet and the pods flannel's plugin wired there carry on. Then back."""
    pod = mixed.flanneld_pod()
    node, ours = pod.node, mixed.py_nodes[0].pods[0]
    subnet = node.subnet_env().subnet
    mixed.lab.stop_daemon(node, signal.SIGTERM)  # flanneld v0.20.2 may panic in its watch on the way out
    mixed.lab.set_node_daemon(node, None)
    mixed.lab.start_daemon(node)
    assert node.subnet_env().subnet == subnet
    assert mixed.lab.leases()[lease_key(node)]["BackendType"] == BACKENDS[mixed.backend]["Type"]
    wait_full_mesh(mixed)
    transfer_intact(pod, ours)
    transfer_intact(ours, pod)

    assert mixed.lab.stop_daemon(node, signal.SIGTERM) == 0, node.log_text()[-3000:]
    if mixed.backend == "udp":  # flanneld would make flannel1 beside our persistent flannel0 and its route
        node.netns.ip("link", "del", "flannel0")
    assert mixed.flanneld is not None
    mixed.lab.set_node_daemon(node, mixed.flanneld)
    start_flanneld(mixed.lab, node)
    assert node.subnet_env().subnet == subnet
    wait_full_mesh(mixed)
    transfer_intact(pod, ours)


def test_a_flanneld_node_that_leaves_disappears_from_the_datapath(mixed: Mixed) -> None:
    """Its peer entry, its route and (vxlan) its neighbour and FDB entries go on every node."""
    leaving = mixed.flanneld_pod().node
    subnet = leaving.subnet_env().subnet
    vtep_mac = (mixed.lab.leases()[lease_key(leaving)].get("BackendData") or {}).get("VtepMAC")

    def left_on(node: Node) -> list[str]:
        routes = {r["dst"] for r in node.routes() if str(r.get("protocol")) == RTPROT_FLANNEL}
        kernel = node.netns.sh("ip", "neigh", "show", str(subnet.network_address)).stdout
        kernel += node.netns.sh("bridge", "fdb", "show").stdout
        return [what for what, there in (("peer", str(subnet) in peer_subnets(node)),
                                         ("route", str(subnet) in routes),
                                         ("neighbour/fdb", bool(vtep_mac) and vtep_mac in kernel)) if there]

    def gone_everywhere() -> bool:
        return not any(left_on(node) for node in mixed.py_nodes)

    expected = {"udp": {"peer"}, "vxlan": {"peer", "route", "neighbour/fdb"},  # DirectRouting: plain routes
                "vxlan-direct-routing": {"peer", "route"}, "host-gw": {"peer", "route"}}[mixed.backend]
    assert all(expected <= set(left_on(node)) for node in mixed.py_nodes), "nothing there to disappear"
    mixed.lab.stop_daemon(leaving, signal.SIGTERM)
    assert mixed.lab.etcd is not None
    mixed.lab.etcd.ctl("del", f"{PREFIX}/subnets/{lease_key(leaving)}")

    assert wait_until(gone_everywhere, 20), {node.name: left_on(node) for node in mixed.py_nodes}
    remaining = [pod for node in mixed.py_nodes for pod in node.pods]
    assert all(ping_matrix(remaining, count=1).values())
