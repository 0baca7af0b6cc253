"""The cluster network config: flannel's JSON at ``<prefix>/config``.

Parsing applies flannel's defaults and rejects bad values with an error that
names the field and the value, so an operator can fix the key in etcd.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

__all__ = [
    "BACKEND_TYPES",
    "BackendConfig",
    "ConfigError",
    "NetworkConfig",
    "parse_network_config",
]

BACKEND_TYPES = ("udp", "vxlan", "host-gw")
_DEFAULT_PORTS = {"udp": 8285, "vxlan": 0, "host-gw": 0}
VXLAN_KERNEL_PORT = 8472


class ConfigError(ValueError):
    """The network config is invalid; ``field`` and ``value`` say where."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"network config: {field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """``Backend`` of the network config; fields unused by a type keep defaults."""

    type: str = "udp"
    port: int = 8285
    vni: int = 1
    gbp: bool = False
    direct_routing: bool = False

    @property
    def vxlan_port(self) -> int:
        """The VXLAN UDP port: flannel's 0 means the kernel's 8472."""
        return self.port or VXLAN_KERNEL_PORT


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A validated network config. ``subnet_min``/``subnet_max`` are subnets."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: BackendConfig

    @property
    def subnet_count(self) -> int:
        step = 1 << (32 - self.subnet_len)
        return (int(self.subnet_max.network_address) - int(self.subnet_min.network_address)) // step + 1

    def holds_subnet(self, subnet: IPv4Network) -> bool:
        """True if ``subnet`` is one this config may hand out."""
        return (
            subnet.prefixlen == self.subnet_len
            and subnet.subnet_of(self.network)
            and int(self.subnet_min.network_address)
            <= int(subnet.network_address)
            <= int(self.subnet_max.network_address)
        )


def parse_network_config(raw: str | bytes) -> NetworkConfig:
    """Parse and validate flannel's network config JSON."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("config", _preview(raw), f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError("config", _preview(raw), "must be a JSON object")
    if doc.get("EnableIPv6"):
        raise ConfigError("EnableIPv6", doc["EnableIPv6"], "IPv6 networks are not supported")
    if doc.get("EnableIPv4") is False:
        raise ConfigError("EnableIPv4", False, "an IPv4 Network is required")
    network = _parse_network(doc.get("Network"))
    subnet_len = _parse_subnet_len(doc.get("SubnetLen"), network)
    step = 1 << (32 - subnet_len)
    first = IPv4Network((int(network.network_address) + step, subnet_len))
    last = IPv4Network((int(network.broadcast_address) + 1 - step, subnet_len))
    subnet_min = _parse_bound("SubnetMin", doc.get("SubnetMin"), network, subnet_len, first)
    subnet_max = _parse_bound("SubnetMax", doc.get("SubnetMax"), network, subnet_len, last)
    if int(subnet_min.network_address) > int(subnet_max.network_address):
        raise ConfigError("SubnetMin", str(subnet_min.network_address), "is above SubnetMax")
    backend = _parse_backend(doc.get("Backend"))
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend)


def _preview(raw: str | bytes) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_network(value: Any) -> IPv4Network:
    if value is None:
        raise ConfigError("Network", None, "is required, e.g. \"10.244.0.0/16\"")
    if not isinstance(value, str):
        raise ConfigError("Network", value, "must be a string CIDR")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError("Network", value, "is not a CIDR") from None
    if not isinstance(network, IPv4Network):
        raise ConfigError("Network", value, "must be IPv4")
    if network.prefixlen > 28:
        raise ConfigError("Network", value, "is too small (prefix longer than /28)")
    return network


def _parse_subnet_len(value: Any, network: IPv4Network) -> int:
    if value is None or value == 0:
        return 24 if network.prefixlen <= 22 else network.prefixlen + 2
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("SubnetLen", value, "must be an integer")
    if value <= network.prefixlen:
        raise ConfigError("SubnetLen", value, f"must be longer than the Network prefix /{network.prefixlen}")
    if value > 30:
        raise ConfigError("SubnetLen", value, "must be 30 or less")
    return value


def _parse_bound(
    field: str, value: Any, network: IPv4Network, subnet_len: int, default: IPv4Network
) -> IPv4Network:
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ConfigError(field, value, "must be an IPv4 address string")
    try:
        address = IPv4Address(value.split("/")[0])
    except ValueError:
        raise ConfigError(field, value, "is not an IPv4 address") from None
    if address not in network:
        raise ConfigError(field, value, f"is outside Network {network}")
    step = 1 << (32 - subnet_len)
    if int(address) % step:
        raise ConfigError(field, value, f"is not the start of a /{subnet_len} subnet")
    return IPv4Network((int(address), subnet_len))


def _parse_backend(value: Any) -> BackendConfig:
    if value is None:
        return BackendConfig()
    if not isinstance(value, dict):
        raise ConfigError("Backend", value, "must be a JSON object")
    kind = value.get("Type", "udp")
    if kind not in BACKEND_TYPES:
        raise ConfigError("Backend.Type", kind, f"must be one of {', '.join(BACKEND_TYPES)}")
    port = value.get("Port", _DEFAULT_PORTS[kind])
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("Backend.Port", port, "must be a port number 1-65535")
    if kind == "udp" and port == 0:
        port = _DEFAULT_PORTS["udp"]
    vni = value.get("VNI", 1)
    if not isinstance(vni, int) or isinstance(vni, bool) or not 0 < vni < (1 << 24):
        raise ConfigError("Backend.VNI", vni, "must be an integer 1-16777215")
    gbp = value.get("GBP", False)
    direct = value.get("DirectRouting", False)
    for name, flag in (("Backend.GBP", gbp), ("Backend.DirectRouting", direct)):
        if not isinstance(flag, bool):
            raise ConfigError(name, flag, "must be true or false")
    return BackendConfig(type=kind, port=port, vni=vni, gbp=gbp, direct_routing=direct)
