"""Which interface carries the overlay, chosen as flanneld v0.20.2 chooses it (no I/O).

The flags, in flannel's order of precedence:

* none of ``--iface``, ``--iface-regex``, ``--iface-can-reach``: the interface that
  holds ``--public-ip`` if given, else the default route's;
* each ``--iface`` in turn, by name or by one of its addresses: the first that
  exists and has an address wins;
* then each ``--iface-regex`` in turn: first searched in every interface's addresses
  (the matching address is used), then in the interface names;
* then ``--iface-can-reach``: the interface (and source address) of the kernel's route
  to that address, as ``ip route get`` shows it.

The address family is the network's, as flannel's ``ipmatch.LookupExtIface``: an
IPv4 or dual-stack network looks at IPv4 addresses and the IPv4 default route; an
IPv6-only one (``EnableIPv4: false``, :attr:`UnderlayChoice.ipv6_only`) at IPv6
addresses, ``--public-ipv6`` instead of ``--public-ip`` and the IPv6 default route,
so that it runs on an interface with no IPv4 address (the lease's ``PublicIP`` is
then 0.0.0.0, as flanneld publishes it). A dual-stack network on an interface
with only IPv6 addresses is refused, as flannel refuses it.

An interface's address is its first global unicast address of the family, else its
first link-local one (loopback addresses never count), as flannel's
``GetInterfaceIP4Addrs``/``GetInterfaceIP6Addrs``. ``--public-ip`` is what peers send to; it
defaults to the chosen address. With ``EnableIPv6``, ``--public-ipv6`` is what peers send
IPv6 to; it defaults to the chosen IPv6 address if global, else the interface's first
global IPv6 address (:func:`choose_public_ipv6`; flannel would fall back to a link-local
one, which peers across a router cannot reach, so flanneld-py asks for a global one).
The I/O side (:meth:`flanneld_py.netlink.Netlink.select_underlay`) reads the links, the
default route of the family and the route to ``--iface-can-reach``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network, ip_address

__all__ = ["Link", "NoUnderlay", "RouteHint", "Underlay", "UnderlayChoice", "choose_public_ipv6", "choose_underlay",
           "usable_addresses", "usable_addresses6"]

_Address = IPv4Interface | IPv6Interface


class NoUnderlay(LookupError):
    """No interface matches the flags; the message says what was tried."""


@dataclass(frozen=True, slots=True)
class Link:
    """One interface as the kernel lists it (addresses in the kernel's order)."""

    name: str
    index: int
    mtu: int
    addresses: tuple[IPv4Interface, ...] = ()
    addresses6: tuple[IPv6Interface, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteHint:
    """The kernel's answer to ``ip route get``: output interface and preferred source."""

    index: int
    source: IPv4Address | IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class UnderlayChoice:
    """What the flags ask for; ``ipv6_only`` for a network with ``EnableIPv4: false``."""

    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    ipv6_only: bool = False

    @property
    def explicit(self) -> bool:
        return bool(self.iface or self.iface_regex or self.iface_can_reach)


@dataclass(frozen=True, slots=True)
class Underlay:
    """The chosen interface and address, what peers send to, and the candidates that
    did not match (flannel logs each of them). An IPv6-only network's underlay has an
    IPv6 ``address6`` instead of ``address`` and ``public_ip`` 0.0.0.0."""

    link: Link
    address: IPv4Interface | None
    public_ip: IPv4Address
    skipped: tuple[str, ...] = ()
    address6: IPv6Interface | None = None


def choose_public_ipv6(link: Link, public_ipv6: str | None, chosen: IPv6Interface | None = None) -> IPv6Address:
    """What peers send IPv6 to: ``--public-ipv6`` if given, else ``chosen`` (the IPv6 underlay's
    address) if global, else the link's first global IPv6 address.

    Raises:
        NoUnderlay: neither is there; the message says how to fix it.
    """
    if public_ipv6:
        return IPv6Address(public_ipv6)
    for address in (chosen, *link.addresses6):
        if address is not None and _global_unicast(address.ip):
            return address.ip
    raise NoUnderlay(f"EnableIPv6 is set but interface {link.name} has no global IPv6 address: add one, "
                     "give --public-ipv6, or turn EnableIPv6 off")


def ipv6_prefix(link: Link, address: IPv6Address) -> IPv6Network | None:
    """The prefix of ``link``'s IPv6 address ``address`` (the segment of IPv6 next hops), if the link has it."""
    for found in link.addresses6:
        if found.ip == address:
            return found.network
    return None


def _global_unicast(address: IPv4Address | IPv6Address) -> bool:
    """Go's ``net.IP.IsGlobalUnicast`` (private and unique local ranges count as global)."""
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address.is_link_local or address == IPv4Address("255.255.255.255"))


def usable_addresses(link: Link) -> list[IPv4Interface]:
    """Global unicast IPv4 addresses first, then link-local ones; never loopback."""
    found = [a for a in link.addresses if _global_unicast(a.ip)]
    return found + [a for a in link.addresses if a.ip.is_link_local]


def usable_addresses6(link: Link) -> list[IPv6Interface]:
    """Global unicast IPv6 addresses first, then link-local ones; never loopback."""
    found = [a for a in link.addresses6 if _global_unicast(a.ip)]
    return found + [a for a in link.addresses6 if a.ip.is_link_local]


@dataclass(frozen=True, slots=True)
class _Family:
    """The address family the interface is chosen by."""

    version: int

    @property
    def name(self) -> str:
        return f"IPv{self.version}"

    def usable(self, link: Link) -> Sequence[_Address]:
        return usable_addresses6(link) if self.version == 6 else usable_addresses(link)

    def held(self, link: Link) -> Sequence[_Address]:
        return link.addresses6 if self.version == 6 else link.addresses


def choose_underlay(links: Sequence[Link], choice: UnderlayChoice, default_route: int | None,
                    can_reach: RouteHint | None = None) -> Underlay:
    """The underlay for ``choice``; ``default_route`` is the index of the default route's interface
    in the choice's family, ``can_reach`` the route to ``--iface-can-reach`` (if given).

    Raises:
        NoUnderlay: nothing matches; the message names what was tried and why each failed.
    """
    family = _Family(6 if choice.ipv6_only else 4)
    try:
        return _choose(links, choice, default_route, can_reach, family)
    except NoUnderlay:
        if choice.ipv6_only:
            raise
        ipv6_link = _ipv6_only_link(links, choice, default_route, can_reach)
        if ipv6_link is None:
            raise
        raise NoUnderlay(f"network config: EnableIPv4=true but the underlay interface {ipv6_link} has no IPv4 "
                         "address: give it one, or run an IPv6-only network on it (EnableIPv4=false, "
                         "EnableIPv6=true)") from None


def _ipv6_only_link(links: Sequence[Link], choice: UnderlayChoice, default_route: int | None,
                    can_reach: RouteHint | None) -> str | None:
    """The interface the flags would pick by its IPv6 addresses, if it has no IPv4 address
    (the IPv4 default route is then usually absent too: the caller's ``default_route`` is
    the IPv4 one, so only flags that name the interface count here)."""
    if not choice.explicit:
        return None
    try:
        found = _choose(links, replace(choice, public_ip=None), default_route, can_reach, _Family(6))
    except NoUnderlay:
        return None
    return found.link.name if not usable_addresses(found.link) else None


def _choose(links: Sequence[Link], choice: UnderlayChoice, default_route: int | None,
            can_reach: RouteHint | None, family: _Family) -> Underlay:
    if not choice.explicit:
        link, address = _implicit(links, choice, default_route, family)
        return _result(link, address, choice, ())
    skipped: list[str] = []
    for candidate in choice.iface:
        try:
            return _result(*_by_name_or_address(links, candidate, family), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface={candidate}: {exc}")
    for pattern in choice.iface_regex:
        try:
            return _result(*_by_regex(links, pattern, family), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface-regex={pattern}: {exc}")
    if choice.iface_can_reach:
        try:
            return _result(*_by_route(links, can_reach, family), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface-can-reach={choice.iface_can_reach}: {exc}")
    raise NoUnderlay("no interface matches the interface flags (" + "; ".join(skipped) + "): set --iface, "
                     "--iface-regex or --iface-can-reach (FLANNELD_IFACE, ...) to the underlay interface")


def _result(link: Link, address: _Address, choice: UnderlayChoice, skipped: Sequence[str]) -> Underlay:
    if isinstance(address, IPv6Interface):
        return Underlay(link, None, IPv4Address(0), tuple(skipped), address)
    public = IPv4Address(choice.public_ip) if choice.public_ip else address.ip
    return Underlay(link, address, public, tuple(skipped))


def _first_address(link: Link, family: _Family) -> tuple[Link, _Address]:
    usable = family.usable(link)
    if not usable:
        raise NoUnderlay(f"interface {link.name} has no {family.name} address")
    return link, usable[0]


def _holding(links: Sequence[Link], address: IPv4Address | IPv6Address, family: _Family) -> tuple[Link, _Address] | None:
    for link in links:
        for held in family.held(link):
            if held.ip == address:
                return link, held
    return None


def _implicit(links: Sequence[Link], choice: UnderlayChoice, default_route: int | None,
              family: _Family) -> tuple[Link, _Address]:
    if family.version == 6 and choice.public_ip:
        raise NoUnderlay(f"--public-ip {choice.public_ip} is an IPv4 address and the network is IPv6-only "
                         "(EnableIPv4=false): give --public-ipv6 or --iface instead")
    public, flag = (choice.public_ipv6, "--public-ipv6") if family.version == 6 else (choice.public_ip, "--public-ip")
    if public:
        found = _holding(links, ip_address(public), family)
        if found is None:
            raise NoUnderlay(f"{flag} {public} is on no interface here; name the underlay with --iface "
                             f"(then {flag} may be any address, e.g. one behind NAT)")
        return found
    by_index = {link.index: link for link in links}
    if default_route is None or default_route not in by_index:
        raise NoUnderlay(f"no {family.name} default route to take the underlay interface from; name it with --iface")
    return _first_address(by_index[default_route], family)


def _by_name_or_address(links: Sequence[Link], text: str, family: _Family) -> tuple[Link, _Address]:
    try:
        address = ip_address(text)
    except ValueError:
        for link in links:
            if link.name == text:
                return _first_address(link, family)
        raise NoUnderlay(f"no interface named {text}") from None
    if address.version != family.version:
        raise NoUnderlay(f"{text} is not an {family.name} address, and the interface is chosen by its "
                         f"{family.name} addresses (EnableIPv4={'false' if family.version == 6 else 'true'})")
    found = _holding(links, address, family)
    if found is None:
        raise NoUnderlay(f"no interface holds {text}")
    return found


def _by_regex(links: Sequence[Link], pattern: str, family: _Family) -> tuple[Link, _Address]:
    regex = re.compile(pattern)
    for link in links:
        for address in family.usable(link):
            if regex.search(str(address.ip)):
                return link, address
    for link in links:
        if regex.search(link.name):
            return _first_address(link, family)
    available = ", ".join(f"{link.name}:{[str(a.ip) for a in family.usable(link)]}" for link in links)
    raise NoUnderlay(f"matches no interface address or name ({available})")


def _by_route(links: Sequence[Link], route: RouteHint | None, family: _Family) -> tuple[Link, _Address]:
    by_index = {link.index: link for link in links}
    if route is None or route.index not in by_index:
        raise NoUnderlay("the kernel has no route to it")
    link = by_index[route.index]
    if route.source is None or route.source.version != family.version:
        return _first_address(link, family)
    held = next((a for a in family.held(link) if a.ip == route.source), None)
    if held is not None:
        return link, held
    return link, IPv6Interface((route.source, 128)) if family.version == 6 else IPv4Interface((route.source, 32))
