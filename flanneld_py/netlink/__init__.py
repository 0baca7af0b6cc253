"""The thin netlink layer shared by the daemon's backends and the CNI side.

Raw rtnetlink through :mod:`.batch` (requests packed with :mod:`struct`, the
answers' few fields read back), not a netlink library: pyroute2, which this
replaced, cost the daemon ~12 MB of resident memory and ~0.2 s of imports.

Everything here is synchronous: async callers run it with ``asyncio.to_thread``.
One ``Netlink`` object is bound to one network namespace; a socket made for
another namespace stays in it, so nothing here ever calls ``setns`` on the
event-loop thread.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_address
from typing import Any, TypeVar

from ..core.underlay import (
    Link,
    NoUnderlay,
    RouteHint,
    Underlay,
    UnderlayChoice,
    choose_underlay,
)
from .batch import (
    AF_INET,
    AF_INET6,
    LinkRecord,
    NetlinkBatchError,
    Request,
    RtnlSocket,
    address_request,
    link_delete_request,
    link_request,
    route_request,
)

__all__ = ["InterfaceInfo", "Netlink", "NetlinkError", "NoUnderlay", "RouteSpec", "underlay_info"]

RTPROT_FLANNEL = 252  # our routes carry this protocol number, so we know which are ours
RTNH_F_ONLINK = 4
IFF_UP = 0x1
_T = TypeVar("_T")


class NetlinkError(Exception):
    """The kernel refused a netlink request; ``code`` is its errno."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message or os.strerror(code))
        self.code = code


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """The underlay interface as the backends use it: name, index, address and MTU."""

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
    """Synchronous rtnetlink access for one namespace (the current one by default), over one
    socket opened on first use and shared by threads under a lock."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._rtnl: RtnlSocket | None = None

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
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_socket(self, work: Callable[[RtnlSocket], _T]) -> _T:
        """Run ``work`` on the raw socket under this object's lock; a refusal becomes :class:`NetlinkError`."""
        with self._lock:
            if self._rtnl is None:
                self._rtnl = RtnlSocket(self.raw_socket())
            try:
                return work(self._rtnl)
            except NetlinkBatchError:
                raise
            except OSError as exc:
                if exc.errno is None:
                    raise
                raise NetlinkError(exc.errno) from None

    def request(self, request: Request) -> None:
        """One change (see :mod:`.batch` for the requests); :class:`NetlinkError` if refused."""
        self.with_socket(lambda rtnl: rtnl.change(request))

    # --- links -------------------------------------------------------------

    def link(self, index: int) -> LinkRecord:
        found = self.with_socket(lambda rtnl: rtnl.link(index=index))
        if found is None:
            raise NetlinkError(errno.ENODEV)
        return found

    def link_records(self) -> list[LinkRecord]:
        """Every link of the namespace."""
        return self.with_socket(lambda rtnl: rtnl.links())

    def link_index(self, name: str) -> int | None:
        found = self.with_socket(lambda rtnl: rtnl.link(name=name))
        return found.index if found is not None else None

    def require_index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise LookupError(f"interface {name!r} does not exist")
        return index

    def link_attrs(self, index: int) -> dict[str, Any]:
        link = self.link(index)
        return {"name": link.name, "mtu": link.mtu, "flags": link.flags, "address": link.mac}

    def set_link(self, index: int, *, mtu: int | None = None, txqlen: int | None = None, address: str | None = None,
                 state: str | None = None) -> None:
        """``ip link set``: any of MTU, queue length, MAC and ``state`` ("up" or "down")."""
        self.request(link_request(index, mtu=mtu, txqlen=txqlen, mac=address,
                                  up=None if state is None else state == "up"))

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False if it was already gone."""
        index = self.link_index(name)
        if index is None:
            return False
        try:
            self.request(link_delete_request(index))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True

    # --- addresses ---------------------------------------------------------

    def ipv4_addresses(self, index: int) -> list[IPv4Interface]:
        return self.with_socket(lambda rtnl: rtnl.ipv4_addresses(index))

    def ensure_address(self, index: int, address: IPv4Interface, exclusive: bool = True) -> None:
        """Make ``address`` present; with ``exclusive`` remove other IPv4 addresses."""
        present = self.ipv4_addresses(index)
        if exclusive:
            for other in present:
                if other != address:
                    self.request(address_request(index, other, delete=True))
        if address not in present:
            try:
                self.request(address_request(index, address))
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    # --- routes ------------------------------------------------------------

    def replace_route(self, route: RouteSpec, proto: int = RTPROT_FLANNEL) -> None:
        self.request(route_request(route.dst, route.ifindex, route.gateway, route.onlink, proto))

# --- interface choice --------------------------------------------------

    def links(self) -> list[Link]:
        """Every interface with its IPv4 and IPv6 addresses, in index order (what flannel's lookups walk)."""
        def read(rtnl: RtnlSocket) -> list[Link]:
            addresses: dict[int, list[IPv4Interface]] = {}
            for index, raw, prefixlen in rtnl.all_addresses(AF_INET):
                addresses.setdefault(index, []).append(IPv4Interface((raw, prefixlen)))
            addresses6: dict[int, list[IPv6Interface]] = {}
            for index, raw, prefixlen in rtnl.all_addresses(AF_INET6):
                addresses6.setdefault(index, []).append(IPv6Interface((raw, prefixlen)))
            return [Link(link.name, link.index, link.mtu, tuple(addresses.get(link.index, ())),
                         tuple(addresses6.get(link.index, ()))) for link in rtnl.links()]

        return sorted(self.with_socket(read), key=lambda link: link.index)

    def route_hint(self, destination: str) -> RouteHint | None:
        """``ip route get <destination>``: the output interface and source, None without a route."""
        try:
            found = self.with_socket(lambda rtnl: rtnl.route_to(ip_address(destination)))
        except (NetlinkError, ValueError):
            return None
        if found is None:
            return None
        index, source = found
        return RouteHint(index, source)

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
        for route in self.with_socket(lambda rtnl: rtnl.routes(None, family=family)):
            if route.dst.prefixlen == 0 and route.ifindex:
                return route.ifindex
        return None


def underlay_info(underlay: Underlay) -> InterfaceInfo:
    """The backends' view of a chosen underlay."""
    link, address, address6 = underlay.link, underlay.address, underlay.address6
    if address is None:
        return InterfaceInfo(link.name, link.index, None, 0, link.mtu, None if address6 is None else address6.ip)
    return InterfaceInfo(link.name, link.index, address.ip, address.network.prefixlen, link.mtu)
