"""Which interface carries the overlay, chosen as flanneld v0.20.2 chooses it (no I/O).

The flags, in flannel's order of precedence:

* none of ``--iface``, ``--iface-regex``, ``--iface-can-reach``: the interface that
  holds ``--public-ip`` if given, else the default route's;
* each ``--iface`` in turn, by name or by one of its IPv4 addresses: the first that
  exists and has an address wins;
* then each ``--iface-regex`` in turn: first searched in every interface's addresses
  (the matching address is used), then in the interface names;
* then ``--iface-can-reach``: the interface (and source address) of the kernel's route
  to that address, as ``ip route get`` shows it.

An interface's address is its first global unicast IPv4 address, else its first
link-local one (loopback addresses never count), as flannel's
``GetInterfaceIP4Addrs``. ``--public-ip`` is what peers send to; it defaults to the
chosen address. With ``EnableIPv6``, ``--public-ipv6`` is what peers send IPv6 to;
it defaults to the chosen interface's first global IPv6 address
(:func:`choose_public_ipv6`; flannel would fall back to a link-local one, which peers
across a router cannot reach, so flanneld-py asks for a global one). The I/O side
(:meth:`flanneld_py.netlink.Netlink.select_underlay`) reads the links, the default route and the
route to ``--iface-can-reach``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

__all__ = ["Link", "NoUnderlay", "RouteHint", "Underlay", "UnderlayChoice", "choose_public_ipv6", "choose_underlay",
           "usable_addresses"]


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
    source: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class UnderlayChoice:
    """What the flags ask for."""

    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: str | None = None

    @property
    def explicit(self) -> bool:
        return bool(self.iface or self.iface_regex or self.iface_can_reach)


@dataclass(frozen=True, slots=True)
class Underlay:
    """The chosen interface and address, what peers send to, and the candidates that
    did not match (flannel logs each of them)."""

    link: Link
    address: IPv4Interface
    public_ip: IPv4Address
    skipped: tuple[str, ...] = ()


def choose_public_ipv6(link: Link, public_ipv6: str | None) -> IPv6Address:
    """What peers send IPv6 to: ``--public-ipv6`` if given, else the link's first global IPv6 address.

    Raises:
        NoUnderlay: neither is there; the message says how to fix it.
    """
    if public_ipv6:
        return IPv6Address(public_ipv6)
    for address in link.addresses6:
        if not (address.ip.is_link_local or address.ip.is_loopback or address.ip.is_multicast
                or address.ip.is_unspecified):
            return address.ip
    raise NoUnderlay(f"EnableIPv6 is set but interface {link.name} has no global IPv6 address: add one, "
                     "give --public-ipv6, or turn EnableIPv6 off")


def ipv6_prefix(link: Link, address: IPv6Address) -> IPv6Network | None:
    """The prefix of ``link``'s IPv6 address ``address`` (the segment of IPv6 next hops), if the link has it."""
    for found in link.addresses6:
        if found.ip == address:
            return found.network
    return None


def _global_unicast(address: IPv4Address) -> bool:
    """Go's ``net.IP.IsGlobalUnicast`` for IPv4 (private ranges count as global)."""
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address.is_link_local or address == IPv4Address("255.255.255.255"))


def usable_addresses(link: Link) -> list[IPv4Interface]:
    """Global unicast addresses first, then link-local ones; never loopback."""
    found = [a for a in link.addresses if _global_unicast(a.ip)]
    return found + [a for a in link.addresses if a.ip.is_link_local]


def choose_underlay(links: Sequence[Link], choice: UnderlayChoice, default_route: int | None,
                    can_reach: RouteHint | None = None) -> Underlay:
    """The underlay for ``choice``; ``can_reach`` is the route to ``--iface-can-reach`` (if given).

    Raises:
        NoUnderlay: nothing matches; the message names what was tried and why each failed.
    """
    if not choice.explicit:
        link, address = _implicit(links, choice.public_ip, default_route)
        return _result(link, address, choice, ())
    skipped: list[str] = []
    for candidate in choice.iface:
        try:
            return _result(*_by_name_or_address(links, candidate), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface={candidate}: {exc}")
    for pattern in choice.iface_regex:
        try:
            return _result(*_by_regex(links, pattern), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface-regex={pattern}: {exc}")
    if choice.iface_can_reach:
        try:
            return _result(*_by_route(links, can_reach), choice, skipped)
        except NoUnderlay as exc:
            skipped.append(f"--iface-can-reach={choice.iface_can_reach}: {exc}")
    raise NoUnderlay("no interface matches the interface flags (" + "; ".join(skipped) + "): set --iface, "
                     "--iface-regex or --iface-can-reach (FLANNELD_IFACE, ...) to the underlay interface")


def _result(link: Link, address: IPv4Interface, choice: UnderlayChoice, skipped: Sequence[str]) -> Underlay:
    public = IPv4Address(choice.public_ip) if choice.public_ip else address.ip
    return Underlay(link, address, public, tuple(skipped))


def _first_address(link: Link) -> tuple[Link, IPv4Interface]:
    usable = usable_addresses(link)
    if not usable:
        raise NoUnderlay(f"interface {link.name} has no IPv4 address")
    return link, usable[0]


def _holding(links: Sequence[Link], address: IPv4Address) -> tuple[Link, IPv4Interface] | None:
    for link in links:
        for held in link.addresses:
            if held.ip == address:
                return link, held
    return None


def _implicit(links: Sequence[Link], public_ip: str | None, default_route: int | None) -> tuple[Link, IPv4Interface]:
    if public_ip:
        found = _holding(links, IPv4Address(public_ip))
        if found is None:
            raise NoUnderlay(f"--public-ip {public_ip} is on no interface here; name the underlay with --iface "
                             "(then --public-ip may be any address, e.g. one behind NAT)")
        return found
    by_index = {link.index: link for link in links}
    if default_route is None or default_route not in by_index:
        raise NoUnderlay("no default route to take the underlay interface from; name it with --iface")
    return _first_address(by_index[default_route])


def _by_name_or_address(links: Sequence[Link], text: str) -> tuple[Link, IPv4Interface]:
    try:
        address = IPv4Address(text)
    except ValueError:
        for link in links:
            if link.name == text:
                return _first_address(link)
        raise NoUnderlay(f"no interface named {text}") from None
    found = _holding(links, address)
    if found is None:
        raise NoUnderlay(f"no interface holds {text}")
    return found


def _by_regex(links: Sequence[Link], pattern: str) -> tuple[Link, IPv4Interface]:
    regex = re.compile(pattern)
    for link in links:
        for address in usable_addresses(link):
            if regex.search(str(address.ip)):
                return link, address
    for link in links:
        if regex.search(link.name):
            return _first_address(link)
    available = ", ".join(f"{link.name}:{[str(a.ip) for a in usable_addresses(link)]}" for link in links)
    raise NoUnderlay(f"matches no interface address or name ({available})")


def _by_route(links: Sequence[Link], route: RouteHint | None) -> tuple[Link, IPv4Interface]:
    by_index = {link.index: link for link in links}
    if route is None or route.index not in by_index:
        raise NoUnderlay("the kernel has no route to it")
    link = by_index[route.index]
    if route.source is None:
        return _first_address(link)
    held = next((a for a in link.addresses if a.ip == route.source), None)
    return link, held or IPv4Interface(f"{route.source}/32")
