"""Lease records as flannel stores them, and the pure watch reducer.

Keys, as flannel's ``MakeSubnetKey`` writes them under ``<prefix>/subnets/``:
IPv4 ``10.244.7.0-24``, dual-stack ``10.244.7.0-24&fd00:10:244:7::-64``,
IPv6-only ``0.0.0.0-0&fd00:10:244:7::-64`` (flannel's zero IPv4 subnet).
Value, in Go's field order with its ``omitempty`` rules: ``{"PublicIP": "...",
"PublicIPv6": null, "BackendType": "vxlan", "BackendData": ..., "BackendV6Data": ...}``
(``PublicIPv6`` is always there, null without IPv6; the others are left out when empty).
flannel's own UDP backend leaves ``BackendType`` out: ``{"PublicIP": "192.0.2.4", "PublicIPv6": null}``,
which flanneld takes as a udp peer, and so does this module (:data:`UNTYPED_BACKEND`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from .netconfig import NO_IPV4_SUBNET, NetworkConfig, subnet_inside

__all__ = [
    "UNTYPED_BACKEND",
    "BadRecord",
    "KeyDeleted",
    "KeyPut",
    "Lease",
    "LeaseAdded",
    "LeaseAttrs",
    "LeaseError",
    "LeaseEvent",
    "LeaseRemoved",
    "LeaseWatcher",
    "SubnetPair",
    "choose_subnet",
    "choose_subnet6",
    "format_subnet_key",
    "parse_lease_key",
    "parse_subnet_key",
]

UNTYPED_BACKEND = "udp"
"""The backend of a lease without ``BackendType``: flannel's UDP backend writes none, its vxlan and
host-gw backends always write theirs (and skip leases of any other type), so such a lease is a udp
peer in a udp network and ignored by the others, as flanneld treats it."""

_KEY_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([0-9a-fA-F:]+)-(\d+))?$")


class LeaseError(ValueError):
    """A lease key or value that is not a valid flannel record."""


SubnetPair = tuple[IPv4Network, IPv6Network | None]
"""What a lease key names: the IPv4 subnet (:data:`NO_IPV4_SUBNET` if IPv6-only) and the IPv6 one."""


def format_subnet_key(subnet: IPv4Network, subnet6: IPv6Network | None = None) -> str:
    """``10.244.7.0/24`` (and ``fd00::/64``) -> ``10.244.7.0-24&fd00::-64``, the last part of the etcd key."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    return key if subnet6 is None else f"{key}&{subnet6.network_address}-{subnet6.prefixlen}"


def parse_lease_key(name: str) -> SubnetPair:
    """The inverse of :func:`format_subnet_key`: both subnets a key names."""
    match = _KEY_RE.match(name)
    if not match:
        raise LeaseError(f"key {name!r} is not a subnet (want e.g. 10.244.7.0-24)")
    try:
        subnet = IPv4Network(f"{match.group(1)}/{match.group(2)}")
        subnet6 = None if match.group(3) is None else IPv6Network(f"{match.group(3)}/{match.group(4)}")
    except ValueError as exc:
        raise LeaseError(f"key {name!r} is not a subnet: {exc}") from None
    return subnet, subnet6


def parse_subnet_key(name: str) -> IPv4Network:
    """The IPv4 subnet a key names (:func:`parse_lease_key` gives both)."""
    return parse_lease_key(name)[0]


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node publishes about itself in its lease."""

    public_ip: IPv4Address
    backend_type: str
    backend_data: Any = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Any = None

    @property
    def node_address(self) -> IPv4Address | IPv6Address:
        """The address that tells nodes apart: PublicIP, or PublicIPv6 where PublicIP is flannel's
        0.0.0.0 of an IPv6-only node."""
        if self.public_ip.is_unspecified and self.public_ipv6 is not None:
            return self.public_ipv6
        return self.public_ip

    def to_json(self) -> bytes:
        """As Go marshals flannel's ``LeaseAttrs``: PublicIPv6 always (null if unset), the rest omitempty."""
        doc: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": None if self.public_ipv6 is None else str(self.public_ipv6),
        }
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            doc["BackendV6Data"] = self.backend_v6_data
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseAttrs:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise LeaseError("lease value is not JSON") from None
        if not isinstance(doc, dict):
            raise LeaseError("lease value is not a JSON object")
        try:
            public_ip = IPv4Address(doc.get("PublicIP"))
        except ValueError:
            raise LeaseError(f"lease PublicIP {doc.get('PublicIP')!r} is not an IPv4 address") from None
        backend_type = doc.get("BackendType") or UNTYPED_BACKEND  # absent, null or ""
        if not isinstance(backend_type, str):
            raise LeaseError(f"lease BackendType {backend_type!r} is not a string")
        raw6 = doc.get("PublicIPv6")
        try:
            public_ipv6 = None if raw6 is None else IPv6Address(raw6)
        except ValueError:
            raise LeaseError(f"lease PublicIPv6 {raw6!r} is not an IPv6 address") from None
        return cls(public_ip, backend_type, doc.get("BackendData"), public_ipv6, doc.get("BackendV6Data"))


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's lease: its IPv4 subnet (:data:`NO_IPV4_SUBNET` if IPv6-only), its IPv6 subnet if any."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    subnet6: IPv6Network | None = None

    @property
    def key(self) -> SubnetPair:
        return self.subnet, self.subnet6

    @property
    def name(self) -> str:
        return format_subnet_key(self.subnet, self.subnet6)


