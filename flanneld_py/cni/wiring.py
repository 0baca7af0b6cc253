"""The kernel side of ADD, DEL and CHECK: one veth from the node's bridge into a pod.

Blocking: the server runs it in worker threads. The node's side goes
through one shared ``Netlink``; the pod's side through a socket
bound to the pod's namespace for the call (``PodSocket`` for ADD's four
requests, ``NetnsNetlink`` for CHECK), so no thread ever ``setns``-es. ADD
registers an undo for each thing it makes on the caller's ``ExitStack``; the
caller ``pop_all()``-s it once the whole ADD has succeeded.
"""

from __future__ import annotations

import errno
import hashlib
import re
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from ..netlink import Netlink, NetlinkError
from ..netlink.pods import (
    NamespaceNotFound,
    NetnsNetlink,
    PodSocket,
    addresses,
    create_veth,
    disable_dad,
    ensure_bridge,
    hairpin_enabled,
    link_master,
    random_mac,
    routes,
    set_hairpin,
    write_sysctl,
)
from .models import Attachment, CniError, ErrorCode, Interface, Result, Route

__all__ = ["PodLink", "PodWiring", "WiredPod", "host_veth_name"]

HOST_VETH = re.compile(r"^veth[0-9a-f]{11}$")  # what host_veth_name() makes
RTPROT_BOOT = 3  # what `ip route add` and the bridge plugin use for pod routes
IFF_UP = 1
# What the bridge plugin's isGateway sets, per family: pods leave the node through it.
FORWARDING_SYSCTL = {4: "net/ipv4/ip_forward", 6: "net/ipv6/conf/all/forwarding"}
BRIDGE_RECHECK_SECONDS = 30.0  # how long ADD trusts what it last ensured about the bridge


def host_veth_name(owner: Attachment) -> str:
    """``veth`` + 11 hex digits of the attachment: DEL and CHECK find it without the pod's namespace."""
    return "veth" + hashlib.sha256(f"{owner.container_id}/{owner.ifname}".encode()).hexdigest()[:11]


@dataclass(frozen=True, slots=True)
class PodLink:
    """What ADD builds (and CHECK expects) for one attachment."""

    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    gateways: tuple[IPv4Interface | IPv6Interface, ...]  # the bridge's addresses, one per family
    addresses: tuple[IPv4Interface | IPv6Interface, ...]  # the pod's, in the same order
    routes: tuple[Route, ...]
    mtu: int
    hairpin: bool = False
    forwarding: bool = False  # the node routes for its pods (isDefaultGateway)
    clusters: tuple[IPv4Network | IPv6Network, ...] = ()  # other node subnets inside them are stale on the bridge
    gso_max_size: int | None = None  # the conflist's gsoMaxSize: cap GSO on both veth ends


@dataclass(frozen=True, slots=True)
class WiredPod:
    host: Interface
    container: Interface
    container_index: int


