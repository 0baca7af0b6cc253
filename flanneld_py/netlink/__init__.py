"""The thin netlink layer over pyroute2, shared by the daemon's backends and the CNI side.

pyroute2's asyncio API does not work under uvloop, so everything here is
synchronous: async callers run it with ``asyncio.to_thread``, and must also
*construct* it there (pyroute2's sync API drives a private event loop, which
fails on a thread whose loop is running). One ``Netlink``
object wraps one rtnetlink socket bound to one network namespace; a socket
made for another namespace stays in it, so nothing here ever calls ``setns``
on the event-loop thread.
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_address
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..core.underlay import (
    Link,
    NoUnderlay,
    RouteHint,
    Underlay,
    UnderlayChoice,
    choose_underlay,
)

__all__ = ["InterfaceInfo", "Netlink", "NetlinkError", "NoUnderlay", "RouteSpec", "underlay_info"]

RTPROT_FLANNEL = 252  # our routes carry this protocol number, so we know which are ours
RTNH_F_ONLINK = 4


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    name: str
    index: int
    address: IPv4Address | None  # None on an IPv6-only network (the underlay is chosen by IPv6)
    prefixlen: int
    mtu: int
    address6: IPv6Address | None = None  # the IPv6 underlay's address on an IPv6-only network


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as a backend wants it in the kernel (IPv4 or IPv6: the destination's family)."""

    dst: IPv4Network | IPv6Network
    ifindex: int
    gateway: IPv4Address | IPv6Address | None = None
    onlink: bool = False


