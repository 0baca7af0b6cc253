"""IPv6 lease records as flannel v0.20.2 writes them: key forms, values, and the watcher."""

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flanneld_py.core.lease import (
    BadRecord,
    KeyDeleted,
    KeyPut,
    Lease,
    LeaseAdded,
    LeaseAttrs,
    LeaseError,
    LeaseRemoved,
    LeaseWatcher,
    choose_subnet6,
    format_subnet_key,
    parse_lease_key,
    parse_subnet_key,
)
from flanneld_py.core.netconfig import NO_IPV4_SUBNET, parse_network_config

DUAL = parse_network_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"}')
V6ONLY = parse_network_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"}')
V4ONLY = parse_network_config('{"Network": "10.244.0.0/16"}')


@pytest.mark.parametrize(
    ("name", "subnet", "subnet6"),
    [
        ("10.244.1.0-24", "10.244.1.0/24", None),  # IPv4 only
        ("10.244.1.0-24&fd00:10:244:1::-64", "10.244.1.0/24", "fd00:10:244:1::/64"),  # dual-stack
        ("0.0.0.0-0&fd00:10:244:1::-64", "0.0.0.0/0", "fd00:10:244:1::/64"),  # IPv6-only (zero IP4Net)
        ("10.244.0.4-30&fd00::10-124", "10.244.0.4/30", "fd00::10/124"),  # small subnets
    ],
)
def test_every_flannel_key_form_round_trips(name, subnet, subnet6):
    pair = (IPv4Network(subnet), None if subnet6 is None else IPv6Network(subnet6))
    assert parse_lease_key(name) == pair
    assert format_subnet_key(*pair) == name
    assert parse_subnet_key(name) == IPv4Network(subnet)


@pytest.mark.parametrize("name", ["10.244.1.0-24&fd00::", "10.244.1.0-24&fd00::1-64", "10.244.1.0-24&zz::-64",
                                  "10.244.1.0-24&fd00::-129", "fd00::-64"])
def test_bad_ipv6_keys_are_lease_errors(name):
    with pytest.raises(LeaseError):
        parse_lease_key(name)


def test_dual_stack_value_is_what_go_marshals():
    attrs = LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:01"},
                       IPv6Address("2001:db8::1"), {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:02"})
    raw = attrs.to_json()
    assert raw == (b'{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1","BackendType":"vxlan",'
                   b'"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},'
                   b'"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}')
    assert LeaseAttrs.from_json(raw) == attrs


def test_ipv4_value_keeps_null_public_ipv6_and_omits_empty_fields():
    raw = LeaseAttrs(IPv4Address("192.0.2.1"), "host-gw").to_json()
    assert raw == b'{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert LeaseAttrs.from_json(raw).public_ipv6 is None


def test_flannels_ipv6_only_value_parses():
    raw = b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::3","BackendType":"host-gw"}'
    attrs = LeaseAttrs.from_json(raw)
    assert attrs.public_ip == IPv4Address("0.0.0.0") and attrs.public_ipv6 == IPv6Address("2001:db8::3")
    assert attrs.to_json() == raw


def test_bad_public_ipv6_is_a_lease_error():
    with pytest.raises(LeaseError, match="PublicIPv6"):
        LeaseAttrs.from_json(b'{"PublicIP":"192.0.2.1","PublicIPv6":"192.0.2.9"}')


def _put(name, ip="192.0.2.2", ip6="2001:db8::2"):
    attrs = LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": 1}, None if ip6 is None else IPv6Address(ip6), {"VNI": 1})
    return KeyPut(name, attrs.to_json())


def test_watcher_carries_both_subnets_and_addresses():
    w = LeaseWatcher(DUAL, own_subnet=IPv4Network("10.244.1.0/24"), own_subnet6=IPv6Network("fd00:10:244:1::/64"))
    events = w.reset([_put("10.244.1.0-24&fd00:10:244:1::-64"), _put("10.244.2.0-24&fd00:10:244:2::-64"),
                      _put("10.244.3.0-24", "192.0.2.3", None)])
    leases = {e.lease.subnet: e.lease for e in events if isinstance(e, LeaseAdded)}
    assert set(leases) == {IPv4Network("10.244.2.0/24"), IPv4Network("10.244.3.0/24")}
    two = leases[IPv4Network("10.244.2.0/24")]
    assert two.subnet6 == IPv6Network("fd00:10:244:2::/64") and two.attrs.public_ipv6 == IPv6Address("2001:db8::2")
    assert two.attrs.backend_v6_data == {"VNI": 1}
    assert leases[IPv4Network("10.244.3.0/24")].subnet6 is None  # an IPv4-only peer is kept
    removed = w.update([KeyDeleted("10.244.2.0-24&fd00:10:244:2::-64")])
    assert removed == [LeaseRemoved(two)]


def test_watcher_rejects_ipv6_subnets_outside_the_network():
    w = LeaseWatcher(DUAL)
    events = w.reset([_put("10.244.2.0-24&fd00:99::-64"), _put("10.244.3.0-24&fd00:10:244:3::-80")])
    assert [type(e) for e in events] == [BadRecord, BadRecord]
    assert "IPv6Network" in events[0].reason


def test_ipv6_only_watcher_keys_on_the_ipv6_subnet():
    w = LeaseWatcher(V6ONLY, own_subnet=NO_IPV4_SUBNET, own_subnet6=IPv6Network("fd00:10:244:1::/64"))
    events = w.reset([_put("0.0.0.0-0&fd00:10:244:1::-64"), _put("0.0.0.0-0&fd00:10:244:2::-64"),
                      _put("0.0.0.0-0&fd00:10:244:3::-64"), _put("10.244.3.0-24", ip6=None)])
    added = sorted(str(e.lease.subnet6) for e in events if isinstance(e, LeaseAdded))
    assert added == ["fd00:10:244:2::/64", "fd00:10:244:3::/64"]
    assert [e.reason for e in events if isinstance(e, BadRecord)] == ["no IPv6 subnet in an IPv6-only network"]


def test_ipv4_network_ignores_an_ipv6_half_it_does_not_use():
    w = LeaseWatcher(V4ONLY)
    events = w.reset([_put("10.244.2.0-24&fd00:99::-64")])
    assert events == [LeaseAdded(Lease(IPv4Network("10.244.2.0/24"), LeaseAttrs.from_json(_put("x").value),
                                       IPv6Network("fd00:99::/64")))]


def test_choose_subnet6_stays_in_range_and_skips_taken_without_listing_the_space():
    config = parse_network_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/16"}')
    assert config.ipv6 is not None and config.ipv6.subnet_len == 64  # 2**48 subnets: never listed
    taken = [IPv6Network(((0xfd00 << 112) + (i << 64), 64)) for i in range(1, 150)]
    chosen = {choose_subnet6(config, taken, random.Random(seed)) for seed in range(50)}
    assert all(s is not None and config.ipv6.holds_subnet(s) and s not in taken for s in chosen)
    assert len(chosen) > 1


def test_choose_subnet6_none_when_full():
    config = parse_network_config(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True,
                                              "IPv6Network": "fd00::/120"}))
    assert config.ipv6 is not None
    six = config.ipv6
    every = [IPv6Network((int(six.subnet_min.network_address) + i * six.step, six.subnet_len)) for i in range(3)]
    assert choose_subnet6(config, every, random.Random(1)) is None
    assert choose_subnet6(config, every[:2], random.Random(1)) == every[2]
