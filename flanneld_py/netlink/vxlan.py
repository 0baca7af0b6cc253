"""The VXLAN device (flannel's VTEP) over a :class:`~flanneld_py.netlink.Netlink`.

Per-peer neighbour and FDB entries go through :mod:`.batch` instead.

Synchronous like the rest of the netlink layer: call it from a worker thread
(``asyncio.to_thread``), never from the event-loop thread. Values in and out
are plain (ints, addresses, MAC strings); the backends build their records
from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from . import Netlink

__all__ = ["DeviceOutcome", "VxlanDeviceSpec", "ensure_vxlan_device"]

@dataclass(frozen=True, slots=True)
class VxlanDeviceSpec:
    """A flannel VTEP: ``flannel.<VNI>`` (``flannel-v6.<VNI>`` with an IPv6 ``local``) over the underlay, learning off."""

    name: str
    vni: int
    port: int
    underlay_index: int
    local: IPv4Address | IPv6Address
    mtu: int
    mac: str
    gbp: bool = False


class DeviceOutcome(Enum):
    CREATED = "created"
    ADOPTED = "adopted"      # an existing compatible device (e.g. from before a restart)
    RECREATED = "recreated"  # an existing device with other settings was replaced


def _vxlan_data(netlink: Netlink, index: int) -> dict[str, Any] | None:
    """The device's IFLA_VXLAN_* attributes, or None if it is not a vxlan device."""
    (link,) = netlink.call("get_links", index)
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    out: dict[str, Any] = {"address": link.get_attr("IFLA_ADDRESS")}
    if data is not None:
        for name, value in data.get("attrs", []):
            out[name] = value
    return out


def _local_attr(spec: VxlanDeviceSpec) -> str:
    return "IFLA_VXLAN_LOCAL6" if spec.local.version == 6 else "IFLA_VXLAN_LOCAL"


def _same_address(found: Any, wanted: IPv4Address | IPv6Address) -> bool:
    try:
        return found is not None and ip_address(found) == wanted
    except ValueError:
        return False


def _compatible(data: dict[str, Any], spec: VxlanDeviceSpec) -> bool:
    return (
        data.get("IFLA_VXLAN_ID") == spec.vni
        and data.get("IFLA_VXLAN_LINK") == spec.underlay_index
        and _same_address(data.get(_local_attr(spec)), spec.local)
        and data.get("IFLA_VXLAN_PORT") == spec.port
        and not data.get("IFLA_VXLAN_LEARNING")
        and bool("IFLA_VXLAN_GBP" in data) == spec.gbp
    )


def _create(netlink: Netlink, spec: VxlanDeviceSpec) -> int:
    attrs: dict[str, Any] = {
        "ifname": spec.name,
        "kind": "vxlan",
        "vxlan_id": spec.vni,
        "vxlan_link": spec.underlay_index,
        _local_attr(spec).lower().removeprefix("ifla_"): str(spec.local),
        "vxlan_port": spec.port,
        "vxlan_learning": 0,
        "address": spec.mac,
        "mtu": spec.mtu,
    }
    if spec.gbp:
        attrs["vxlan_gbp"] = True
    netlink.call("link", "add", **attrs)
    return netlink.require_index(spec.name)


def ensure_vxlan_device(netlink: Netlink, spec: VxlanDeviceSpec) -> tuple[int, DeviceOutcome]:
    """Create the VTEP, or adopt an existing compatible one; MTU, MAC and state up are enforced.

    Like flannel, an existing device with other VXLAN settings (VNI, port,
    underlay, local address, GBP, learning) is deleted and created anew.
    """
    index = netlink.link_index(spec.name)
    outcome = DeviceOutcome.CREATED
    if index is not None:
        data = _vxlan_data(netlink, index)
        if data is not None and _compatible(data, spec):
            outcome = DeviceOutcome.ADOPTED
        else:
            netlink.delete_link(spec.name)
            index = None
            outcome = DeviceOutcome.RECREATED
    if index is None:
        index = _create(netlink, spec)
    attrs = netlink.link_attrs(index)
    changes: dict[str, Any] = {}
    if attrs["mtu"] != spec.mtu:
        changes["mtu"] = spec.mtu
    if str(attrs["address"]).lower() != spec.mac:
        changes["address"] = spec.mac
    if changes:
        netlink.set_link(index, **changes)
    netlink.set_link(index, state="up")
    return index, outcome
