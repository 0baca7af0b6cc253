"""UdpBackend: flannel's ``udp`` backend, wire-compatible with flannel's C proxy.

Kernel state: TUN ``flannel0`` with MTU = underlay MTU - 28 (IPv4 + UDP
headers), address ``<subnet>/32`` and the route ``<Network> dev flannel0``;
with an IPv6 subnet of ours also ``<IPv6Network> dev flannel0`` (no IPv6
address: flannel0 needs none to carry IPv6, and without a link-local one the
kernel sends no router solicitations or MLD reports into it). IPv6 pod
packets go to a peer's PublicIPv6 from a second socket bound to ours (the
IPv6 underlay), or to its PublicIP when either side has no PublicIPv6; with
an IPv6 underlay the MTU leaves room for its 40-byte header. Peers live only
in the engine's table, never in the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv4Network, IPv6Network

from ...core.lease import LeaseAdded, LeaseAttrs, LeaseEvent, LeaseRemoved
from ...core.packet import Drop
from ...netlink import RTPROT_FLANNEL, RouteSpec
from ..base import BackendContext, BatchCount, PeerStats
from ..kernel import NetlinkKernel
from ..kernel_state import udp_own_entries
from ..reconcile_loop import ReconcileLoop
from ..reconciler import Reconciler
from . import offload
from .engine import Engine
from .loop import Pump
from .tun import KernelTun, open_tun
from .udpconn import KernelUdp, open_udp

__all__ = ["UdpBackend"]

log = logging.getLogger(__name__)

TUN_NAME = "flannel0"
OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
OVERHEAD6 = 48  # outer IPv6 (40) + UDP (8)
TXQUEUELEN = 2000


def _accept_local_source(ifname: str) -> None:
    """Let the kernel take our ICMP errors, whose source is flannel0's own address.

    Without this the kernel drops them as martians (a local source arriving
    on a non-loopback device), and pods would wait for a timeout instead of
    hearing "net unreachable" (flannel's C proxy has this problem).
    """
    with open(f"/proc/sys/net/ipv4/conf/{ifname}/accept_local", "w") as handle:
        handle.write("1")


def _no_ipv6(ifname: str) -> None:
    """Keep IPv6 off flannel0: the udp overlay carries IPv4 only, and a link-local address would
    make the kernel send router solicitations and MLD reports into it, counted as drops."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as handle:
            handle.write("1")
    except FileNotFoundError:
        pass  # a kernel without IPv6


def _ipv6_without_addresses(ifname: str) -> None:
    """Let flannel0 carry IPv6 with no address of its own: ``addr_gen_mode`` 1 (none) before IPv6 is
    enabled, so no link-local address appears, and with it no router solicitations or MLD reports
    (any that still come are counted as ``link_scope``, not forwarded)."""
    for key, value in (("addr_gen_mode", "1"), ("disable_ipv6", "0")):
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/{key}", "w") as handle:
            handle.write(value)


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


class UdpBackend:
    type_name = "udp"
    families = frozenset({4, 6})  # dual-stack: IPv6 pod packets over the IPv4 underlay

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.port = ctx.config.backend.port
        self.engine: Engine | None = None
        self.pump: Pump | None = None
        self._tun: KernelTun | None = None
        self._conn: KernelUdp | None = None
        self._conn6: KernelUdp | None = None
        self._keeper: ReconcileLoop | None = None

    @property
    def _ipv6_underlay(self) -> bool:
        return self.ctx.config.ipv6 is not None and self.ctx.public_ipv6 is not None

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu - (OVERHEAD6 if self._ipv6_underlay else OVERHEAD)

    def lease_attrs(self) -> LeaseAttrs:
        return LeaseAttrs(self.ctx.public_ip, self.type_name, None)

    def backend_v6_data(self) -> None:
        """udp publishes no backend data, for either family."""
        return None

    async def start(self, own_subnet: IPv4Network, own_subnet6: IPv6Network | None = None) -> None:
        ipv6 = self.ctx.config.ipv6
        network6 = ipv6.network if ipv6 is not None and own_subnet6 is not None else None
        if ipv6 is not None and own_subnet6 is None:
            log.warning("EnableIPv6 is set but the daemon gave the udp backend no IPv6 subnet: "
                        "carrying IPv4 only")
        self._conn = open_udp(str(self.ctx.iface.address), self.port, offload=self.ctx.offload)
        if network6 is not None and self._ipv6_underlay:
            self._conn6 = self._open_udp6()
        self.engine = Engine(self.ctx.config.network, own_subnet, self.port, network6,
                             own_subnet6 if network6 is not None else None, underlay6=self._conn6 is not None)
        self._tun = open_tun(TUN_NAME, offload=self.ctx.offload)
        try:
            index = await asyncio.to_thread(self._configure_tun, own_subnet, network6)
        except Exception:
            self._close_fds()
            raise
        self.pump = Pump(self.engine, self._tun, self._conn, conn6=self._conn6)
        self.pump.start()
        self._tun.set_persistent(True)
        self._keep(own_subnet, index)
        log.info("udp backend up: %s mtu %d, listening on %s:%d (offloads: tun %s, gso %s, gro %s; %s stages)",
                 TUN_NAME, self.mtu, self.ctx.iface.address, self.port,
                 _on_off(self._tun.offload), _on_off(self._conn.gso), _on_off(self._conn.gro),
                 "compiled" if offload.IMPL == "c" else "pure-Python")
        if own_subnet6 is not None and self.engine.own_subnet6 is not None:
            log.info("udp backend carries IPv6: %s dev %s, %s", self.engine.network6, TUN_NAME,
                     f"IPv6 underlay on [{self.ctx.public_ipv6}]:{self.port}" if self._conn6 is not None
                     else "over the IPv4 underlay")
        if offload.IMPL != "c" and self._tun.offload:
            log.warning("the compiled offload stages are not built: super-packets are split and merged by the "
                        "pure-Python reference, several times slower (install gcc and the Python headers, then "
                        "reinstall flanneld-py)")

    def _open_udp6(self) -> KernelUdp | None:
        """The IPv6 underlay's socket on our PublicIPv6; None (IPv6 pods then cross the IPv4
        underlay) when that address is not one of this node's, e.g. a NATed --public-ipv6."""
        address = str(self.ctx.public_ipv6)
        try:
            return open_udp(address, self.port, offload=self.ctx.offload)
        except OSError as exc:
            log.warning("cannot listen on [%s]:%d (%s): IPv6 pod traffic crosses the IPv4 underlay",
                        address, self.port, exc.strerror or exc)
            return None

    def _keep(self, own_subnet: IPv4Network, index: int) -> None:
        """Restore flannel0's address and the Network route if they vanish (checked every 5 s)."""
        wanted = udp_own_entries(self.ctx.config.network, own_subnet, index)
        self._keeper = ReconcileLoop(Reconciler(NetlinkKernel(self.ctx.netlink), lambda: wanted), "udp",
                                     names=lambda: {index: TUN_NAME})
        self._keeper.start()

    def _configure_tun(self, own_subnet: IPv4Network, network6: IPv6Network | None) -> int:
        netlink = self.ctx.netlink
        index = netlink.require_index(TUN_NAME)
        # flannel0 keeps the kernel's default gso_max_size: a forwarded super-packet larger than the
        # egress device's gso_max_size is split by the kernel in software, so a lower value here
        # would hand us pods' 64 KB super-packets as single MTU-sized packets
        netlink.set_link(index, mtu=self.mtu, txqlen=TXQUEUELEN)
        if network6 is None:
            _no_ipv6(TUN_NAME)
        else:
            _ipv6_without_addresses(TUN_NAME)
        netlink.ensure_address(index, IPv4Interface((own_subnet.network_address, 32)))
        netlink.set_link(index, state="up")
        netlink.replace_route(RouteSpec(self.ctx.config.network, index))
        if network6 is not None:
            netlink.call("route", "replace", family=socket.AF_INET6, dst=str(network6.network_address),
                         dst_len=network6.prefixlen, oif=index, proto=RTPROT_FLANNEL)
        _accept_local_source(TUN_NAME)
        return index

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        assert self.engine is not None, "apply() before start()"
        for event in events:
            if isinstance(event, LeaseAdded):
                lease = event.lease
                if lease.attrs.backend_type != self.type_name:
                    log.warning("peer %s (%s) uses backend %r, not udp; ignoring it",
                                lease.subnet, lease.attrs.public_ip, lease.attrs.backend_type)
                    self.engine.remove_peer(lease.subnet)
                    continue
                public_ipv6 = lease.attrs.public_ipv6
                self.engine.set_peer(lease.subnet, str(lease.attrs.public_ip), lease.subnet6,
                                     None if public_ipv6 is None else str(public_ipv6))
                if lease.subnet6 is not None and self.engine.own_subnet6 is not None:
                    log.info("peer added: %s and %s via %s", lease.subnet, lease.subnet6, lease.attrs.public_ip)
                else:
                    log.info("peer added: %s via %s", lease.subnet, lease.attrs.public_ip)
            elif isinstance(event, LeaseRemoved):
                if self.engine.remove_peer(event.lease.subnet) is not None:
                    log.info("peer removed: %s (was %s)", event.lease.subnet, event.lease.attrs.public_ip)

    def is_up(self) -> bool:
        return self.pump is not None

    def peers(self) -> list[PeerStats]:
        if self.engine is None:
            return []
        return [
            PeerStats(p.subnet, p.public_ip, p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes, p.last_tx, p.last_rx)
            for p in self.engine.peers.values()
        ]

    def batch_counts(self) -> dict[str, BatchCount]:
        if self.pump is None:
            return {}
        return {name: BatchCount(stats.wakeups, tuple(stats.buckets))
                for name, stats in (("tun", self.pump.tun_batches), ("udp", self.pump.udp_batches))}

    def drop_counts(self) -> dict[str, int]:
        if self.engine is None:
            return {}
        counts = {reason.label: self.engine.drops[reason] for reason in Drop}
        counts["icmp_rate_limited"] = self.engine.icmp_suppressed  # errors we did not send, not packets lost
        return counts

    async def stop(self, cleanup: bool) -> None:
        if self._keeper is not None:
            await self._keeper.stop()
            self._keeper = None
        if self.pump is not None:
            self.pump.stop()
            self.pump = None
        if cleanup and self._tun is not None:
            # without persistence, closing the fd removes flannel0 and with it its address and route
            self._tun.set_persistent(False)
        self._close_fds()

    def _close_fds(self) -> None:
        if self._tun is not None:
            self._tun.close()
            self._tun = None
        for conn in (self._conn, self._conn6):
            if conn is not None:
                conn.close()
        self._conn = self._conn6 = None
