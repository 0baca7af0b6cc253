"""LocalManager: which subnet to claim and how, on top of a subnet store (:class:`~.store.Registry`).

Acquisition order (flannel's): a lease that already carries our PublicIP,
else the subnet from the previous subnet file if free, else a random free
subnet. Every claim is one create-if-absent transaction; a lost race means
trying another subnet, never exiting. One etcd lease is kept alive for the
life of the claim instead of a new grant per renewal.

With ``EnableIPv6`` the IPv6 subnet is chosen the same way, per family
(``FLANNEL_IPV6_SUBNET`` from the previous file, else a random free one), and
both go into the one key (``10.244.1.0-24&fd00:10:244:1::-64``), so they are
claimed in the same transaction and renewed by the same etcd lease.

The listing a claim was chosen from comes back with it (:class:`Claim`): the
lease watch starts from it, so a start-up reads every lease once.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from ..core.lease import (
    LeaseAttrs,
    LeaseError,
    choose_subnet,
    choose_subnet6,
    format_subnet_key,
    parse_lease_key,
)
from ..core.lease_policy import OwnLease
from ..core.netconfig import NO_IPV4_SUBNET, NetworkConfig
from .store import Registry, StoredSubnet

__all__ = ["Claim", "LeaseLost", "LocalManager", "NoFreeSubnet", "OwnLease"]

log = logging.getLogger(__name__)


class NoFreeSubnet(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax is leased."""


class LeaseLost(RuntimeError):
    """Our subnet was taken by another node while we did not hold it."""


class _Listing:
    """One listing of every subnet record, each key parsed once (a record whose name is no subnet
    key is left out)."""

    def __init__(self, records: list[StoredSubnet]) -> None:
        self.keyed: list[tuple[StoredSubnet, IPv4Network, IPv6Network | None]] = []
        for record in records:
            try:
                subnet, subnet6 = parse_lease_key(record.name)
            except LeaseError:
                continue
            self.keyed.append((record, subnet, subnet6))

    def taken(self) -> set[IPv4Network]:
        return {subnet for _, subnet, _ in self.keyed}

    def taken6(self) -> set[IPv6Network]:
        return {subnet6 for _, _, subnet6 in self.keyed if subnet6 is not None}

    def carrying(self, attrs: LeaseAttrs, config: NetworkConfig) -> StoredSubnet | None:
        """A record that already names our node (PublicIP, or PublicIPv6 if IPv6-only) and fits the config.

        An IPv4 address has one text form, which a lease naming it holds as a JSON string as
        is unless the writer escaped some of its characters (``\\u0031``), so only the records
        that hold that string or any backslash are decoded (start-up reads every lease); an
        IPv6 address has several forms, so every record is.
        """
        address = attrs.node_address
        text = f'"{address}"'.encode() if address.version == 4 else b""
        for record, subnet, subnet6 in self.keyed:
            if (text not in record.value and b"\\" not in record.value) or not _fits(config, subnet, subnet6):
                continue
            try:
                theirs = LeaseAttrs.from_json(record.value)
            except LeaseError:
                continue
            if theirs.node_address == address:
                return record
        return None


@dataclass(frozen=True, slots=True)
class Claim:
    """Our lease, and the listing (with the revision it was read at) it was chosen from.

    The listing may predate our own key's latest write (a create or an adoption
    follows it); a watch from ``revision + 1`` sees that write.
    """

    own: OwnLease
    records: tuple[StoredSubnet, ...]
    revision: int


def _fits(config: NetworkConfig, subnet: IPv4Network, subnet6: IPv6Network | None) -> bool:
    """Both halves of a key are ones this config hands out (no IPv6 half unless EnableIPv6)."""
    if config.ipv6 is None:
        return subnet6 is None and config.holds_subnet(subnet)
    return subnet6 is not None and config.ipv6.holds_subnet(subnet6) and config.holds_subnet(subnet)


