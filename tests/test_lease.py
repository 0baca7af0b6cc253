import json
import random
from ipaddress import IPv4Address, IPv4Network

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
    choose_subnet,
    format_subnet_key,
    parse_subnet_key,
)
from flanneld_py.core.netconfig import parse_network_config

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')


def attrs(ip="198.51.100.1", kind="udp"):
    return LeaseAttrs(IPv4Address(ip), kind, None)


def put(name, ip="198.51.100.1"):
    return KeyPut(name, attrs(ip).to_json())


def test_key_roundtrip_and_flannel_dual_stack_form():
    subnet = IPv4Network("10.244.7.0/24")
    assert format_subnet_key(subnet) == "10.244.7.0-24"
    assert parse_subnet_key("10.244.7.0-24") == subnet
    assert parse_subnet_key("10.244.7.0-24&fc00:0:0:7::-64") == subnet


@pytest.mark.parametrize("bad", ["10.244.7.0", "10.244.7.0/24", "x-24", "10.244.7.1-24", "10.244.7.0-33", ""])
def test_bad_keys(bad):
    with pytest.raises(LeaseError):
        parse_subnet_key(bad)


def test_value_is_flannels_json():
    doc = json.loads(LeaseAttrs(IPv4Address("198.51.100.3"), "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}).to_json())
    assert doc == {"PublicIP": "198.51.100.3", "PublicIPv6": None, "BackendType": "vxlan",
                   "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}}
    # flannel omits empty fields; we must read that too
    parsed = LeaseAttrs.from_json(b'{"PublicIP":"198.51.100.9","BackendType":"udp"}')
    assert parsed == LeaseAttrs(IPv4Address("198.51.100.9"), "udp", None)


@pytest.mark.parametrize("raw", [b"nope", b"[]", b'{"PublicIP": "x"}', b'{"PublicIP": "198.51.100.1", "BackendType": 5}'])
def test_bad_values(raw):
    with pytest.raises(LeaseError):
        LeaseAttrs.from_json(raw)


def test_watcher_reset_then_updates_converge():
    w = LeaseWatcher(CONFIG, own_subnet=IPv4Network("10.244.1.0/24"))
    events = w.reset([put("10.244.1.0-24"), put("10.244.2.0-24", "198.51.100.2"), put("10.244.3.0-24", "198.51.100.3")])
    assert sorted(str(e.lease.subnet) for e in events) == ["10.244.2.0/24", "10.244.3.0/24"]
    assert all(isinstance(e, LeaseAdded) for e in events)
    # unchanged put: nothing; changed put: an add; delete: a remove; own key: ignored
    assert w.update([put("10.244.2.0-24", "198.51.100.2")]) == []
    changed = w.update([put("10.244.2.0-24", "198.51.100.22")])
    assert changed == [LeaseAdded(Lease(IPv4Network("10.244.2.0/24"), attrs("198.51.100.22")))]
    removed = w.update([KeyDeleted("10.244.3.0-24"), KeyDeleted("10.244.1.0-24")])
    assert removed == [LeaseRemoved(Lease(IPv4Network("10.244.3.0/24"), attrs("198.51.100.3")))]
    # a re-list after compaction removes what vanished and adds what appeared
    events = w.reset([put("10.244.4.0-24", "198.51.100.4")])
    assert {type(e) for e in events} == {LeaseAdded, LeaseRemoved}
    assert set(w.leases) == {(IPv4Network("10.244.4.0/24"), None)}


def test_broken_records_are_reported_once_and_skipped():
    w = LeaseWatcher(CONFIG)
    bad = [KeyPut("10.244.5.0-24", b"not json"), KeyPut("garbage", b"{}"), put("10.99.0.0-24"), put("10.244.6.0-25")]
    first = w.update(bad)
    assert len(first) == 4 and all(isinstance(e, BadRecord) for e in first)
    assert w.update(bad) == []
    assert w.leases == {}


def test_a_good_lease_turned_bad_is_removed():
    w = LeaseWatcher(CONFIG)
    w.update([put("10.244.5.0-24")])
    events = w.update([KeyPut("10.244.5.0-24", b"oops")])
    assert [type(e) for e in events] == [BadRecord, LeaseRemoved]


def test_choose_subnet_respects_bounds_and_taken():
    config = parse_network_config('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0", "SubnetMax": "10.244.12.0"}')
    rng = random.Random(1)
    taken = {IPv4Network("10.244.10.0/24"), IPv4Network("10.244.12.0/24")}
    assert choose_subnet(config, taken, rng) == IPv4Network("10.244.11.0/24")
    assert choose_subnet(config, taken | {IPv4Network("10.244.11.0/24")}, rng) is None
    seen = {choose_subnet(config, set(), rng) for _ in range(50)}
    assert seen == {IPv4Network(f"10.244.{i}.0/24") for i in (10, 11, 12)}


# --- flannel v0.20.2's own records (as its flanneld writes them) ---------------------------------

FLANNEL_UDP = b'{"PublicIP":"192.0.2.4","PublicIPv6":null}'
FLANNEL_VXLAN = b'{"PublicIP":"192.0.2.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"9a:1c:33:0f:5e:21"}}'
FLANNEL_HOST_GW = b'{"PublicIP":"192.0.2.6","PublicIPv6":null,"BackendType":"host-gw"}'
# the fields of flannel's subnet.LeaseAttrs (Go's encoding/json matches them case-insensitively)
FLANNEL_LEASE_FIELDS = {"publicip", "publicipv6", "backendtype", "backenddata", "backendv6data"}


@pytest.mark.parametrize("raw", [FLANNEL_UDP, b'{"PublicIP":"192.0.2.4","BackendType":""}',
                                 b'{"PublicIP":"192.0.2.4","BackendType":null}'])
def test_flannels_udp_lease_without_backend_type_is_a_udp_peer(raw):
    assert LeaseAttrs.from_json(raw) == LeaseAttrs(IPv4Address("192.0.2.4"), "udp", None)


def test_flannels_vxlan_and_host_gw_leases_keep_their_type_and_data():
    vxlan = LeaseAttrs.from_json(FLANNEL_VXLAN)
    assert (vxlan.backend_type, vxlan.backend_data) == ("vxlan", {"VNI": 1, "VtepMAC": "9a:1c:33:0f:5e:21"})
    assert LeaseAttrs.from_json(FLANNEL_HOST_GW).backend_type == "host-gw"


def test_watcher_hands_flannels_udp_lease_to_the_backends_as_udp():
    w = LeaseWatcher(CONFIG, own_subnet=IPv4Network("10.244.1.0/24"))
    events = w.reset([KeyPut("10.244.16.0-24", FLANNEL_UDP),
                      KeyPut("10.244.17.0-24&fd00:10:244:11::-64", FLANNEL_VXLAN)])
    got = {str(e.lease.subnet): e.lease.attrs.backend_type for e in events if isinstance(e, LeaseAdded)}
    assert got == {"10.244.16.0/24": "udp", "10.244.17.0/24": "vxlan"}


@pytest.mark.parametrize("backend, data", [("udp", None), ("vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}),
                                           ("host-gw", None)])
def test_what_we_write_is_what_flannels_lease_attrs_read(backend, data):
    """Only flannel's LeaseAttrs fields, PublicIP as a dotted quad (its ip.IP4 JSON form), a type that
    flannel's vxlan and host-gw backends compare with their own name, and BackendData that is JSON
    (flannel's json.RawMessage takes null). Each record reads back as itself."""
    attrs = LeaseAttrs(IPv4Address("198.51.100.3"), backend, data)
    doc = json.loads(attrs.to_json())
    assert {key.lower() for key in doc} <= FLANNEL_LEASE_FIELDS
    assert doc["PublicIP"] == "198.51.100.3" and doc["PublicIPv6"] is None
    assert doc["BackendType"] == backend
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs
