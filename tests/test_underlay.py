"""The underlay interface choice, flannel's rules (pure: links and routes made by hand)."""

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest

from flanneld_py.core.underlay import (
    Link,
    NoUnderlay,
    RouteHint,
    UnderlayChoice,
    choose_public_ipv6,
    choose_underlay,
    usable_addresses,
)

LO = Link("lo", 1, 65536, (IPv4Interface("127.0.0.1/8"),))
ETH0 = Link("eth0", 2, 1500, (IPv4Interface("192.0.2.10/24"), IPv4Interface("192.0.2.11/24")))
ETH1 = Link("eth1", 3, 9000, (IPv4Interface("169.254.3.3/16"), IPv4Interface("198.51.100.5/24")))
ENS3 = Link("ens3", 4, 1450, ())
LINKS = [LO, ETH0, ETH1, ENS3]


def choose(default=2, hint=None, **flags):
    return choose_underlay(LINKS, UnderlayChoice(**flags), default, hint)


def test_addresses_global_first_then_link_local_never_loopback():
    assert usable_addresses(ETH1) == [IPv4Interface("198.51.100.5/24"), IPv4Interface("169.254.3.3/16")]
    assert usable_addresses(LO) == []


def test_default_route_interface_and_its_first_address():
    u = choose(default=3)
    assert u.link is ETH1 and u.address == IPv4Interface("198.51.100.5/24") and u.public_ip == u.address.ip


def test_no_default_route_is_an_error_with_the_fix():
    with pytest.raises(NoUnderlay, match="--iface"):
        choose(default=None)


def test_public_ip_alone_picks_the_interface_holding_it():
    u = choose(public_ip="192.0.2.11")
    assert u.link is ETH0 and u.address.ip == IPv4Address("192.0.2.11") and u.public_ip == IPv4Address("192.0.2.11")


def test_public_ip_on_no_interface_says_use_iface():
    with pytest.raises(NoUnderlay, match="on no interface here.*--iface"):
        choose(public_ip="203.0.113.9")


def test_public_ip_with_iface_is_only_what_peers_send_to():
    u = choose(iface=("eth1",), public_ip="203.0.113.9")
    assert u.link is ETH1 and u.public_ip == IPv4Address("203.0.113.9")


def test_first_existing_iface_wins_in_order():
    u = choose(iface=("eth7", "ens3", "198.51.100.5", "eth0"))
    assert u.link is ETH1 and u.address.ip == IPv4Address("198.51.100.5")
    assert u.skipped == ("--iface=eth7: no interface named eth7", "--iface=ens3: interface ens3 has no IPv4 address")


def test_iface_by_address_keeps_that_address():
    assert choose(iface=("192.0.2.11",)).address == IPv4Interface("192.0.2.11/24")


def test_regex_matches_addresses_before_names():
    u = choose(iface_regex=("^eth1$|192\\.0\\.2\\.1",))
    assert u.link is ETH0 and u.address.ip == IPv4Address("192.0.2.10")


def test_regex_on_names_and_order_of_regexes():
    u = choose(iface_regex=("^wlan", "^eth1$"))
    assert u.link is ETH1 and u.skipped[0].startswith("--iface-regex=^wlan: matches no interface")


def test_regex_never_matches_loopback_addresses():
    with pytest.raises(NoUnderlay):
        choose(iface_regex=("^127\\.",))


def test_iface_before_regex_before_can_reach():
    hint = RouteHint(3, IPv4Address("198.51.100.5"))
    assert choose(iface=("eth0",), iface_regex=("eth1",), iface_can_reach="198.51.100.9", hint=hint).link is ETH0
    assert choose(iface=("x",), iface_regex=("eth1",), iface_can_reach="192.0.2.9", hint=hint).link is ETH1
    u = choose(iface=("x",), iface_can_reach="198.51.100.9", hint=hint)
    assert u.link is ETH1 and u.address == IPv4Interface("198.51.100.5/24")


def test_can_reach_without_source_takes_the_first_address():
    assert choose(iface_can_reach="192.0.2.99", hint=RouteHint(2)).address == IPv4Interface("192.0.2.10/24")


def test_nothing_matches_lists_every_attempt():
    with pytest.raises(NoUnderlay) as info:
        choose(iface=("eth7",), iface_regex=("^wl",), iface_can_reach="203.0.113.1", hint=None)
    text = str(info.value)
    assert "--iface=eth7" in text and "--iface-regex=^wl" in text and "--iface-can-reach=203.0.113.1" in text


def test_public_ipv6_is_the_flag_else_the_first_global_ipv6_address():
    link = Link("eth0", 2, 1500, (IPv4Interface("192.0.2.1/24"),),
                (IPv6Interface("fe80::1/64"), IPv6Interface("2001:db8::1/64"), IPv6Interface("2001:db8::2/64")))
    assert choose_public_ipv6(link, None) == IPv6Address("2001:db8::1")
    assert choose_public_ipv6(link, "2001:db8::99") == IPv6Address("2001:db8::99")
    only_link_local = Link("eth1", 3, 1500, (IPv4Interface("192.0.2.1/24"),), (IPv6Interface("fe80::1/64"),))
    with pytest.raises(NoUnderlay) as info:
        choose_public_ipv6(only_link_local, None)
    assert "eth1" in str(info.value) and "--public-ipv6" in str(info.value) and "\n" not in str(info.value)
    assert choose_public_ipv6(only_link_local, "2001:db8::5") == IPv6Address("2001:db8::5")