# Raw store events, as the registry reports them (already stripped of the prefix).
@dataclass(frozen=True, slots=True)
class KeyPut:
    """A record written (or listed): its key under ``<prefix>/subnets/`` and its value."""

    name: str
    value: bytes


@dataclass(frozen=True, slots=True)
class KeyDeleted:
    """A record deleted (or expired with its etcd lease)."""

    name: str


# Reduced events, what backends act on.
@dataclass(frozen=True, slots=True)
class LeaseAdded:
    """A peer lease to route: new, or changed (it replaces the one with the same key)."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class LeaseRemoved:
    """A peer lease gone: its routes go with it."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that was skipped (or, ``partly``, passed on in part); reported once per distinct (key, reason)."""

    name: str
    reason: str
    partly: bool = False


LeaseEvent = LeaseAdded | LeaseRemoved | BadRecord


@dataclass(slots=True)
class LeaseWatcher:
    """Turns snapshots and key events into lease events for the backends.

    Pure reducer in the style of flannel's ``LeaseWatcher``: ``reset`` takes a
    full listing (after start or compaction) and ``update`` takes watch events;
    both return the adds/removes needed to converge, skipping our own subnet
    and records that are broken or outside the network.

    One IPv6 subnet goes to one node. A key is unique, its IPv6 half alone is
    not: two nodes racing for one IPv6 subnet both write a key for a moment (the
    later one then gives it up), and a hand-written record can repeat one. The
    first lease seen with an IPv6 subnet holds it (ours always holds our own);
    a later one is passed on with its IPv4 subnet only, and gets its IPv6 subnet
    back when the holder goes. Without this, the loser's key going away would
    take the winner's IPv6 route with it.
    """

    config: NetworkConfig
    own_subnet: IPv4Network | None = None
    own_subnet6: IPv6Network | None = None
    leases: dict[SubnetPair, Lease] = field(default_factory=dict)  # by key, as passed on to the backends
    _reported: set[tuple[str, str]] = field(default_factory=set)
    _holders6: dict[IPv6Network, SubnetPair] = field(default_factory=dict)
    _waiting6: dict[IPv6Network, dict[SubnetPair, None]] = field(default_factory=dict)  # in the order seen

    def __post_init__(self) -> None:
        if self.config.ipv6 is not None and self.own_subnet6 is not None:
            self._holders6[self.own_subnet6] = (self.own_subnet or NO_IPV4_SUBNET, self.own_subnet6)

    def reset(self, snapshot: Iterable[KeyPut]) -> list[LeaseEvent]:
        wanted: dict[SubnetPair, Lease] = {}
        out: list[LeaseEvent] = []
        for put in snapshot:
            lease = self._decode(put, out)
            if lease is not None:
                wanted[lease.key] = lease
        for key in [key for key in self.leases if key not in wanted]:
            self._drop(key, out)
        for lease in wanted.values():
            self._put(lease, out)
        return out

    def update(self, events: Iterable[KeyPut | KeyDeleted]) -> list[LeaseEvent]:
        out: list[LeaseEvent] = []
        for event in events:
            lease = self._decode(event, out) if isinstance(event, KeyPut) else None
            if lease is not None:
                self._put(lease, out)
            else:
                self._drop_key(event.name, out)
        return out

    def _put(self, lease: Lease, out: list[LeaseEvent]) -> None:
        passed = self._routable(lease, out)
        if self.leases.get(lease.key) != passed:
            self.leases[lease.key] = passed
            out.append(LeaseAdded(passed))

    def _routable(self, lease: Lease, out: list[LeaseEvent]) -> Lease:
        """``lease``, or ``lease`` without its IPv6 subnet while another lease holds that."""
        six = lease.subnet6
        if six is None or self.config.ipv6 is None or not self.config.enable_ipv4:
            return lease  # IPv6-only: the key is the IPv6 subnet (flannel's zero IPv4 half), unique as it is
        holder = self._holders6.setdefault(six, lease.key)
        if holder == lease.key:
            return lease
        self._waiting6.setdefault(six, {})[lease.key] = None
        ours = " (this node's)" if six == self.own_subnet6 else ""
        self._report(lease.name, f"its IPv6 subnet {six} is leased by {format_subnet_key(*holder)}{ours} too, "
                                 "so only its IPv4 subnet is routed until one of the two goes", out, partly=True)
        return Lease(lease.subnet, lease.attrs)

    def _drop_key(self, name: str, out: list[LeaseEvent]) -> None:
        try:
            key = parse_lease_key(name)
        except LeaseError:
            return
        self._drop(key, out)

    def _drop(self, key: SubnetPair, out: list[LeaseEvent]) -> None:
        old = self.leases.pop(key, None)
        if old is None:
            return
        out.append(LeaseRemoved(old))
        six = key[1]
        if six is None:
            return
        waiting = self._waiting6.get(six, {})
        waiting.pop(key, None)
        if self._holders6.get(six) == key:
            del self._holders6[six]
            if waiting:  # the next lease seen with it gets its IPv6 subnet back
                heir = next(iter(waiting))
                del waiting[heir]
                out.append(LeaseRemoved(self.leases[heir]))
                self._holders6[six] = heir
                self.leases[heir] = Lease(heir[0], self.leases[heir].attrs, six)
                out.append(LeaseAdded(self.leases[heir]))
        if not waiting:
            self._waiting6.pop(six, None)

    def _decode(self, put: KeyPut, out: list[LeaseEvent]) -> Lease | None:
        try:
            subnet, subnet6 = parse_lease_key(put.name)
            attrs = LeaseAttrs.from_json(put.value)
        except LeaseError as exc:
            self._report(put.name, str(exc), out)
            return None
        if self._is_own(subnet, subnet6):
            return None
        problem = self._misfit(subnet, subnet6)
        if problem:
            self._report(put.name, problem, out)
            return None
        return Lease(subnet, attrs, subnet6)

    def _is_own(self, subnet: IPv4Network, subnet6: IPv6Network | None) -> bool:
        if self.config.enable_ipv4:
            return subnet == self.own_subnet
        return subnet6 is not None and subnet6 == self.own_subnet6

    def _misfit(self, subnet: IPv4Network, subnet6: IPv6Network | None) -> str:
        """Why a record does not fit the config ("" if it does). A dual-stack network takes
        IPv4-only peers (they get no IPv6 routes), as flannel does."""
        config = self.config
        if config.enable_ipv4 and (subnet.prefixlen != config.subnet_len or not subnet_inside(subnet, config.network)):
            return f"subnet {subnet} is outside Network {config.network}"
        if config.ipv6 is None or (subnet6 is None and config.enable_ipv4):
            return ""
        if subnet6 is None:
            return "no IPv6 subnet in an IPv6-only network"
        if subnet6.prefixlen != config.ipv6.subnet_len or not subnet_inside(subnet6, config.ipv6.network):
            return f"subnet {subnet6} is outside IPv6Network {config.ipv6.network}"
        return ""

    def _report(self, name: str, reason: str, out: list[LeaseEvent], partly: bool = False) -> None:
        if (name, reason) not in self._reported:
            self._reported.add((name, reason))
            out.append(BadRecord(name, reason, partly))


