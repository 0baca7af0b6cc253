"""Lease records as flannel stores them, and the pure watch reducer.

Key: ``<prefix>/subnets/10.244.7.0-24`` (flannel may append ``&<v6>-<len>``).
Value: ``{"PublicIP": "...", "PublicIPv6": null, "BackendType": "udp", "BackendData": ...}``.
flannel's own UDP backend leaves ``BackendType`` out (Go's ``omitempty``):
``{"PublicIP": "192.0.2.4", "PublicIPv6": null}``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .netconfig import NetworkConfig

__all__ = [
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
    "UNTYPED_BACKEND",
    "choose_subnet",
    "format_subnet_key",
    "parse_subnet_key",
]

UNTYPED_BACKEND = "udp"
"""The backend of a lease without ``BackendType``: flannel's UDP backend writes none, its vxlan and
host-gw backends always write theirs (and skip leases of any other type), so such a lease is a udp
peer in a udp network and ignored by the others, as flanneld treats it."""

_KEY_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([0-9a-fA-F:]+)-(\d+))?$")


class LeaseError(ValueError):
    """A lease key or value that is not a valid flannel record."""


def format_subnet_key(subnet: IPv4Network) -> str:
    """``10.244.7.0/24`` -> ``10.244.7.0-24`` (the last part of the etcd key)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(name: str) -> IPv4Network:
    """The inverse of :func:`format_subnet_key`; any IPv6 half is ignored."""
    match = _KEY_RE.match(name)
    if not match:
        raise LeaseError(f"key {name!r} is not a subnet (want e.g. 10.244.7.0-24)")
    try:
        return IPv4Network(f"{match.group(1)}/{match.group(2)}")
    except ValueError as exc:
        raise LeaseError(f"key {name!r} is not a subnet: {exc}") from None


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node publishes about itself in its lease."""

    public_ip: IPv4Address
    backend_type: str
    backend_data: Any = None

    def to_json(self) -> bytes:
        doc = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": None,
            "BackendType": self.backend_type,
            "BackendData": self.backend_data,
        }
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
        return cls(public_ip, backend_type, doc.get("BackendData"))


@dataclass(frozen=True, slots=True)
class Lease:
    subnet: IPv4Network
    attrs: LeaseAttrs


# Raw store events, as the registry reports them (already stripped of the prefix).
@dataclass(frozen=True, slots=True)
class KeyPut:
    name: str
    value: bytes


@dataclass(frozen=True, slots=True)
class KeyDeleted:
    name: str


# Reduced events, what backends act on.
@dataclass(frozen=True, slots=True)
class LeaseAdded:
    lease: Lease


@dataclass(frozen=True, slots=True)
class LeaseRemoved:
    lease: Lease


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that was skipped; reported once per distinct (key, reason)."""

    name: str
    reason: str


LeaseEvent = LeaseAdded | LeaseRemoved | BadRecord


@dataclass(slots=True)
class LeaseWatcher:
    """Turns snapshots and key events into lease events for the backends.

    Pure reducer in the style of flannel's ``LeaseWatcher``: ``reset`` takes a
    full listing (after start or compaction) and ``update`` takes watch events;
    both return the adds/removes needed to converge, skipping our own subnet
    and records that are broken or outside the network.
    """

    config: NetworkConfig
    own_subnet: IPv4Network | None = None
    leases: dict[IPv4Network, Lease] = field(default_factory=dict)
    _reported: set[tuple[str, str]] = field(default_factory=set)

    def reset(self, snapshot: Iterable[KeyPut]) -> list[LeaseEvent]:
        wanted: dict[IPv4Network, Lease] = {}
        out: list[LeaseEvent] = []
        for put in snapshot:
            lease = self._decode(put, out)
            if lease is not None:
                wanted[lease.subnet] = lease
        for subnet, old in list(self.leases.items()):
            if subnet not in wanted:
                del self.leases[subnet]
                out.append(LeaseRemoved(old))
        for subnet, lease in wanted.items():
            if self.leases.get(subnet) != lease:
                self.leases[subnet] = lease
                out.append(LeaseAdded(lease))
        return out

    def update(self, events: Iterable[KeyPut | KeyDeleted]) -> list[LeaseEvent]:
        out: list[LeaseEvent] = []
        for event in events:
            if isinstance(event, KeyPut):
                lease = self._decode(event, out)
                if lease is None:
                    self._drop_key(event.name, out)
                elif self.leases.get(lease.subnet) != lease:
                    self.leases[lease.subnet] = lease
                    out.append(LeaseAdded(lease))
            else:
                self._drop_key(event.name, out)
        return out

    def _drop_key(self, name: str, out: list[LeaseEvent]) -> None:
        try:
            subnet = parse_subnet_key(name)
        except LeaseError:
            return
        old = self.leases.pop(subnet, None)
        if old is not None:
            out.append(LeaseRemoved(old))

    def _decode(self, put: KeyPut, out: list[LeaseEvent]) -> Lease | None:
        try:
            subnet = parse_subnet_key(put.name)
            attrs = LeaseAttrs.from_json(put.value)
        except LeaseError as exc:
            self._report(put.name, str(exc), out)
            return None
        if subnet == self.own_subnet:
            return None
        if not self.config.network.supernet_of(subnet) or subnet.prefixlen != self.config.subnet_len:
            self._report(put.name, f"subnet {subnet} is outside Network {self.config.network}", out)
            return None
        return Lease(subnet, attrs)

    def _report(self, name: str, reason: str, out: list[LeaseEvent]) -> None:
        if (name, reason) not in self._reported:
            self._reported.add((name, reason))
            out.append(BadRecord(name, reason))


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
