"""The cluster network config: flannel's JSON at ``<prefix>/config``, read as flannel reads it.

Parsing applies flannel's defaults and rejects bad values with an error that
names the field and the value, so an operator can fix the key in etcd. Keys
match case-insensitively, as Go's ``encoding/json`` matches them, and
``Backend.Type`` is lower-cased, as flannel's backend manager does.

What flanneld-py does not use is never dropped silently: keys unknown to
flannel, and flannel keys it does not implement (``Networks``,
``EnableNFTables``, vxlan ``Learning``), come back as
:attr:`NetworkConfig.warnings` for the daemon to log once. A backend flannel
has and flanneld-py lacks is a :class:`ConfigError` that lists ours.

IPv6 follows flannel v0.20.2: ``EnableIPv6`` turns on ``IPv6Network`` (with
``IPv6SubnetLen``, ``IPv6SubnetMin``, ``IPv6SubnetMax`` defaulted as flannel
does), ``EnableIPv4: false`` makes the network IPv6-only. The IPv6 keys are
inert while ``EnableIPv6`` is off. An IPv6-only config keeps flannel's zero
IPv4 values (``0.0.0.0/0``, length 0) in the IPv4 fields, as flannel's lease
keys do; :attr:`NetworkConfig.enable_ipv4` says whether they mean anything.
Whether the chosen backend carries IPv6 is the daemon's check, not the parser's.

``Backend.MTU`` is honoured where flannel honours it: the vxlan backend
(flannel v0.21.3+) takes it as the underlay MTU to assume, so ``flannel.<VNI>``
and pods get ``MTU - 50``. flannel's udp and host-gw backends read no MTU, so
there it is an unknown key (a warning) and the interface's MTU is used.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar

__all__ = [
    "BACKEND_TYPES",
    "FLANNEL_ONLY_BACKENDS",
    "NO_IPV4_SUBNET",
    "BackendConfig",
    "ConfigError",
    "IPv6Range",
    "NetworkConfig",
    "parse_network_config",
    "subnet_inside",
]

BACKEND_TYPES = ("udp", "vxlan", "host-gw")
# flannel's other backends (all versions): named in the error that refuses them
FLANNEL_ONLY_BACKENDS = ("ipip", "wireguard", "ipsec", "alloc", "extension", "gce", "aws-vpc", "ali-vpc",
                         "tencent-vpc")
MIN_UNDERLAY_MTU = 576  # IPv4's minimum datagram every host must take
# top-level keys: what we read, and flannel's keys that stay inert here
_TOP_KEYS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", "EnableIPv6")
_IPV6_KEYS = ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax")
_UNIMPLEMENTED_KEYS = ("Networks", "IPv6Networks", "EnableNFTables")
# Backend keys flannel reads, per type (vxlan MTU: v0.21.3+)
_BACKEND_KEYS = {
    "udp": ("Type", "Port"),
    "vxlan": ("Type", "VNI", "Port", "GBP", "DirectRouting", "MTU", "Learning"),
    "host-gw": ("Type",),
}
_DEFAULT_PORTS = {"udp": 8285, "vxlan": 0, "host-gw": 0}
VXLAN_KERNEL_PORT = 8472
_Net = TypeVar("_Net", IPv4Network, IPv6Network)
NO_IPV4_SUBNET = IPv4Network("0.0.0.0/0")
"""flannel's zero IPv4 subnet: the IPv4 half of an IPv6-only network and of its lease keys."""


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
    mtu: int | None = None  # vxlan: the underlay MTU to assume (flannel 0.21.3+); None: the interface's

    @property
    def vxlan_port(self) -> int:
        """The VXLAN UDP port: flannel's 0 means the kernel's 8472."""
        return self.port or VXLAN_KERNEL_PORT

    def underlay_mtu(self, interface_mtu: int) -> int:
        """The underlay MTU the encapsulation is sized for: ``Backend.MTU`` if set, else the interface's."""
        return self.mtu or interface_mtu


