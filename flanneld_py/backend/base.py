"""The one interface every backend implements, and what it is given to do so.

A backend publishes its lease attributes before the subnet is claimed (vxlan
needs its VTEP MAC in the lease), sets up its device once the subnet is known,
then turns lease events into datapath state. The daemon owns the order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol, runtime_checkable

from ..core.lease import LeaseAttrs, LeaseEvent
from ..core.netconfig import NetworkConfig
from ..netlink import InterfaceInfo, Netlink

__all__ = ["Backend", "BackendContext", "BatchCount", "CountsBatches", "CountsDrops", "PeerStats"]


@dataclass(frozen=True, slots=True)
class BackendContext:
    """Everything a backend needs from the daemon, fixed at start."""

    config: NetworkConfig
    iface: InterfaceInfo
    public_ip: IPv4Address
    netlink: Netlink
    offload: bool = True


@dataclass(frozen=True, slots=True)
class PeerStats:
    """One peer as operators see it (``status``, metrics)."""

    subnet: IPv4Network
    public_ip: str
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    last_tx: float = 0.0
    last_rx: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchCount:
    """Wakeups of one hot-loop direction by packets moved: ``buckets[i]`` counts
    wakeups whose packet count has bit length ``i`` (0, 1, 2-3, 4-7, ... 64+)."""

    wakeups: int
    buckets: tuple[int, ...]


class Backend(Protocol):
    type_name: str

    @property
    def mtu(self) -> int:
        """The MTU pods must use (written to the subnet file)."""
        ...

    @property
    def pod_gso_max_size(self) -> int | None:
        """A cap for pod veths' GSO size that suits this datapath, or None for the kernel's."""
        ...

    def lease_attrs(self) -> LeaseAttrs:
        """What to publish in our lease (PublicIP, BackendType, BackendData)."""
        ...

    async def start(self, own_subnet: IPv4Network) -> None:
        """Create and configure the datapath for our subnet."""
        ...

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        """Converge the datapath on peer lease changes (never called with our own lease)."""
        ...

    def is_up(self) -> bool:
        """True while the datapath forwards."""
        ...

    def peers(self) -> list[PeerStats]:
        ...

    async def stop(self, cleanup: bool) -> None:
        """Stop forwarding; with ``cleanup`` also remove the kernel state we made."""
        ...


# Optional abilities: a backend has them or not, and says so by having the method.


@runtime_checkable
class CountsDrops(Protocol):
    """Dropped packets by reason label (a backend that forwards in userspace)."""

    def drop_counts(self) -> dict[str, int]: ...


@runtime_checkable
class CountsBatches(Protocol):
    """Packets moved per wakeup, by direction (a backend with a batching hot loop)."""

    def batch_counts(self) -> dict[str, BatchCount]: ...
