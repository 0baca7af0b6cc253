"""Many rtnetlink requests per system call, and dumps the kernel filters for us.

One request and a wait for its answer (as netlink libraries do) is one
round trip, plus the message's encoding and decoding, per peer entry. For thousands of peers
that is most of a start-up. Here, as iproute2's ``-batch`` and ``tc``'s
batching do, requests are packed with :mod:`struct` into one buffer, sent
with one ``sendto``, and the kernel's acknowledgements (one per request,
``NLM_F_ACK``) are read back and matched to their requests by sequence
number, so one failed request is known by name and the others still count.

Dumps ask the kernel to filter (``NETLINK_GET_STRICT_CHK``: only one
protocol's routes, only one device's neighbours) and read just the fields a
backend compares, so a drift pass over thousands of peers stays cheap.

Synchronous, with no event loop of its own. The kernel handles a
request inside ``sendto``, so reading the answers waits on nothing but the
kernel's own work: one lookup may run on the event-loop thread; batches and
dumps of thousands of entries belong in a worker thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_address
from typing import NamedTuple

__all__ = [
    "AF_BRIDGE",
    "AF_INET6",
    "LinkRecord",
    "NetlinkBatchError",
    "Request",
    "RouteRecord",
    "RtnlSocket",
    "address_request",
    "attr",
    "fdb_request",
    "link_attrs",
    "link_delete_request",
    "link_header",
    "link_request",
    "neigh_request",
    "new_link_request",
    "parse_attrs",
    "route_request",
]

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = 7
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF = 0x02
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_TXQLEN, IFLA_LINKINFO = 1, 3, 4, 10, 13, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFF_UP = 0x1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_ATTR = struct.Struct("=HH")
_ERROR = struct.Struct("=i")
_U32 = struct.Struct("=I")

MAX_BATCH = 256  # requests per send: their acknowledgements must fit the receive buffer
RECEIVE_BUFFER = 8 << 20
_CHANGE = NLM_F_REQUEST | NLM_F_ACK
_REPLACE = _CHANGE | NLM_F_CREATE | NLM_F_REPLACE
_ADDRESS_BYTES: dict[int, int] = {AF_INET: 4, AF_INET6: 16}

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def family_of(address: IPAddress | IPNetwork | IPv4Interface | IPv6Interface) -> int:
    """AF_INET or AF_INET6, from an address, network or interface of either family."""
    return AF_INET6 if address.version == 6 else AF_INET


@dataclass(frozen=True, slots=True)
class Request:
    """One rtnetlink request without its header: message type, flags and body."""

    kind: int
    flags: int
    body: bytes


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute (type, length, value, padding); nest by passing joined attributes as ``value``."""
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def route_request(dst: IPNetwork, ifindex: int, gateway: IPAddress | None, onlink: bool,
                  proto: int, delete: bool = False) -> Request:
    """``ip route replace|del <dst> [via <gateway>] dev <ifindex> [onlink] proto <proto>`` (main table).

    A delete names the device and protocol, so it never removes another
    owner's route to the same destination. The family is the destination's.
    """
    family = family_of(dst)
    if delete:
        head = _RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, proto, RT_SCOPE_NOWHERE, 0, 0)
    else:
        scope = RT_SCOPE_LINK if gateway is None else RT_SCOPE_UNIVERSE
        head = _RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST,
                           RTNH_F_ONLINK if onlink else 0)
    body = head + attr(RTA_DST, dst.network_address.packed) + attr(RTA_OIF, _U32.pack(ifindex))
    if gateway is not None and not delete:
        body += attr(RTA_GATEWAY, gateway.packed)
    return Request(RTM_DELROUTE if delete else RTM_NEWROUTE, _CHANGE if delete else _REPLACE, body)


def neigh_request(ifindex: int, ip: IPAddress, mac: str, delete: bool = False) -> Request:
    """``ip neigh replace|del <ip> lladdr <mac> dev <ifindex> nud permanent`` (ARP or NDP by the IP's family)."""
    body = _NDMSG.pack(family_of(ip), ifindex, NUD_PERMANENT, 0, 0) + attr(NDA_DST, ip.packed)
    if delete:
        return Request(RTM_DELNEIGH, _CHANGE, body)
    return Request(RTM_NEWNEIGH, _REPLACE, body + attr(NDA_LLADDR, _mac(mac)))


