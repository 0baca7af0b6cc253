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


# --- an IPv6-only network (EnableIPv4: false): chosen by IPv6, as flannel's ipv6Stack ---------------

V6A = Link("eth0", 2, 1500, (), (IPv6Interface("fe80::a/64"), IPv6Interface("2001:db8::10/64"),
                                 IPv6Interface("2001:db8::11/64")))
V6B = Link("eth1", 3, 1400, (IPv4Interface("192.0.2.20/24"),), (IPv6Interface("2001:db8:1::20/64"),))
V6C = Link("eth2", 4, 1500, (), (IPv6Interface("fe80::c/64"),))
LINKS6 = [LO, V6A, V6B, V6C]


def choose6(default=2, hint=None, **flags):
    return choose_underlay(LINKS6, UnderlayChoice(ipv6_only=True, **flags), default, hint)


def test_ipv6_only_takes_the_ipv6_default_routes_interface_and_its_first_global_ipv6_address():
    u = choose6(default=2)
    assert u.link is V6A and u.address is None and u.address6 == IPv6Interface("2001:db8::10/64")
    assert u.public_ip == IPv4Address(0)  # flannel's PublicIP of an IPv6-only node
    assert choose6(default=3).address6 == IPv6Interface("2001:db8:1::20/64")  # its IPv4 address is not used
    assert choose6(default=4).address6 == IPv6Interface("fe80::c/64")  # link-local when nothing else, as flannel
    with pytest.raises(NoUnderlay, match="no IPv6 default route"):
        choose6(default=None)


def test_ipv6_only_iface_by_name_or_ipv6_address():
    assert choose6(iface=("eth1",)).address6 == IPv6Interface("2001:db8:1::20/64")
    u = choose6(iface=("2001:db8::11",))
    assert u.link is V6A and u.address6 == IPv6Interface("2001:db8::11/64")
    u = choose6(iface=("192.0.2.20", "lo", "eth0"))
    assert u.link is V6A
    assert u.skipped[0].startswith("--iface=192.0.2.20: 192.0.2.20 is not an IPv6 address")
    assert u.skipped[1] == "--iface=lo: interface lo has no IPv6 address"


def test_ipv6_only_regex_matches_ipv6_addresses_then_names():
    assert choose6(iface_regex=("^2001:db8:1:",)).link is V6B
    assert choose6(iface_regex=("^eth2$",)).address6 == IPv6Interface("fe80::c/64")


def test_ipv6_only_can_reach_uses_the_routes_ipv6_source():
    u = choose6(iface_can_reach="2001:db8::99", hint=RouteHint(2, IPv6Address("2001:db8::11")))
    assert u.link is V6A and u.address6 == IPv6Interface("2001:db8::11/64")
    u = choose6(iface_can_reach="192.0.2.99", hint=RouteHint(3, IPv4Address("192.0.2.20")))
    assert u.link is V6B and u.address6 == IPv6Interface("2001:db8:1::20/64")


def test_ipv6_only_public_ipv6_alone_picks_the_interface_holding_it_and_public_ip_is_refused():
    u = choose6(default=None, public_ipv6="2001:db8:1::20")
    assert u.link is V6B and u.address6 == IPv6Interface("2001:db8:1::20/64")
    with pytest.raises(NoUnderlay, match="--public-ipv6 2001:db8::99 is on no interface here"):
        choose6(public_ipv6="2001:db8::99")
    with pytest.raises(NoUnderlay) as info:
        choose6(public_ip="192.0.2.20")
    assert "--public-ip 192.0.2.20" in str(info.value) and "EnableIPv4=false" in str(info.value)


def test_a_dual_stack_network_on_an_interface_without_ipv4_is_refused_in_one_line_naming_enable_ipv4():
    with pytest.raises(NoUnderlay) as info:
        choose_underlay(LINKS6, UnderlayChoice(iface=("eth0",)), None)
    text = str(info.value)
    assert text.startswith("network config: EnableIPv4=true but the underlay interface eth0 has no IPv4 address")
    assert "EnableIPv4=false" in text and "\n" not in text
    assert choose_underlay(LINKS6, UnderlayChoice(iface=("eth1",)), None).address == IPv4Interface("192.0.2.20/24")


def test_public_ipv6_defaults_to_the_chosen_global_ipv6_address():
    assert choose_public_ipv6(V6A, None, IPv6Interface("2001:db8::11/64")) == IPv6Address("2001:db8::11")
    assert choose_public_ipv6(V6A, None, IPv6Interface("fe80::a/64")) == IPv6Address("2001:db8::10")
    with pytest.raises(NoUnderlay, match="eth2 has no global IPv6 address"):
        choose_public_ipv6(V6C, None, IPv6Interface("fe80::c/64"))
