"""VXLAN device, neighbour and FDB access over a :class:`~flanneld_py.netlink.Netlink`.

Synchronous like the rest of the netlink layer: call it from a worker thread
(``asyncio.to_thread``), never from the event-loop thread. Values in and out
are plain (ints, addresses, MAC strings); the backends build their records
from them.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address
from typing import Any

from . import Netlink, NetlinkError

__all__ = [
    "DeviceOutcome",
    "VxlanDeviceSpec",
    "delete_fdb",
    "delete_neigh",
    "ensure_vxlan_device",
    "fdb_entries",
    "permanent_neighbours",
    "replace_fdb",
    "replace_neigh",
    "vxlan_device_mac",
]

AF_INET = 2
AF_BRIDGE = 7
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV)


@dataclass(frozen=True, slots=True)
class VxlanDeviceSpec:
    """A flannel VTEP: ``flannel.<VNI>`` over the underlay, learning off."""

    name: str
    vni: int
    port: int
    underlay_index: int
    local: IPv4Address
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


def vxlan_device_mac(netlink: Netlink, name: str) -> str | None:
    """The MAC of an existing vxlan device ``name``, so a restart keeps its VTEP MAC."""
    index = netlink.link_index(name)
    if index is None:
        return None
    data = _vxlan_data(netlink, index)
    return None if data is None else str(data["address"]).lower()


def _compatible(data: dict[str, Any], spec: VxlanDeviceSpec) -> bool:
    return (
        data.get("IFLA_VXLAN_ID") == spec.vni
        and data.get("IFLA_VXLAN_LINK") == spec.underlay_index
        and data.get("IFLA_VXLAN_LOCAL") == str(spec.local)
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
        "vxlan_local": str(spec.local),
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


# --- neighbours (ARP) ----------------------------------------------------------


def replace_neigh(netlink: Netlink, ifindex: int, ip: IPv4Address, mac: str) -> None:
    """Add or overwrite the permanent entry ``ip -> mac`` (flannel's ``AddARP``)."""
    netlink.call("neigh", "replace", family=AF_INET, ifindex=ifindex, dst=str(ip), lladdr=mac,
                 state=NUD_PERMANENT)


def _delete_neighbour_entry(netlink: Netlink, **match: object) -> bool:
    """One ``neigh del``; False if the entry (or its device) was already gone."""
    try:
        netlink.call("neigh", "del", **match)
    except NetlinkError as exc:
        if exc.code in _GONE:
            return False
        raise
    return True


def delete_neigh(netlink: Netlink, ifindex: int, ip: IPv4Address) -> bool:
    """Remove the entry for ``ip``; False if there was none."""
    return _delete_neighbour_entry(netlink, family=AF_INET, ifindex=ifindex, dst=str(ip))


def permanent_neighbours(netlink: Netlink, ifindex: int) -> list[tuple[IPv4Address, str]]:
    """(IP, MAC) of every permanent IPv4 neighbour on the device."""
    out = []
    for msg in netlink.call("get_neighbours", family=AF_INET, ifindex=ifindex):
        dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
        if msg["state"] & NUD_PERMANENT and dst and mac:
            out.append((IPv4Address(dst), str(mac).lower()))
    return out


# --- FDB -----------------------------------------------------------------------------


def replace_fdb(netlink: Netlink, ifindex: int, mac: str, dst: IPv4Address) -> None:
    """Send frames for ``mac`` to the VTEP at ``dst`` (flannel's ``AddFDB``: NeighSet, self, permanent)."""
    netlink.call("neigh", "replace", family=AF_BRIDGE, ifindex=ifindex, lladdr=mac, dst=str(dst),
                 state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)


def delete_fdb(netlink: Netlink, ifindex: int, mac: str, dst: IPv4Address) -> bool:
    """Remove the FDB entry ``mac -> dst``; False if there was none."""
    return _delete_neighbour_entry(netlink, family=AF_BRIDGE, ifindex=ifindex, lladdr=mac, dst=str(dst),
                                   state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)


def fdb_entries(netlink: Netlink, ifindex: int) -> list[tuple[str, IPv4Address]]:
    """(MAC, remote VTEP) of every FDB entry with an IPv4 remote on the device."""
    out = []
    for msg in netlink.call("get_neighbours", family=AF_BRIDGE, ifindex=ifindex):
        dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
        if msg["ifindex"] != ifindex or not dst or not mac or ":" in str(dst):
            continue
        out.append((str(mac).lower(), IPv4Address(dst)))
    return out
