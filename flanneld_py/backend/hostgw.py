"""HostGwBackend: flannel's ``host-gw`` backend: plain routes, every node on one L2 segment.

All it supplies to the shared peer handling is flannel's ``GetRoute``:
``<peer subnet> via <PublicIP> dev <iface>`` per peer. A peer whose PublicIP
is not on our interface's subnet cannot be a next hop; it is refused with a
log line instead of a route the kernel would reject. No device, no
encapsulation: pods get the full interface MTU. With ``EnableIPv6`` each peer
also gets ``<peer IPv6 subnet> via <PublicIPv6> dev <iface>``, its PublicIPv6
on our interface's IPv6 prefix.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

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
    families = frozenset({4, 6})

    def __init__(self, ctx: BackendContext, kernel: Kernel | None = None,
                 interval: float = RECONCILE_INTERVAL) -> None:
        super().__init__(ctx, kernel, interval)
        iface = ctx.iface
        self._local: HostGwLocal | None = None
        if ctx.config.enable_ipv4 and iface.address is not None:
            segment = IPv4Interface((iface.address, iface.prefixlen)).network
            self._local = HostGwLocal(iface.index, segment, iface.name)
        self._local6: HostGwLocal | None = None
        if ctx.config.enable_ipv6 and ctx.ipv6_segment is not None:
            self._local6 = HostGwLocal(iface.index, ctx.ipv6_segment, iface.name)

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu

    def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(self.ctx.public_ip, self.type_name, None)

    def backend_v6_data(self) -> Any:
        return None  # flannel's host-gw publishes no BackendV6Data

    def _setup(self, own_subnet: IPv4Network) -> None:
        families = [f"{name} ({local.underlay})" for name, local in (("PublicIP", self._local), ("PublicIPv6", self._local6))
                    if local is not None]
        log.info("host-gw backend up: routes to peers via their %s on %s, mtu %d",
                 " and ".join(families), self.ctx.iface.name, self.mtu)

    def _scope(self) -> Scope:
        ipv6 = self.ctx.config.ipv6
        return Scope(self.ctx.config.network if self._local is not None else None, frozenset({self.ctx.iface.index}),
                     network6=ipv6.network if ipv6 is not None and self._local6 is not None else None)

    def _peer_entries(self, lease: Lease) -> PeerEntries:
        return hostgw_peer_entries(self._local, lease, self._local6)