def fdb_request(ifindex: int, mac: str, dst: IPAddress, delete: bool = False) -> Request:
    """``bridge fdb replace|del <mac> dev <ifindex> dst <dst> self permanent`` (flannel's AddFDB)."""
    body = (_NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
            + attr(NDA_LLADDR, _mac(mac)) + attr(NDA_DST, dst.packed))
    return Request(RTM_DELNEIGH if delete else RTM_NEWNEIGH, _CHANGE if delete else _REPLACE, body)


def address_request(ifindex: int, address: IPv4Interface | IPv6Interface, delete: bool = False) -> Request:
    """``ip addr add|del <address> dev <ifindex>`` (IPv6: ``nodad``, as the address is ours alone)."""
    family = family_of(address)
    flags = IFA_F_NODAD if family == AF_INET6 else 0
    body = (_IFADDRMSG.pack(family, address.network.prefixlen, flags, RT_SCOPE_UNIVERSE, ifindex)
            + attr(IFA_LOCAL, address.ip.packed) + attr(IFA_ADDRESS, address.ip.packed))
    return Request(RTM_DELADDR if delete else RTM_NEWADDR, _CHANGE if delete else _CHANGE | NLM_F_CREATE, body)


def link_request(ifindex: int, *, mtu: int | None = None, txqlen: int | None = None, mac: str | None = None,
                 up: bool | None = None) -> Request:
    """``ip link set dev <ifindex> [mtu N] [txqueuelen N] [address MAC] [up|down]``."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, IFF_UP if up else 0, IFF_UP if up is not None else 0)
    for kind, value in ((IFLA_MTU, mtu), (IFLA_TXQLEN, txqlen)):
        if value is not None:
            body += attr(kind, _U32.pack(value))
    if mac is not None:
        body += attr(IFLA_ADDRESS, _mac(mac))
    return Request(RTM_NEWLINK, _CHANGE, body)


def link_attrs(name: str | None = None, *, mtu: int | None = None, mac: str | None = None, master: int | None = None,
               extra: bytes = b"") -> bytes:
    """A link's attributes as RTM_NEWLINK takes them (``extra``: more, already packed)."""
    out = attr(IFLA_IFNAME, name.encode() + b"\0") if name is not None else b""
    if mac is not None:
        out += attr(IFLA_ADDRESS, _mac(mac))
    if mtu is not None:
        out += attr(IFLA_MTU, _U32.pack(mtu))
    if master is not None:
        out += attr(IFLA_MASTER, _U32.pack(master))
    return out + extra


def link_header(ifindex: int = 0, *, up: bool = False, family: int = socket.AF_UNSPEC) -> bytes:
    """The ifinfomsg of a link request (``up``: set IFF_UP)."""
    return _IFINFOMSG.pack(family, 0, ifindex, IFF_UP if up else 0, IFF_UP if up else 0)


def new_link_request(name: str, kind: str, data: bytes = b"", *, mtu: int, mac: str | None = None,
                     up: bool = False, extra: bytes = b"") -> Request:
    """``ip link add <name> [address <mac>] mtu <mtu> [up] type <kind> <data>``; ``data``: the kind's
    IFLA_INFO_DATA attributes, joined. An existing link of that name is an error (EEXIST)."""
    info = attr(IFLA_INFO_KIND, kind.encode()) + (attr(IFLA_INFO_DATA, data) if data else b"")
    body = link_header(up=up) + link_attrs(name, mtu=mtu, mac=mac, extra=extra + attr(IFLA_LINKINFO, info))
    return Request(RTM_NEWLINK, _CHANGE | NLM_F_CREATE | NLM_F_EXCL, body)


def link_delete_request(ifindex: int) -> Request:
    """``ip link del dev <ifindex>``."""
    return Request(RTM_DELLINK, _CHANGE, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0))


def parse_attrs(data: bytes | memoryview, offset: int, end: int) -> dict[int, bytes]:
    """Attributes by type (nested ones still packed: parse their value again)."""
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = bytes(data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return out


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence, body offset, message end) of every message in one datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        yield kind, seq, offset + _HEADER.size, offset + length
        offset += (length + 3) & ~3


