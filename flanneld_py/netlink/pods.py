"""Netlink for pod wiring: sockets bound to a namespace by path, bridges and veth pairs.

A socket for another namespace is made without a fork (pyroute2's
``IPRoute(netns=path)`` forked a child, ~6 ms, and passed ``O_CREAT``, which
would *create* a namespace that a runtime has already removed): a throwaway thread opens the namespace
file, ``setns``-es itself into it, creates the netlink socket and exits: the
socket stays bound to that namespace, no long-lived thread ever changes
namespace (the event loop's least of all), and a missing namespace is an
error, never a new one. That costs ~0.2 ms.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, TypeVar

from . import Netlink, NetlinkError
from .batch import (
    AF_BRIDGE,
    Request,
    RtnlSocket,
    address_request,
    attr,
    link_attrs,
    link_header,
    new_link_request,
    parse_attrs,
)

__all__ = [
    "NamespaceNotFound",
    "NetnsNetlink",
    "PodSocket",
    "addresses",
    "create_veth",
    "disable_dad",
    "ensure_bridge",
    "hairpin_enabled",
    "link_master",
    "netns_socket",
    "random_mac",
    "routes",
    "set_hairpin",
    "write_sysctl",
]

CLONE_NEWNET = 0x40000000
BRPORT_MODE_HAIRPIN = 1
_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")

Address = IPv4Address | IPv6Address
Interface = IPv4Interface | IPv6Interface
Network = IPv4Network | IPv6Network


class NamespaceNotFound(FileNotFoundError):
    """The network namespace path does not exist (or is not a network namespace)."""


def in_netns(path: str, work: Callable[[], _T]) -> _T:
    """Run ``work`` in a throwaway thread that has entered the network namespace at ``path``.

    Sockets it creates stay bound to that namespace, and ``/proc/sys/net`` files it
    opens are the namespace's; no other thread ever changes namespace.
    """
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(errno.ENOENT, "network namespace does not exist", path) from None
    outcome: dict[str, Any] = {}

    def enter_and_work() -> None:
        # This thread ends inside the namespace; it is never reused.
        if _libc.setns(nsfd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            outcome["error"] = (NamespaceNotFound if code == errno.EINVAL else OSError)(
                code, f"cannot enter network namespace: {os.strerror(code)}", path)
            return
        try:
            outcome["value"] = work()
        except OSError as exc:
            outcome["error"] = exc

    try:
        worker = threading.Thread(target=enter_and_work, name="netns-worker", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(nsfd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def netns_socket(path: str, family: int = socket.AF_NETLINK,
                 kind: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket created inside the network namespace at ``path``."""
    return in_netns(path, lambda: socket.socket(family, kind, proto))


def write_sysctl(key: str, value: str) -> None:
    """Set ``/proc/sys/<key>`` (``net/ipv6/conf/all/forwarding``) in the caller's namespace, if it differs."""
    with open(f"/proc/sys/{key}", "r+", encoding="ascii") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value)


def disable_dad(netns_path: str, ifname: str) -> None:
    """``accept_dad = 0`` on the pod's interface, as the bridge plugin sets it.

    Duplicate address detection would hold the pod's IPv6 address tentative
    (unusable) for a second or more after ADD; the node's IPAM already
    guarantees the address is unique on the bridge.
    """
    in_netns(netns_path, lambda: write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "0"))