class Netlink:
    """Synchronous rtnetlink access for one namespace (the current one by default)."""

    def __init__(self, netns: str | None = None) -> None:
        self._ipr = IPRoute(netns=netns) if netns else IPRoute()
        self._lock = threading.Lock()
        self.netns = netns

    def raw_socket(self) -> socket.socket:
        """A new rtnetlink socket in this object's namespace (for :mod:`.batch`)."""
        if self.netns is None:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        from .pods import netns_socket  # here: pods imports this module

        path = self.netns if "/" in self.netns else f"/var/run/netns/{self.netns}"
        return netns_socket(path, socket.AF_NETLINK, socket.SOCK_RAW, 0)

    def close(self) -> None:
        """Close the socket, after any call in flight (never under another thread's request)."""
        with self._lock:
            self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one pyroute2 call under this socket's lock (calls come from worker threads)."""
        with self._lock:
            return getattr(self._ipr, method)(*args, **kwargs)

    # --- links -------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        found = self.call("link_lookup", ifname=name)
        return found[0] if found else None

    def require_index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise LookupError(f"interface {name!r} does not exist")
        return index

    def link_attrs(self, index: int) -> dict[str, Any]:
        (link,) = self.call("get_links", index)
        return {"name": link.get_attr("IFLA_IFNAME"), "mtu": link.get_attr("IFLA_MTU"),
                "flags": link["flags"], "address": link.get_attr("IFLA_ADDRESS")}

    def set_link(self, index: int, **attrs: Any) -> None:
        self.call("link", "set", index=index, **attrs)

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False if it was already gone."""
        index = self.link_index(name)
        if index is None:
            return False
        try:
            self.call("link", "del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True

    # --- addresses ---------------------------------------------------------

    def ipv4_addresses(self, index: int) -> list[IPv4Interface]:
        out = []
        for msg in self.call("get_addr", family=2, index=index):
            out.append(IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        return out

    def ensure_address(self, index: int, address: IPv4Interface, exclusive: bool = True) -> None:
        """Make ``address`` present; with ``exclusive`` remove other IPv4 addresses."""
        present = self.ipv4_addresses(index)
        if exclusive:
            for other in present:
                if other != address:
                    self.call("addr", "del", index=index, address=str(other.ip), prefixlen=other.network.prefixlen)
        if address not in present:
            try:
                self.call("addr", "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    # --- routes ------------------------------------------------------------

    def replace_route(self, route: RouteSpec, proto: int = RTPROT_FLANNEL) -> None:
        kwargs: dict[str, Any] = {
            "dst": str(route.dst.network_address),
            "dst_len": route.dst.prefixlen,
            "oif": route.ifindex,
            "proto": proto,
            "family": socket.AF_INET6 if route.dst.version == 6 else socket.AF_INET,
        }
        if route.gateway is not None:
            kwargs["gateway"] = str(route.gateway)
        if route.onlink:
            kwargs["flags"] = RTNH_F_ONLINK
        self.call("route", "replace", **kwargs)

    def delete_route(self, dst: IPv4Network) -> bool:
        try:
            self.call("route", "del", dst=str(dst.network_address), dst_len=dst.prefixlen)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True

    def routes(self, proto: int | None = None) -> list[RouteSpec]:
        """The main table's IPv4 unicast routes (optionally only one protocol's)."""
        out = []
        query: dict[str, Any] = {"family": 2, "table": 254}
        if proto is not None:
            query["proto"] = proto
        for msg in self.call("get_routes", **query):
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"
            gateway = msg.get_attr("RTA_GATEWAY")
            out.append(RouteSpec(
                dst=IPv4Network(f"{dst}/{msg['dst_len']}"),
                ifindex=msg.get_attr("RTA_OIF") or 0,
                gateway=IPv4Address(gateway) if gateway else None,
                onlink=bool(msg["flags"] & RTNH_F_ONLINK),
            ))
        return out

    # --- interface choice --------------------------------------------------

    def links(self) -> list[Link]:
        """Every interface with its IPv4 and IPv6 addresses, in index order (what flannel's lookups walk)."""
        addresses: dict[int, list[IPv4Interface]] = {}
        for msg in self.call("get_addr", family=2):
            addresses.setdefault(int(msg["index"]), []).append(
                IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        addresses6: dict[int, list[IPv6Interface]] = {}
        for msg in self.call("get_addr", family=10):
            addresses6.setdefault(int(msg["index"]), []).append(
                IPv6Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        out = [Link(link.get_attr("IFLA_IFNAME"), int(link["index"]), int(link.get_attr("IFLA_MTU") or 0),
                    tuple(addresses.get(int(link["index"]), ())), tuple(addresses6.get(int(link["index"]), ())))
               for link in self.call("get_links")]
        return sorted(out, key=lambda link: link.index)

    def route_hint(self, destination: str) -> RouteHint | None:
        """``ip route get <destination>``: the output interface and source, None without a route."""
        try:
            answer = self.call("route", "get", dst=destination)
        except NetlinkError:
            return None
        for msg in answer:
            index = msg.get_attr("RTA_OIF")
            if index:
                source = msg.get_attr("RTA_PREFSRC")
                return RouteHint(int(index), ip_address(source) if source else None)
        return None

    def select_underlay(self, choice: UnderlayChoice) -> Underlay:
        """flannel's choice of the underlay interface (see :mod:`flanneld_py.core.underlay`).

        Raises:
            NoUnderlay: nothing matches the flags.
        """
        hint = self.route_hint(choice.iface_can_reach) if choice.iface_can_reach else None
        default = self._default_route_index(socket.AF_INET6 if choice.ipv6_only else socket.AF_INET)
        return choose_underlay(self.links(), choice, default, hint)

    def _default_route_index(self, family: int) -> int | None:
        """The interface of the main table's first default route of ``family`` (flannel's
        ``GetDefaultGatewayInterface`` / ``GetDefaultV6GatewayInterface``)."""
        for msg in self.call("get_routes", family=family, table=254):
            if msg["dst_len"] == 0 and msg.get_attr("RTA_OIF"):
                return int(msg.get_attr("RTA_OIF"))
        return None


def underlay_info(underlay: Underlay) -> InterfaceInfo:
    """The backends' view of a chosen underlay."""
    link, address, address6 = underlay.link, underlay.address, underlay.address6
    if address is None:
        return InterfaceInfo(link.name, link.index, None, 0, link.mtu, None if address6 is None else address6.ip)
    return InterfaceInfo(link.name, link.index, address.ip, address.network.prefixlen, link.mtu)
