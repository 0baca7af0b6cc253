import json
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flanneld_py.core.netconfig import NO_IPV4_SUBNET, ConfigError, IPv6Range, parse_network_config, subnet_inside

V6 = {"EnableIPv4": False, "EnableIPv6": True}  # IPv6-only: the IPv6 keys are checked first


def cfg(**doc):
    return parse_network_config(json.dumps(doc))


def test_defaults_for_a_16():
    c = cfg(Network="10.244.0.0/16")
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Network("10.244.1.0/24")
    assert c.subnet_max == IPv4Network("10.244.255.0/24")
    assert c.backend.type == "udp" and c.backend.port == 8285
    assert c.subnet_count == 255


def test_subnet_len_default_for_small_networks_is_prefix_plus_two():
    assert cfg(Network="10.244.0.0/24").subnet_len == 26
    assert cfg(Network="10.244.0.0/22").subnet_len == 24
    assert cfg(Network="10.244.0.0/23").subnet_len == 25


def test_explicit_bounds_and_backend():
    c = cfg(Network="10.244.0.0/16", SubnetLen=25, SubnetMin="10.244.2.0", SubnetMax="10.244.3.128",
            Backend={"Type": "vxlan", "VNI": 7, "DirectRouting": True})
    assert c.subnet_min == IPv4Network("10.244.2.0/25")
    assert c.subnet_max == IPv4Network("10.244.3.128/25")
    assert c.subnet_count == 4
    assert c.backend.type == "vxlan" and c.backend.vni == 7 and c.backend.direct_routing
    assert c.backend.vxlan_port == 8472


def test_holds_subnet():
    c = cfg(Network="10.244.0.0/16", SubnetMin="10.244.10.0", SubnetMax="10.244.20.0")
    assert c.holds_subnet(IPv4Network("10.244.15.0/24"))
    assert not c.holds_subnet(IPv4Network("10.244.9.0/24"))
    assert not c.holds_subnet(IPv4Network("10.244.15.0/25"))
    assert not c.holds_subnet(IPv4Network("10.245.15.0/24"))


@pytest.mark.parametrize(
    ("doc", "field", "value"),
    [
        ({}, "Network", None),
        ({"Network": 5}, "Network", 5),
        ({"Network": "banana"}, "Network", "banana"),
        ({"Network": "fd00::/64"}, "Network", "fd00::/64"),
        ({"Network": "10.0.0.0/30"}, "Network", "10.0.0.0/30"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 16}, "SubnetLen", 16),
        ({"Network": "10.244.0.0/16", "SubnetLen": 31}, "SubnetLen", 31),
        ({"Network": "10.244.0.0/16", "SubnetLen": "24"}, "SubnetLen", "24"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}, "SubnetMin", "10.245.0.0"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.244.0.7"}, "SubnetMin", "10.244.0.7"),
        ({"Network": "10.244.0.0/16", "SubnetMax": "nope"}, "SubnetMax", "nope"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.3.0"}, "SubnetMin", "10.244.9.0"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "gre"}}, "Backend.Type", "gre"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}, "Backend.Port", 70000),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0}}, "Backend.VNI", 0),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "GBP": "yes"}}, "Backend.GBP", "yes"),
        ({"Network": "10.244.0.0/16", "Backend": "udp"}, "Backend", "udp"),
        ({"Network": "10.244.0.0/16", "EnableIPv6": True}, "IPv6Network", None),
        ({"Network": "10.244.0.0/16", "EnableIPv6": "yes"}, "EnableIPv6", "yes"),
        ({"Network": "10.244.0.0/16", "EnableIPv4": 0}, "EnableIPv4", 0),
        ({"EnableIPv4": False}, "EnableIPv4", False),
        ({**V6, "IPv6Network": "10.244.0.0/16"}, "IPv6Network", "10.244.0.0/16"),
        ({**V6, "IPv6Network": "banana"}, "IPv6Network", "banana"),
        ({**V6, "IPv6Network": 6}, "IPv6Network", 6),
        ({**V6, "IPv6Network": "fd00::/125"}, "IPv6Network", "fd00::/125"),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetLen": 57}, "IPv6SubnetLen", 57),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetLen": 127}, "IPv6SubnetLen", 127),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetLen": "64"}, "IPv6SubnetLen", "64"),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd01::"}, "IPv6SubnetMin", "fd01::"),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00::1"}, "IPv6SubnetMin", "fd00::1"),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetMax": "10.0.0.0"}, "IPv6SubnetMax", "10.0.0.0"),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetMax": 5}, "IPv6SubnetMax", 5),
        ({**V6, "IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00:0:0:9::",
          "IPv6SubnetMax": "fd00:0:0:3::"}, "IPv6SubnetMin", "fd00:0:0:9::"),
    ],
)
def test_every_validation_error_names_field_and_value(doc, field, value):
    with pytest.raises(ConfigError) as info:
        parse_network_config(json.dumps(doc))
    assert info.value.field == field
    assert info.value.value == value
    assert field in str(info.value)


