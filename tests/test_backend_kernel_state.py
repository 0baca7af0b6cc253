"""The pure lease -> kernel entry mappings of each backend, and the reconciler's diff, without a kernel."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest

from flanneld_py.backend.base import BackendContext
from flanneld_py.backend.hostgw import HostGwBackend
from flanneld_py.backend.kernel import Failure
from flanneld_py.backend.kernel_state import (
    AddrSpec,
    Entry,
    FdbSpec,
    HostGwLocal,
    NeighSpec,
    Plan,
    Scope,
    VxlanLocal,
    Wanted,
    describe,
    hostgw_peer_entries,
    in_scope,
    plan,
    random_vtep_mac,
    udp_own_entries,
    vtep_address,
    vxlan_backend_data,
    vxlan_peer_entries,
)
from flanneld_py.backend.reconcile_loop import ReconcileLoop
from flanneld_py.backend.reconciler import PassResult, Reconciler
from flanneld_py.backend.vxlan import VxlanBackend
from flanneld_py.core.lease import Lease, LeaseAdded, LeaseAttrs, LeaseRemoved
from flanneld_py.core.netconfig import parse_network_config
from flanneld_py.netlink import InterfaceInfo, NetlinkError, RouteSpec

NETWORK = IPv4Network("10.244.0.0/16")
UNDERLAY = IPv4Network("198.51.100.0/24")
ETH0, FLANNEL1, CNI0 = 2, 7, 9
MAC = "aa:bb:cc:dd:ee:02"


def lease(subnet: str, public_ip: str, kind: str = "vxlan", data: object = None) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), kind, data))


def vx_lease(subnet: str = "10.244.2.0/24", public_ip: str = "198.51.100.2", mac: str = MAC) -> Lease:
    return lease(subnet, public_ip, "vxlan", {"VNI": 1, "VtepMAC": mac})


VX = VxlanLocal(device_index=FLANNEL1, underlay_index=ETH0, underlay=UNDERLAY, direct_routing=False)
VX_DIRECT = VxlanLocal(device_index=FLANNEL1, underlay_index=ETH0, underlay=UNDERLAY, direct_routing=True)
HG = HostGwLocal(underlay_index=ETH0, underlay=UNDERLAY, iface_name="eth0")


# --- vxlan ----------------------------------------------------------------------------


def test_vxlan_peer_wants_neighbour_fdb_and_onlink_route() -> None:
    wants = vxlan_peer_entries(VX, vx_lease())
    assert wants.refused is None
    assert wants.entries == {
        NeighSpec(FLANNEL1, IPv4Address("10.244.2.0"), MAC),
        FdbSpec(FLANNEL1, MAC, IPv4Address("198.51.100.2")),
        RouteSpec(IPv4Network("10.244.2.0/24"), FLANNEL1, gateway=IPv4Address("10.244.2.0"), onlink=True),
    }


def test_vxlan_peer_mac_is_normalised_to_lower_case() -> None:
    wants = vxlan_peer_entries(VX, vx_lease(mac="AA:BB:CC:DD:EE:02"))
    assert NeighSpec(FLANNEL1, IPv4Address("10.244.2.0"), MAC) in wants.entries


def test_vxlan_direct_routing_uses_a_plain_route_on_the_same_subnet() -> None:
    wants = vxlan_peer_entries(VX_DIRECT, vx_lease())
    assert wants.entries == {RouteSpec(IPv4Network("10.244.2.0/24"), ETH0, gateway=IPv4Address("198.51.100.2"))}


def test_vxlan_direct_routing_still_encapsulates_to_other_subnets() -> None:
    wants = vxlan_peer_entries(VX_DIRECT, vx_lease(public_ip="203.0.113.9"))
    assert wants.entries == vxlan_peer_entries(VX, vx_lease(public_ip="203.0.113.9")).entries
    assert FdbSpec(FLANNEL1, MAC, IPv4Address("203.0.113.9")) in wants.entries


@pytest.mark.parametrize("data", [None, {}, {"VNI": 1}, {"VNI": 1, "VtepMAC": "not-a-mac"}, "aa:bb"])
def test_vxlan_peer_without_a_valid_vtep_mac_is_refused(data: object) -> None:
    wants = vxlan_peer_entries(VX, lease("10.244.2.0/24", "198.51.100.2", "vxlan", data))
    assert not wants.entries
    assert wants.refused is not None and "VtepMAC" in wants.refused


def test_vxlan_own_address_is_the_subnet_address_slash_32() -> None:
    assert {vtep_address(FLANNEL1, IPv4Network("10.244.1.0/24"))} == {
        AddrSpec(FLANNEL1, IPv4Interface("10.244.1.0/32"))
    }


def test_vxlan_lease_json_is_flannels() -> None:
    attrs = LeaseAttrs(IPv4Address("198.51.100.1"), "vxlan", vxlan_backend_data(1, "aa:bb:cc:dd:ee:ff"))
    assert attrs.to_json() == (
        b'{"PublicIP":"198.51.100.1","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
    )
    # and flannel's record parses back into entries
    peer = Lease(IPv4Network("10.244.2.0/24"), LeaseAttrs.from_json(attrs.to_json()))
    assert vxlan_peer_entries(VX, peer).refused is None


def test_random_vtep_mac_is_locally_administered_unicast() -> None:
    rng = random.Random(1)
    macs = {random_vtep_mac(rng) for _ in range(50)}
    assert len(macs) == 50
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01
    assert random_vtep_mac(random.Random(3)) == random_vtep_mac(random.Random(3))


# --- host-gw --------------------------------------------------------------------------------


def test_hostgw_peer_on_segment_gets_a_route_via_its_public_ip() -> None:
    wants = hostgw_peer_entries(HG, lease("10.244.3.0/24", "198.51.100.3", "host-gw"))
    assert wants.entries == {RouteSpec(IPv4Network("10.244.3.0/24"), ETH0, gateway=IPv4Address("198.51.100.3"))}
    assert "198.51.100.3" in wants.summary


def test_hostgw_peer_off_segment_is_refused_with_a_reason() -> None:
    wants = hostgw_peer_entries(HG, lease("10.244.3.0/24", "203.0.113.3", "host-gw"))
    assert not wants.entries
    assert wants.refused is not None
    assert "203.0.113.3" in wants.refused and "198.51.100.0/24" in wants.refused


# --- udp -------------------------------------------------------------------------------------


def test_udp_own_state_is_address_and_network_route_on_flannel0() -> None:
    wanted = udp_own_entries(NETWORK, IPv4Network("10.244.5.0/24"), 11)
    assert wanted.entries == {AddrSpec(11, IPv4Interface("10.244.5.0/32")), RouteSpec(NETWORK, 11)}
    assert wanted.scope == Scope(NETWORK, frozenset({11}), frozenset({11}))


NETWORK6 = IPv6Network("fd00:10:244::/56")


def test_udp_own_state_has_the_ipv6_network_route_with_an_ipv6_subnet() -> None:
    wanted = udp_own_entries(NETWORK, IPv4Network("10.244.5.0/24"), 11, NETWORK6)
    assert wanted.entries == {AddrSpec(11, IPv4Interface("10.244.5.0/32")), RouteSpec(NETWORK, 11),
                              RouteSpec(NETWORK6, 11)}
    assert wanted.scope == Scope(NETWORK, frozenset({11}), frozenset({11}), network6=NETWORK6)
    ipv6_only = udp_own_entries(None, None, 11, NETWORK6)
    assert ipv6_only.entries == {RouteSpec(NETWORK6, 11)}
    assert ipv6_only.scope == Scope(None, frozenset({11}), frozenset({11}), network6=NETWORK6)


@pytest.mark.parametrize("network", [NETWORK, None])
def test_udp_keeper_restores_the_ipv6_network_route_deleted_by_hand(network: IPv4Network | None) -> None:
    wanted = udp_own_entries(network, IPv4Network("10.244.5.0/24") if network else None, 11, NETWORK6)
    kernel = FakeKernel(set(wanted.entries))
    route6 = RouteSpec(NETWORK6, 11)
    kernel.entries.discard(route6)
    result = Reconciler(kernel, lambda: wanted).run_pass()
    assert result.added == (route6,) and result.removed == ()
    assert kernel.entries == wanted.entries


# --- scope and diff ----------------------------------------------------------------------------

VX_SCOPE = Scope(NETWORK, frozenset({FLANNEL1, ETH0}), frozenset({FLANNEL1}))


def peer_set(*leases: Lease) -> frozenset[Entry]:
    out: set[Entry] = set()
    for item in leases:
        out |= vxlan_peer_entries(VX, item).entries
    return frozenset(out)


def test_scope_covers_only_our_devices_and_the_network() -> None:
    assert in_scope(VX_SCOPE, RouteSpec(IPv4Network("10.244.2.0/24"), FLANNEL1))
    assert not in_scope(VX_SCOPE, RouteSpec(IPv4Network("10.244.2.0/24"), CNI0))  # the CNI bridge's
    assert not in_scope(VX_SCOPE, RouteSpec(IPv4Network("0.0.0.0/0"), ETH0))  # outside the Network
    assert in_scope(VX_SCOPE, NeighSpec(FLANNEL1, IPv4Address("10.244.2.0"), MAC))
    assert not in_scope(VX_SCOPE, NeighSpec(ETH0, IPv4Address("198.51.100.9"), MAC))
    assert not in_scope(VX_SCOPE, AddrSpec(ETH0, IPv4Interface("198.51.100.1/24")))


def test_plan_adds_missing_entries_fdb_and_neighbour_before_the_route() -> None:
    wanted = Wanted(VX_SCOPE, peer_set(vx_lease()))
    result = plan(wanted, [])
    assert result.remove == ()
    assert [type(e) for e in result.add] == [FdbSpec, NeighSpec, RouteSpec]


def test_plan_is_empty_when_the_kernel_matches() -> None:
    entries = peer_set(vx_lease(), vx_lease("10.244.3.0/24", "198.51.100.3", "aa:bb:cc:dd:ee:03"))
    assert not plan(Wanted(VX_SCOPE, entries), entries)


def test_plan_removes_unwanted_owned_entries_route_first() -> None:
    gone = peer_set(vx_lease("10.244.3.0/24", "198.51.100.3", "aa:bb:cc:dd:ee:03"))
    foreign = [RouteSpec(IPv4Network("10.244.9.0/24"), CNI0), NeighSpec(ETH0, IPv4Address("198.51.100.9"), MAC)]
    result = plan(Wanted(VX_SCOPE, frozenset()), [*gone, *foreign])
    assert set(result.remove) == gone
    assert [type(e) for e in result.remove] == [RouteSpec, NeighSpec, FdbSpec]
    assert result.add == ()


def test_plan_replaces_a_changed_route_and_neighbour_and_moves_the_fdb_entry() -> None:
    old = peer_set(vx_lease(mac="aa:bb:cc:dd:ee:99", public_ip="198.51.100.20"))
    new = peer_set(vx_lease())
    result = plan(Wanted(VX_SCOPE, new), old)
    # neighbour and route are replaced in place (same key), the stale FDB entry is removed
    assert result.remove == (FdbSpec(FLANNEL1, "aa:bb:cc:dd:ee:99", IPv4Address("198.51.100.20")),)
    assert set(result.add) == {
        NeighSpec(FLANNEL1, IPv4Address("10.244.2.0"), MAC),
        FdbSpec(FLANNEL1, MAC, IPv4Address("198.51.100.2")),
    }  # the route itself did not change


def test_plan_without_prune_never_removes() -> None:
    stale = peer_set(vx_lease("10.244.3.0/24", "198.51.100.3"))
    result = plan(Wanted(VX_SCOPE, peer_set(vx_lease())), stale, prune=False)
    assert result.remove == ()
    assert len(result.add) == 3


def test_describe_names_devices() -> None:
    route = RouteSpec(IPv4Network("10.244.2.0/24"), FLANNEL1, IPv4Address("10.244.2.0"), onlink=True)
    assert describe(route, {FLANNEL1: "flannel.1"}) == "route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink"
    assert describe(FdbSpec(FLANNEL1, MAC, IPv4Address("198.51.100.2"))) == f"fdb {MAC} dst 198.51.100.2 dev #7"


# --- the reconciler over an in-memory kernel ------------------------------------------------------


class FakeKernel:
    """An in-memory kernel: entries keyed like the real one, with injectable failures."""

    def __init__(self, entries: set[Entry] | None = None) -> None:
        self.entries: set[Entry] = set(entries or ())
        self.fail: dict[Entry, int] = {}
        self.calls: list[tuple[str, Entry]] = []

    def dump(self, scope: Scope) -> list[Entry]:
        return [e for e in self.entries if in_scope(scope, e)]

    def add(self, entry: Entry) -> None:
        self.calls.append(("add", entry))
        if entry in self.fail:
            raise NetlinkError(self.fail[entry])
        if isinstance(entry, RouteSpec):  # a route replaces the one with the same destination
            self.entries = {e for e in self.entries if not (isinstance(e, RouteSpec) and e.dst == entry.dst)}
        if isinstance(entry, NeighSpec):
            self.entries = {e for e in self.entries
                            if not (isinstance(e, NeighSpec) and (e.ifindex, e.ip) == (entry.ifindex, entry.ip))}
        self.entries.add(entry)

    def remove(self, entry: Entry) -> None:
        self.calls.append(("remove", entry))
        if entry in self.fail:
            raise NetlinkError(self.fail[entry])
        self.entries.discard(entry)

    def change(self, changes: Plan) -> list[Failure]:
        failed: list[Failure] = []
        for action, entries in ((self.remove, changes.remove), (self.add, changes.add)):
            for entry in entries:
                try:
                    action(entry)
                except NetlinkError as exc:
                    failed.append((entry, str(exc)))
        return failed


def test_reconciler_converges_and_then_does_nothing() -> None:
    wanted = Wanted(VX_SCOPE, peer_set(vx_lease()))
    kernel = FakeKernel({RouteSpec(IPv4Network("10.244.9.0/24"), CNI0)})
    reconciler = Reconciler(kernel, lambda: wanted)
    first = reconciler.run_pass()
    assert set(first.added) == wanted.entries and first.removed == ()
    assert kernel.entries == wanted.entries | {RouteSpec(IPv4Network("10.244.9.0/24"), CNI0)}
    kernel.calls.clear()
    assert reconciler.run_pass() == type(first)()
    assert kernel.calls == []


def test_reconciler_repairs_an_entry_deleted_by_hand() -> None:
    wanted = Wanted(VX_SCOPE, peer_set(vx_lease()))
    kernel = FakeKernel(set(wanted.entries))
    neigh = next(e for e in wanted.entries if isinstance(e, NeighSpec))
    kernel.entries.discard(neigh)
    result = Reconciler(kernel, lambda: wanted).run_pass()
    assert result.added == (neigh,)
    assert kernel.entries == wanted.entries


def test_reconciler_keeps_going_past_a_failing_entry() -> None:
    good = lease("10.244.2.0/24", "198.51.100.2", "host-gw")
    bad = lease("10.244.3.0/24", "198.51.100.3", "host-gw")
    entries = hostgw_peer_entries(HG, good).entries | hostgw_peer_entries(HG, bad).entries
    kernel = FakeKernel()
    (bad_route,) = hostgw_peer_entries(HG, bad).entries
    kernel.fail[bad_route] = errno.ENETUNREACH
    result = Reconciler(kernel, lambda: Wanted(Scope(NETWORK, frozenset({ETH0})), entries)).run_pass()
    assert [e for e, _ in result.failed] == [bad_route]
    assert kernel.entries == hostgw_peer_entries(HG, good).entries


def test_reconciler_close_removes_what_we_own_and_stops_later_passes() -> None:
    wanted = Wanted(VX_SCOPE, peer_set(vx_lease()) | {vtep_address(FLANNEL1, IPv4Network("10.244.1.0/24"))})
    foreign = RouteSpec(IPv4Network("10.244.1.0/24"), CNI0)
    kernel = FakeKernel({foreign})
    reconciler = Reconciler(kernel, lambda: wanted)
    reconciler.run_pass()
    closed = reconciler.close(VX_SCOPE)
    assert set(closed.removed) == wanted.entries
    assert kernel.entries == {foreign}
    assert reconciler.run_pass().added == ()
    assert kernel.entries == {foreign}


def test_reconcile_loop_repairs_drift_on_its_timer_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    wanted = udp_own_entries(NETWORK, IPv4Network("10.244.5.0/24"), 11)
    kernel = FakeKernel(set(wanted.entries))
    route = RouteSpec(NETWORK, 11)

    async def scenario() -> None:
        loop = ReconcileLoop(Reconciler(kernel, lambda: wanted), "udp", names=lambda: {11: "flannel0"},
                             interval=0.02)
        loop.start()
        kernel.entries.discard(route)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "drift repaired" in caplog.text:
                break
        await loop.stop()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert route in kernel.entries
    assert "drift repaired: restored route 10.244.0.0/16 dev flannel0" in caplog.text


# --- the shared peer handling, through host-gw ------------------------------------------------------


def hostgw_backend(kernel: FakeKernel) -> HostGwBackend:
    config = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    iface = InterfaceInfo("eth0", ETH0, IPv4Address("198.51.100.1"), 24, 1500)
    ctx = BackendContext(config, iface, IPv4Address("198.51.100.1"), netlink=None)  # type: ignore[arg-type]
    return HostGwBackend(ctx, kernel=kernel, interval=3600)


def route_to(subnet: str, via: str) -> RouteSpec:
    return RouteSpec(IPv4Network(subnet), ETH0, gateway=IPv4Address(via))


def test_routed_backend_adds_ignores_refuses_and_removes_peers(caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel()
    backend = hostgw_backend(kernel)
    a = lease("10.244.2.0/24", "198.51.100.2", "host-gw")
    other_type = lease("10.244.3.0/24", "198.51.100.3", "vxlan", {"VNI": 1, "VtepMAC": MAC})
    off_segment = lease("10.244.4.0/24", "203.0.113.4", "host-gw")

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        await backend.apply([LeaseAdded(a), LeaseAdded(other_type), LeaseAdded(off_segment)])
        assert kernel.entries == {route_to("10.244.2.0/24", "198.51.100.2")}
        assert [p.subnet for p in backend.peers()] == [a.subnet]
        moved = lease("10.244.2.0/24", "198.51.100.22", "host-gw")
        await backend.apply([LeaseAdded(moved)])
        assert kernel.entries == {route_to("10.244.2.0/24", "198.51.100.22")}
        await backend.apply([LeaseRemoved(moved)])
        assert kernel.entries == set()
        await backend.stop(cleanup=False)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "peer added: 10.244.2.0/24 via 198.51.100.2 dev eth0" in caplog.text
    assert "peer updated: 10.244.2.0/24 via 198.51.100.22" in caplog.text
    assert "uses backend 'vxlan', not host-gw; ignoring it" in caplog.text
    assert "peer 10.244.4.0/24 (203.0.113.4) refused" in caplog.text
    assert "peer removed: 10.244.2.0/24" in caplog.text


def test_routed_backend_keeps_live_routes_until_it_knows_the_peers() -> None:
    """After a restart, routes from the previous run stay until the first lease listing."""
    live, stale = route_to("10.244.2.0/24", "198.51.100.2"), route_to("10.244.3.0/24", "198.51.100.3")
    kernel = FakeKernel({live, stale})
    backend = hostgw_backend(kernel)

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        assert kernel.entries == {live, stale}
        await backend.apply([LeaseAdded(lease("10.244.2.0/24", "198.51.100.2", "host-gw"))])
        assert kernel.entries == {live}
        await backend.stop(cleanup=False)

    asyncio.run(scenario())


@pytest.mark.parametrize("cleanup", [True, False])
def test_routed_backend_stop_removes_routes_only_with_cleanup(cleanup: bool) -> None:
    foreign = RouteSpec(IPv4Network("10.244.1.0/24"), CNI0)
    kernel = FakeKernel({foreign})
    backend = hostgw_backend(kernel)

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        await backend.apply([LeaseAdded(lease("10.244.2.0/24", "198.51.100.2", "host-gw"))])
        assert backend.is_up()
        await backend.stop(cleanup=cleanup)
        assert not backend.is_up()

    asyncio.run(scenario())
    expected = {foreign} if cleanup else {foreign, route_to("10.244.2.0/24", "198.51.100.2")}
    assert kernel.entries == expected


def test_reconcile_loop_retries_a_refused_entry_soon_not_at_the_next_timed_pass() -> None:
    wanted = udp_own_entries(NETWORK, IPv4Network("10.244.5.0/24"), 11)
    route = RouteSpec(NETWORK, 11)
    kernel = FakeKernel(set(wanted.entries) - {route})
    kernel.fail[route] = errno.ENOBUFS

    async def scenario() -> bool:
        loop = ReconcileLoop(Reconciler(kernel, lambda: wanted), "udp", interval=3600)
        loop.start()
        await loop.apply_plan(lambda: Plan((), (route,)), "peers")
        assert route not in kernel.entries
        del kernel.fail[route]  # the kernel takes it now
        for _ in range(500):
            if route in kernel.entries:
                break
            await asyncio.sleep(0.01)
        await loop.stop()
        return route in kernel.entries

    assert asyncio.run(scenario())


def vx_backend(kernel: FakeKernel) -> VxlanBackend:
    config = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    iface = InterfaceInfo("eth0", ETH0, IPv4Address("198.51.100.1"), 24, 1500)
    ctx = BackendContext(config, iface, IPv4Address("198.51.100.1"), netlink=None)  # type: ignore[arg-type]
    backend = VxlanBackend(ctx, kernel=kernel, interval=3600)
    backend._macs[backend.device_name] = "aa:bb:cc:dd:ee:01"
    backend._setup = lambda own_subnet: backend._set_device(backend.device_name, FLANNEL1)  # type: ignore[method-assign]
    backend._ensure = lambda: None  # type: ignore[method-assign]
    return backend


def test_a_lease_event_changes_only_its_own_entries_and_shared_ones_stay() -> None:
    kernel = FakeKernel()
    backend = vx_backend(kernel)
    many = [vx_lease(f"10.244.{i}.0/24", f"198.51.100.{i}", f"aa:bb:cc:00:00:{i:02x}") for i in range(10, 60)]
    twin_a = vx_lease("10.244.100.0/24", "198.51.100.99", MAC)  # one node, two leases: one FDB entry
    twin_b = vx_lease("10.244.101.0/24", "198.51.100.99", MAC)

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        await backend.apply([LeaseAdded(lease) for lease in many])
        kernel.calls.clear()
        await backend.apply([LeaseAdded(twin_a), LeaseAdded(twin_b)])
        assert len(kernel.calls) == 5 and all(kind == "add" for kind, _ in kernel.calls)  # 1 FDB, 2 neigh, 2 routes
        kernel.calls.clear()
        await backend.apply([LeaseRemoved(twin_a)])
        assert {type(e) for _, e in kernel.calls} == {NeighSpec, RouteSpec}  # the FDB entry is still wanted
        assert FdbSpec(FLANNEL1, MAC, IPv4Address("198.51.100.99")) in kernel.entries
        kernel.calls.clear()
        await backend.apply([LeaseRemoved(twin_b)])
        assert FdbSpec(FLANNEL1, MAC, IPv4Address("198.51.100.99")) not in kernel.entries
        assert len(kernel.calls) == 3
        assert kernel.entries == backend._wanted().entries
        await backend.stop(cleanup=False)

    asyncio.run(scenario())


def test_a_quiet_full_pass_lists_the_kernel_but_plans_and_changes_nothing() -> None:
    wanted = Wanted(VX_SCOPE, peer_set(vx_lease()))
    kernel = FakeKernel()
    reconciler = Reconciler(kernel, lambda: wanted)
    reconciler.run_pass()
    reconciler.run_pass()  # converged: the next pass may skip planning
    kernel.calls.clear()
    assert reconciler.run_pass() == PassResult()
    assert kernel.calls == []
    kernel.entries.discard(next(iter(wanted.entries)))  # drift after a skipped pass is still seen
    assert len(reconciler.run_pass().added) == 1
    assert kernel.entries == wanted.entries


def test_a_listing_of_many_peers_logs_one_line_and_each_peer_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel()
    backend = hostgw_backend(kernel)
    many = [lease(f"10.244.{i}.0/24", f"198.51.100.{i}", "host-gw") for i in range(10, 70)]

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        await backend.apply([LeaseAdded(one) for one in many])
        await backend.stop(cleanup=False)

    with caplog.at_level(logging.INFO, logger="flanneld_py.backend.routed"):
        asyncio.run(scenario())
    assert "peers: 60 added (60 in all; each peer's line at -v)" in caplog.text
    assert "peer added" not in caplog.text
    assert len(kernel.entries) == 60


def test_a_delta_that_lands_while_a_full_pass_lists_is_not_undone_by_it() -> None:
    a, b = route_to("10.244.2.0/24", "198.51.100.2"), route_to("10.244.3.0/24", "198.51.100.3")
    scope = Scope(NETWORK, frozenset({ETH0}))
    wanted = {"now": Wanted(scope, frozenset({a}))}
    kernel = FakeKernel({a})
    reconciler = Reconciler(kernel, lambda: wanted["now"])
    listing = kernel.dump

    def lease_event() -> Plan:
        wanted["now"] = Wanted(scope, frozenset({a, b}))
        return Plan((), (b,))

    def dump_while_an_event_lands(scope: Scope) -> list[Entry]:
        reconciler.apply_plan(lease_event)  # after the pass took its wanted state, before it lists
        return listing(scope)

    kernel.dump = dump_while_an_event_lands  # type: ignore[method-assign]
    result = reconciler.run_pass()
    assert result == PassResult()  # b looked like a stray to this pass; the event's change stands
    assert kernel.entries == {a, b}
    kernel.dump = listing  # type: ignore[method-assign]
    assert reconciler.run_pass() == PassResult()
    assert kernel.entries == {a, b}


def test_a_batch_that_adds_and_removes_one_subnet_leaves_nothing_of_it() -> None:
    kernel = FakeKernel()
    backend = hostgw_backend(kernel)
    gone = lease("10.244.2.0/24", "198.51.100.2", "host-gw")
    stays = lease("10.244.3.0/24", "198.51.100.3", "host-gw")

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"))
        await backend.apply([LeaseAdded(stays)])
        await backend.apply([LeaseAdded(gone), LeaseRemoved(gone)])
        assert kernel.entries == {route_to("10.244.3.0/24", "198.51.100.3")}
        assert kernel.entries == backend._wanted().entries
        await backend.stop(cleanup=False)

    asyncio.run(scenario())


# --- IPv6: dual-stack peers -------------------------------------------------------------------

NETWORK6 = IPv6Network("fd00:10:244::/48")
UNDERLAY6 = IPv6Network("2001:db8::/64")
FLANNEL_V6 = 8
MAC6 = "aa:bb:cc:dd:ee:62"
VX6 = VxlanLocal(device_index=FLANNEL_V6, underlay_index=ETH0, underlay=UNDERLAY6, direct_routing=False)
VX6_DIRECT = VxlanLocal(device_index=FLANNEL_V6, underlay_index=ETH0, underlay=UNDERLAY6, direct_routing=True)
HG6 = HostGwLocal(underlay_index=ETH0, underlay=UNDERLAY6, iface_name="eth0")


def dual_lease(subnet: str = "10.244.2.0/24", subnet6: str = "fd00:10:244:2::/64", public_ip: str = "198.51.100.2",
               public_ipv6: str | None = "2001:db8::2", kind: str = "vxlan", v6_data: object = "default") -> Lease:
    data = {"VNI": 1, "VtepMAC": MAC} if kind == "vxlan" else None
    v6 = ({"VNI": 1, "VtepMAC": MAC6} if kind == "vxlan" else None) if v6_data == "default" else v6_data
    attrs = LeaseAttrs(IPv4Address(public_ip), kind, data,
                       IPv6Address(public_ipv6) if public_ipv6 else None, v6)
    return Lease(IPv4Network(subnet), attrs, IPv6Network(subnet6))


def test_vxlan_dual_stack_peer_wants_both_families_on_their_own_devices() -> None:
    wants = vxlan_peer_entries(VX, dual_lease(), VX6)
    assert wants.refused is None
    gateway6 = IPv6Address("fd00:10:244:2::")
    assert wants.entries == vxlan_peer_entries(VX, dual_lease()).entries | {
        NeighSpec(FLANNEL_V6, gateway6, MAC6),
        FdbSpec(FLANNEL_V6, MAC6, IPv6Address("2001:db8::2")),
        RouteSpec(IPv6Network("fd00:10:244:2::/64"), FLANNEL_V6, gateway=gateway6, onlink=True),
    }
    assert "fd00:10:244:2::/64 via 2001:db8::2" in wants.summary


def test_vxlan_ipv6_direct_routing_is_a_plain_route_via_the_public_ipv6_on_our_prefix() -> None:
    wants = vxlan_peer_entries(VX_DIRECT, dual_lease(), VX6_DIRECT)
    assert wants.entries == {
        RouteSpec(IPv4Network("10.244.2.0/24"), ETH0, gateway=IPv4Address("198.51.100.2")),
        RouteSpec(IPv6Network("fd00:10:244:2::/64"), ETH0, gateway=IPv6Address("2001:db8::2")),
    }
    off_prefix = vxlan_peer_entries(VX_DIRECT, dual_lease(public_ipv6="2001:db8:1::2"), VX6_DIRECT)
    assert FdbSpec(FLANNEL_V6, MAC6, IPv6Address("2001:db8:1::2")) in off_prefix.entries


def test_an_ipv4_only_peer_in_a_dual_stack_cluster_gets_its_ipv4_entries() -> None:
    assert vxlan_peer_entries(VX, vx_lease(), VX6) == vxlan_peer_entries(VX, vx_lease())
    assert hostgw_peer_entries(HG, lease("10.244.2.0/24", "198.51.100.2", "host-gw"), HG6).entries == {
        route_to("10.244.2.0/24", "198.51.100.2")}


@pytest.mark.parametrize(("peer", "reason"), [
    (dual_lease(public_ipv6=None), "publishes no PublicIPv6"),
    (dual_lease(v6_data={"VNI": 1}), "IPv6: its BackendV6Data"),
    (dual_lease(v6_data=None), "IPv6: its BackendV6Data"),
])
def test_a_dual_stack_vxlan_peer_without_usable_ipv6_records_is_refused(peer: Lease, reason: str) -> None:
    wants = vxlan_peer_entries(VX, peer, VX6)
    assert not wants.entries and wants.refused is not None and reason in wants.refused


def test_hostgw_ipv6_route_via_public_ipv6_and_off_prefix_peers_refused() -> None:
    wants = hostgw_peer_entries(HG, dual_lease(kind="host-gw"), HG6)
    assert wants.entries == {route_to("10.244.2.0/24", "198.51.100.2"),
                             RouteSpec(IPv6Network("fd00:10:244:2::/64"), ETH0, gateway=IPv6Address("2001:db8::2"))}
    refused = hostgw_peer_entries(HG, dual_lease(kind="host-gw", public_ipv6="2001:db8:9::2"), HG6).refused
    assert refused is not None and "PublicIPv6 2001:db8:9::2 is not on eth0's segment 2001:db8::/64" in refused


def test_vtep_address_is_the_ipv6_subnet_address_slash_128() -> None:
    assert vtep_address(FLANNEL_V6, IPv6Network("fd00:10:244:1::/64")) == AddrSpec(
        FLANNEL_V6, IPv6Interface("fd00:10:244:1::/128"))


def test_ipv6_routes_are_ours_only_inside_the_ipv6_network_of_a_scope_that_has_one() -> None:
    inside = RouteSpec(IPv6Network("fd00:10:244:9::/64"), FLANNEL_V6, IPv6Address("fd00:10:244:9::"), True)
    outside = RouteSpec(IPv6Network("fd00:99::/64"), FLANNEL_V6, IPv6Address("fd00:99::"), True)
    scope = Scope(NETWORK, frozenset({FLANNEL1, FLANNEL_V6}), frozenset({FLANNEL1, FLANNEL_V6}), NETWORK6)
    assert in_scope(scope, inside) and not in_scope(scope, outside)
    assert not in_scope(Scope(NETWORK, frozenset({FLANNEL1, FLANNEL_V6})), inside)
    assert plan(Wanted(scope, frozenset()), [inside, outside]).remove == (inside,)


def vx_dual_backend(kernel: FakeKernel, direct: bool = False) -> VxlanBackend:
    config = parse_network_config(
        '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48",'
        f' "Backend": {{"Type": "vxlan", "DirectRouting": {str(direct).lower()}}}}}')
    iface = InterfaceInfo("eth0", ETH0, IPv4Address("198.51.100.1"), 24, 1500)
    ctx = BackendContext(config, iface, IPv4Address("198.51.100.1"), netlink=None,  # type: ignore[arg-type]
                         public_ipv6=IPv6Address("2001:db8::1"), ipv6_prefix=UNDERLAY6)
    backend = VxlanBackend(ctx, kernel=kernel, interval=3600)
    backend._macs = {backend.device_name: "aa:bb:cc:dd:ee:01", backend.device6_name: "aa:bb:cc:dd:ee:61"}

    def setup(own_subnet: IPv4Network) -> None:
        backend._set_device(backend.device_name, FLANNEL1)
        backend._set_device(backend.device6_name, FLANNEL_V6)

    backend._setup = setup  # type: ignore[method-assign]
    backend._ensure = lambda: None  # type: ignore[method-assign]
    return backend


def test_dual_stack_vxlan_publishes_flannels_v6_records_and_converges_both_families() -> None:
    kernel = FakeKernel()
    backend = vx_dual_backend(kernel)
    assert backend.backend_v6_data() == {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:61"}
    assert backend.mtu == 1450
    peer = dual_lease()
    own6 = AddrSpec(FLANNEL_V6, IPv6Interface("fd00:10:244:1::/128"))

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))
        await backend.apply([LeaseAdded(peer)])
        assert kernel.entries == vxlan_peer_entries(VX, peer, VX6).entries | {
            own6, AddrSpec(FLANNEL1, IPv4Interface("10.244.1.0/32"))}
        route6 = RouteSpec(IPv6Network("fd00:10:244:2::/64"), FLANNEL_V6, IPv6Address("fd00:10:244:2::"), True)
        kernel.entries.discard(route6)  # drift: an IPv6 route deleted by hand
        stale6 = RouteSpec(IPv6Network("fd00:10:244:7::/64"), FLANNEL_V6, IPv6Address("fd00:10:244:7::"), True)
        kernel.entries.add(stale6)  # and one of a peer long gone
        assert backend._loop is not None
        await backend._loop.sync("test")
        assert route6 in kernel.entries and stale6 not in kernel.entries
        await backend.apply([LeaseRemoved(peer)])
        assert kernel.entries == {own6, AddrSpec(FLANNEL1, IPv4Interface("10.244.1.0/32"))}
        await backend.stop(cleanup=False)

    asyncio.run(scenario())


def test_an_ipv6_only_host_gw_node_owns_and_wants_ipv6_routes_only() -> None:
    config = parse_network_config(
        '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "host-gw"}}')
    iface = InterfaceInfo("eth0", ETH0, IPv4Address("198.51.100.1"), 24, 1500)
    ctx = BackendContext(config, iface, IPv4Address("198.51.100.1"), netlink=None,  # type: ignore[arg-type]
                         public_ipv6=IPv6Address("2001:db8::1"), ipv6_prefix=UNDERLAY6)
    foreign4 = route_to("10.244.9.0/24", "198.51.100.9")  # a proto-252 IPv4 route: not ours on an IPv6-only node
    kernel = FakeKernel({foreign4})
    backend = HostGwBackend(ctx, kernel=kernel, interval=3600)
    peer = Lease(IPv4Network("0.0.0.0/0"), LeaseAttrs(IPv4Address(0), "host-gw", None, IPv6Address("2001:db8::2")),
                 IPv6Network("fd00:10:244:2::/64"))

    async def scenario() -> None:
        await backend.start(IPv4Network("0.0.0.0/0"), IPv6Network("fd00:10:244:1::/64"))
        await backend.apply([LeaseAdded(peer)])
        assert kernel.entries == {foreign4, RouteSpec(IPv6Network("fd00:10:244:2::/64"), ETH0,
                                                      gateway=IPv6Address("2001:db8::2"))}
        await backend.apply([LeaseRemoved(peer)])
        assert kernel.entries == {foreign4}
        await backend.stop(cleanup=True)
        assert kernel.entries == {foreign4}

    asyncio.run(scenario())


def test_bursts_as_the_watch_coalesces_them_leave_the_kernel_equal_to_the_plan_also_past_failures() -> None:
    """Hundreds of adds, changes and removes per apply (a burst of lease writes arrives so), with
    entries the kernel refuses: each apply changes just the delta, and the retry pass completes it."""
    kernel = FakeKernel()
    backend = vx_backend(kernel)
    peers = [vx_lease(f"10.244.{i // 4}.{i % 4 * 64}/26", f"198.51.100.{10 + i % 200}",
                      "02:fb:00:00:" + f"{i >> 8:02x}:{i & 0xFF:02x}") for i in range(8, 308)]

    def converged() -> bool:
        return kernel.entries == backend._wanted().entries

    async def scenario() -> None:
        await backend.start(IPv4Network("10.244.0.0/26"))
        await backend.apply([])  # the (empty) listing
        refused = {e for lease in peers[:3] for e in backend._peer_entries(lease).entries if isinstance(e, RouteSpec)}
        kernel.fail = dict.fromkeys(refused, errno.ENOBUFS)
        await backend.apply([LeaseAdded(lease) for lease in peers])
        assert not refused & kernel.entries and kernel.entries | refused == backend._wanted().entries
        kernel.fail.clear()
        assert backend._loop is not None
        await backend._loop.sync("retry")
        assert converged(), "the refused entries are retried, nothing else is lost"

        moved = [vx_lease(str(lease.subnet), "198.51.100.250", lease.attrs.backend_data["VtepMAC"])
                 for lease in peers[100:150]]
        burst = ([LeaseRemoved(lease) for lease in peers[:100]] + [LeaseAdded(lease) for lease in moved]
                 + [LeaseAdded(peers[0]), LeaseRemoved(peers[0])])  # one subnet back and gone within the burst
        kernel.calls.clear()
        await backend.apply(burst)
        assert converged()
        assert len(kernel.calls) == 100 * 3 + 50 * 2  # the removed peers; per moved one its FDB entry out, new one in
        await backend.apply([LeaseRemoved(lease) for lease in peers[100:]])
        assert kernel.entries == backend._wanted().entries == backend._own_entries()
        await backend.stop(cleanup=False)

    asyncio.run(scenario())
