"""The reconciler over the real kernel with batched netlink: mass adds, mass deletes, refused entries.

Each test gets its own namespace with an underlay ``eth0`` (a veth) and a
VXLAN device ``flannel.1``, and checks the kernel's state with ``ip`` and
``bridge`` (not with our own dump), so an entry our parser misreads cannot
hide a wrong kernel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

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
    vtep_address,
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


NETWORK6 = IPv6Network("fd00:10:244::/48")


def dual_stack_leases(count: int) -> list[Lease]:
    """vxlan leases with both families, as flannel writes them (a VTEP MAC per family)."""
    out = []
    for index, lease in enumerate(leases(count, vxlan=True)):
        subnet6 = IPv6Network((int(NETWORK6.network_address) + ((index + 1) << 64), 64))
        mac6 = "02:f6:" + ":".join(f"{(index >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))
        attrs = replace(lease.attrs, public_ipv6=IPv6Address(f"2001:db8::{index + 10:x}"),
                        backend_v6_data={"VNI": 1, "VtepMAC": mac6})
        out.append(Lease(lease.subnet, attrs, subnet6))
    return out


def ipv6_state(node: Node) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """IPv6 routes of proto 252, flannel-v6.1's permanent neighbours, FDB entries and global addresses, by iproute2."""
    routes = {(r["dst"], r.get("gateway", ""), r["dev"])
              for r in json.loads(node.ns.ip("-6", "-j", "route", "show", "proto", "252").stdout or "[]")}
    neighbours = {(n["dst"], n["lladdr"]) for n in json.loads(
        node.ns.ip("-6", "-j", "neigh", "show", "dev", "flannel-v6.1", "nud", "permanent").stdout or "[]")}
    fdb = {(f["mac"], f["dst"]) for f in json.loads(
        node.ns.sh("bridge", "-j", "fdb", "show", "dev", "flannel-v6.1").stdout or "[]") if "dst" in f}
    addresses = {f"{a['local']}/{a['prefixlen']}" for link in json.loads(
        node.ns.ip("-6", "-j", "addr", "show", "dev", "flannel-v6.1").stdout or "[]")
        for a in link.get("addr_info", []) if a.get("scope") == "global"}
    return routes, neighbours, fdb, addresses


def test_dual_stack_entries_are_added_read_back_repaired_and_removed_in_both_families(node: Node) -> None:
    node.ns.ip("addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
    node.ns.ip("link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "dev", "eth0", "local", "2001:db8::1",
               "dstport", "8472", "nolearning")
    node.ns.ip("link", "set", "flannel-v6.1", "up")
    v6dev = node.netlink.require_index("flannel-v6.1")
    devices = frozenset({node.flannel1, v6dev})
    scope = Scope(NETWORK, devices | {node.eth0}, devices, NETWORK6)
    local = VxlanLocal(node.flannel1, node.eth0, UNDERLAY, direct_routing=False)
    local6 = VxlanLocal(v6dev, node.eth0, IPv6Network("2001:db8::/64"), direct_routing=False)
    peers = dual_stack_leases(200)
    own = {vtep_address(node.flannel1, IPv4Network("10.244.0.0/26")),
           vtep_address(v6dev, IPv6Network("fd00:10:244::/64"))}
    entries = frozenset(e for lease in peers for e in vxlan_peer_entries(local, lease, local6).entries) | own
    wanted = Wanted(scope, entries)
    reconciler = Reconciler(node.kernel, lambda: wanted)

    first = reconciler.run_pass()
    assert first.failed == () and len(first.added) == len(entries)
    v6 = frozenset(e for e in entries if e.ifindex == v6dev)
    routes, neighbours, fdb, addresses = ipv6_state(node)
    assert routes == {(str(e.dst), str(e.gateway), "flannel-v6.1") for e in v6 if isinstance(e, RouteSpec)}
    assert neighbours == {(str(e.ip), e.mac) for e in v6 if isinstance(e, NeighSpec)}
    assert fdb == {(e.mac, str(e.dst)) for e in v6 if isinstance(e, FdbSpec)}
    assert addresses == {"fd00:10:244::/128"}
    assert set(node.kernel.dump(scope)) == entries  # the kernel's fe80:: address is not listed as ours
    assert reconciler.run_pass() == PassResult()

    route = next(e for e in v6 if isinstance(e, RouteSpec))
    node.ns.ip("-6", "route", "del", str(route.dst), "dev", "flannel-v6.1")
    node.ns.ip("-6", "route", "add", "fd00:10:244:ffff::/64", "dev", "flannel-v6.1", "proto", "252")  # a stray
    repaired = reconciler.run_pass()
    assert repaired.added == (route,)
    assert [str(e.dst) for e in repaired.removed if isinstance(e, RouteSpec)] == ["fd00:10:244:ffff::/64"]

    wanted = Wanted(scope, frozenset())
    removed = reconciler.run_pass()
    assert removed.failed == () and len(removed.removed) == len(entries)
    assert ipv6_state(node) == (set(), set(), set(), set()) and kernel_state(node) == (set(), set(), set())