def subnet_inside(subnet: IPv4Network | IPv6Network, network: IPv4Network | IPv6Network) -> bool:
    """``subnet.subnet_of(network)`` in integer arithmetic, for one family: ``ipaddress``'s own
    compares broadcast addresses, which it builds (and caches) per network, and this runs
    for every lease of a listing and every entry of every reconcile pass."""
    return (subnet.prefixlen >= network.prefixlen
            and int(subnet.network_address) & int(network.netmask) == int(network.network_address))


def _holds(network: _Net, subnet_len: int, first: _Net, last: _Net, subnet: _Net) -> bool:
    """``subnet`` is a ``/subnet_len`` of ``network`` from ``first`` to ``last``."""
    return (
        subnet.prefixlen == subnet_len
        and subnet_inside(subnet, network)
        and int(first.network_address) <= int(subnet.network_address) <= int(last.network_address)
    )


@dataclass(frozen=True, slots=True)
class IPv6Range:
    """The IPv6 half of a network config: ``IPv6Network`` cut into ``/subnet_len`` subnets.

    The space is far too large to list, so subnets are worked with as integers.
    """

    network: IPv6Network
    subnet_len: int
    subnet_min: IPv6Network
    subnet_max: IPv6Network

    @property
    def step(self) -> int:
        return 1 << (128 - self.subnet_len)

    def holds_subnet(self, subnet: IPv6Network) -> bool:
        """True if ``subnet`` is one this config may hand out."""
        return _holds(self.network, self.subnet_len, self.subnet_min, self.subnet_max, subnet)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A validated network config. ``subnet_min``/``subnet_max`` are subnets.

    ``ipv6`` is set when ``EnableIPv6`` is on; with ``enable_ipv4`` off the IPv4
    fields hold flannel's zero values (:data:`NO_IPV4_SUBNET`).
    """

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: BackendConfig
    # what the daemon should log once: keys ignored, with why (not part of the config's meaning)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    enable_ipv4: bool = True
    ipv6: IPv6Range | None = None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6 is not None

    @property
    def subnet_count(self) -> int:
        step = 1 << (32 - self.subnet_len)
        return (int(self.subnet_max.network_address) - int(self.subnet_min.network_address)) // step + 1

    def holds_subnet(self, subnet: IPv4Network) -> bool:
        """True if ``subnet`` is one this config may hand out (IPv6-only: flannel's zero subnet)."""
        if not self.enable_ipv4:
            return subnet == NO_IPV4_SUBNET
        return _holds(self.network, self.subnet_len, self.subnet_min, self.subnet_max, subnet)


def parse_network_config(raw: str | bytes) -> NetworkConfig:
    """Parse and validate flannel's network config JSON."""
    try:
        loaded = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("config", _preview(raw), f"not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError("config", _preview(raw), "must be a JSON object")
    doc, unknown = _fold_keys(loaded, (*_TOP_KEYS, *_IPV6_KEYS, *_UNIMPLEMENTED_KEYS))
    enable_ipv4 = _parse_flag("EnableIPv4", doc.get("EnableIPv4", True))
    enable_ipv6 = _parse_flag("EnableIPv6", doc.get("EnableIPv6", False))
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4", False, "and EnableIPv6 is off: enable at least one address family")
    if enable_ipv4:
        network, subnet_len, subnet_min, subnet_max = _parse_ipv4(doc)
    else:
        network, subnet_len, subnet_min, subnet_max = NO_IPV4_SUBNET, 0, NO_IPV4_SUBNET, NO_IPV4_SUBNET
    ipv6 = _parse_ipv6(doc) if enable_ipv6 else None
    backend, backend_unknown, ignored = _parse_backend(doc.get("Backend"))
    warnings = _unknown_warning(unknown + [f"Backend.{key}" for key in backend_unknown], backend.type)
    warnings += _unimplemented_warnings(doc) + ignored
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend, tuple(warnings),
                         enable_ipv4=enable_ipv4, ipv6=ipv6)


def _parse_flag(name: str, value: Any) -> bool:
    if value is None:  # JSON null leaves Go's default in place
        return name == "EnableIPv4"
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")
    return value


@dataclass(frozen=True, slots=True)
class _RangeKeys:
    """One family's keys, and what its network must be."""

    network: str
    subnet_len: str
    subnet_min: str
    subnet_max: str
    required: str  # how to say the network is required, with an example
    longest: int  # the longest network prefix with room for four subnets


_IPV4_RANGE = _RangeKeys("Network", "SubnetLen", "SubnetMin", "SubnetMax",
                         "is required, e.g. \"10.244.0.0/16\"", 28)
_IPV6_RANGE = _RangeKeys("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
                         "is required with EnableIPv6, e.g. \"fd00:10:244::/56\"", 124)


def _parse_ipv4(doc: Mapping[str, Any]) -> tuple[IPv4Network, int, IPv4Network, IPv4Network]:
    network = _parse_network(_IPV4_RANGE, doc.get("Network"), IPv4Network)
    return _parse_range(doc, _IPV4_RANGE, network, _parse_subnet_len(doc.get("SubnetLen"), network))


def _parse_ipv6(doc: Mapping[str, Any]) -> IPv6Range:
    """flannel's IPv6 rules: a /64 per node where IPv6Network allows it, else a quarter of it."""
    network = _parse_network(_IPV6_RANGE, doc.get("IPv6Network"), IPv6Network)
    subnet_len = _parse_ipv6_subnet_len(doc.get("IPv6SubnetLen"), network)
    return IPv6Range(*_parse_range(doc, _IPV6_RANGE, network, subnet_len))


def _parse_range(doc: Mapping[str, Any], keys: _RangeKeys, network: _Net, subnet_len: int) -> tuple[_Net, int, _Net, _Net]:
    """The subnet bounds: flannel's defaults skip the first subnet and end at the last."""
    step = 1 << (network.max_prefixlen - subnet_len)
    kind = type(network)
    first = kind((int(network.network_address) + step, subnet_len))
    last = kind((int(network.broadcast_address) + 1 - step, subnet_len))
    subnet_min = _parse_bound(keys.subnet_min, doc.get(keys.subnet_min), network, subnet_len, first)
    subnet_max = _parse_bound(keys.subnet_max, doc.get(keys.subnet_max), network, subnet_len, last)
    if int(subnet_min.network_address) > int(subnet_max.network_address):
        raise ConfigError(keys.subnet_min, str(subnet_min.network_address), f"is above {keys.subnet_max}")
    return network, subnet_len, subnet_min, subnet_max


def _parse_ipv6_subnet_len(value: Any, network: IPv6Network) -> int:
    if value is None or value == 0:
        return 64 if network.prefixlen <= 62 else network.prefixlen + 2
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("IPv6SubnetLen", value, "must be an integer")
    if value > 126:
        raise ConfigError("IPv6SubnetLen", value, "must be 126 or less")
    if value < network.prefixlen + 2:
        raise ConfigError("IPv6SubnetLen", value, f"must be at least /{network.prefixlen + 2} so that "
                          f"IPv6Network /{network.prefixlen} holds four subnets")
    return value


def _fold_keys(doc: Mapping[str, Any], known: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Keys matched to ``known`` as Go's encoding/json matches them (exact, else ignoring case;
    the last of equal keys wins), and the keys that match none, in document order."""
    exact = set(known)
    folded = {name.lower(): name for name in exact}
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in doc.items():
        name = key if key in exact else folded.get(key.lower())
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    return out, unknown


def _unknown_warning(keys: list[str], backend_type: str) -> list[str]:
    if not keys:
        return []
    return [(f"network config: ignoring {', '.join(keys)}: not a key flannel reads for a {backend_type} "
             "network (a typo?)")]


def _unimplemented_warnings(doc: Mapping[str, Any]) -> list[str]:
    out = []
    for key in ("Networks", "IPv6Networks"):
        if doc.get(key):
            out.append(f"network config: ignoring {key}: flanneld-py uses Network alone")
    if doc.get("EnableNFTables"):
        out.append("network config: ignoring EnableNFTables: flanneld-py writes iptables rules (through "
                   "iptables-nft where the host uses nftables)")
    return out


def _preview(raw: str | bytes) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_network(keys: _RangeKeys, value: Any, kind: type[_Net]) -> _Net:
    if value is None:
        raise ConfigError(keys.network, None, keys.required)
    if not isinstance(value, str):
        raise ConfigError(keys.network, value, "must be a string CIDR")
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(keys.network, value, "is not a CIDR") from None
    if not isinstance(network, kind):
        raise ConfigError(keys.network, value, "must be IPv4" if kind is IPv4Network else "must be IPv6")
    if network.prefixlen > keys.longest:
        raise ConfigError(keys.network, value, f"is too small (prefix longer than /{keys.longest})")
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


def _parse_bound(field: str, value: Any, network: _Net, subnet_len: int, default: _Net) -> _Net:
    """SubnetMin/SubnetMax (or their IPv6 keys): an address in ``network`` on a subnet boundary."""
    if value is None or value == "":
        return default
    family = "IPv4" if network.version == 4 else "IPv6"
    if not isinstance(value, str):
        raise ConfigError(field, value, f"must be an {family} address string")
    try:
        address = ipaddress.ip_address(value.split("/")[0])
    except ValueError:
        address = None
    if address is None or address.version != network.version:
        raise ConfigError(field, value, f"is not an {family} address")
    if address not in network:
        raise ConfigError(field, value, f"is outside {'Network' if network.version == 4 else 'IPv6Network'} {network}")
    if int(address) % (1 << (network.max_prefixlen - subnet_len)):
        raise ConfigError(field, value, f"is not the start of a /{subnet_len} subnet")
    return type(network)((int(address), subnet_len))


def _parse_backend(value: Any) -> tuple[BackendConfig, list[str], list[str]]:
    """The backend, its keys flannel does not read for its type, and warnings for ignored ones."""
    if value is None:
        return BackendConfig(), [], []
    if not isinstance(value, dict):
        raise ConfigError("Backend", value, "must be a JSON object")
    type_field, _ = _fold_keys(value, ("Type",))
    kind = type_field.get("Type", "udp")
    if not isinstance(kind, str):
        raise ConfigError("Backend.Type", kind, f"must be a string: one of {', '.join(BACKEND_TYPES)}")
    kind = kind.lower() or "udp"
    if kind in FLANNEL_ONLY_BACKENDS:
        raise ConfigError("Backend.Type", kind, f"is a flannel backend flanneld-py does not have; "
                          f"use one of {', '.join(BACKEND_TYPES)}")
    if kind not in BACKEND_TYPES:
        raise ConfigError("Backend.Type", kind, f"is not a backend; use one of {', '.join(BACKEND_TYPES)}")
    doc, unknown = _fold_keys(value, _BACKEND_KEYS[kind])
    port = doc.get("Port", _DEFAULT_PORTS[kind])
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("Backend.Port", port, "must be a port number 1-65535")
    if kind == "udp" and port == 0:
        port = _DEFAULT_PORTS["udp"]
    vni = doc.get("VNI", 1)
    if not isinstance(vni, int) or isinstance(vni, bool) or not 0 < vni < (1 << 24):
        raise ConfigError("Backend.VNI", vni, "must be an integer 1-16777215")
    gbp = doc.get("GBP", False)
    direct = doc.get("DirectRouting", False)
    learning = doc.get("Learning", False)
    for name, flag in (("Backend.GBP", gbp), ("Backend.DirectRouting", direct), ("Backend.Learning", learning)):
        if not isinstance(flag, bool):
            raise ConfigError(name, flag, "must be true or false")
    mtu = doc.get("MTU") or None
    if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool)
                            or not MIN_UNDERLAY_MTU <= mtu <= 65535):
        raise ConfigError("Backend.MTU", mtu, f"must be {MIN_UNDERLAY_MTU}-65535 (the underlay MTU; "
                          "flannel.<VNI> and pods get MTU - 50)")
    ignored = []
    if learning:
        ignored.append("network config: ignoring Backend.Learning=true: flanneld-py keeps VXLAN learning off "
                       "and programs every peer's FDB entry itself")
    backend = BackendConfig(type=kind, port=port, vni=vni, gbp=gbp, direct_routing=direct, mtu=mtu)
    return backend, unknown, ignored
