"""MemoryRegistry: the subnet store in memory, with etcd's semantics where the policy relies on them.

Revisions count every change; keys bound to a lease vanish when it is revoked
or runs out (by ``clock()``); a watch replays history from its start revision
and raises :class:`WatchCompacted` below the compaction point; an outage makes
every call (and every open watch) raise :class:`EtcdUnavailable`. Tests drive
it like etcdctl does: :meth:`put_config`, :meth:`put_subnet`,
:meth:`delete_subnet`, :meth:`compact`, :meth:`fail`/:meth:`recover`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..core.lease import KeyDeleted, KeyPut
from .store import EtcdUnavailable, StoredSubnet, SubnetBatch, WatchCompacted

__all__ = ["MemoryRegistry"]


@dataclass(frozen=True, slots=True)
class _Change:
    revision: int
    key: str  # "config" or "subnets/<name>"
    value: bytes | None  # None: deleted


class MemoryRegistry:
    """An in-memory :class:`~.store.Registry`."""

    def __init__(self, prefix: str = "/coreos.com/network", clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = prefix.rstrip("/")
        self.endpoint = "memory"
        self.errors = 0
        self.reconnects = 0
        self.clock = clock
        self.revision = 1
        self.compacted = 0  # revisions up to this one are gone
        self.available = True
        self.requests = 0
        self._keys: dict[str, StoredSubnet] = {}
        self._leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, expires at)
        self._lease_ids = itertools.count(0x1000)
        self._history: list[_Change] = []
        self._changed = asyncio.Event()  # set and replaced on every change

    # --- test controls (as etcdctl would) ----------------------------------------

    def fail(self) -> None:
        """etcd goes away: every call and every open watch raises EtcdUnavailable."""
        self.available = False
        self._wake()

    def recover(self) -> None:
        self.available = True

    def put_config(self, raw: bytes) -> None:
        self._put("config", raw, 0)

    def delete_config(self) -> None:
        self._delete("config")

    def put_subnet(self, name: str, value: bytes, lease_id: int = 0) -> None:
        self._put(f"subnets/{name}", value, lease_id)

    def delete_subnet(self, name: str) -> None:
        self._delete(f"subnets/{name}")

    def compact(self) -> None:
        """Forget the history up to now (a watch from before must re-list)."""
        self.compacted = self.revision
        self._history.clear()
        self._wake()

    def live_leases(self) -> list[int]:
        self._expire()
        return sorted(self._leases)

    # --- the Registry interface -------------------------------------------------

    async def close(self) -> None:
        return None

    async def get_config(self) -> bytes | None:
        self._request()
        found = self._keys.get("config")
        return None if found is None else found.value

    async def get_config_revision(self) -> tuple[bytes | None, int]:
        return await self.get_config(), self.revision

    async def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        async for change in self._watch(start_revision, lambda key: key == "config"):
            yield change.value, change.revision

    async def list_subnets(self) -> tuple[list[StoredSubnet], int]:
        self._request()
        records = [record for key, record in sorted(self._keys.items()) if key.startswith("subnets/")]
        return records, self.revision

    async def get_subnet(self, name: str) -> StoredSubnet | None:
        self._request()
        return self._keys.get(f"subnets/{name}")

    async def grant(self, ttl: int) -> int:
        self._request()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = (ttl, self.clock() + ttl)
        return lease_id

    async def create_subnet(self, name: str, value: bytes, lease_id: int, unique_prefix: str = "") -> bool:
        self._request()
        if f"subnets/{name}" in self._keys:
            return False
        if unique_prefix and any(key.startswith(f"subnets/{unique_prefix}") for key in self._keys):
            return False
        self._put(f"subnets/{name}", value, lease_id)
        return True

    async def update_subnet(self, name: str, value: bytes, lease_id: int, mod_revision: int) -> bool:
        self._request()
        current = self._keys.get(f"subnets/{name}")
        if (0 if current is None else current.mod_revision) != mod_revision:
            return False
        self._put(f"subnets/{name}", value, lease_id)
        return True

    async def keepalive(self, lease_id: int) -> int:
        self._request()
        if lease_id not in self._leases:
            return 0
        ttl, _ = self._leases[lease_id]
        self._leases[lease_id] = (ttl, self.clock() + ttl)
        return ttl

    async def revoke(self, lease_id: int) -> None:
        self._request()
        self._end_lease(lease_id)

    async def lease_ttl(self, lease_id: int) -> int:
        self._request()
        if lease_id not in self._leases:
            return -1
        return max(0, round(self._leases[lease_id][1] - self.clock()))

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[SubnetBatch]:
        start = len("subnets/")
        async for change in self._watch(start_revision, lambda key: key.startswith("subnets/")):
            name = change.key[start:]
            item = KeyDeleted(name) if change.value is None else KeyPut(name, change.value)
            yield [item], change.revision

    # --- inside ---------------------------------------------------------------

    def _request(self) -> None:
        self.requests += 1
        if not self.available:
            self.errors += 1
            raise EtcdUnavailable("etcd at memory unreachable: failed by the test")
        self._expire()

    def _expire(self) -> None:
        now = self.clock()
        for lease_id, (_ttl, expires_at) in list(self._leases.items()):
            if expires_at <= now:
                self._end_lease(lease_id)

    def _end_lease(self, lease_id: int) -> None:
        if self._leases.pop(lease_id, None) is None:
            return
        for key, record in list(self._keys.items()):
            if record.lease_id == lease_id:
                self._delete(key)

    def _put(self, key: str, value: bytes, lease_id: int) -> None:
        self.revision += 1
        name = key.removeprefix("subnets/")
        self._keys[key] = StoredSubnet(name, value, lease_id, self.revision)
        self._history.append(_Change(self.revision, key, value))
        self._wake()

    def _delete(self, key: str) -> None:
        if self._keys.pop(key, None) is None:
            return
        self.revision += 1
        self._history.append(_Change(self.revision, key, None))
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _watch(self, start_revision: int, wanted: Callable[[str], bool]) -> AsyncIterator[_Change]:
        self._request()
        if start_revision <= self.compacted:
            raise WatchCompacted(self.compacted + 1)
        seen = start_revision - 1
        while True:
            for change in [c for c in self._history if c.revision > seen]:
                seen = change.revision
                if wanted(change.key):
                    yield change
            changed = self._changed
            if self.available and self.compacted <= seen and not any(c.revision > seen for c in self._history):
                await changed.wait()
            if not self.available:
                self.errors += 1
                raise EtcdUnavailable("watch on memory broke: failed by the test")
            if self.compacted > seen:
                raise WatchCompacted(self.compacted + 1)
