"""VxlanBackend: flannel's ``vxlan`` backend (kernel encapsulation), record-compatible with flannel.

Kernel state: device ``flannel.<VNI>`` (UDP port 8472 unless ``Port`` says
otherwise, learning off, GBP as configured, underlay = the chosen interface,
local = its address), MTU = underlay MTU - 50, address ``<subnet>/32``. Per
peer: a permanent neighbour (peer subnet address -> VtepMAC), a permanent FDB
entry (VtepMAC -> PublicIP) and ``<peer subnet> via <peer subnet address>
dev flannel.<VNI> onlink``; with ``DirectRouting`` a peer on our underlay
subnet gets a plain route via its PublicIP instead.

With ``EnableIPv6``, as flannel: a second device ``flannel-v6.<VNI>`` over the
IPv6 underlay (local = our PublicIPv6, MTU = underlay MTU - 70, its own MAC,
address ``<IPv6 subnet>/128``), published as ``BackendV6Data``; per peer the
same three entries in IPv6 (neighbour, FDB to its PublicIPv6, onlink route
via its IPv6 subnet address), or with DirectRouting a route via its PublicIPv6
when that is on our interface's IPv6 prefix.

The lease carries ``{"VNI": 1, "VtepMAC": "..."}`` exactly as flannel writes
it. A restart reuses the MAC of an existing device, as flannel does, so the
neighbour and FDB entries peers hold for us stay valid.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from typing import Any

from ..core.lease import Lease, LeaseAttrs
from ..netlink import vxlan as nlvx
from ..netlink.batch import RtnlSocket
from .base import BackendContext
from .kernel import Kernel
from .kernel_state import (
    VXLAN_OVERHEAD,
    VXLAN_V6_OVERHEAD,
    Entry,
    PeerEntries,
    Scope,
    VxlanLocal,
    random_vtep_mac,
    vtep_address,
    vxlan_backend_data,
    vxlan_peer_entries,
)
from .reconcile_loop import RECONCILE_INTERVAL
from .routed import RoutedBackend

__all__ = ["VxlanBackend"]

log = logging.getLogger(__name__)

IFF_UP = 0x1


class VxlanBackend(RoutedBackend):
    type_name = "vxlan"
    families = frozenset({4, 6})

    def __init__(self, ctx: BackendContext, kernel: Kernel | None = None,
                 interval: float = RECONCILE_INTERVAL, rng: random.Random | None = None) -> None:
        super().__init__(ctx, kernel, interval)
        self.vni = ctx.config.backend.vni
        self.device_name = f"flannel.{self.vni}"
        self.device6_name = f"flannel-v6.{self.vni}"
        self._rng = rng or random.SystemRandom()
        self._macs: dict[str, str] = {}  # device name -> VTEP MAC, once lease_attrs() or start() chose it
        self._local: VxlanLocal | None = None
        self._local6: VxlanLocal | None = None
        address = ctx.iface.address
        self._underlay = None if address is None else IPv4Interface((address, ctx.iface.prefixlen)).network
        self._v4 = ctx.config.enable_ipv4
        self._v6 = ctx.config.enable_ipv6 and ctx.public_ipv6 is not None

    @property
    def vtep_mac(self) -> str | None:
        return self._macs.get(self.device_name)

    @property
    def mtu(self) -> int:
        """The IPv4 VTEP's MTU, as flannel writes it for pods (the IPv6 VTEP's on an IPv6-only node)."""
        underlay = self.ctx.config.backend.underlay_mtu(self.ctx.iface.mtu)
        return underlay - (VXLAN_OVERHEAD if self._v4 else VXLAN_V6_OVERHEAD)

    def _choose_mac(self, name: str) -> str:
        """A VTEP's MAC: the existing device's on a restart, else a new random one.

        One rtnetlink request on a socket of our own (not the shared
        ``Netlink``, whose lock a worker thread may hold): the kernel answers
        within the send, so the loop never waits on a thread or a peer.
        """
        if name not in self._macs:
            rtnl = RtnlSocket(self.ctx.netlink.raw_socket())
            try:
                found = rtnl.link_kind_and_mac(name)
            finally:
                rtnl.close()
            existing = found[1] if found is not None and found[0] == "vxlan" else None
            self._macs[name] = existing or random_vtep_mac(self._rng)
            if existing:
                log.info("reusing VTEP MAC %s of the existing %s", existing, name)
        return self._macs[name]

    def lease_attrs(self) -> LeaseAttrs:
        data = vxlan_backend_data(self.vni, self._choose_mac(self.device_name)) if self._v4 else None
        return LeaseAttrs(self.ctx.public_ip, self.type_name, data)

    def backend_v6_data(self) -> Any:
        """``BackendV6Data``: flannel-v6.N's VNI and MAC, in flannel's field order."""
        return vxlan_backend_data(self.vni, self._choose_mac(self.device6_name)) if self._v6 else None

    def _device_spec(self, name: str) -> nlvx.VxlanDeviceSpec:
        cfg = self.ctx.config.backend
        underlay = cfg.underlay_mtu(self.ctx.iface.mtu)
        local: IPv4Address | IPv6Address
        if name == self.device6_name:
            local6 = self.ctx.iface.address6 or self.ctx.public_ipv6  # the IPv6 underlay's address, as flannel
            assert local6 is not None
            local, mtu = local6, underlay - VXLAN_V6_OVERHEAD
        else:
            assert self.ctx.iface.address is not None, "flannel.<VNI> on an underlay without IPv4"
            local, mtu = self.ctx.iface.address, underlay - VXLAN_OVERHEAD
        return nlvx.VxlanDeviceSpec(
            name=name, vni=self.vni, port=cfg.vxlan_port, underlay_index=self.ctx.iface.index,
            local=local, mtu=mtu, mac=self._choose_mac(name), gbp=cfg.gbp,
        )

    def _set_device(self, name: str, index: int) -> None:
        direct = self.ctx.config.backend.direct_routing
        if name == self.device6_name:
            assert self.ctx.ipv6_segment is not None
            self._local6 = VxlanLocal(index, self.ctx.iface.index, self.ctx.ipv6_segment, direct)
        else:
            assert self._underlay is not None
            self._local = VxlanLocal(index, self.ctx.iface.index, self._underlay, direct)

    def _device_names_wanted(self) -> list[str]:
        return [name for name, on in ((self.device_name, self._v4), (self.device6_name, self._v6)) if on]

    def _local_of(self, name: str) -> VxlanLocal | None:
        return self._local6 if name == self.device6_name else self._local

    # --- RoutedBackend hooks ---------------------------------------------------------

    def _setup(self, own_subnet: IPv4Network) -> None:
        for name in self._device_names_wanted():
            spec = self._device_spec(name)
            index, outcome = nlvx.ensure_vxlan_device(self.ctx.netlink, spec)
            self._set_device(name, index)
            log.info("vxlan backend up: %s (%s) vni %d port %d mtu %d, VTEP MAC %s, local %s dev %s%s",
                     spec.name, outcome.value, spec.vni, spec.port, spec.mtu, spec.mac, spec.local,
                     self.ctx.iface.name, ", direct routing on" if self.ctx.config.backend.direct_routing else "")

    def _ensure(self) -> None:
        """Bring back a VTEP (same MAC) if it was deleted, and up if it was set down."""
        netlink = self.ctx.netlink
        for name in self._device_names_wanted():
            local = self._local_of(name)
            assert local is not None
            index = netlink.link_index(name)
            if index is None:
                index, _ = nlvx.ensure_vxlan_device(netlink, self._device_spec(name))
                self._set_device(name, index)
                log.warning("vxlan: drift repaired: %s was deleted; recreated it with VTEP MAC %s",
                            name, self._macs[name])
                continue
            if index != local.device_index:
                self._set_device(name, index)
            if not netlink.link_attrs(index)["flags"] & IFF_UP:
                netlink.set_link(index, state="up")
                log.warning("vxlan: drift repaired: %s was down; set it up", name)

    def _device_state(self) -> Hashable:
        return self._local, self._local6

    def _scope(self) -> Scope:
        devices = frozenset(local.device_index for local in (self._local, self._local6) if local is not None)
        ipv6 = self.ctx.config.ipv6
        network = self.ctx.config.network if self._v4 else None
        return Scope(network, devices | {self.ctx.iface.index}, devices,
                     network6=ipv6.network if ipv6 is not None and self._v6 else None)

    def _own_entries(self) -> frozenset[Entry]:
        own: set[Entry] = set()
        if self._local is not None and self._own_subnet is not None:
            own.add(vtep_address(self._local.device_index, self._own_subnet))
        if self._local6 is not None and self._own_subnet6 is not None:
            own.add(vtep_address(self._local6.device_index, self._own_subnet6))
        return frozenset(own)

    def _peer_entries(self, lease: Lease) -> PeerEntries:
        return vxlan_peer_entries(self._local, lease, self._local6)

    def _teardown(self) -> None:
        for name in (self.device_name, self.device6_name):
            if self.ctx.netlink.delete_link(name):
                log.info("deleted %s", name)

    def _device_names(self) -> dict[int, str]:
        names = super()._device_names()
        for name, local in ((self.device_name, self._local), (self.device6_name, self._local6)):
            if local is not None:
                names[local.device_index] = name
        return names
