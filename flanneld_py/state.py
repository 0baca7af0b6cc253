"""What the daemon is doing, as the parts around it (operations, the lease runner) read it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .backend.base import Backend
from .core.netconfig import NetworkConfig
from .subnet.manager import OwnLease

__all__ = ["DaemonState"]


@dataclass
class DaemonState:
    """What the daemon is doing, for readiness, health, status and metrics."""

    phase: str = "starting"
    config: NetworkConfig | None = None
    lease: OwnLease | None = None
    lease_expires_at: float | None = None  # wall clock
    backend: Backend | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    peer_events: int = 0

    def hold(self, own: OwnLease) -> None:
        """Record the lease we hold now and when it runs out."""
        self.lease = own
        self.lease_expires_at = time.time() + own.ttl