class RouteRecord(NamedTuple):
    dst: IPNetwork
    ifindex: int
    gateway: IPAddress | None
    onlink: bool
    proto: int
    table: int


_UNPARSED = RouteRecord(IPv4Network("0.0.0.0/0"), 0, None, False, 0, 0)


def _route_record(message: bytes, want: int = AF_INET) -> RouteRecord | None:
    """A route of family ``want`` from an RTM_NEWROUTE body (None for another family)."""
    family, dst_len, _src, _tos, table, proto, _scope, _type, flags = _RTMSG.unpack_from(message)
    if family != want:
        return None
    attrs = parse_attrs(message, _RTMSG.size, len(message))
    table = _U32.unpack(attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table
    raw_dst = int.from_bytes(attrs.get(RTA_DST, b""), "big")
    dst: IPNetwork = IPv6Network((raw_dst, dst_len)) if family == AF_INET6 else IPv4Network((raw_dst, dst_len))
    oif = _U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0
    gateway = ip_address(attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None
    return RouteRecord(dst, oif, gateway, bool(flags & RTNH_F_ONLINK), proto, table)


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """One link as ``ip -d link show`` has it; ``data``: its kind's IFLA_INFO_DATA attributes, raw."""

    index: int
    name: str
    mtu: int
    flags: int
    mac: str
    kind: str
    data: dict[int, bytes]
    master: int = 0  # the bridge (IFLA_MASTER) of a port


def _link_record(message: bytes) -> LinkRecord:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(message)
    attrs = parse_attrs(message, _IFINFOMSG.size, len(message))
    info = attrs.get(IFLA_LINKINFO, b"")
    info_attrs = parse_attrs(info, 0, len(info))
    data = info_attrs.get(IFLA_INFO_DATA, b"")
    return LinkRecord(index, attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                      _U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0, flags,
                      attrs.get(IFLA_ADDRESS, b"").hex(":"), info_attrs.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode(),
                      parse_attrs(data, 0, len(data)), _U32.unpack(attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0)


class NetlinkBatchError(OSError):
    """The socket itself failed (not one request): nothing can be said about the batch."""


class RtnlSocket:
    """One rtnetlink socket for batches and filtered dumps (not thread-safe: one user at a time)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._tune()
        self._seq = 0
        self._buffer = bytearray(1 << 16)
        self._routes: dict[tuple[int, bytes], RouteRecord | None] = {}  # the last route dumps, parsed

    def _tune(self) -> None:
        for option, value in ((NETLINK_CAP_ACK, 1), (NETLINK_GET_STRICT_CHK, 1)):
            try:
                self._sock.setsockopt(SOL_NETLINK, option, value)
            except OSError:
                pass  # older kernels: full acknowledgements, unfiltered dumps (we filter again below)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def send(self, requests: Sequence[Request]) -> list[int]:
        """Send every request, in order, :data:`MAX_BATCH` per system call; the errno of each (0: done).

        The kernel applies the requests of one send in order, each on its own:
        a failed one does not stop the next.
        """
        errors: list[int] = []
        for start in range(0, len(requests), MAX_BATCH):
            errors += self._send_chunk(requests[start:start + MAX_BATCH])
        return errors

    def _send_chunk(self, requests: Sequence[Request]) -> list[int]:
        pending: dict[int, int] = {}
        parts: list[bytes] = []
        for position, request in enumerate(requests):
            seq = self._next_seq()
            pending[seq] = position
            parts.append(_HEADER.pack(_HEADER.size + len(request.body), request.kind, request.flags, seq, 0))
            parts.append(request.body)
        self._sock.sendto(b"".join(parts), (0, 0))
        errors = [0] * len(requests)
        while pending:
            data = self._receive()
            for kind, seq, body, _end in _messages(data):
                if kind == NLMSG_ERROR and seq in pending:
                    errors[pending.pop(seq)] = -_ERROR.unpack_from(data, body)[0]
        return errors

    def _receive(self) -> bytes:
        """One datagram (the kernel never makes one longer than 32 KiB for us)."""
        try:
            size = self._sock.recv_into(self._buffer, 0, socket.MSG_TRUNC)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise NetlinkBatchError(errno.ENOBUFS, "netlink answers were lost (receive buffer full)") from None
            raise
        if size > len(self._buffer):
            raise NetlinkBatchError(errno.EMSGSIZE, f"netlink answer of {size} bytes truncated")
        return bytes(self._buffer[:size])

    def dump_raw(self, request: Request) -> Iterator[bytes]:
        """The body (fixed header and attributes) of every answer to a dump request.

        Raises:
            OSError: the kernel refused the dump (with its errno).
        """
        return self._ask(request, NLM_F_REQUEST | NLM_F_DUMP)

    def _ask(self, request: Request, flags: int) -> Iterator[bytes]:
        """Send one request; the body of each answer, until the kernel says it is done."""
        seq = self._next_seq()
        self._sock.sendto(_HEADER.pack(_HEADER.size + len(request.body), request.kind, flags, seq, 0) + request.body,
                          (0, 0))
        while True:
            data = self._receive()
            for kind, got, body, end in _messages(data):
                if got != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -_ERROR.unpack_from(data, body)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield data[body:end]
                if not flags & NLM_F_DUMP:
                    return

    def dump(self, request: Request, fixed: int) -> Iterator[tuple[bytes, dict[int, bytes]]]:
        """Every answer to a dump request: its fixed header (``fixed`` bytes) and its attributes."""
        for message in self.dump_raw(request):
            yield message[:fixed], parse_attrs(message, fixed, len(message))

    # --- what the backends read --------------------------------------------------------------

    def routes(self, proto: int | None, table: int = RT_TABLE_MAIN, family: int = AF_INET) -> list[RouteRecord]:
        """The routes of ``family`` in ``table``, only those of ``proto`` unless it is None."""
        return [record for _raw, record in self.route_messages(proto, table, family)]

    def route_messages(self, proto: int | None, table: int = RT_TABLE_MAIN,
                       family: int = AF_INET) -> list[tuple[bytes, RouteRecord]]:
        """Like :meth:`routes`, each with its raw message (the same bytes while the route is unchanged)."""
        request = Request(RTM_GETROUTE, 0, _RTMSG.pack(family, 0, 0, 0, table, proto or 0, 0, 0, 0))
        seen: dict[tuple[int, bytes], RouteRecord | None] = {}
        for message in self.dump_raw(request):
            # parse each distinct message once, not on every pass
            key = (family, message)
            record = self._routes.get(key, _UNPARSED)
            seen[key] = _route_record(message, family) if record is _UNPARSED else record
        self._routes = {k: r for k, r in self._routes.items() if k[0] != family} | seen
        return [(raw, r) for (_family, raw), r in seen.items()
                if r is not None and r.table == table and proto in (None, r.proto)]

    @staticmethod
    def _neighbour_dump(family: int, ifindex: int) -> Request:
        if family == AF_BRIDGE:  # the FDB dump takes the device from the header
            return Request(RTM_GETNEIGH, 0, _NDMSG.pack(family, ifindex, 0, 0, 0))
        return Request(RTM_GETNEIGH, 0, _NDMSG.pack(family, 0, 0, 0, 0) + attr(NDA_IFINDEX, _U32.pack(ifindex)))

    def count_neighbours(self, family: int, ifindex: int, state_mask: int = 0) -> int:
        """How many neighbours (AF_INET) or FDB entries (AF_BRIDGE) the device has (in ``state_mask``, if given).

        Reads only each answer's fixed header: cheap enough to poll.
        """
        count = 0
        for message in self.dump_raw(self._neighbour_dump(family, ifindex)):
            got_family, got_index, state, _flags, _type = _NDMSG.unpack_from(message)
            if got_family == family and got_index == ifindex and (not state_mask or state & state_mask):
                count += 1
        return count

    def neighbour_keys(self, family: int, ifindex: int) -> list[tuple[int, bytes, bytes]]:
        """(state, NDA_DST bytes, NDA_LLADDR bytes) of every neighbour (AF_INET, AF_INET6) or FDB entry
        (AF_BRIDGE: IPv4 and IPv6 remotes) on the device."""
        out = []
        size = _ADDRESS_BYTES.get(family)
        for head, attrs in self.dump(self._neighbour_dump(family, ifindex), _NDMSG.size):
            got_family, got_index, state, _flags, _type = _NDMSG.unpack(head)
            dst, mac = attrs.get(NDA_DST), attrs.get(NDA_LLADDR)
            if (got_family == family and got_index == ifindex and dst and mac
                    and (len(dst) == size if size else len(dst) in (4, 16))):
                out.append((state, dst, mac))
        return out

    def permanent_neighbours(self, ifindex: int) -> list[tuple[IPv4Address, str]]:
        """(IP, MAC) of every permanent IPv4 neighbour on the device."""
        return [(IPv4Address(dst), mac.hex(":")) for state, dst, mac in self.neighbour_keys(AF_INET, ifindex)
                if state & NUD_PERMANENT]

    def fdb_entries(self, ifindex: int) -> list[tuple[str, IPv4Address]]:
        """(MAC, remote VTEP) of every FDB entry with an IPv4 remote on the device."""
        return [(mac.hex(":"), IPv4Address(dst)) for _state, dst, mac in self.neighbour_keys(AF_BRIDGE, ifindex)
                if len(dst) == 4]

    def ipv4_addresses(self, ifindex: int) -> list[IPv4Interface]:
        return [IPv4Interface((int.from_bytes(raw, "big"), prefixlen))
                for raw, prefixlen in self.address_keys(AF_INET, ifindex)]

    def address_keys(self, family: int, ifindex: int) -> list[tuple[bytes, int]]:
        """(address bytes, prefix length) of every ``family`` address on the device but link-scope ones
        (the kernel's own IPv6 fe80:: addresses are not ours to list or remove)."""
        request = Request(RTM_GETADDR, 0, _IFADDRMSG.pack(family, 0, 0, 0, ifindex))
        out = []
        for head, attrs in self.dump(request, _IFADDRMSG.size):
            got_family, prefixlen, _flags, scope, index = _IFADDRMSG.unpack(head)
            address = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if got_family == family and index == ifindex and address and scope != RT_SCOPE_LINK:
                out.append((address, prefixlen))
        return out

    def link_kind_and_mac(self, name: str) -> tuple[str, str] | None:
        """The kind (``vxlan``, ``veth``, ...; empty for a plain device) and MAC of link ``name``, or None."""
        link = self.link(name=name)
        return None if link is None else (link.kind, link.mac)

    def link(self, *, name: str | None = None, index: int = 0) -> LinkRecord | None:
        """The link called ``name`` or with ``index``; None if there is none."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            for message in self._ask(Request(RTM_GETLINK, 0, body), NLM_F_REQUEST):
                return _link_record(message)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
        return None

    def links(self) -> list[LinkRecord]:
        """Every link of the namespace."""
        request = Request(RTM_GETLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        return [_link_record(message) for message in self.dump_raw(request)]

    def all_addresses(self, family: int, ifindex: int = 0) -> list[tuple[int, bytes, int]]:
        """(interface index, address bytes, prefix length) of every ``family`` address (of one
        interface if ``ifindex``), any scope, in the kernel's order."""
        out = []
        request = Request(RTM_GETADDR, 0, _IFADDRMSG.pack(family, 0, 0, 0, ifindex))
        for head, attrs in self.dump(request, _IFADDRMSG.size):
            got_family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack(head)
            address = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
            if got_family == family and address and ifindex in (0, index):
                out.append((index, address, prefixlen))
        return out

    def route_to(self, destination: IPAddress) -> tuple[int, IPAddress | None] | None:
        """``ip route get <destination>``: (output interface, preferred source).

        Raises:
            OSError: no route (ENETUNREACH and the like).
        """
        family = family_of(destination)
        body = _RTMSG.pack(family, destination.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, destination.packed)
        for message in self._ask(Request(RTM_GETROUTE, 0, body), NLM_F_REQUEST):
            attrs = parse_attrs(message, _RTMSG.size, len(message))
            if RTA_OIF in attrs:
                source = attrs.get(RTA_PREFSRC)
                return _U32.unpack(attrs[RTA_OIF])[0], ip_address(source) if source else None
        return None

    def change(self, request: Request) -> None:
        """Send one request and wait for its acknowledgement.

        Raises:
            OSError: the kernel refused it (with its errno).
        """
        (code,) = self.send([request])
        if code:
            raise OSError(code, os.strerror(code))
