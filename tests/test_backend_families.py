"""Which address families each backend carries, the daemon's gate on them, and the lease it publishes."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from flanneld_py.backend.base import IPV4_ONLY, BackendContext, families_of, missing_families, published_attrs
from flanneld_py.backend.factory import create_backend
from flanneld_py.backend.udp.engine import Engine
from flanneld_py.core.netconfig import parse_network_config
from flanneld_py.netlink import InterfaceInfo

IFACE = InterfaceInfo("eth0", 2, IPv4Address("192.0.2.1"), 24, 1500)
IFACE6 = InterfaceInfo("eth0", 2, None, 0, 1500, IPv6Address("2001:db8::1"))  # an IPv6-only underlay


def context(doc: dict, public_ipv6: str | None = None) -> BackendContext:
    config = parse_network_config(json.dumps(doc))
    return BackendContext(config, IFACE, IPv4Address("192.0.2.1"), None,  # type: ignore[arg-type]
                          public_ipv6=None if public_ipv6 is None else IPv6Address(public_ipv6))


def test_every_backend_carries_both_families():
    for kind in ("udp", "vxlan", "host-gw"):
        backend = create_backend(context({"Network": "10.244.0.0/16", "Backend": {"Type": kind}}))
        assert families_of(backend) == {4, 6}


def test_udp_carries_both_families_and_takes_a_dual_stack_config():
    dual = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
    backend = create_backend(context(dual, "2001:db8::1"))
    assert families_of(backend) == {4, 6}
    assert backend.mtu == 1500 - 28  # until an IPv6 underlay socket is open, IPv6 crosses the IPv4 underlay
    assert create_backend(context({"Network": "10.244.0.0/16"})).mtu == 1500 - 28
    only6 = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
    ipv6_only = BackendContext(parse_network_config(json.dumps(only6)), IFACE6, IPv4Address(0), None,  # type: ignore[arg-type]
                               public_ipv6=IPv6Address("2001:db8::1"))
    assert create_backend(ipv6_only).mtu == 1500 - 48  # an IPv6-only network's one socket is on the IPv6 underlay
    attrs = published_attrs(backend, IPv6Address("2001:db8::1"))
    assert attrs.backend_type == "udp" and attrs.backend_v6_data is None
    assert attrs.public_ipv6 == IPv6Address("2001:db8::1")


class _IPv4OnlyBackend:
    """The gate's input: a backend that declares no IPv6 (no ``CarriesIPv6``)."""

    type_name = "example"


@pytest.mark.parametrize("doc", [
    {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"},
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"},
])
def test_a_config_with_ipv6_is_refused_in_one_line_for_a_backend_without_it(doc):
    backend = _IPv4OnlyBackend()
    assert families_of(backend) == IPV4_ONLY  # type: ignore[arg-type]
    message = missing_families(backend, parse_network_config(json.dumps(doc)))  # type: ignore[arg-type]
    assert "\n" not in message and "the example backend carries IPv4 only" in message and "EnableIPv6" in message


@pytest.mark.parametrize("kind", ["vxlan", "host-gw"])
def test_the_kernel_backends_take_dual_stack_and_ipv6_only(kind):
    dual = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": kind}}
    assert create_backend(context(dual, "2001:db8::1")).type_name == kind
    v6only = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": kind}}
    assert create_backend(context(v6only, "2001:db8::1")).type_name == kind


def test_published_attrs_add_public_ipv6_to_what_the_backend_gives():
    backend = create_backend(context({"Network": "10.244.0.0/16"}))
    assert b'"PublicIPv6":null' in published_attrs(backend, None).to_json()
    attrs = published_attrs(backend, IPv6Address("2001:db8::1"))
    assert attrs.public_ip == IPv4Address("192.0.2.1") and attrs.public_ipv6 == IPv6Address("2001:db8::1")
    assert attrs.backend_type == "udp" and attrs.backend_v6_data is None
    assert json.loads(attrs.to_json())["PublicIPv6"] == "2001:db8::1"


def test_an_ipv6_only_node_publishes_flannels_zero_public_ip():
    backend = create_backend(context({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}))
    attrs = published_attrs(backend, IPv6Address("2001:db8::1"), enable_ipv4=False)
    assert attrs.to_json() == b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"host-gw"}'
    assert attrs.node_address == IPv6Address("2001:db8::1")


@pytest.mark.parametrize("kind", ["vxlan", "host-gw", "udp"])
def test_every_backend_takes_an_ipv6_only_network_on_an_underlay_without_ipv4(kind):
    v6only = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": kind}}
    ctx = BackendContext(parse_network_config(json.dumps(v6only)), IFACE6, IPv4Address(0), None,  # type: ignore[arg-type]
                         public_ipv6=IPv6Address("2001:db8::1"))
    backend = create_backend(ctx)
    assert backend.type_name == kind and families_of(backend) == {4, 6}
    if kind == "host-gw":
        attrs = published_attrs(backend, IPv6Address("2001:db8::1"), enable_ipv4=False)
        assert attrs.to_json() == b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"host-gw"}'


def test_udp_exports_suppressed_icmp_errors_with_its_drop_counters():
    backend = create_backend(context({"Network": "10.244.0.0/16"}))
    assert backend.drop_counts() == {}  # not started: no datapath, no counters
    backend.engine = Engine(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 8285)  # type: ignore[attr-defined]
    backend.engine.icmp_suppressed = 7  # type: ignore[attr-defined]
    counts = backend.drop_counts()
    assert counts["icmp_rate_limited"] == 7 and counts["no_route"] == 0
