"""HostGwBackend: flannel's ``host-gw`` backend: plain routes, every node on one L2 segment.

All it supplies to the shared peer handling is flannel's ``GetRoute``:
``<peer subnet> via <PublicIP> dev <iface>`` per peer. A peer whose PublicIP
is not on our interface's subnet cannot be a next hop; it is refused with a
log line instead of a route the kernel would reject. No device, no
encapsulation: pods get the full interface MTU.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Interface, IPv4Network

from ..core.lease import Lease, LeaseAttrs
from .base import BackendContext
from .kernel import Kernel
from .kernel_state import HostGwLocal, PeerEntries, Scope, hostgw_peer_entries
from .reconcile_loop import RECONCILE_INTERVAL
from .routed import RoutedBackend

__all__ = ["HostGwBackend"]

log = logging.getLogger(__name__)


class HostGwBackend(RoutedBackend):
    type_name = "host-gw"

    def __init__(self, ctx: BackendContext, kernel: Kernel | None = None,
                 interval: float = RECONCILE_INTERVAL) -> None:
        super().__init__(ctx, kernel, interval)
        iface = ctx.iface
        segment = IPv4Interface(f"{iface.address}/{iface.prefixlen}").network
        self._local = HostGwLocal(iface.index, segment, iface.name)

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu

    def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(self.ctx.public_ip, self.type_name, None)

    def _setup(self, own_subnet: IPv4Network) -> None:
        log.info("host-gw backend up: routes to peers via their PublicIP on %s (%s), mtu %d",
                 self.ctx.iface.name, self._local.underlay, self.mtu)

    def _scope(self) -> Scope:
        return Scope(self.ctx.config.network, frozenset({self.ctx.iface.index}))

    def _peer_entries(self, lease: Lease) -> PeerEntries:
        return hostgw_peer_entries(self._local, lease)
