"""The subnet store's interface (flannel's ``Registry``): what the lease policy needs of etcd.

Two implementations: :class:`~.registry.EtcdRegistry` (the real one) and
:class:`~.memory.MemoryRegistry` (in memory, for tests). Storage only: which
subnet to take and what a lost race means is :mod:`.manager`'s business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..core.lease import KeyDeleted, KeyPut

__all__ = [
    "EtcdAuthError",
    "EtcdUnavailable",
    "Registry",
    "StoreStats",
    "StoredSubnet",
    "SubnetBatch",
    "WatchCompacted",
]


class EtcdUnavailable(ConnectionError):
    """No etcd endpoint answered in time; the caller retries with backoff."""


class EtcdAuthError(PermissionError):
    """TLS or credentials were refused: retrying will not help, the operator must act."""


class WatchCompacted(Exception):
    """The watch revision was compacted away; the caller must re-list.

    ``oldest`` is the oldest revision the store still keeps (etcd's compact revision; 0 if
    not told).
    """

    def __init__(self, oldest: int = 0) -> None:
        super().__init__(f"revisions before {oldest} were compacted" if oldest else "revision compacted")
        self.oldest = oldest


@dataclass(frozen=True, slots=True)
class StoredSubnet:
    """A subnet key as the store holds it."""

    name: str
    value: bytes
    lease_id: int
    mod_revision: int


SubnetBatch = tuple[list[KeyPut | KeyDeleted], int]  # events and the revision they happened at


class StoreStats(Protocol):
    """What operations read of the store: where it is, how it fares, and one cheap read."""

    @property
    def endpoint(self) -> str: ...

    @property
    def errors(self) -> int: ...

    @property
    def reconnects(self) -> int: ...

    async def get_config(self) -> bytes | None: ...


class Registry(StoreStats, Protocol):
    """flannel's records: ``<prefix>/config`` and ``<prefix>/subnets/<name>``, with etcd leases.

    Every method may raise :class:`EtcdUnavailable` (retry later) or
    :class:`EtcdAuthError` (the operator must act).
    """

    @property
    def prefix(self) -> str: ...

    async def close(self) -> None: ...

    async def get_config_revision(self) -> tuple[bytes | None, int]:
        """The raw network config (None if absent) and the store revision it was read at."""
        ...

    def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        """The raw config at each change from ``start_revision`` on (None: deleted), with its revision."""
        ...

    async def list_subnets(self) -> tuple[list[StoredSubnet], int]:
        """All subnet records and the store revision they were read at."""
        ...

    async def get_subnet(self, name: str) -> StoredSubnet | None: ...

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        ...

    async def create_subnet(self, name: str, value: bytes, lease_id: int, unique_prefix: str = "") -> bool:
        """Create the key only if absent, bound to ``lease_id``; False if it exists, or if
        ``unique_prefix`` is given and some key starting with it exists (one transaction)."""
        ...

    async def update_subnet(self, name: str, value: bytes, lease_id: int, mod_revision: int) -> bool:
        """Rewrite a key only if nobody changed it since ``mod_revision``."""
        ...

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; its new TTL in seconds, 0 if it no longer exists."""
        ...

    async def revoke(self, lease_id: int) -> None:
        """End a lease and delete its keys; a lease that is already gone is fine."""
        ...

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of a lease, or -1 if it does not exist."""
        ...

    def watch_subnets(self, start_revision: int) -> AsyncIterator[SubnetBatch]:
        """Batches of subnet events from ``start_revision`` on, each with its revision.

        Raises :class:`WatchCompacted` when that revision is gone and
        :class:`EtcdUnavailable` when the stream breaks; the caller resumes
        from the last revision it saw plus one.
        """
        ...
