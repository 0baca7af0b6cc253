"""The pod side of the netlink layer, in namespaces of our own: sockets, raw requests, bridge and veth."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest

from flanneld_py.lab.netns import Netns, unique_tag
from flanneld_py.netlink import NetlinkError
from flanneld_py.netlink.pods import (NamespaceNotFound, NetnsNetlink, PodSocket, addresses, create_veth,
                                      disable_dad, ensure_bridge, routes,
                                      hairpin_enabled, link_master, netns_socket, random_mac, set_hairpin)

pytestmark = pytest.mark.netns


@pytest.fixture
def pair() -> Iterator[tuple[Netns, Netns]]:
    tag = unique_tag()
    node = Netns.create(f"cnit-{tag}-nlnode")
    pod = Netns.create(f"cnit-{tag}-nlpod")
    try:
        yield node, pod
    finally:
        node.delete()
        pod.delete()


def links(ns: Netns) -> dict[str, dict]:  # type: ignore[type-arg]
    return {link["ifname"]: link for link in json.loads(ns.ip("-d", "-j", "addr").stdout)}


def test_a_missing_namespace_is_an_error_not_a_new_namespace() -> None:
    path = f"/var/run/netns/cnit-{unique_tag()}-missing"
    with pytest.raises(NamespaceNotFound):
        netns_socket(path)
    with pytest.raises(NamespaceNotFound):
        PodSocket(path)
    with pytest.raises(NamespaceNotFound):
        NetnsNetlink(path)
    with pytest.raises(NamespaceNotFound):  # a file that is no namespace
        netns_socket("/proc/self/status")
    assert not os.path.exists(path)


def test_sockets_land_in_the_namespace_and_no_thread_moves(pair: tuple[Netns, Netns]) -> None:
    _, pod = pair
    here = os.readlink("/proc/thread-self/ns/net")
    with NetnsNetlink(pod.path) as nl:
        assert nl.link_attrs(nl.require_index("lo"))["name"] == "lo"
        assert nl.link_index("eth0") is None
    with PodSocket(pod.path) as raw:
        assert raw.link_index("lo") == 1
        with pytest.raises(NetlinkError) as caught:
            raw.link_index("eth0")
        assert caught.value.code == errno.ENODEV
    assert os.readlink("/proc/thread-self/ns/net") == here
    assert threading.active_count() == 1, "the namespace-entering threads are gone"


def test_bridge_veth_and_the_raw_pod_requests(pair: tuple[Netns, Netns]) -> None:
    node, pod = pair
    gateway = IPv4Interface("10.244.77.1/24")
    with NetnsNetlink(node.path) as nl:
        node.ip("addr", "add", "10.244.66.1/24", "dev", "lo")  # not on the bridge: left alone
        bridge = ensure_bridge(nl, "cnib0", 1472, [gateway], [IPv4Network("10.244.0.0/16")])
        assert ensure_bridge(nl, "cnib0", 1472, [gateway]) == bridge  # idempotent
        mac, peer_mac = random_mac(), random_mac()
        create_veth(nl, "vethtest0", "eth0", pod.path, 1472, master=bridge, host_mac=mac, peer_mac=peer_mac,
                    gso_max_size=63000)
        host = nl.require_index("vethtest0")
        assert link_master(nl, host) == bridge and not hairpin_enabled(nl, host)
        set_hairpin(nl, host)
        assert hairpin_enabled(nl, host)
        with pytest.raises(NetlinkError) as caught:
            create_veth(nl, "vethtest0", "eth9", pod.path, 1472)
        assert caught.value.code == errno.EEXIST
    with PodSocket(pod.path) as raw:
        index = raw.link_index("eth0")
        raw.set_up(index)
        raw.add_address(index, IPv4Interface("10.244.77.2/24"))
        raw.replace_route(IPv4Network("0.0.0.0/0"), IPv4Address("10.244.77.1"), index, 3)
        raw.replace_route(IPv4Network("10.244.0.0/16"), IPv4Address("10.244.77.1"), index, 3)
        raw.replace_route(IPv4Network("10.244.0.0/16"), IPv4Address("10.244.77.1"), index, 3)  # replace: no EEXIST
        with pytest.raises(NetlinkError) as caught:
            raw.add_address(index, IPv4Interface("10.244.77.2/24"))
        assert caught.value.code == errno.EEXIST
    seen = links(pod)["eth0"]
    assert seen["address"] == peer_mac and seen["mtu"] == 1472 and "UP" in seen["flags"]
    assert seen["gso_max_size"] == 63000
    assert [(a["local"], a["prefixlen"]) for a in seen["addr_info"] if a["family"] == "inet"] == [("10.244.77.2", 24)]
    routes = {(r["dst"], r.get("gateway")) for r in json.loads(pod.ip("-j", "route").stdout)}
    assert ("default", "10.244.77.1") in routes and ("10.244.0.0/16", "10.244.77.1") in routes
    bridge_seen = links(node)["cnib0"]
    assert [a["local"] for a in bridge_seen["addr_info"] if a["family"] == "inet"] == ["10.244.77.1"]
    assert links(node)["vethtest0"]["address"] == mac
    pod.sh("ping", "-c", "1", "-W", "2", "10.244.77.1")


def test_a_new_gateway_replaces_an_old_node_subnet_on_the_bridge(pair: tuple[Netns, Netns]) -> None:
    node, _ = pair
    with NetnsNetlink(node.path) as nl:
        ensure_bridge(nl, "cnib0", 1472, [IPv4Interface("10.244.8.1/24"), IPv6Interface("fd00:10:244:8::1/64")],
                      [IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56")])
        ensure_bridge(nl, "cnib0", 1472, [IPv4Interface("10.244.9.1/24"), IPv6Interface("fd00:10:244:9::1/64")],
                      [IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56")])
        index = nl.require_index("cnib0")
        assert nl.ipv4_addresses(index) == [IPv4Interface("10.244.9.1/24")]
        assert addresses(nl, index) == [IPv4Interface("10.244.9.1/24"), IPv6Interface("fd00:10:244:9::1/64")]
        mac = nl.link_attrs(index)["address"]
    node.ip("link", "add", "vethx", "type", "veth", "peer", "name", "vethy")
    node.ip("link", "set", "vethx", "master", "cnib0")
    assert links(node)["cnib0"]["address"] == mac, "the bridge keeps its MAC when ports come"


def test_ipv6_bridge_gateway_and_raw_pod_requests(pair: tuple[Netns, Netns]) -> None:
    node, pod = pair
    gateway = IPv6Interface("fd00:10:244:77::1/64")
    with NetnsNetlink(node.path) as nl:
        bridge = ensure_bridge(nl, "cnib0", 1472, [gateway], [IPv6Network("fd00:10:244::/56")])
        create_veth(nl, "vethtest6", "eth0", pod.path, 1472, master=bridge)
        assert addresses(nl, bridge) == [gateway]
    disable_dad(pod.path, "eth0")
    assert pod.sh("cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad").stdout.strip() == "0"
    with PodSocket(pod.path) as raw:
        index = raw.link_index("eth0")
        raw.set_up(index)
        raw.add_address(index, IPv6Interface("fd00:10:244:77::2/64"))
        raw.replace_route(IPv6Network("::/0"), IPv6Address("fd00:10:244:77::1"), index, 3)
        raw.replace_route(IPv6Network("fd00:10:244::/56"), IPv6Address("fd00:10:244:77::1"), index, 3)
    with NetnsNetlink(pod.path) as nl:
        assert IPv6Interface("fd00:10:244:77::2/64") in addresses(nl, index)
        installed = routes(nl)
    assert (IPv6Network("::/0"), IPv6Address("fd00:10:244:77::1")) in installed
    assert (IPv6Network("fd00:10:244::/56"), IPv6Address("fd00:10:244:77::1")) in installed
    node.ip("link", "set", "vethtest6", "up")
    pod.sh("ping", "-6", "-c", "1", "-W", "5", "fd00:10:244:77::1")
