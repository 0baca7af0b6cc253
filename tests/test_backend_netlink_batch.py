"""The reconciler over the real kernel with batched netlink: mass adds, mass deletes, refused entries.

Each test gets its own namespace with an underlay ``eth0`` (a veth) and a
VXLAN device ``flannel.1``, and checks the kernel's state with ``ip`` and
``bridge`` (not with our own dump), so an entry our parser misreads cannot
hide a wrong kernel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld_py.backend.kernel import NetlinkKernel
from flanneld_py.backend.kernel_state import (
    Entry,
    FdbSpec,
    HostGwLocal,
    NeighSpec,
    Plan,
    Scope,
    VxlanLocal,
    Wanted,
    hostgw_peer_entries,
    vxlan_peer_entries,
)
from flanneld_py.backend.reconciler import PassResult, Reconciler
from flanneld_py.core.lease import Lease, LeaseAttrs
from flanneld_py.lab.netns import Netns, unique_tag
from flanneld_py.netlink import Netlink, RouteSpec

pytestmark = pytest.mark.netns

NETWORK = IPv4Network("10.244.0.0/16")
UNDERLAY = IPv4Network("198.51.100.0/24")
PEERS = 1000


class Node:
    """A namespace with eth0 and flannel.1, and our kernel access inside it."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        ns.ip("addr", "add", "198.51.100.1/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("link", "set", "eth0p", "up")
        ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "local", "198.51.100.1",
              "dstport", "8472", "nolearning")
        ns.ip("link", "set", "flannel.1", "up")
        self.netlink = Netlink(netns=ns.name)
        self.kernel = NetlinkKernel(self.netlink)
        self.eth0 = self.netlink.require_index("eth0")
        self.flannel1 = self.netlink.require_index("flannel.1")
        self.scope = Scope(NETWORK, frozenset({self.eth0, self.flannel1}), frozenset({self.flannel1}))

    def close(self) -> None:
        self.kernel.close()
        self.netlink.close()

    def vxlan_entries(self, count: int) -> frozenset[Entry]:
        local = VxlanLocal(self.flannel1, self.eth0, UNDERLAY, direct_routing=False)
        out: set[Entry] = set()
        for lease in leases(count, vxlan=True):
            out |= vxlan_peer_entries(local, lease).entries
        return frozenset(out)

    # what the kernel holds, read by iproute2
    def routes(self) -> set[tuple[str, str, str]]:
        found = json.loads(self.ns.ip("-j", "route", "show", "proto", "252").stdout or "[]")
        return {(r["dst"], r.get("gateway", ""), r["dev"]) for r in found}

    def neighbours(self) -> set[tuple[str, str]]:
        found = json.loads(self.ns.ip("-j", "neigh", "show", "dev", "flannel.1", "nud", "permanent").stdout or "[]")
        return {(n["dst"], n["lladdr"]) for n in found}

    def fdb(self) -> set[tuple[str, str]]:
        out = self.ns.sh("bridge", "-j", "fdb", "show", "dev", "flannel.1").stdout
        return {(f["mac"], f["dst"]) for f in json.loads(out or "[]") if "dst" in f}


State = tuple[set[tuple[str, str, str]], set[tuple[str, str]], set[tuple[str, str]]]


def expected(node: Node, entries: frozenset[Entry]) -> State:
    """``entries`` as iproute2 prints them: routes, permanent neighbours, FDB entries."""
    names = {node.eth0: "eth0", node.flannel1: "flannel.1"}
    routes = {(str(e.dst), str(e.gateway or ""), names[e.ifindex]) for e in entries if isinstance(e, RouteSpec)}
    neighbours = {(str(e.ip), e.mac) for e in entries if isinstance(e, NeighSpec)}
    fdb = {(e.mac, str(e.dst)) for e in entries if isinstance(e, FdbSpec)}
    return routes, neighbours, fdb


def kernel_state(node: Node) -> State:
    return node.routes(), node.neighbours(), node.fdb()


