"""The one interface every backend implements, and what it is given to do so.

A backend publishes its lease attributes before the subnet is claimed (vxlan
needs its VTEP MAC in the lease), sets up its device once the subnet is known,
then turns lease events into datapath state. The daemon owns the order.

Address families: a backend carries IPv4 unless it says otherwise by having
:class:`CarriesIPv6`'s members (``families`` and ``backend_v6_data``). The daemon
refuses a config that enables a family the backend does not carry
(:func:`missing_families`), and publishes ``PublicIPv6`` and the backend's
``BackendV6Data`` next to its IPv4 attributes (:func:`published_attrs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol, runtime_checkable

from ..core.lease import LeaseAttrs, LeaseEvent
from ..core.netconfig import NetworkConfig
from ..netlink import InterfaceInfo, Netlink

__all__ = [
    "IPV4_ONLY",
    "Backend",
    "BackendContext",
    "BatchCount",
    "CarriesIPv6",
    "CountsBatches",
    "CountsDrops",
    "PeerStats",
    "families_of",
    "missing_families",
    "published_attrs",
]

IPV4_ONLY = frozenset({4})


@dataclass(frozen=True, slots=True)
class BackendContext:
    """Everything a backend needs from the daemon, fixed at start."""

    config: NetworkConfig
    iface: InterfaceInfo
    public_ip: IPv4Address
    netlink: Netlink
    offload: bool = True
    public_ipv6: IPv6Address | None = None  # set with EnableIPv6: --public-ipv6 or the interface's
    ipv6_prefix: IPv6Network | None = None  # the interface's IPv6 prefix holding public_ipv6, if it has one

    @property
    def ipv6_segment(self) -> IPv6Network | None:
        """Where IPv6 next hops are on-link (host-gw, DirectRouting): our prefix, else our PublicIPv6 alone."""
        if self.public_ipv6 is None:
            return None
        return self.ipv6_prefix or IPv6Network((self.public_ipv6, 128))


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
    subnet6: IPv6Network | None = None
    public_ipv6: str | None = None

    @property
    def subnets(self) -> str:
        """Both families' subnets as operators read them; an IPv6-only lease's IPv4 half (0.0.0.0/0) left out."""
        return ", ".join(str(net) for net in (self.subnet, self.subnet6) if net is not None and net.prefixlen)

    @property
    def addresses(self) -> str:
        return ", ".join(ip for ip in (self.public_ip, self.public_ipv6) if ip and ip != "0.0.0.0")


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


@runtime_checkable
class CarriesIPv6(Protocol):
    """A backend that carries IPv6 pod traffic: the families it carries (``{4, 6}``; ``{6}`` would
    be IPv6-only), what it publishes as ``BackendV6Data`` (None: nothing, as host-gw), and a
    ``start`` that also takes our IPv6 subnet (None without EnableIPv6)."""

    families: frozenset[int]

    def backend_v6_data(self) -> Any: ...

    async def start(self, own_subnet: IPv4Network, own_subnet6: IPv6Network | None = None) -> None: ...


def families_of(backend: Backend) -> frozenset[int]:
    """The address families ``backend`` carries: IPv4 only unless it is :class:`CarriesIPv6`."""
    return backend.families if isinstance(backend, CarriesIPv6) else IPV4_ONLY


def missing_families(backend: Backend, config: NetworkConfig) -> str:
    """Why ``backend`` cannot run ``config``'s address families, in one line ("" if it can)."""
    carried = families_of(backend)
    if config.enable_ipv6 and 6 not in carried:
        return (f"network config: EnableIPv6=true: the {backend.type_name} backend carries IPv4 only in this "
                "version of flanneld-py; set EnableIPv6 to false (IPv6 pod networks wait for IPv6 in the "
                f"{backend.type_name} backend)")
    if config.enable_ipv4 and 4 not in carried:
        return f"network config: EnableIPv4=true: the {backend.type_name} backend carries IPv6 only"
    return ""


def published_attrs(backend: Backend, public_ipv6: IPv6Address | None, enable_ipv4: bool = True) -> LeaseAttrs:
    """Our lease's value: the backend's attributes, plus ``PublicIPv6`` and ``BackendV6Data`` with IPv6.
    An IPv6-only node publishes ``PublicIP`` 0.0.0.0, as flanneld does."""
    attrs = backend.lease_attrs()
    if not enable_ipv4:
        attrs = replace(attrs, public_ip=IPv4Address(0))
    if public_ipv6 is None or attrs.public_ipv6 is not None:
        return attrs
    v6_data = backend.backend_v6_data() if isinstance(backend, CarriesIPv6) else None
    return replace(attrs, public_ipv6=public_ipv6, backend_v6_data=v6_data)