class LocalManager:
    def __init__(
        self,
        registry: Registry,
        lease_ttl: int = 24 * 3600,
        rng: random.Random | None = None,
        max_attempts: int = 64,
    ) -> None:
        self.registry = registry
        self.lease_ttl = lease_ttl
        self.rng = rng or random.Random()
        self.max_attempts = max_attempts

    async def acquire(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None = None,
        previous6: IPv6Network | None = None,
    ) -> OwnLease:
        """Claim a subnet (and an IPv6 one with EnableIPv6) for ``attrs``; raises
        :class:`NoFreeSubnet` when the network is full."""
        return (await self.claim(config, attrs, previous, previous6)).own

    async def claim(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None = None,
        previous6: IPv6Network | None = None,
    ) -> Claim:
        """:meth:`acquire`, with the listing the subnet was chosen from."""
        tried: set[IPv4Network] = set()
        tried6: set[IPv6Network] = set()
        spare_lease: int | None = None
        try:
            for _ in range(self.max_attempts):
                records, revision = await self.registry.list_subnets()
                listing = _Listing(records)
                mine = listing.carrying(attrs, config)
                if mine is not None:
                    adopted = await self._adopt(mine, attrs)
                    if adopted is not None:
                        return Claim(adopted, tuple(records), revision)
                    continue
                subnet = self._pick4(config, listing, tried, previous)
                subnet6 = self._pick6(config, listing, tried6, previous6)
                if spare_lease is None:
                    spare_lease = await self.registry.grant(self.lease_ttl)
                name = format_subnet_key(subnet, subnet6)
                # the IPv4 half is unique by the transaction itself (no key may start with it);
                # IPv6-only keys are unique as whole keys (their IPv4 half is always 0.0.0.0-0)
                unique = format_subnet_key(subnet) if config.enable_ipv4 else name
                if await self.registry.create_subnet(name, attrs.to_json(), spare_lease, unique_prefix=unique):
                    if config.enable_ipv4 and subnet6 is not None and await self._lost_ipv6_race(name, subnet6):
                        await self._revoke_quietly(spare_lease)  # deletes our key with it
                        spare_lease = None
                        log.info("IPv6 subnet %s was claimed by another node a moment before us; "
                                 "trying another", subnet6)
                        tried6.add(subnet6)
                        previous = previous6 = None
                        continue
                    own = OwnLease(subnet, attrs, spare_lease, self.lease_ttl, subnet6)
                    spare_lease = None
                    return Claim(own, tuple(records), revision)
                log.info("subnet %s was taken by another node a moment ago; trying another", name)
                if config.enable_ipv4:
                    tried.add(subnet)
                if subnet6 is not None:
                    tried6.add(subnet6)
                previous = previous6 = None
            raise NoFreeSubnet(f"gave up after {self.max_attempts} lost races for a subnet")
        finally:
            if spare_lease is not None:
                await self._revoke_quietly(spare_lease)

    async def _lost_ipv6_race(self, name: str, subnet6: IPv6Network) -> bool:
        """After a dual-stack create: did another key take the same IPv6 subnet first?

        A key is unique, its IPv6 half alone is not (``A&X`` and ``B&X`` are two keys), so
        racers for one IPv6 subnet compare revisions afterwards: the earlier creation keeps it.
        """
        records, _revision = await self.registry.list_subnets()
        ours = next((r.mod_revision for r in records if r.name == name), None)
        if ours is None:
            return False  # gone already: the policy re-claims it as for any deleted key
        for record in records:
            try:
                _, theirs = parse_lease_key(record.name)
            except LeaseError:
                continue
            if record.name != name and theirs == subnet6 and record.mod_revision < ours:
                return True
        return False

    def _pick4(self, config: NetworkConfig, listing: _Listing, tried: set[IPv4Network],
               previous: IPv4Network | None) -> IPv4Network:
        if not config.enable_ipv4:
            return NO_IPV4_SUBNET
        taken = listing.taken() | tried
        if previous is not None and config.holds_subnet(previous) and previous not in taken:
            return previous
        subnet = choose_subnet(config, taken, self.rng)
        if subnet is None:
            raise NoFreeSubnet(
                f"no free subnet left in {config.network} between {config.subnet_min} and "
                f"{config.subnet_max}: {len(listing.taken())} leased; remove stale leases under "
                f"{self.registry.prefix}/subnets/ or widen the Network"
            )
        return subnet

    def _pick6(self, config: NetworkConfig, listing: _Listing, tried: set[IPv6Network],
               previous: IPv6Network | None) -> IPv6Network | None:
        six = config.ipv6
        if six is None:
            return None
        taken = listing.taken6() | tried
        if previous is not None and six.holds_subnet(previous) and previous not in taken:
            return previous
        subnet6 = choose_subnet6(config, taken, self.rng)
        if subnet6 is None:
            raise NoFreeSubnet(
                f"no free IPv6 subnet left in {six.network} between {six.subnet_min} and {six.subnet_max}: "
                f"{len(listing.taken6())} leased; remove stale leases under {self.registry.prefix}/subnets/ "
                "or widen the IPv6Network"
            )
        return subnet6

    async def _adopt(self, record: StoredSubnet, attrs: LeaseAttrs) -> OwnLease | None:
        """Take back a lease that already carries our PublicIP, keeping its etcd lease."""
        subnet, subnet6 = parse_lease_key(record.name)
        lease_id = record.lease_id
        if lease_id and await self.registry.lease_ttl(lease_id) <= 0:
            lease_id = 0
        fresh = lease_id == 0
        if fresh:
            lease_id = await self.registry.grant(self.lease_ttl)
        if not await self.registry.update_subnet(record.name, attrs.to_json(), lease_id, record.mod_revision):
            if fresh:
                await self._revoke_quietly(lease_id)
            return None
        ttl = await self.registry.keepalive(lease_id) or self.lease_ttl
        own = OwnLease(subnet, attrs, lease_id, ttl, subnet6)
        log.info("reusing our existing lease on %s", own.subnets)
        return own

    async def renew(self, own: OwnLease) -> OwnLease:
        """Refresh our one etcd lease; re-claim the subnet if the lease is gone."""
        ttl = await self.registry.keepalive(own.lease_id)
        if ttl > 0:
            return replace(own, ttl=ttl)
        log.warning("our etcd lease for %s expired; re-claiming the subnet", own.subnets)
        return await self.reclaim(own, lease_alive=False)

    async def reclaim(self, own: OwnLease, lease_alive: bool = True) -> OwnLease:
        """Our key vanished: claim the same subnet again, or raise :class:`LeaseLost`."""
        lease_id = own.lease_id
        if not lease_alive or await self.registry.lease_ttl(lease_id) <= 0:
            lease_id = await self.registry.grant(self.lease_ttl)
        if await self.registry.create_subnet(own.name, own.attrs.to_json(), lease_id):
            log.info("re-claimed subnet %s", own.subnets)
            return replace(own, lease_id=lease_id, ttl=self.lease_ttl)
        current = await self.registry.get_subnet(own.name)
        if current is not None:
            try:
                holder = LeaseAttrs.from_json(current.value).node_address
            except LeaseError:
                holder = None
            if holder == own.attrs.node_address:
                if lease_id != own.lease_id:
                    await self._revoke_quietly(lease_id)
                return replace(own, lease_id=current.lease_id or own.lease_id)
        if lease_id != own.lease_id:
            await self._revoke_quietly(lease_id)
        holder_text = "unknown" if current is None else current.value.decode(errors="replace")
        raise LeaseLost(
            f"subnet {own.subnets} is now held by another node ({holder_text}); pods on this node hold "
            "addresses from it, so this node must be drained and flanneld-py restarted to get a new subnet"
        )

    async def release(self, own: OwnLease) -> None:
        """Give the subnet back (only on explicit request; a restart keeps it)."""
        await self.registry.revoke(own.lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.registry.revoke(lease_id)
        except Exception as exc:  # best effort: an orphan lease expires on its own
            log.warning("could not revoke unused etcd lease %x: %s", lease_id, exc)