def leases(count: int, vxlan: bool, first: int = 0) -> list[Lease]:
    out = []
    for index in range(first, first + count):
        subnet = IPv4Network((int(NETWORK.network_address) + (index + 1) * 64, 26))
        mac = "02:fb:" + ":".join(f"{(index >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))
        data = {"VNI": 1, "VtepMAC": mac} if vxlan else None
        attrs = LeaseAttrs(IPv4Address(f"198.51.100.{10 + index % 200}"), "vxlan" if vxlan else "host-gw", data)
        out.append(Lease(subnet, attrs))
    return out


@pytest.fixture
def node() -> Iterator[Node]:
    ns = Netns.create(f"kbt-{unique_tag()}")
    made: Node | None = None
    try:
        made = Node(ns)
        yield made
    finally:
        if made is not None:
            made.close()
        ns.delete()


def test_mass_add_then_mass_delete_leaves_the_kernel_equal_to_the_plan(node: Node) -> None:
    wanted = Wanted(node.scope, node.vxlan_entries(PEERS))
    reconciler = Reconciler(node.kernel, lambda: wanted)
    added = reconciler.run_pass()
    assert added.failed == () and len(added.added) == 3 * PEERS
    assert kernel_state(node) == expected(node, wanted.entries)
    assert set(node.kernel.dump(node.scope)) == wanted.entries  # our dump reads back what iproute2 sees
    assert reconciler.run_pass() == PassResult()  # converged: nothing left to do

    wanted = Wanted(node.scope, frozenset())
    removed = reconciler.run_pass()
    assert removed.failed == () and len(removed.removed) == 3 * PEERS
    assert kernel_state(node) == (set(), set(), set())


def test_a_route_deleted_by_hand_comes_back_and_a_stray_of_ours_goes(node: Node) -> None:
    entries = node.vxlan_entries(200)
    wanted = Wanted(node.scope, entries)
    reconciler = Reconciler(node.kernel, lambda: wanted)
    reconciler.run_pass()
    route = next(e for e in entries if isinstance(e, RouteSpec))
    node.ns.ip("route", "del", str(route.dst), "dev", "flannel.1")
    node.ns.ip("route", "add", "10.244.250.0/24", "dev", "flannel.1", "proto", "252")  # a stray of ours
    repaired = reconciler.run_pass()
    assert repaired.added == (route,)
    assert [str(e.dst) for e in repaired.removed if isinstance(e, RouteSpec)] == ["10.244.250.0/24"]
    assert kernel_state(node) == expected(node, entries)


def test_refused_entries_are_reported_one_by_one_and_retried_until_they_take(node: Node) -> None:
    good = leases(300, vxlan=False)
    off_link = [Lease(IPv4Network(f"10.244.{200 + i}.0/24"), LeaseAttrs(IPv4Address(f"203.0.113.{i + 1}"), "host-gw", None))
                for i in range(5)]
    local = HostGwLocal(node.eth0, IPv4Network("0.0.0.0/0"), "eth0")  # accept any PublicIP: the kernel decides
    entries = frozenset(e for lease in good + off_link for e in hostgw_peer_entries(local, lease).entries)
    wanted = Wanted(node.scope, entries)
    reconciler = Reconciler(node.kernel, lambda: wanted)

    first = reconciler.run_pass()
    refused = {e for e, _ in first.failed}
    assert refused == {e for lease in off_link for e in hostgw_peer_entries(local, lease).entries}
    assert all("unreachable" in why.lower() for _, why in first.failed)
    assert len(first.added) == len(good)
    assert kernel_state(node)[0] == expected(node, entries - refused)[0]

    again = reconciler.run_pass()  # still refused, still listed: never dropped
    assert {e for e, _ in again.failed} == refused and again.added == ()

    node.ns.ip("addr", "add", "203.0.113.100/24", "dev", "eth0")  # the gateways are on-link now
    last = reconciler.run_pass()
    assert set(last.added) == refused and last.failed == ()
    assert kernel_state(node)[0] == expected(node, entries)[0]


def test_a_removal_of_what_is_already_gone_is_not_a_failure(node: Node) -> None:
    entries = node.vxlan_entries(10)
    assert node.kernel.change(Plan(tuple(entries), ())) == []
    assert node.kernel.change(Plan((), tuple(entries))) == []
    node.ns.ip("link", "del", "flannel.1")
    failed = node.kernel.change(Plan((), tuple(entries)))  # the device is gone: every add fails, each named
    assert {e for e, _ in failed} == set(entries)
