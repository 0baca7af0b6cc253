"""The VXLAN device (flannel's VTEP) over a :class:`~flanneld_py.netlink.Netlink`.

Per-peer neighbour and FDB entries go through :mod:`.batch` instead.

Synchronous like the rest of the netlink layer: call it from a worker thread
(``asyncio.to_thread``), never from the event-loop thread. Values in and out
are plain (ints, addresses, MAC strings); the backends build their records
from them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv6Address

from . import Netlink
from .batch import attr, new_link_request

__all__ = ["DeviceOutcome", "VxlanDeviceSpec", "ensure_vxlan_device"]

# IFLA_VXLAN_* attributes (linux/if_link.h)
VXLAN_ID, VXLAN_LINK, VXLAN_LOCAL, VXLAN_LEARNING, VXLAN_PORT, VXLAN_LOCAL6, VXLAN_GBP = 1, 3, 4, 7, 15, 17, 23
_U32 = struct.Struct("=I")
_PORT = struct.Struct("!H")


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


def _local_attr(spec: VxlanDeviceSpec) -> int:
    return VXLAN_LOCAL6 if spec.local.version == 6 else VXLAN_LOCAL


def vxlan_data(spec: VxlanDeviceSpec) -> dict[int, bytes]:
    """The device's IFLA_VXLAN_* attributes as the kernel reports them back (GBP: a flag, present or not)."""
    data = {
        VXLAN_ID: _U32.pack(spec.vni),
        VXLAN_LINK: _U32.pack(spec.underlay_index),
        _local_attr(spec): spec.local.packed,
        VXLAN_PORT: _PORT.pack(spec.port),
        VXLAN_LEARNING: b"\0",
    }
    if spec.gbp:
        data[VXLAN_GBP] = b""
    return data


def _compatible(found: dict[int, bytes], spec: VxlanDeviceSpec) -> bool:
    wanted = vxlan_data(spec)
    return (all(found.get(kind) == value for kind, value in wanted.items() if kind != VXLAN_LEARNING)
            and not any(found.get(VXLAN_LEARNING, b"")) and (VXLAN_GBP in found) == spec.gbp)


def _create(netlink: Netlink, spec: VxlanDeviceSpec) -> int:
    data = b"".join(attr(kind, value) for kind, value in vxlan_data(spec).items())
    netlink.request(new_link_request(spec.name, "vxlan", data, mtu=spec.mtu, mac=spec.mac))
    return netlink.require_index(spec.name)


def ensure_vxlan_device(netlink: Netlink, spec: VxlanDeviceSpec) -> tuple[int, DeviceOutcome]:
    """Create the VTEP, or adopt an existing compatible one; MTU, MAC and state up are enforced.

    Like flannel, an existing device with other VXLAN settings (VNI, port,
    underlay, local address, GBP, learning) is deleted and created anew.
    """
    index = netlink.link_index(spec.name)
    outcome = DeviceOutcome.CREATED
    if index is not None:
        link = netlink.link(index)
        if link.kind == "vxlan" and _compatible(link.data, spec):
            outcome = DeviceOutcome.ADOPTED
        else:
            netlink.delete_link(spec.name)
            index = None
            outcome = DeviceOutcome.RECREATED
    if index is None:
        index = _create(netlink, spec)
    link = netlink.link(index)
    netlink.set_link(index, mtu=spec.mtu if link.mtu != spec.mtu else None,
                     address=spec.mac if link.mac.lower() != spec.mac else None, state="up")
    return index, outcome
