"""LocalManager: which subnet to claim and how, on top of a subnet store (:class:`~.store.Registry`).

Acquisition order (flannel's): a lease that already carries our PublicIP,
else the subnet from the previous subnet file if free, else a random free
subnet. Every claim is one create-if-absent transaction; a lost race means
trying another subnet, never exiting. One etcd lease is kept alive for the
life of the claim instead of a new grant per renewal.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from ipaddress import IPv4Network

from ..core.lease import LeaseAttrs, LeaseError, choose_subnet, format_subnet_key, parse_subnet_key
from ..core.lease_policy import OwnLease
from ..core.netconfig import NetworkConfig
from .store import Registry, StoredSubnet

__all__ = ["LeaseLost", "LocalManager", "NoFreeSubnet", "OwnLease"]

log = logging.getLogger(__name__)


class NoFreeSubnet(RuntimeError):
    """Every subnet between SubnetMin and SubnetMax is leased."""


class LeaseLost(RuntimeError):
    """Our subnet was taken by another node while we did not hold it."""


@dataclass(frozen=True, slots=True)
class _Listing:
    records: list[StoredSubnet]

    def taken(self) -> set[IPv4Network]:
        out: set[IPv4Network] = set()
        for record in self.records:
            try:
                out.add(parse_subnet_key(record.name))
            except LeaseError:
                continue
        return out

    def carrying(self, attrs: LeaseAttrs, config: NetworkConfig) -> StoredSubnet | None:
        """A record that already names our PublicIP and fits the config."""
        for record in self.records:
            try:
                subnet = parse_subnet_key(record.name)
                theirs = LeaseAttrs.from_json(record.value)
            except LeaseError:
                continue
            if theirs.public_ip == attrs.public_ip and config.holds_subnet(subnet):
                return record
        return None


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
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None = None
    ) -> OwnLease:
        """Claim a subnet for ``attrs``; raises :class:`NoFreeSubnet` when the network is full."""
        tried: set[IPv4Network] = set()
        spare_lease: int | None = None
        try:
            for _ in range(self.max_attempts):
                records, _revision = await self.registry.list_subnets()
                listing = _Listing(records)
                mine = listing.carrying(attrs, config)
                if mine is not None:
                    adopted = await self._adopt(mine, attrs)
                    if adopted is not None:
                        return adopted
                    continue
                taken = listing.taken() | tried
                subnet = previous if previous is not None and config.holds_subnet(previous) and previous not in taken else None
                if subnet is None:
                    subnet = choose_subnet(config, taken, self.rng)
                if subnet is None:
                    raise NoFreeSubnet(
                        f"no free subnet left in {config.network} between {config.subnet_min} and "
                        f"{config.subnet_max}: {len(listing.taken())} leased; remove stale leases under "
                        f"{self.registry.prefix}/subnets/ or widen the Network"
                    )
                if spare_lease is None:
                    spare_lease = await self.registry.grant(self.lease_ttl)
                if await self.registry.create_subnet(format_subnet_key(subnet), attrs.to_json(), spare_lease):
                    own = OwnLease(subnet, attrs, spare_lease, self.lease_ttl)
                    spare_lease = None
                    return own
                log.info("subnet %s was taken by another node a moment ago; trying another", subnet)
                tried.add(subnet)
                previous = None
            raise NoFreeSubnet(f"gave up after {self.max_attempts} lost races for a subnet")
        finally:
            if spare_lease is not None:
                await self._revoke_quietly(spare_lease)

    async def _adopt(self, record: StoredSubnet, attrs: LeaseAttrs) -> OwnLease | None:
        """Take back a lease that already carries our PublicIP, keeping its etcd lease."""
        subnet = parse_subnet_key(record.name)
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
        log.info("reusing our existing lease on %s", subnet)
        return OwnLease(subnet, attrs, lease_id, ttl)

    async def renew(self, own: OwnLease) -> OwnLease:
        """Refresh our one etcd lease; re-claim the subnet if the lease is gone."""
        ttl = await self.registry.keepalive(own.lease_id)
        if ttl > 0:
            return replace(own, ttl=ttl)
        log.warning("our etcd lease for %s expired; re-claiming the subnet", own.subnet)
        return await self.reclaim(own, lease_alive=False)

    async def reclaim(self, own: OwnLease, lease_alive: bool = True) -> OwnLease:
        """Our key vanished: claim the same subnet again, or raise :class:`LeaseLost`."""
        lease_id = own.lease_id
        if not lease_alive or await self.registry.lease_ttl(lease_id) <= 0:
            lease_id = await self.registry.grant(self.lease_ttl)
        if await self.registry.create_subnet(own.name, own.attrs.to_json(), lease_id):
            log.info("re-claimed subnet %s", own.subnet)
            return replace(own, lease_id=lease_id, ttl=self.lease_ttl)
        current = await self.registry.get_subnet(own.name)
        if current is not None:
            try:
                holder = LeaseAttrs.from_json(current.value).public_ip
            except LeaseError:
                holder = None
            if holder == own.attrs.public_ip:
                if lease_id != own.lease_id:
                    await self._revoke_quietly(lease_id)
                return replace(own, lease_id=current.lease_id or own.lease_id)
        if lease_id != own.lease_id:
            await self._revoke_quietly(lease_id)
        holder_text = "unknown" if current is None else current.value.decode(errors="replace")
        raise LeaseLost(
            f"subnet {own.subnet} is now held by another node ({holder_text}); pods on this node hold "
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