def test_not_json_and_not_object():
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_network_config(b"{nope")
    with pytest.raises(ConfigError, match="JSON object"):
        parse_network_config("[1, 2]")


def test_keys_match_case_insensitively_as_go_json():
    c = parse_network_config('{"network": "10.244.0.0/16", "backend": {"type": "VXLAN", "vni": 4}}')
    assert c.network == IPv4Network("10.244.0.0/16") and c.backend.type == "vxlan" and c.backend.vni == 4
    assert c.warnings == ()


def test_unknown_keys_give_one_warning_naming_them():
    c = cfg(Network="10.244.0.0/16", Netwrk="x", SubnetLength=24, Backend={"Type": "udp", "VNI": 3, "Prot": 1})
    assert len(c.warnings) == 1
    for key in ("Netwrk", "SubnetLength", "Backend.VNI", "Backend.Prot"):
        assert key in c.warnings[0]


def test_ipv6_keys_are_flannel_keys_not_unknown():
    c = cfg(Network="10.244.0.0/16", EnableIPv6=False, IPv6Network="fd00::/56", IPv6SubnetLen=64,
            IPv6SubnetMin="fd00::100", IPv6SubnetMax="fd00::ff00", EnableIPv4=True)
    assert c.warnings == ()


def test_dual_stack_takes_flannels_ipv6_defaults():
    c = parse_network_config('{"network": "10.244.0.0/16", "enableipv6": true, "ipv6network": "fd00:10:244::/56"}')
    assert c.enable_ipv4 and c.enable_ipv6 and c.network == IPv4Network("10.244.0.0/16")
    assert c.ipv6 == IPv6Range(IPv6Network("fd00:10:244::/56"), 64, IPv6Network("fd00:10:244:1::/64"),
                               IPv6Network("fd00:10:244:ff::/64"))
    assert c.warnings == ()


@pytest.mark.parametrize(("network", "length"), [("fd00::/48", 64), ("fd00::/62", 64), ("fd00::/63", 65),
                                                 ("fd00::/120", 122), ("fd00::/124", 126)])
def test_ipv6_subnet_len_default_is_flannels(network, length):
    c = cfg(Network="10.244.0.0/16", EnableIPv6=True, IPv6Network=network)
    assert c.ipv6 is not None and c.ipv6.subnet_len == length


def test_ipv6_bounds_and_holds_subnet():
    c = cfg(Network="10.244.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=64,
            IPv6SubnetMin="fd00:0:0:10::", IPv6SubnetMax="fd00:0:0:20::")
    assert c.ipv6 is not None
    assert c.ipv6.holds_subnet(IPv6Network("fd00:0:0:10::/64"))
    assert c.ipv6.holds_subnet(IPv6Network("fd00:0:0:20::/64"))
    assert not c.ipv6.holds_subnet(IPv6Network("fd00:0:0:21::/64"))
    assert not c.ipv6.holds_subnet(IPv6Network("fd00:0:0:10::/65"))
    assert not c.ipv6.holds_subnet(IPv6Network("fd01:0:0:10::/64"))