class PodWiring:
    def __init__(self, node: Netlink) -> None:
        self.node = node
        self._bridge_lock = threading.Lock()
        # name -> (index, gateways, when): what the last ensure_bridge() found, so most ADDs skip it
        self._bridges: dict[str, tuple[int, tuple[IPv4Interface | IPv6Interface, ...], float]] = {}

    # --- ADD ---------------------------------------------------------------

    def add(self, link: PodLink, undo: ExitStack) -> WiredPod:
        try:
            return self._add(link, undo)
        except NamespaceNotFound:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_NETNS {link.netns} does not exist") from None
        except (NetlinkError, OSError, LookupError) as exc:
            raise CniError(ErrorCode.KERNEL_SETUP_FAILED, f"cannot wire {link.ifname} into {link.netns}",
                           str(exc)) from exc

    def _add(self, link: PodLink, undo: ExitStack) -> WiredPod:
        host_mac, container_mac = random_mac(), random_mac()
        self._create_veth(link, host_mac, container_mac)
        undo.callback(self.node.delete_link, link.host_ifname)
        if link.hairpin:
            set_hairpin(self.node, self.node.require_index(link.host_ifname))
        if any(address.version == 6 for address in link.addresses):
            disable_dad(link.netns, link.ifname)
        with PodSocket(link.netns) as pod:
            index = pod.link_index(link.ifname)
            pod.set_up(index)
            for address in link.addresses:
                pod.add_address(index, address)
            for route in link.routes:
                pod.replace_route(route.dst, route.gw, index, RTPROT_BOOT)
        return WiredPod(
            host=Interface(link.host_ifname, host_mac, mtu=link.mtu),
            container=Interface(link.ifname, container_mac, sandbox=link.netns, mtu=link.mtu),
            container_index=index,
        )

    def _bridge(self, link: PodLink, *, fresh: bool = False) -> int:
        """The bridge's index, ensured (exists, up, gateways, forwarding) at most every 30 s or when ``fresh``."""
        with self._bridge_lock:
            known = self._bridges.get(link.bridge)
            now = time.monotonic()
            if (known is not None and known[1] == link.gateways and not fresh
                    and now - known[2] < BRIDGE_RECHECK_SECONDS):
                return known[0]
            index = ensure_bridge(self.node, link.bridge, link.mtu, link.gateways, link.clusters)
            if link.forwarding:
                for version in sorted({gateway.version for gateway in link.gateways}):
                    write_sysctl(FORWARDING_SYSCTL[version], "1")
            self._bridges[link.bridge] = (index, link.gateways, now)
            return index

    def _create_veth(self, link: PodLink, host_mac: str, container_mac: str) -> None:
        """One netlink request; a bridge that vanished since we cached it is made again, once."""
        for fresh in (False, True):
            master = self._bridge(link, fresh=fresh)
            try:
                create_veth(self.node, link.host_ifname, link.ifname, link.netns, link.mtu, master=master,
                            host_mac=host_mac, peer_mac=container_mac, gso_max_size=link.gso_max_size)
                return
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise self._already_there(link) from None
                if fresh or self.node.link_index(link.bridge) == master:
                    raise

    def _already_there(self, link: PodLink) -> CniError:
        if self.node.link_index(link.host_ifname) is not None:
            return CniError(ErrorCode.KERNEL_SETUP_FAILED,
                            f"{link.host_ifname} already exists: this container and interface are already "
                            "attached; DEL them before adding again")
        return CniError(ErrorCode.KERNEL_SETUP_FAILED,
                        f"the pod's namespace {link.netns} already has an interface {link.ifname}")

    # --- DEL ---------------------------------------------------------------

    def delete(self, host_ifname: str) -> bool:
        """Remove the pair by its host end; gone already is fine (the namespace took it along)."""
        try:
            return self.node.delete_link(host_ifname)
        except NetlinkError as exc:
            raise CniError(ErrorCode.KERNEL_SETUP_FAILED, f"cannot delete {host_ifname}", str(exc)) from exc

    def sweep(self, bridge: str, keep: set[str]) -> list[str]:
        """Remove ports of ``bridge`` named like our host veths that are not in ``keep`` (GC).

        They are what a crash between DEL's answer and the removal leaves when
        the pod's namespace lives on.
        """
        try:
            bridge_index = self.node.link_index(bridge)
            if bridge_index is None:
                return []
            stale = [link.name for link in self.node.link_records()
                     if link.master == bridge_index and HOST_VETH.match(link.name) and link.name not in keep]
            return [name for name in stale if self.node.delete_link(name)]
        except NetlinkError as exc:
            raise CniError(ErrorCode.KERNEL_SETUP_FAILED, f"cannot sweep bridge {bridge}", str(exc)) from exc

    # --- CHECK -------------------------------------------------------------

    def check(self, link: PodLink, prev: Result) -> None:
        """Compare the kernel with what ADD made and ``prev`` reports; raise on the first difference."""
        try:
            self._check_host(link)
            with NetnsNetlink(link.netns) as pod:
                _check_pod(pod, link, prev)
        except NamespaceNotFound:
            raise _mismatch(f"the pod's namespace {link.netns} does not exist") from None
        except (NetlinkError, OSError) as exc:
            raise CniError(ErrorCode.KERNEL_SETUP_FAILED, "cannot read the pod's network state", str(exc)) from exc

    def _check_host(self, link: PodLink) -> None:
        index = self.node.link_index(link.host_ifname)
        if index is None:
            raise _mismatch(f"host interface {link.host_ifname} is missing")
        bridge = self.node.link_index(link.bridge)
        if bridge is None or link_master(self.node, index) != bridge:
            raise _mismatch(f"{link.host_ifname} is not attached to bridge {link.bridge}")
        present = addresses(self.node, bridge)
        for gateway in link.gateways:
            if gateway not in present:
                raise _mismatch(f"bridge {link.bridge} lacks the pods' gateway {gateway}")
        if not self.node.link_attrs(index)["flags"] & IFF_UP:
            raise _mismatch(f"{link.host_ifname} is down")
        if link.hairpin and not hairpin_enabled(self.node, index):
            raise _mismatch(f"{link.host_ifname} has hairpin mode off")


def _check_pod(pod: Netlink, link: PodLink, prev: Result) -> None:
    index = pod.link_index(link.ifname)
    if index is None:
        raise _mismatch(f"interface {link.ifname} is missing from {link.netns}")
    attrs = pod.link_attrs(index)
    reported = [i for i in prev.interfaces if i.name == link.ifname and i.sandbox]
    if reported and reported[0].mac and reported[0].mac.lower() != str(attrs["address"]).lower():
        raise _mismatch(f"{link.ifname} has MAC {attrs['address']}, prevResult says {reported[0].mac}")
    if attrs["mtu"] != link.mtu:
        raise _mismatch(f"{link.ifname} has MTU {attrs['mtu']}, expected {link.mtu}")
    present = addresses(pod, index)
    for address in link.addresses:
        if address not in present:
            raise _mismatch(f"{link.ifname} lacks its address {address}")
    installed = routes(pod)
    for route in prev.routes:
        if (route.dst, route.gw) not in installed:
            via = f" via {route.gw}" if route.gw else ""
            raise _mismatch(f"route {route.dst}{via} is missing in {link.netns}")


def _mismatch(msg: str) -> CniError:
    return CniError(ErrorCode.CHECK_MISMATCH, msg)
