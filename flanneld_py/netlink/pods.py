"""Netlink for pod wiring: sockets bound to a namespace by path, bridges and veth pairs.

pyroute2's ``IPRoute(netns=path)`` forks a child to create the socket (~6 ms)
and by default passes ``O_CREAT``, which would *create* a namespace that a
runtime has already removed. Here a throwaway thread opens the namespace
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
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any, TypeVar

from . import Netlink, NetlinkError
from .batch import RtnlSocket

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
    """A ``Netlink`` bound to the namespace at ``path``, for one worker thread.

    pyroute2 keeps per-thread state for sockets it was handed by fd, so create,
    use and close one of these in the same thread. It subscribes to no
    multicast groups: it only asks questions.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._rtnl = RtnlSocket(self.raw_socket())  # now: a missing namespace is an error here

    def raw_socket(self) -> socket.socket:
        return netns_socket(self.path, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)

    def _open_pyroute2(self) -> Any:
        from pyroute2 import IPRoute

        sock = netns_socket(self.path, proto=NETLINK_ROUTE)
        try:
            ipr = IPRoute(fileno=sock.fileno(), groups=0)
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the IPRoute owns the descriptor now
        return ipr


class PodSocket:
    """Just what ADD does inside a pod, as raw rtnetlink over a namespace-bound socket.

    ADD needs four requests in the pod's namespace (find the interface, bring
    it up, add the address, add the route). Through pyroute2 that is an
    ``IPRoute`` (an event loop of its own) and ~0.3 ms of Python per
    request; here it is one ``struct.pack`` and one ``send``/``recv`` each,
    ~0.3 ms in all. Everything else, CHECK included, uses ``NetnsNetlink``.
    Errors are pyroute2's ``NetlinkError`` with the kernel's errno.
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
IFLA_IFNAME = 3
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
            nl.call("link", "add", ifname=name, kind="bridge", mtu=mtu)
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
    if not attrs["flags"] & 1:  # IFF_UP
        nl.set_link(index, state="up")
    present = addresses(nl, index)
    for other in present:
        if other not in gateways and any(other.version == net.version and other.ip in net for net in stale):
            nl.call("addr", "del", index=index, address=str(other.ip), prefixlen=other.network.prefixlen)
    for gateway in gateways:
        if gateway not in present:
            _add_address(nl, index, gateway)
    return index


def _add_address(nl: Netlink, index: int, address: Interface) -> None:
    flags = IFA_F_NODAD if address.version == 6 else 0
    try:
        nl.call("addr", "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen,
                flags=flags)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def addresses(nl: Netlink, index: int) -> list[Interface]:
    """The interface's IPv4 and IPv6 addresses (IPv6 link-local ones left out)."""
    out: list[Interface] = []
    for msg in nl.call("get_addr", index=index):
        if msg["family"] in (socket.AF_INET, socket.AF_INET6):
            address = ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not address.ip.is_link_local or address.version == 4:
                out.append(address)
    return out


def routes(nl: Netlink) -> set[tuple[Network, Address | None]]:
    """(destination, gateway) of the main table's unicast routes, both families."""
    out: set[tuple[Network, Address | None]] = set()
    for family, default in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for msg in nl.call("get_routes", family=family, table=RT_TABLE_MAIN):
            if msg["type"] != RTN_UNICAST:
                continue
            gateway = msg.get_attr("RTA_GATEWAY")
            out.add((ip_network(f"{msg.get_attr('RTA_DST') or default}/{msg['dst_len']}"),
                     ip_address(gateway) if gateway else None))
    return out


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
    host_attrs: dict[str, Any] = {"ifname": host, "kind": "veth", "mtu": mtu, "state": "up"}
    peer_attrs: dict[str, Any] = {"ifname": peer, "net_ns_fd": nsfd, "mtu": mtu}
    if master is not None:
        host_attrs["master"] = master
    if host_mac:
        host_attrs["address"] = host_mac
    if peer_mac:
        peer_attrs["address"] = peer_mac
    if gso_max_size is not None:
        host_attrs["gso_max_size"] = peer_attrs["gso_max_size"] = gso_max_size
    try:
        nl.call("link", "add", peer=peer_attrs, **host_attrs)
    finally:
        os.close(nsfd)


def random_mac() -> str:
    """A random unicast, locally administered MAC (what the kernel would pick for a veth)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def set_hairpin(nl: Netlink, index: int) -> None:
    """Let a bridge port reflect frames back to their sender: a pod reaching itself via a service."""
    nl.call("brport", "set", index=index, mode=BRPORT_MODE_HAIRPIN)


def hairpin_enabled(nl: Netlink, index: int) -> bool:
    """Whether a bridge port reflects frames back to their sender."""
    for msg in nl.call("brport", "show", index=index):
        info = msg.get_attr("IFLA_PROTINFO")
        if info is not None:
            return bool(info.get_attr("IFLA_BRPORT_MODE"))
    return False


def link_master(nl: Netlink, index: int) -> int | None:
    (link,) = nl.call("get_links", index)
    master = link.get_attr("IFLA_MASTER")
    return int(master) if master else None

