"""The kernel as the reconciler sees it: list what we own, apply a plan in one batch.

:class:`Kernel` is the small interface (tests use an in-memory one with
injectable failures); :class:`NetlinkKernel` is the real one, over
:mod:`flanneld_py.netlink.batch`: every change of a plan goes out in batched
sends, and each entry's own errno comes back, so a failure is pinned to the
entry that caused it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from ipaddress import ip_address, ip_interface
from typing import Protocol

from ..netlink import RTPROT_FLANNEL, Netlink, RouteSpec
from ..netlink.batch import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    NUD_PERMANENT,
    Request,
    RouteRecord,
    RtnlSocket,
    address_request,
    fdb_request,
    neigh_request,
    route_request,
)
from .kernel_state import AddrSpec, Entry, FdbSpec, NeighSpec, Plan, Scope, in_scope

__all__ = ["Failure", "Kernel", "NetlinkKernel"]

Failure = tuple[Entry, str]  # an entry the kernel refused, and why

# A removal that finds nothing to remove is done; so is adding an address that is there.
_GONE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV, errno.EADDRNOTAVAIL})
_ALREADY = frozenset({errno.EEXIST})


class Kernel(Protocol):
    """The kernel as the reconciler sees it (synchronous: run it in a worker thread)."""

    def dump(self, scope: Scope) -> list[Entry]:
        """Every entry the kernel holds that falls in ``scope``."""
        ...

    def change(self, changes: Plan) -> list[Failure]:
        """Make every removal, then every addition, in order; return those that failed.

        An addition replaces an entry with the same identity; removing an
        entry that is already gone is not a failure. One failed entry does
        not stop the others.
        """
        ...


NeighbourKey = tuple[str, int, bytes, bytes]  # "neigh", "fdb" or "addr", device, raw IPv4/IPv6 address, MAC or prefix
RawKey = bytes | NeighbourKey  # a route's: its whole message


def _entry_of(key: RawKey, route: RouteRecord | None) -> Entry:
    if route is not None:
        return RouteSpec(route.dst, route.ifindex, route.gateway, route.onlink)
    assert isinstance(key, tuple)
    kind, index, ip, mac = key
    if kind == "neigh":
        return NeighSpec(index, ip_address(ip), mac.hex(":"))
    if kind == "addr":
        return AddrSpec(index, ip_interface((ip_address(ip), mac[0])))
    return FdbSpec(index, mac.hex(":"), ip_address(ip))


def _request(entry: Entry, delete: bool) -> Request:
    if isinstance(entry, RouteSpec):
        return route_request(entry.dst, entry.ifindex, entry.gateway, entry.onlink, RTPROT_FLANNEL, delete)
    if isinstance(entry, NeighSpec):
        return neigh_request(entry.ifindex, entry.ip, entry.mac, delete)
    if isinstance(entry, FdbSpec):
        return fdb_request(entry.ifindex, entry.mac, entry.dst, delete)
    return address_request(entry.ifindex, entry.address, delete)


def _failures(entries: Iterable[Entry], codes: Iterable[int], ignore: frozenset[int]) -> list[Failure]:
    return [(entry, os.strerror(code)) for entry, code in zip(entries, codes, strict=True)
            if code and code not in ignore]


class _Socket:
    """One rtnetlink socket, opened on first use, for one thread at a time."""

    def __init__(self, netlink: Netlink) -> None:
        self._netlink = netlink
        self._socket: RtnlSocket | None = None
        self.lock = threading.Lock()

    def get(self) -> RtnlSocket:
        if self._socket is None:
            self._socket = RtnlSocket(self._netlink.raw_socket())
        return self._socket

    def close(self) -> None:
        with self.lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


class NetlinkKernel:
    """:class:`Kernel` over batched rtnetlink; call it from worker threads.

    Listing and changing use a socket each, so a lease event's change is not
    held up by a long listing.
    """

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink
        self._lister = _Socket(netlink)
        self._changer = _Socket(netlink)
        self._entries: dict[RawKey, Entry] = {}  # the last dump's entries by raw key

    def dump(self, scope: Scope) -> list[Entry]:
        """What we own, as the same entry objects from pass to pass while the kernel is unchanged.

        IPv6 routes, addresses and neighbours are listed only for a scope with an IPv6 network.
        """
        families = tuple(family for family, network in ((AF_INET, scope.network), (AF_INET6, scope.network6))
                         if network is not None)
        with self._lister.lock:
            rtnl = self._lister.get()
            seen: dict[RawKey, Entry] = {}
            out: list[Entry] = []
            for family in families:
                for raw, found in rtnl.route_messages(RTPROT_FLANNEL, family=family):
                    route = self._known(seen, raw, found)
                    if in_scope(scope, route):
                        out.append(route)
            for index in sorted(scope.device_ifindexes):
                for family in families:
                    for ip, prefixlen in rtnl.address_keys(family, index):
                        out.append(self._known(seen, ("addr", index, ip, bytes([prefixlen])), None))
                    for state, ip, mac in rtnl.neighbour_keys(family, index):
                        if state & NUD_PERMANENT:
                            out.append(self._known(seen, ("neigh", index, ip, mac), None))
                for _state, ip, mac in rtnl.neighbour_keys(AF_BRIDGE, index):
                    out.append(self._known(seen, ("fdb", index, ip, mac), None))
            self._entries = seen
            return out

    def _known(self, seen: dict[RawKey, Entry], key: RawKey, route: RouteRecord | None) -> Entry:
        """The entry for a raw key: last pass's object if there was one (cheap to hash and compare)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = _entry_of(key, route)
        seen[key] = entry
        return entry

    def change(self, changes: Plan) -> list[Failure]:
        with self._changer.lock:
            rtnl = self._changer.get()
            requests = [_request(e, delete=True) for e in changes.remove]
            requests += [_request(e, delete=False) for e in changes.add]
            codes = rtnl.send(requests)
            split = len(changes.remove)
            return (_failures(changes.remove, codes[:split], _GONE)
                    + _failures(changes.add, codes[split:], _ALREADY))

    def close(self) -> None:
        self._lister.close()
        self._changer.close()