class NetnsNetlink(Netlink):
    """A ``Netlink`` bound to the namespace at ``path`` (for CHECK: it only asks questions)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._rtnl = RtnlSocket(self.raw_socket())  # now: a missing namespace is an error here

    def raw_socket(self) -> socket.socket:
        return netns_socket(self.path, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)


class PodSocket:
    """Just what ADD does inside a pod, as raw rtnetlink over a namespace-bound socket.

    ADD needs four requests in the pod's namespace (find the interface, bring
    it up, add the address, add the route): one ``struct.pack`` and one
    ``send``/``recv`` each, ~0.3 ms in all, on a socket with a timeout.
    Everything else, CHECK included, uses ``NetnsNetlink``. Errors are
    ``NetlinkError`` with the kernel's errno.
    """

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self._sock = netns_socket(path, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PodSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def link_index(self, name: str) -> int:
        """The interface's index; ``NetlinkError`` (ENODEV) if there is none."""
        by_name = _IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
        reply = self._request(RTM_GETLINK, 0, by_name)
        _family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(reply)
        return int(index)

    def set_up(self, index: int) -> None:
        self._request(RTM_NEWLINK, NLM_F_ACK, _IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP))

    def add_address(self, index: int, address: Interface) -> None:
        packed = address.ip.packed
        body = _IFADDRMSG.pack(_family(address.version), address.network.prefixlen, 0, 0, index)
        self._request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                      body + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed))

    def replace_route(self, dst: Network, gateway: Address | None, index: int, proto: int) -> None:
        body = _RTMSG.pack(_family(dst.version), dst.prefixlen, 0, 0, RT_TABLE_MAIN, proto, RT_SCOPE_UNIVERSE,
                           RTN_UNICAST, 0)
        if dst.prefixlen:
            body += _attr(RTA_DST, dst.network_address.packed)
        if gateway is not None:
            body += _attr(RTA_GATEWAY, gateway.packed)
        body += _attr(RTA_OIF, struct.pack("=I", index))
        self._request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)

    def _request(self, kind: int, flags: int, body: bytes) -> bytes:
        """Send one request; return the reply's payload (empty for a bare ACK)."""
        self._seq += 1
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0) + body)
        while True:
            for msg_type, seq, payload in _messages(self._sock.recv(65536)):
                if seq != self._seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return b""
                return payload


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise OSError(errno.EPROTO, "malformed netlink message")
        yield msg_type, seq, data[offset + _NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
IFF_UP = 0x1
RTM_SETLINK = 19
NLA_F_NESTED = 0x8000
IFLA_IFNAME, IFLA_PROTINFO, IFLA_NET_NS_FD, IFLA_GSO_MAX_SIZE = 3, 12, 28, 41
IFLA_BRPORT_MODE = 4
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 0, 1
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


# --- bridge and veth helpers (used on the node's namespace) ----------------


def ensure_bridge(nl: Netlink, name: str, mtu: int, gateways: Sequence[Interface],
                  stale: Sequence[Network] = ()) -> int:
    """The bridge's index, after making sure it exists, is up and holds each of ``gateways``.

    Addresses inside a ``stale`` network other than the gateways (an old node
    subnet) are removed; others are left alone. A concurrent creator is not an
    error. An IPv6 gateway is added without duplicate address detection
    (``IFA_F_NODAD``), so it is usable at once, even before a port gives the bridge a carrier.
    """
    index = nl.link_index(name)
    if index is None:
        try:
            nl.request(new_link_request(name, "bridge", mtu=mtu))
            created = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            created = False
        index = nl.require_index(name)
        if created:
            # Pin the MAC: a bridge otherwise takes its lowest port's, so the pods'
            # gateway would change MAC whenever a pod comes or goes.
            nl.set_link(index, address=nl.link_attrs(index)["address"])
    attrs = nl.link_attrs(index)
    if not attrs["flags"] & IFF_UP:
        nl.set_link(index, state="up")
    present = addresses(nl, index)
    for other in present:
        if other not in gateways and any(other.version == net.version and other.ip in net for net in stale):
            nl.request(address_request(index, other, delete=True))
    for gateway in gateways:
        if gateway not in present:
            _add_address(nl, index, gateway)
    return index


def _add_address(nl: Netlink, index: int, address: Interface) -> None:
    try:
        nl.request(address_request(index, address))  # IPv6: without duplicate address detection
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def addresses(nl: Netlink, index: int) -> list[Interface]:
    """The interface's IPv4 and IPv6 addresses (IPv6 link-local ones left out)."""
    def read(rtnl: RtnlSocket) -> list[Interface]:
        out: list[Interface] = [IPv4Interface((raw, prefixlen))
                                for _index, raw, prefixlen in rtnl.all_addresses(socket.AF_INET, index)]
        for _index, raw, prefixlen in rtnl.all_addresses(socket.AF_INET6, index):
            address6 = IPv6Interface((raw, prefixlen))
            if not address6.ip.is_link_local:
                out.append(address6)
        return out

    return nl.with_socket(read)


def routes(nl: Netlink) -> set[tuple[Network, Address | None]]:
    """(destination, gateway) of the main table's unicast routes, both families."""
    def read(rtnl: RtnlSocket) -> set[tuple[Network, Address | None]]:
        return {(route.dst, route.gateway) for family in (socket.AF_INET, socket.AF_INET6)
                for raw, route in rtnl.route_messages(None, family=family) if raw[7] == RTN_UNICAST}

    return nl.with_socket(read)


def create_veth(nl: Netlink, host: str, peer: str, peer_netns_path: str, mtu: int, *,
                master: int | None = None, host_mac: str | None = None, peer_mac: str | None = None,
                gso_max_size: int | None = None) -> None:
    """Create ``host`` here (up, on ``master``) and ``peer`` directly inside the namespace, in one request.

    Choosing both MACs up front saves reading them back.
    """
    try:
        nsfd = os.open(peer_netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(errno.ENOENT, "network namespace does not exist", peer_netns_path) from None
    gso = attr(IFLA_GSO_MAX_SIZE, struct.pack("=I", gso_max_size)) if gso_max_size is not None else b""
    peer_info = link_header() + link_attrs(peer, mtu=mtu, mac=peer_mac,
                                           extra=attr(IFLA_NET_NS_FD, struct.pack("=I", nsfd)) + gso)
    try:
        nl.request(new_link_request(host, "veth", attr(VETH_INFO_PEER, peer_info), mtu=mtu, mac=host_mac, up=True,
                                    extra=link_attrs(master=master, extra=gso)))
    finally:
        os.close(nsfd)


def random_mac() -> str:
    """A random unicast, locally administered MAC (what the kernel would pick for a veth)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def set_hairpin(nl: Netlink, index: int) -> None:
    """Let a bridge port reflect frames back to their sender: a pod reaching itself via a service."""
    mode = attr(IFLA_PROTINFO | NLA_F_NESTED, attr(IFLA_BRPORT_MODE, bytes([BRPORT_MODE_HAIRPIN])))
    nl.request(Request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, link_header(index, family=AF_BRIDGE) + mode))


def hairpin_enabled(nl: Netlink, index: int) -> bool:
    """Whether a bridge port reflects frames back to their sender."""
    ports = Request(RTM_GETLINK, 0, link_header(family=AF_BRIDGE))
    for head, attrs in nl.with_socket(lambda rtnl: list(rtnl.dump(ports, _IFINFOMSG.size))):
        if _IFINFOMSG.unpack(head)[2] == index and IFLA_PROTINFO in attrs:
            info = attrs[IFLA_PROTINFO]
            return bool(parse_attrs(info, 0, len(info)).get(IFLA_BRPORT_MODE, b"\0")[0])
    return False


def link_master(nl: Netlink, index: int) -> int | None:
    return nl.link(index).master or None

