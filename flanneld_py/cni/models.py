"""The CNI protocol as data: requests, errors and results, per cniVersion.

Pure: no sockets, no kernel, no files. The daemon side parses the shim's
wire request (``{"command", "env", "config"}``) into a ``Request`` here, and
renders a ``Result`` or a ``CniError`` in the version the runtime asked for
(containernetworking/cni SPEC.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any

__all__ = [
    "COMMANDS",
    "SUPPORTED_VERSIONS",
    "Attachment",
    "CniError",
    "ConfigDefaults",
    "ErrorCode",
    "IPConfig",
    "Interface",
    "NetConf",
    "Request",
    "Result",
    "Route",
    "parse_request",
    "version_info",
]

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"

# Which CNI_* variables each command cannot do without (SPEC.md, "Parameters").
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}
# The first cniVersion in which each command exists.
COMMAND_SINCE = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_CONTAINER_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class ErrorCode(IntEnum):
    """SPEC.md's well-known codes (< 100) and ours (>= 100)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    # ours
    SUBNET_FILE_INVALID = 100
    ADDRESSES_EXHAUSTED = 101
    KERNEL_SETUP_FAILED = 102
    CHECK_MISMATCH = 103
    FIREWALL_FAILED = 104
    INTERNAL = 110


class CniError(Exception):
    """A failure the runtime sees as SPEC.md's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def render(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def answer_version(requested: object) -> str:
    """The version to answer in: the one asked for when we speak it, else our latest."""
    return requested if isinstance(requested, str) and requested in SUPPORTED_VERSIONS else LATEST_VERSION


def version_info(requested: object) -> dict[str, Any]:
    """The VERSION command's answer."""
    return {"cniVersion": answer_version(requested), "supportedVersions": list(SUPPORTED_VERSIONS)}


# --- configuration ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """One (container, interface) pair: the key under which a pod's resources are kept."""

    container_id: str
    ifname: str


@dataclass(frozen=True, slots=True)
class ConfigDefaults:
    """Where things live when the network config does not say (the daemon's choice)."""

    subnet_file: str = "/run/flannel/subnet.env"
    data_dir: str = "/var/lib/cni/networks"
    bridge: str = "cni0"
    gso_max_size: int | None = None  # the backend's wish for pod veths (udp: one super-packet per GSO send)


@dataclass(frozen=True, slots=True)
class NetConf:
    """Our plugin's part of the network configuration (one entry of a conflist)."""

    cni_version: str
    name: str
    bridge: str
    subnet_file: str
    data_dir: str
    is_default_gateway: bool = False
    hairpin_mode: bool = False
    ip_masq: bool | None = None  # None: follow the subnet file (!FLANNEL_IPMASQ), as flannel does
    gso_max_size: int | None = None  # gsoMaxSize: caps both veth ends' GSO size; None: the backend's choice
    dns: dict[str, Any] = field(default_factory=dict)
    prev_result: dict[str, Any] | None = None
    valid_attachments: tuple[Attachment, ...] | None = None

    @classmethod
    def parse(cls, raw: object, defaults: ConfigDefaults) -> NetConf:
        if not isinstance(raw, dict):
            raise CniError(ErrorCode.INVALID_CONFIG, "the network config must be a JSON object")
        version = raw.get("cniVersion")
        if not isinstance(version, str) or not version:
            raise CniError(ErrorCode.INVALID_CONFIG, "the network config has no cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise CniError(ErrorCode.INCOMPATIBLE_VERSION,
                           f"cniVersion {version} is not supported",
                           f"supported versions: {', '.join(SUPPORTED_VERSIONS)}")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CniError(ErrorCode.INVALID_CONFIG,
                           f"the network config's name {name!r} is missing or not a valid network name")
        return cls(
            cni_version=version,
            name=name,
            bridge=_ifname(raw, "bridge", defaults.bridge),
            subnet_file=_path(raw, "subnetFile", defaults.subnet_file),
            data_dir=_path(raw, "dataDir", defaults.data_dir),
            is_default_gateway=_bool(raw, "isDefaultGateway", False),
            hairpin_mode=_bool(raw, "hairpinMode", False),
            ip_masq=_optional_bool(raw, "ipMasq"),
            gso_max_size=_optional_int(raw, "gsoMaxSize", 1, 524280) or defaults.gso_max_size,
            dns=_object(raw, "dns") or {},
            prev_result=_object(raw, "prevResult"),
            valid_attachments=_attachments(raw.get(VALID_ATTACHMENTS_KEY)),
        )


def _bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = _optional_bool(raw, key)
    return default if value is None else value


def _optional_bool(raw: dict[str, Any], key: str) -> bool | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise CniError(ErrorCode.INVALID_CONFIG, f"config key {key!r} must be true or false, not {value!r}")
    return value