def iter_subnets(config: NetworkConfig) -> Iterator[IPv4Network]:
    """Every subnet from SubnetMin to SubnetMax, in order."""
    step = 1 << (32 - config.subnet_len)
    start = int(config.subnet_min.network_address)
    for index in range(config.subnet_count):
        yield IPv4Network((start + index * step, config.subnet_len))


def choose_subnet(
    config: NetworkConfig, taken: Iterable[IPv4Network], rng: random.Random
) -> IPv4Network | None:
    """A random free subnet between SubnetMin and SubnetMax, or None if full."""
    used = set(taken)
    free = [subnet for subnet in iter_subnets(config) if subnet not in used]
    return rng.choice(free) if free else None


CANDIDATES_V6 = 100  # flannel's: pick among the first 100 free IPv6 subnets from IPv6SubnetMin


def choose_subnet6(
    config: NetworkConfig, taken: Iterable[IPv6Network], rng: random.Random
) -> IPv6Network | None:
    """A random free IPv6 subnet among the first free ones from IPv6SubnetMin, as flannel picks.

    The space is too large to list: the walk stops after :data:`CANDIDATES_V6` free
    subnets, so it costs at most that many steps plus the number taken.
    """
    assert config.ipv6 is not None
    six = config.ipv6
    used = {int(subnet.network_address) for subnet in taken if subnet.prefixlen == six.subnet_len}
    free: list[int] = []
    address, last = int(six.subnet_min.network_address), int(six.subnet_max.network_address)
    while address <= last and len(free) < CANDIDATES_V6:
        if address not in used:
            free.append(address)
        address += six.step
    return IPv6Network((rng.choice(free), six.subnet_len)) if free else None
