"""UdpBackend: flannel's ``udp`` backend, wire-compatible with flannel's C proxy.

Kernel state: TUN ``flannel0`` with MTU = underlay MTU - 28 (IPv4 + UDP
headers), address ``<subnet>/32`` and the route ``<Network> dev flannel0``;
with an IPv6 subnet of ours also ``<IPv6Network> dev flannel0`` (no IPv6
address: flannel0 needs none to carry IPv6, and without a link-local one the
kernel sends no router solicitations or MLD reports into it). IPv6 pod
packets go to a peer's PublicIPv6 from a second socket bound to ours (the
IPv6 underlay), or to its PublicIP when either side has no PublicIPv6. The
MTU leaves room for the outer header of the underlay actually used: 48 bytes
(IPv6 + UDP) once an IPv6 underlay socket is open, else 28. An IPv6-only
network (``EnableIPv4: false``) has no IPv4 address, route or socket: its one
socket is on the IPv6 underlay. Peers live only in the engine's table, never
in the kernel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from types import ModuleType

from ...core.lease import LeaseAdded, LeaseAttrs, LeaseEvent, LeaseRemoved
from ...core.packet import Drop
from ...errors import FatalError
from ...netlink import RouteSpec
from ..base import BackendContext, BatchCount, PeerStats
from ..kernel import NetlinkKernel
from ..kernel_state import udp_own_entries
from ..reconcile_loop import ReconcileLoop
from ..reconciler import Reconciler
from . import lane, offload
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
# a pod TCP super-packet of at most this size is 44 segments at the usual MTU (1472 over a
# 1500-byte underlay): one UDP GSO send (65507 bytes) carries it whole
POD_GSO_MAX_SIZE = 63000


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
    families = frozenset({4, 6})  # IPv6 pod packets over either underlay; IPv6-only networks too

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.port = ctx.config.backend.port
        self.engine: Engine | None = None
        self.pump: Pump | None = None
        self._tun: KernelTun | None = None
        self._lane_module: ModuleType | None = lane.load()  # a bad FLANNELD_PY_FAST_LANE: one fatal line
        self._conn: KernelUdp | None = None
        self._conn6: KernelUdp | None = None
        self._keeper: ReconcileLoop | None = None

    @property
    def _ipv6_underlay(self) -> bool:
        return self.ctx.config.ipv6 is not None and self.ctx.public_ipv6 is not None

    @property
    def _ipv4(self) -> bool:
        """False on an IPv6-only network: no IPv4 address, route or socket."""
        return self.ctx.config.enable_ipv4

    @property
    def mtu(self) -> int:
        """flannel0's and the pods' MTU: the interface's less the outer headers of the underlay in
        use, IPv6 (48) when IPv6 pod packets cross an IPv6 socket, else IPv4 (28): IPv6 pods over
        the IPv4 underlay need no more room than IPv4 ones. Known once :meth:`start` opened the sockets."""
        ipv6_socket = self._conn6 is not None or not self._ipv4
        return self.ctx.iface.mtu - (OVERHEAD6 if ipv6_socket else OVERHEAD)

    @property
    def pod_gso_max_size(self) -> int | None:
        """What flannel-py sets on the veths it wires: a pod's super-packet then leaves as one GSO
        send, arrives as one GRO read and is written with one TUN write. flannel0 keeps the
        kernel's default (see :meth:`_configure_tun`), so a pod wired by another CNI plugin
        (65536: 45-46 segments) keeps the fast path too, carried across two sends and reads."""
        return POD_GSO_MAX_SIZE if self.ctx.offload else None

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
        if self._ipv4:
            self._conn = open_udp(str(self.ctx.iface.address), self.port, offload=self.ctx.offload)
            if network6 is not None and self._ipv6_underlay:
                self._conn6 = self._open_udp6()
        else:
            self._conn6 = self._open_ipv6_only_underlay()
        self.engine = Engine(self.ctx.config.network, own_subnet, self.port, network6,
                             own_subnet6 if network6 is not None else None, underlay6=self._conn6 is not None)
        self._tun = open_tun(TUN_NAME, offload=self.ctx.offload)
        try:
            index = await asyncio.to_thread(self._configure_tun, own_subnet, network6)
        except Exception:
            self._close_fds()
            raise
        conn = self._conn or self._conn6
        assert conn is not None
        # the lane forwards IPv4 over the IPv4 socket; an IPv6-only network has neither
        self.pump = Pump(self.engine, self._tun, conn, conn6=self._conn6 if self._conn is not None else None,
                         lane=self._lane_module if self._conn is not None else None)
        self.pump.start()
        self._tun.set_persistent(True)
        self._keep(own_subnet, network6, index)
        log.info("udp backend up: %s mtu %d, listening on %s:%d (offloads: tun %s, gso %s, gro %s; %s stages)",
                 TUN_NAME, self.mtu, self.ctx.iface.address or f"[{self._bind6}]", self.port,
                 _on_off(self._tun.offload), _on_off(conn.gso), _on_off(conn.gro),
                 "compiled" if offload.IMPL == "c" else "pure-Python")
        log.info("udp fast lane %s", "on: lone plain packets forwarded by a C thread" if self._lane_module is not None
                 else f"off: every packet through the Python loop ({lane.VARIABLE})")
        if own_subnet6 is not None and self.engine.own_subnet6 is not None:
            log.info("udp backend carries IPv6: %s dev %s, %s", self.engine.network6, TUN_NAME,
                     f"IPv6 underlay on [{self.ctx.public_ipv6}]:{self.port}" if self._conn6 is not None
                     else "over the IPv4 underlay")
        if offload.IMPL != "c" and self._tun.offload:
            log.warning("the compiled offload stages are not built: super-packets are split and merged by the "
                        "pure-Python reference, several times slower (install gcc and the Python headers, then "
                        "reinstall flanneld-py)")

    @property
    def _bind6(self) -> str:
        """The IPv6 underlay socket's address: the interface's IPv6 address chosen on an IPv6-only
        network, else our PublicIPv6."""
        return str(self.ctx.iface.address6 or self.ctx.public_ipv6)

    def _open_ipv6_only_underlay(self) -> KernelUdp:
        """An IPv6-only network's one socket; without it nothing could cross, so failing is fatal."""
        try:
            return open_udp(self._bind6, self.port, offload=self.ctx.offload)
        except OSError as exc:
            raise FatalError(f"cannot listen on [{self._bind6}]:{self.port} for the IPv6 underlay: "
                             f"{exc.strerror or exc}") from None

    def _open_udp6(self) -> KernelUdp | None:
        """The IPv6 underlay's socket on our PublicIPv6; None (IPv6 pods then cross the IPv4
        underlay) when that address is not one of this node's, e.g. a NATed --public-ipv6."""
        address = self._bind6
        try:
            return open_udp(address, self.port, offload=self.ctx.offload)
        except OSError as exc:
            log.warning("cannot listen on [%s]:%d (%s): IPv6 pod traffic crosses the IPv4 underlay",
                        address, self.port, exc.strerror or exc)
            return None

    def _keep(self, own_subnet: IPv4Network, network6: IPv6Network | None, index: int) -> None:
        """Restore flannel0's address and the Network routes if they vanish (checked every 5 s)."""
        own = own_subnet if self._ipv4 else None
        wanted = udp_own_entries(self.ctx.config.network if self._ipv4 else None, own, index, network6)
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
        if self._ipv4:
            netlink.ensure_address(index, IPv4Interface((own_subnet.network_address, 32)))
        netlink.set_link(index, state="up")
        if self._ipv4:
            netlink.replace_route(RouteSpec(self.ctx.config.network, index))
        if network6 is not None:
            netlink.replace_route(RouteSpec(network6, index))
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
                    self.engine.remove_peer(lease.subnet, lease.subnet6)
                    continue
                public_ipv6 = lease.attrs.public_ipv6
                self.engine.set_peer(lease.subnet, str(lease.attrs.public_ip), lease.subnet6,
                                     None if public_ipv6 is None else str(public_ipv6))
                if not self._ipv4:
                    log.info("peer added: %s via %s", lease.subnet6, public_ipv6)
                elif lease.subnet6 is not None and self.engine.own_subnet6 is not None:
                    log.info("peer added: %s and %s via %s", lease.subnet, lease.subnet6, lease.attrs.public_ip)
                else:
                    log.info("peer added: %s via %s", lease.subnet, lease.attrs.public_ip)
            elif isinstance(event, LeaseRemoved):
                gone = event.lease
                if self.engine.remove_peer(gone.subnet, gone.subnet6) is not None:
                    log.info("peer removed: %s (was %s)", gone.subnet if self._ipv4 else gone.subnet6,
                             gone.attrs.public_ip if self._ipv4 else gone.attrs.public_ipv6)

    def is_up(self) -> bool:
        return self.pump is not None

    def peers(self) -> list[PeerStats]:
        if self.engine is None:
            return []
        if self.pump is not None:
            self.pump.sync_counters()
        return [
            PeerStats(p.subnet, p.public_ip, p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes, p.last_tx, p.last_rx,
                      p.subnet6, p.public_ipv6)
            for p in self.engine.peers.values()
        ]

    def batch_counts(self) -> dict[str, BatchCount]:
        if self.pump is None:
            return {}
        self.pump.sync_counters()
        return {name: BatchCount(stats.wakeups, tuple(stats.buckets))
                for name, stats in (("tun", self.pump.tun_batches), ("udp", self.pump.udp_batches))}

    def drop_counts(self) -> dict[str, int]:
        if self.engine is None:
            return {}
        if self.pump is not None:
            self.pump.sync_counters()
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