def _optional_int(raw: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CniError(ErrorCode.INVALID_CONFIG, f"config key {key!r} must be an integer in [{low}, {high}]")
    return value


def _object(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, dict):
        raise CniError(ErrorCode.INVALID_CONFIG, f"config key {key!r} must be a JSON object")
    return value


def _path(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.startswith("/"):
        raise CniError(ErrorCode.INVALID_CONFIG, f"config key {key!r} must be an absolute path, not {value!r}")
    return value


def _ifname(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not valid_ifname(value):
        raise CniError(ErrorCode.INVALID_CONFIG, f"config key {key!r} is not a valid interface name: {value!r}")
    return value


def _attachments(value: object) -> tuple[Attachment, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise CniError(ErrorCode.INVALID_CONFIG, f"{VALID_ATTACHMENTS_KEY} must be a list")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise CniError(ErrorCode.INVALID_CONFIG,
                           f"each of {VALID_ATTACHMENTS_KEY} needs string containerID and ifname, got {item!r}")
        out.append(Attachment(item["containerID"], item["ifname"]))
    return tuple(out)


def valid_ifname(name: str) -> bool:
    """Linux's rule (and SPEC.md's): 1-15 bytes, not . or .., no /, : or whitespace."""
    return (0 < len(name.encode()) <= 15 and name not in (".", "..")
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


# --- requests --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One plugin invocation, as the runtime made it."""

    command: str
    config: NetConf
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, self.ifname)


def parse_request(wire: object, defaults: ConfigDefaults) -> Request:
    """Validate the shim's ``{"command", "env", "config"}`` into a ``Request``."""
    if not isinstance(wire, dict) or not isinstance(wire.get("env"), dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "malformed request from the flannel-py plugin")
    env: dict[str, Any] = wire["env"]
    command = wire.get("command") or env.get("CNI_COMMAND")
    if command not in COMMANDS:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    config = NetConf.parse(wire.get("config"), defaults)
    _check_env(command, env)
    since = COMMAND_SINCE.get(command)
    if since and version_tuple(config.cni_version) < version_tuple(since):
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION,
                       f"config version {config.cni_version} does not allow {command} (needs {since} or later)")
    if command == "CHECK" and config.prev_result is None:
        raise CniError(ErrorCode.INVALID_CONFIG, "CHECK needs prevResult in the network config")
    return Request(
        command=command,
        config=config,
        container_id=str(env.get("CNI_CONTAINERID", "")),
        netns=str(env.get("CNI_NETNS", "")),
        ifname=str(env.get("CNI_IFNAME", "")),
        args=parse_cni_args(str(env.get("CNI_ARGS", ""))),
        path=str(env.get("CNI_PATH", "")),
    )


def _check_env(command: str, env: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_ENV[command] if not env.get(key)]
    if missing:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"{command} needs {', '.join(missing)} to be set")
    container_id = env.get("CNI_CONTAINERID")
    if container_id and not (isinstance(container_id, str) and _CONTAINER_ID_RE.match(container_id)):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       f"CNI_CONTAINERID {container_id!r} may only hold letters, digits, '_', '.' and '-'")
    ifname = env.get("CNI_IFNAME")
    if ifname and not (isinstance(ifname, str) and valid_ifname(ifname)):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    netns = env.get("CNI_NETNS")
    if netns and not (isinstance(netns, str) and netns.startswith("/")):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_NETNS {netns!r} must be an absolute path")


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` is ``K1=V1;K2=V2``; entries without ``=`` are ignored."""
    out = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep and key:
            out[key] = value
    return out


# --- results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interface:
    """One interface of a CNI result."""

    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None  # reported from cniVersion 1.1.0 on


@dataclass(frozen=True, slots=True)
class IPConfig:
    """One address of a CNI result, on the interface at index ``interface``."""

    address: IPv4Interface | IPv6Interface
    gateway: IPv4Address | IPv6Address | None = None
    interface: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """One route of a CNI result."""

    dst: IPv4Network | IPv6Network
    gw: IPv4Address | IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """An ADD result; also the parsed ``prevResult`` of a CHECK or DEL."""

    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: dict[str, Any] = field(default_factory=dict)

    def render(self, cni_version: str) -> dict[str, Any]:
        """SPEC.md's result object: 0.3.x/0.4.0 tag each IP with ``"version": "4"`` or ``"6"``, 1.x does not."""
        legacy = version_tuple(cni_version) < (1, 0, 0)
        with_mtu = version_tuple(cni_version) >= (1, 1, 0)
        return {
            "cniVersion": cni_version,
            "interfaces": [_render_interface(i, with_mtu) for i in self.interfaces],
            "ips": [_render_ip(ip, legacy) for ip in self.ips],
            "routes": [_render_route(r) for r in self.routes],
            "dns": dict(self.dns),
        }

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Result:
        """Read a prevResult of any supported version, both address families."""
        try:
            interfaces = tuple(Interface(str(i["name"]), str(i.get("mac", "")), str(i.get("sandbox", "")))
                               for i in raw.get("interfaces") or ())
            ips = tuple(
                IPConfig(ip_interface(ip["address"]),
                         ip_address(ip["gateway"]) if ip.get("gateway") else None,
                         ip.get("interface"))
                for ip in raw.get("ips") or ())
            routes = tuple(
                Route(ip_network(r["dst"]), ip_address(r["gw"]) if r.get("gw") else None)
                for r in raw.get("routes") or ())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CniError(ErrorCode.INVALID_CONFIG, "prevResult is malformed", str(exc)) from None
        return cls(interfaces, ips, routes, dict(raw.get("dns") or {}))


def _render_interface(iface: Interface, with_mtu: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if with_mtu and iface.mtu:
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    return out


def _render_ip(ip: IPConfig, legacy: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"version": str(ip.address.version)} if legacy else {}
    if ip.interface is not None:
        out["interface"] = ip.interface
    out["address"] = str(ip.address)
    if ip.gateway is not None:
        out["gateway"] = str(ip.gateway)
    return out


def _render_route(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    return out
