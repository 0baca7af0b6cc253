"""The kernel entries each backend wants, as pure functions of our node and a peer lease.

No I/O here: the backends and the reconciler (:mod:`.reconciler`, over
:mod:`.kernel`) turn these records into netlink calls, and tests check the mappings without a kernel.
Routes reuse :class:`~flanneld_py.netlink.RouteSpec` (a plain dataclass);
addresses, neighbours and FDB entries are defined here. Every record holds
IPv4 or IPv6 addresses alike: a dual-stack peer simply wants more entries.

A backend's whole wish is a :class:`Wanted`: the entries it wants plus the
:class:`Scope` of entries it owns. Only entries inside the scope are ever
listed, compared or removed, so we never touch what others put in the kernel.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_interface
from typing import Any

from ..core.lease import Lease
from ..core.netconfig import subnet_inside
from ..netlink import RouteSpec

__all__ = [
    "AddrSpec",
    "Entry",
    "FdbSpec",
    "HostGwLocal",
    "NeighSpec",
    "PeerEntries",
    "Plan",
    "Scope",
    "VxlanLocal",
    "Wanted",
    "describe",
    "hostgw_peer_entries",
    "identity",
    "in_scope",
    "plan",
    "random_vtep_mac",
    "udp_own_entries",
    "vtep_address",
    "vxlan_backend_data",
    "vxlan_peer_entries",
]

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
VXLAN_V6_OVERHEAD = 70  # the same over an IPv6 underlay (outer header 40)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# --- records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddrSpec:
    """An address on one of our devices."""

    ifindex: int
    address: IPv4Interface | IPv6Interface


@dataclass(frozen=True, slots=True)
class NeighSpec:
    """A permanent neighbour (ARP or NDP) entry: ``ip`` answers at ``mac`` on device ``ifindex``."""

    ifindex: int
    ip: IPv4Address | IPv6Address
    mac: str


@dataclass(frozen=True, slots=True)
class FdbSpec:
    """A permanent VXLAN FDB entry: frames for ``mac`` are sent to the VTEP at ``dst``."""

    ifindex: int
    mac: str
    dst: IPv4Address | IPv6Address


Entry = AddrSpec | RouteSpec | NeighSpec | FdbSpec


@dataclass(frozen=True, slots=True)
class Scope:
    """Which kernel entries are ours.

    Routes: protocol 252 (the netlink layer's RTPROT_FLANNEL), a destination
    inside ``network`` (IPv4, unless IPv6-only) or ``network6`` (IPv6, with EnableIPv6),
    through one of ``route_ifindexes``. Addresses, permanent neighbours and
    FDB entries: everything on ``device_ifindexes`` (devices we created) but
    the kernel's own link-local addresses.
    """

    network: IPv4Network | None  # None: IPv6-only, no IPv4 route is ours
    route_ifindexes: frozenset[int]
    device_ifindexes: frozenset[int] = frozenset()
    network6: IPv6Network | None = None


@dataclass(frozen=True, slots=True)
class Wanted:
    """Every entry a backend wants, within the scope of what it owns."""

    scope: Scope
    entries: frozenset[Entry]


@dataclass(frozen=True, slots=True)
class PeerEntries:
    """What one peer lease asks of the kernel; ``refused`` says why it asks for nothing."""

    entries: frozenset[Entry] = frozenset()
    refused: str | None = None
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    """Removals first (in this order), then additions (in this order)."""

    remove: tuple[Entry, ...]
    add: tuple[Entry, ...]

    def __bool__(self) -> bool:
        return bool(self.remove or self.add)


@dataclass(frozen=True, slots=True)
class VxlanLocal:
    """Our side of one family's vxlan datapath (``flannel.N`` or ``flannel-v6.N``), as the peer mapping needs it."""

    device_index: int
    underlay_index: int
    underlay: IPv4Network | IPv6Network  # the underlay interface's prefix of this family (for DirectRouting)
    direct_routing: bool


@dataclass(frozen=True, slots=True)
class HostGwLocal:
    """Our side of host-gw for one family: the underlay and its segment."""

    underlay_index: int
    underlay: IPv4Network | IPv6Network  # the segment of this family's next hops
    iface_name: str


# --- mappings ----------------------------------------------------------------


def vxlan_backend_data(vni: int, mac: str) -> dict[str, Any]:
    """flannel's vxlan ``BackendData``, field order included: ``{"VNI":1,"VtepMAC":"..."}``."""
    return {"VNI": vni, "VtepMAC": mac}


def random_vtep_mac(rng: random.Random) -> str:
    """A random locally administered unicast MAC (what flannel generates for a new VTEP)."""
    octets = [rng.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _peer_vtep_mac(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    mac = data.get("VtepMAC")
    if not isinstance(mac, str) or not _MAC_RE.match(mac.lower()):
        return None
    return mac.lower()


def _vxlan_family(local: VxlanLocal, subnet: IPv4Network | IPv6Network, public: IPv4Address | IPv6Address,
                  data: Any, field: str) -> PeerEntries:
    """One family of flannel's vxlan peer handling.

    DirectRouting and a peer on our underlay prefix: one plain route via its
    public address. Otherwise: neighbour (peer subnet address -> VtepMAC), FDB
    (VtepMAC -> public address), and ``<subnet> via <subnet address> dev <vtep> onlink``.
    """
    if local.direct_routing and public in local.underlay:
        route = RouteSpec(subnet, local.underlay_index, gateway=public)
        return PeerEntries(frozenset({route}), summary=f"{_named(subnet)}via {public} (direct route)")
    mac = _peer_vtep_mac(data)
    if mac is None:
        return PeerEntries(refused=f"its {field} {data!r} has no valid VtepMAC")
    gateway = subnet.network_address
    entries: frozenset[Entry] = frozenset({
        NeighSpec(local.device_index, gateway, mac),
        FdbSpec(local.device_index, mac, public),
        RouteSpec(subnet, local.device_index, gateway=gateway, onlink=True),
    })
    return PeerEntries(entries, summary=f"{_named(subnet)}via {public} (VTEP {mac})")


def _named(subnet: IPv4Network | IPv6Network) -> str:
    """The IPv6 part of a peer's log line names its subnet (the line starts with the IPv4 one)."""
    return f"{subnet} " if subnet.version == 6 else ""


def _both(v4: PeerEntries | None, v6: PeerEntries | None) -> PeerEntries:
    """One peer's two families as one: refused if either is (IPv6's reason says so)."""
    if v6 is not None and v6.refused is not None:
        return PeerEntries(refused=f"IPv6: {v6.refused}")
    parts = [p for p in (v4, v6) if p is not None]
    if len(parts) == 1:
        return parts[0]  # one family: already the answer (a start-up takes this path for every peer)
    for part in parts:
        if part.refused is not None:
            return part
    return PeerEntries(frozenset().union(*(p.entries for p in parts)), summary=", ".join(p.summary for p in parts))


def _ipv6_part(lease: Lease) -> tuple[IPv6Network, IPv6Address] | str | None:
    """The peer's IPv6 subnet and PublicIPv6; None if it has no IPv6 subnet; why not, if it lacks the address."""
    if lease.subnet6 is None:
        return None
    if lease.attrs.public_ipv6 is None:
        return f"it leases {lease.subnet6} but publishes no PublicIPv6"
    return lease.subnet6, lease.attrs.public_ipv6


def vxlan_peer_entries(local: VxlanLocal | None, lease: Lease, local6: VxlanLocal | None = None) -> PeerEntries:
    """flannel's vxlan peer handling, per family we carry (``local``: IPv4, ``local6``: IPv6).

    A peer without an IPv6 subnet (an IPv4-only node) gets its IPv4 entries only.
    """
    v4 = None if local is None else _vxlan_family(
        local, lease.subnet, lease.attrs.public_ip, lease.attrs.backend_data, "BackendData")
    v6 = None
    six = _ipv6_part(lease) if local6 is not None else None
    if isinstance(six, str):
        v6 = PeerEntries(refused=six)
    elif six is not None and local6 is not None:
        v6 = _vxlan_family(local6, six[0], six[1], lease.attrs.backend_v6_data, "BackendV6Data")
    return _both(v4, v6)


def vtep_address(device_index: int, own_subnet: IPv4Network | IPv6Network) -> AddrSpec:
    """A VTEP's address: ``<subnet address>/32`` (``/128``), so the kernel adds no subnet route."""
    return AddrSpec(device_index, ip_interface((own_subnet.network_address, own_subnet.max_prefixlen)))


def _hostgw_family(local: HostGwLocal, subnet: IPv4Network | IPv6Network,
                   public: IPv4Address | IPv6Address, field: str) -> PeerEntries:
    if public not in local.underlay:
        return PeerEntries(refused=(
            f"its {field} {public} is not on {local.iface_name}'s segment {local.underlay}; "
            "host-gw needs every node on one L2 segment (use vxlan across segments)"
        ))
    route = RouteSpec(subnet, local.underlay_index, gateway=public)
    return PeerEntries(frozenset({route}), summary=f"{_named(subnet)}via {public} dev {local.iface_name}")


def hostgw_peer_entries(local: HostGwLocal | None, lease: Lease, local6: HostGwLocal | None = None) -> PeerEntries:
    """flannel's host-gw ``GetRoute`` per family: ``<subnet> via <PublicIP(v6)> dev <iface>``, on-segment peers only."""
    v4 = None if local is None else _hostgw_family(local, lease.subnet, lease.attrs.public_ip, "PublicIP")
    v6 = None
    six = _ipv6_part(lease) if local6 is not None else None
    if isinstance(six, str):
        v6 = PeerEntries(refused=six)
    elif six is not None and local6 is not None:
        v6 = _hostgw_family(local6, six[0], six[1], "PublicIPv6")
    return _both(v4, v6)


def udp_own_entries(network: IPv4Network | None, own_subnet: IPv4Network | None, tun_index: int,
                    network6: IPv6Network | None = None) -> Wanted:
    """The udp backend's kernel state: ``<subnet>/32`` on flannel0 and ``<Network> dev flannel0``,
    and with an IPv6 subnet of ours ``<IPv6Network> dev flannel0`` (no IPv6 address); an
    IPv6-only network (``network`` None) has only the IPv6 route."""
    scope = Scope(network, frozenset({tun_index}), frozenset({tun_index}), network6=network6)
    entries: set[Entry] = set()
    if network is not None and own_subnet is not None:
        entries |= {AddrSpec(tun_index, IPv4Interface((own_subnet.network_address, 32))), RouteSpec(network, tun_index)}
    if network6 is not None:
        entries.add(RouteSpec(network6, tun_index))
    return Wanted(scope, frozenset(entries))


# --- ownership and diff --------------------------------------------------------


def in_scope(scope: Scope, entry: Entry) -> bool:
    """True if ``entry`` (as found in the kernel, or wanted) is one we own."""
    if isinstance(entry, RouteSpec):
        if entry.ifindex not in scope.route_ifindexes:
            return False
        network = scope.network if entry.dst.version == 4 else scope.network6
        return network is not None and subnet_inside(entry.dst, network)
    return entry.ifindex in scope.device_ifindexes


def identity(entry: Entry) -> tuple[object, ...]:
    """Identity in the kernel: a second entry with the same key replaces the first.

    Routes are keyed by destination (one route per subnet in the main table)
    and neighbours by (device, IP), so a changed gateway or MAC is a replace,
    not a remove plus add. FDB entries are keyed whole: one MAC could have
    several remotes, and the stale one must be removed.
    """
    if isinstance(entry, RouteSpec):
        return ("route", entry.dst)
    if isinstance(entry, NeighSpec):
        return ("neigh", entry.ifindex, entry.ip)
    if isinstance(entry, FdbSpec):
        return ("fdb", entry.ifindex, entry.mac, entry.dst)
    return ("addr", entry.ifindex, entry.address)


# flannel adds the neighbour and FDB entry before the route ("the kernel would
# ARP for the gateway otherwise") and we remove in the reverse order.


def _order(entry: Entry) -> tuple[int, int, int, str]:
    """Type first (see above), then address: a stable order, cheap to compute for thousands of entries."""
    if isinstance(entry, RouteSpec):
        return (3, int(entry.dst.network_address), entry.dst.prefixlen, "")
    if isinstance(entry, NeighSpec):
        return (2, int(entry.ip), entry.ifindex, entry.mac)
    if isinstance(entry, FdbSpec):
        return (1, int(entry.dst), entry.ifindex, entry.mac)
    return (0, int(entry.address.ip), entry.ifindex, "")


def plan(wanted: Wanted, actual: Iterable[Entry], prune: bool = True) -> Plan:
    """What to change so that the kernel holds ``wanted``.

    ``actual`` is what the kernel holds; entries outside the scope are
    ignored. With ``prune`` off, nothing is removed (used right after start,
    before the first lease listing, so a restart does not drop live peers).
    """
    have = {identity(e): e for e in actual if in_scope(wanted.scope, e)}
    want = {identity(e): e for e in wanted.entries}
    add = sorted((e for k, e in want.items() if have.get(k) != e), key=_order)
    remove = [e for k, e in have.items() if k not in want] if prune else []
    remove.sort(key=_order, reverse=True)
    return Plan(tuple(remove), tuple(add))


def describe(entry: Entry, names: Mapping[int, str] | None = None) -> str:
    """An entry the way ``ip``/``bridge`` would print it (for log lines)."""
    dev = (names or {}).get(entry.ifindex) or f"#{entry.ifindex}"
    if isinstance(entry, RouteSpec):
        text = f"route {entry.dst}"
        if entry.gateway is not None:
            text += f" via {entry.gateway}"
        text += f" dev {dev}"
        return text + (" onlink" if entry.onlink else "")
    if isinstance(entry, NeighSpec):
        return f"neigh {entry.ip} lladdr {entry.mac} dev {dev}"
    if isinstance(entry, FdbSpec):
        return f"fdb {entry.mac} dst {entry.dst} dev {dev}"
    return f"address {entry.address} dev {dev}"
