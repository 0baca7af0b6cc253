"""VxlanBackend: flannel's ``vxlan`` backend (kernel encapsulation), record-compatible with flannel.

Kernel state: device ``flannel.<VNI>`` (UDP port 8472 unless ``Port`` says
otherwise, learning off, GBP as configured, underlay = the chosen interface,
local = its address), MTU = underlay MTU - 50, address ``<subnet>/32``. Per
peer: a permanent neighbour (peer subnet address -> VtepMAC), a permanent FDB
entry (VtepMAC -> PublicIP) and ``<peer subnet> via <peer subnet address>
dev flannel.<VNI> onlink``; with ``DirectRouting`` a peer on our underlay
subnet gets a plain route via its PublicIP instead.

The lease carries ``{"VNI": 1, "VtepMAC": "..."}`` exactly as flannel writes
it. A restart reuses the MAC of an existing ``flannel.<VNI>``, as flannel
does, so the neighbour and FDB entries peers hold for us stay valid.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable
from ipaddress import IPv4Interface, IPv4Network

from ..core.lease import Lease, LeaseAttrs
from ..netlink import vxlan as nlvx
from ..netlink.batch import RtnlSocket
from .base import BackendContext
from .kernel import Kernel
from .kernel_state import (
    VXLAN_OVERHEAD,
    Entry,
    PeerEntries,
    Scope,
    VxlanLocal,
    random_vtep_mac,
    vxlan_backend_data,
    vxlan_own_entries,
    vxlan_peer_entries,
)
from .reconcile_loop import RECONCILE_INTERVAL
from .routed import RoutedBackend

__all__ = ["VxlanBackend"]

log = logging.getLogger(__name__)

IFF_UP = 0x1


class VxlanBackend(RoutedBackend):
    type_name = "vxlan"

    def __init__(self, ctx: BackendContext, kernel: Kernel | None = None,
                 interval: float = RECONCILE_INTERVAL, rng: random.Random | None = None) -> None:
        super().__init__(ctx, kernel, interval)
        self.vni = ctx.config.backend.vni
        self.device_name = f"flannel.{self.vni}"
        self._rng = rng or random.SystemRandom()
        self.vtep_mac: str | None = None  # known once lease_attrs() or start() chose it
        self._local: VxlanLocal | None = None
        self._underlay = IPv4Interface(f"{ctx.iface.address}/{ctx.iface.prefixlen}").network

    @property
    def mtu(self) -> int:
        return self.ctx.config.backend.underlay_mtu(self.ctx.iface.mtu) - VXLAN_OVERHEAD

    def _choose_mac(self) -> str:
        """Our VTEP MAC: the existing device's on a restart, else a new random one.

        One rtnetlink request on a socket of our own (not pyroute2, which
        cannot run on the event-loop thread): the kernel answers within the
        send, so the loop never waits on a thread or a peer.
        """
        if self.vtep_mac is None:
            rtnl = RtnlSocket(self.ctx.netlink.raw_socket())
            try:
                found = rtnl.link_kind_and_mac(self.device_name)
            finally:
                rtnl.close()
            existing = found[1] if found is not None and found[0] == "vxlan" else None
            self.vtep_mac = existing or random_vtep_mac(self._rng)
            if existing:
                log.info("reusing VTEP MAC %s of the existing %s", existing, self.device_name)
        return self.vtep_mac

    def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(self.ctx.public_ip, self.type_name, vxlan_backend_data(self.vni, self._choose_mac()))

    def _device_spec(self) -> nlvx.VxlanDeviceSpec:
        cfg = self.ctx.config.backend
        return nlvx.VxlanDeviceSpec(
            name=self.device_name, vni=self.vni, port=cfg.vxlan_port,
            underlay_index=self.ctx.iface.index, local=self.ctx.iface.address,
            mtu=self.mtu, mac=self._choose_mac(), gbp=cfg.gbp,
        )

    def _set_device(self, index: int) -> None:
        self._local = VxlanLocal(index, self.ctx.iface.index, self._underlay, self.ctx.config.backend.direct_routing)

    # --- RoutedBackend hooks ---------------------------------------------------------

    def _setup(self, own_subnet: IPv4Network) -> None:
        spec = self._device_spec()
        index, outcome = nlvx.ensure_vxlan_device(self.ctx.netlink, spec)
        self._set_device(index)
        log.info("vxlan backend up: %s (%s) vni %d port %d mtu %d, VTEP MAC %s, local %s dev %s%s",
                 spec.name, outcome.value, spec.vni, spec.port, spec.mtu, spec.mac, spec.local,
                 self.ctx.iface.name, ", direct routing on" if self.ctx.config.backend.direct_routing else "")

    def _ensure(self) -> None:
        """Bring back ``flannel.<VNI>`` (same MAC) if it was deleted, and up if it was set down."""
        assert self._local is not None
        netlink = self.ctx.netlink
        index = netlink.link_index(self.device_name)
        if index is None:
            index, _ = nlvx.ensure_vxlan_device(netlink, self._device_spec())
            self._set_device(index)
            log.warning("vxlan: drift repaired: %s was deleted; recreated it with VTEP MAC %s",
                        self.device_name, self.vtep_mac)
            return
        if index != self._local.device_index:
            self._set_device(index)
        if not netlink.link_attrs(index)["flags"] & IFF_UP:
            netlink.set_link(index, state="up")
            log.warning("vxlan: drift repaired: %s was down; set it up", self.device_name)

    def _device_state(self) -> Hashable:
        return self._local

    def _scope(self) -> Scope:
        assert self._local is not None
        index = self._local.device_index
        return Scope(self.ctx.config.network, frozenset({index, self.ctx.iface.index}), frozenset({index}))

    def _own_entries(self) -> frozenset[Entry]:
        assert self._local is not None and self._own_subnet is not None
        return vxlan_own_entries(self._local.device_index, self._own_subnet)

    def _peer_entries(self, lease: Lease) -> PeerEntries:
        assert self._local is not None
        return vxlan_peer_entries(self._local, lease)

    def _teardown(self) -> None:
        if self.ctx.netlink.delete_link(self.device_name):
            log.info("deleted %s", self.device_name)

    def _device_names(self) -> dict[int, str]:
        names = super()._device_names()
        if self._local is not None:
            names[self._local.device_index] = self.device_name
        return names