def test_ipv6_only_keeps_flannels_zero_ipv4_values():
    c = cfg(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:10:244::/56")
    assert not c.enable_ipv4 and c.enable_ipv6
    assert c.network == NO_IPV4_SUBNET and c.subnet_len == 0
    assert c.holds_subnet(NO_IPV4_SUBNET) and not c.holds_subnet(IPv4Network("10.244.1.0/24"))


def test_ipv6_network_error_is_one_line_naming_field():
    with pytest.raises(ConfigError) as info:
        cfg(Network="10.244.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=40)
    assert "\n" not in str(info.value) and "IPv6SubnetLen=40" in str(info.value)


def test_flannel_keys_we_do_not_implement_are_warned_about():
    c = cfg(Network="10.244.0.0/16", Networks=["10.245.0.0/16"], EnableNFTables=True,
            Backend={"Type": "vxlan", "Learning": True})
    text = " | ".join(c.warnings)
    assert "Networks" in text and "EnableNFTables" in text and "Learning" in text
    assert cfg(Network="10.244.0.0/16", EnableNFTables=False).warnings == ()


@pytest.mark.parametrize("kind", ["ipip", "wireguard", "ipsec", "alloc", "extension", "gce", "aws-vpc",
                                  "ali-vpc", "tencent-vpc", "WireGuard"])
def test_flannel_backends_we_lack_are_fatal_and_list_ours(kind):
    with pytest.raises(ConfigError) as info:
        cfg(Network="10.244.0.0/16", Backend={"Type": kind})
    text = str(info.value)
    assert kind.lower() in text and "udp, vxlan, host-gw" in text and "\n" not in text


def test_vxlan_mtu_is_the_underlay_mtu_to_assume():
    c = cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan", "MTU": 1400})
    assert c.backend.mtu == 1400 and c.backend.underlay_mtu(9000) == 1400 and c.warnings == ()
    assert cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan"}).backend.underlay_mtu(9000) == 9000
    with pytest.raises(ConfigError, match="Backend.MTU"):
        cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan", "MTU": 100})


@pytest.mark.parametrize("kind", ["udp", "host-gw"])
def test_mtu_is_unknown_to_flannels_udp_and_host_gw(kind):
    c = cfg(Network="10.244.0.0/16", Backend={"Type": kind, "MTU": 1400})
    assert c.backend.mtu is None and "Backend.MTU" in c.warnings[0]


def test_warnings_do_not_change_what_the_config_means():
    assert cfg(Network="10.244.0.0/16", Extra=1) == cfg(Network="10.244.0.0/16")


def _networks(bits: int, cls: type) -> st.SearchStrategy:
    return st.tuples(st.integers(0, 2**bits - 1), st.integers(0, bits)).map(
        lambda t: cls((t[0] >> (bits - t[1]) << (bits - t[1]) if t[1] else 0, t[1])))


@given(st.one_of(st.tuples(_networks(32, IPv4Network), _networks(32, IPv4Network)),
                 st.tuples(_networks(128, IPv6Network), _networks(128, IPv6Network))))
def test_subnet_inside_is_ipaddress_subnet_of(pair):
    """The integer form (leases and reconcile passes use it) answers as ipaddress does."""
    subnet, network = pair
    assert subnet_inside(subnet, network) == subnet.subnet_of(network)


@pytest.mark.parametrize(("subnet", "network", "inside"), [
    ("10.244.7.0/24", "10.244.0.0/16", True), ("10.244.0.0/16", "10.244.0.0/16", True),
    ("10.0.0.0/8", "10.244.0.0/16", False), ("10.245.7.0/24", "10.244.0.0/16", False),
    ("fd00:10:244:7::/64", "fd00:10:244::/56", True), ("fd00:10:245::/64", "fd00:10:244::/56", False),
])
def test_subnet_inside_cases(subnet, network, inside):
    make = IPv4Network if "." in subnet else IPv6Network
    assert subnet_inside(make(subnet), make(network)) is inside
