"""``/run/flannel/subnet.env``: flannel's hand-off from the daemon to the CNI plugin.

The layout is flanneld v0.20.2's ``WriteSubnetFile``: ``FLANNEL_NETWORK`` and
``FLANNEL_SUBNET`` only when IPv4 is enabled, ``FLANNEL_IPV6_NETWORK`` and
``FLANNEL_IPV6_SUBNET`` only when IPv6 is, then ``FLANNEL_MTU`` and
``FLANNEL_IPMASQ``. A ``*_SUBNET`` value is the subnet's first host address with
the prefix length (``10.244.7.1/24``, ``fd00:10:244:7::1/64``): the bridge's gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_interface
from typing import TypeVar, overload

__all__ = ["PodRange", "SubnetEnv", "SubnetEnvError"]

_Parsed = TypeVar("_Parsed")


@overload
def _first_host(subnet: IPv4Network) -> IPv4Interface: ...
@overload
def _first_host(subnet: IPv6Network) -> IPv6Interface: ...
@overload
def _first_host(subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface: ...
def _first_host(subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """What flannel writes as ``*_SUBNET`` and the bridge holds: the subnet's address plus one."""
    return ip_interface((int(subnet.network_address) + 1, subnet.prefixlen))


class SubnetEnvError(ValueError):
    """The subnet file is missing a variable or holds a bad value."""


@dataclass(frozen=True, slots=True)
class PodRange:
    """One address family of the node's lease: the cluster network and the node's subnet in it."""

    network: IPv4Network | IPv6Network
    subnet: IPv4Network | IPv6Network

    @property
    def gateway(self) -> IPv4Interface | IPv6Interface:
        """The subnet's first host address with its prefix: ``10.244.7.1/24``, ``fd00:10:244:7::1/64``."""
        return _first_host(self.subnet)


@dataclass(frozen=True, slots=True)
class SubnetEnv:
    """The subnet file's content. IPv4 fields are None on an IPv6-only node, IPv6 ones on an IPv4-only node."""

    network: IPv4Network | None
    subnet: IPv4Network | None
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None

    def __post_init__(self) -> None:
        if (self.network is None) != (self.subnet is None):
            raise SubnetEnvError("FLANNEL_NETWORK and FLANNEL_SUBNET go together: one is missing")
        if (self.ipv6_network is None) != (self.ipv6_subnet is None):
            raise SubnetEnvError("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET go together: one is missing")
        if self.network is None and self.ipv6_network is None:
            raise SubnetEnvError("the subnet file has neither FLANNEL_NETWORK/FLANNEL_SUBNET "
                                 "nor FLANNEL_IPV6_NETWORK/FLANNEL_IPV6_SUBNET")

    @property
    def ipv4(self) -> PodRange | None:
        if self.network is None or self.subnet is None:
            return None
        return PodRange(self.network, self.subnet)

    @property
    def ipv6(self) -> PodRange | None:
        if self.ipv6_network is None or self.ipv6_subnet is None:
            return None
        return PodRange(self.ipv6_network, self.ipv6_subnet)

    @property
    def ranges(self) -> tuple[PodRange, ...]:
        """The enabled families, IPv4 first (the order flannel writes them and CNI results list them)."""
        return tuple(family for family in (self.ipv4, self.ipv6) if family is not None)

    @property
    def gateway(self) -> IPv4Interface | None:
        """The IPv4 gateway (``FLANNEL_SUBNET``), None on an IPv6-only node."""
        if self.subnet is None:
            return None
        return _first_host(self.subnet)

    @property
    def ipv6_gateway(self) -> IPv6Interface | None:
        """The IPv6 gateway (``FLANNEL_IPV6_SUBNET``), None on an IPv4-only node."""
        if self.ipv6_subnet is None:
            return None
        return _first_host(self.ipv6_subnet)

    def render(self) -> str:
        lines = []
        if self.network is not None:
            lines += [f"FLANNEL_NETWORK={self.network}", f"FLANNEL_SUBNET={self.gateway}"]
        if self.ipv6_network is not None:
            lines += [f"FLANNEL_IPV6_NETWORK={self.ipv6_network}", f"FLANNEL_IPV6_SUBNET={self.ipv6_gateway}"]
        lines += [f"FLANNEL_MTU={self.mtu}", f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}"]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        values: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip().strip('"')

        def read(name: str, convert: Callable[[str], _Parsed], what: str) -> _Parsed | None:
            if name not in values:
                return None
            try:
                return convert(values[name])
            except ValueError:
                raise SubnetEnvError(f"{name}={values[name]!r} is not {what}") from None

        network = read("FLANNEL_NETWORK", IPv4Network, "an IPv4 network like 10.244.0.0/16")
        gateway = read("FLANNEL_SUBNET", IPv4Interface, "an IPv4 address with a prefix like 10.244.7.1/24")
        ipv6_network = read("FLANNEL_IPV6_NETWORK", IPv6Network, "an IPv6 network like fd00:10:244::/56")
        ipv6_gateway = read("FLANNEL_IPV6_SUBNET", IPv6Interface,
                            "an IPv6 address with a prefix like fd00:10:244:7::1/64")
        mtu = read("FLANNEL_MTU", int, "a number")
        if mtu is None:
            raise SubnetEnvError("subnet file lacks FLANNEL_MTU")
        return cls(
            network, gateway.network if gateway is not None else None,
            mtu, values.get("FLANNEL_IPMASQ", "false").lower() == "true",
            ipv6_network, ipv6_gateway.network if ipv6_gateway is not None else None,
        )
