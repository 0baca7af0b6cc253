"""flannel-py on dual-stack and IPv6-only nodes: both addresses, both families' routes, real traffic."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv6Interface, IPv6Network, ip_interface
from typing import Any

import pytest

from cni_helpers import CLUSTER, CLUSTER6, CniNetwork, CniNode, pod_state, with_prev_result
from flanneld_py.cni.masq import chain_name
from flanneld_py.cni.models import Attachment

pytestmark = pytest.mark.netns

_index = itertools.count(100)


@pytest.fixture
def dual(cni_node: CniNode) -> Iterator[CniNetwork]:
    network = CniNetwork.create(cni_node, next(_index), ipv6=True)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def v6only(cni_node: CniNode) -> Iterator[CniNetwork]:
    network = CniNetwork.create(cni_node, next(_index), ipv4=False, ipv6=True)
    try:
        yield network
    finally:
        network.close()


def gateway4(net: CniNetwork) -> str:
    assert net.subnet is not None
    return str(net.subnet.network_address + 1)


def gateway6(net: CniNetwork) -> str:
    assert net.subnet6 is not None
    return str(net.subnet6.network_address + 1)


def addresses_of(result: dict[str, Any]) -> list[IPv4Interface | IPv6Interface]:
    return [ip_interface(ip["address"]) for ip in result["ips"]]


def ping(pod: Any, address: object) -> None:
    pod.sh("ping", "-c", "2", "-i", "0.2", "-W", "5", str(address))


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_dual_stack_add_gives_both_families(dual: CniNetwork, version: str) -> None:
    pod = dual.pod("a")
    result = dual.add(pod, "ctr-a", version)
    v4, v6 = addresses_of(result)
    assert v4.network == dual.subnet and v6.network == dual.subnet6
    container = result["interfaces"][1]
    assert container["name"] == "eth0" and container["sandbox"] == pod.path
    assert [ip["interface"] for ip in result["ips"]] == [1, 1]
    assert [ip["gateway"] for ip in result["ips"]] == [gateway4(dual), gateway6(dual)]
    if version == "0.4.0":
        assert [ip["version"] for ip in result["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in result["ips"])
    assert result["routes"] == [
        {"dst": str(CLUSTER), "gw": gateway4(dual)}, {"dst": "0.0.0.0/0", "gw": gateway4(dual)},
        {"dst": str(CLUSTER6), "gw": gateway6(dual)}, {"dst": "::/0", "gw": gateway6(dual)},
    ]

    state = pod_state(pod)
    assert state["addresses"] == [str(v4)] and state["addresses6"] == [str(v6)]
    assert state["tentative6"] == [], "DAD is off: the address is usable at once"
    assert (str(CLUSTER6), gateway6(dual)) in state["routes6"] and ("default", gateway6(dual)) in state["routes6"]
    assert pod.sh("cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad").stdout.strip() == "0"
    node = dual.lab.node
    assert node.sh("cat", "/proc/sys/net/ipv6/conf/all/forwarding").stdout.strip() == "1"
    (bridge,) = json.loads(node.ip("-j", "-6", "addr", "show", "dev", dual.bridge).stdout)
    (gateway,) = [a for a in bridge["addr_info"] if a["local"] == gateway6(dual)]
    assert gateway["prefixlen"] == 64 and not gateway.get("tentative"), "the bridge's IPv6 gateway is usable at once"
    assert sorted(dual.reservations()) == sorted([str(v4.ip), str(v6.ip)])
    assert (dual.data_dir / dual.name / "last_reserved_ip.1").read_text() == str(v6.ip)

    assert dual.invoke("CHECK", with_prev_result(dual.conf(version), result), container="ctr-a",
                       netns=pod).ok() is None
    dual.delete(pod, "ctr-a")
    assert dual.reservations() == {}


def test_pods_reach_the_gateway_and_each_other_over_both_families(dual: CniNetwork) -> None:
    a, b = dual.pod("a"), dual.pod("b")
    a_v4, a_v6 = addresses_of(dual.add(a, "ctr-a"))
    b_v4, b_v6 = addresses_of(dual.add(b, "ctr-b"))
    ping(a, gateway4(dual))
    ping(a, gateway6(dual))
    ping(a, b_v4.ip)
    ping(a, b_v6.ip)
    ping(b, a_v6.ip)


def test_check_detects_a_missing_ipv6_address(dual: CniNetwork) -> None:
    pod = dual.pod("a")
    result = dual.add(pod, "ctr-a")
    _, v6 = addresses_of(result)
    pod.ip("-6", "addr", "del", str(v6), "dev", "eth0")
    error = dual.invoke("CHECK", with_prev_result(dual.conf(), result), container="ctr-a", netns=pod).error()
    assert error["code"] == 103 and str(v6) in error["msg"]


def test_check_detects_a_missing_ipv6_route(dual: CniNetwork) -> None:
    pod = dual.pod("a")
    result = dual.add(pod, "ctr-a")
    pod.ip("-6", "route", "del", "default")
    error = dual.invoke("CHECK", with_prev_result(dual.conf(), result), container="ctr-a", netns=pod).error()
    assert error["code"] == 103 and "::/0" in error["msg"]


def test_del_and_gc_free_both_families(dual: CniNetwork) -> None:
    a, b = dual.pod("a"), dual.pod("b")
    dual.add(a, "ctr-a")
    kept = addresses_of(dual.add(b, "ctr-b"))
    dual.delete(a, "ctr-a")
    assert sorted(dual.reservations()) == sorted(str(ip.ip) for ip in kept)
    pods = [{"containerID": "ctr-b", "ifname": "eth0"}]
    assert dual.invoke("GC", dual.conf("1.1.0", **{"cni.dev/valid-attachments": pods})).ok() is None
    assert sorted(dual.reservations()) == sorted(str(ip.ip) for ip in kept)
    assert dual.invoke("GC", dual.conf("1.1.0", **{"cni.dev/valid-attachments": []})).ok() is None
    assert dual.reservations() == {}


def test_ipv6_only_node(v6only: CniNetwork) -> None:
    a, b = v6only.pod("a"), v6only.pod("b")
    result = v6only.add(a, "ctr-a", "0.3.1")
    (v6,) = addresses_of(result)
    assert v6.network == v6only.subnet6 and result["ips"][0]["version"] == "6"
    assert result["routes"] == [{"dst": str(CLUSTER6), "gw": gateway6(v6only)}, {"dst": "::/0", "gw": gateway6(v6only)}]
    state = pod_state(a)
    assert state["addresses"] == [] and state["addresses6"] == [str(v6)]
    assert (v6only.data_dir / v6only.name / "last_reserved_ip.0").read_text() == str(v6.ip)
    (b_v6,) = addresses_of(v6only.add(b, "ctr-b"))
    ping(a, gateway6(v6only))
    ping(a, b_v6.ip)
    assert v6only.invoke("CHECK", with_prev_result(v6only.conf("0.4.0"), result), container="ctr-a",
                         netns=a).ok() is None
    v6only.delete(a, "ctr-a")
    v6only.delete(b, "ctr-b")
    assert v6only.reservations() == {}


def test_pod_masquerade_covers_ipv6(cni_node: CniNode) -> None:
    net = CniNetwork.create(cni_node, next(_index), ipv6=True, ipmasq=False)  # the daemon does not masquerade
    try:
        pod = net.pod("a")
        result = net.add(pod, "ctr-a")
        _, v6 = addresses_of(result)
        chain = chain_name(net.name, Attachment("ctr-a", "eth0"))
        nat6 = cni_node.node.sh("ip6tables", "-t", "nat", "-S").stdout
        assert f"-A POSTROUTING -s {v6.ip}/128" in nat6 and f"-A {chain} -d {CLUSTER6}" in nat6
        assert f"-A {chain} ! -d ff00::/8" in nat6
        assert chain in cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
        cni_node.node.sh("ip6tables", "-t", "nat", "-F", chain)
        cni_node.node.sh("ip6tables", "-t", "nat", "-D", "POSTROUTING", "-s", f"{v6.ip}/128", "-m", "comment",
                         "--comment", f"name: {net.name} id: ctr-a", "-j", chain)
        cni_node.node.sh("ip6tables", "-t", "nat", "-X", chain)
        error = net.invoke("CHECK", with_prev_result(net.conf(), result), container="ctr-a", netns=pod).error()
        assert error["code"] == 103 and "IPv6 masquerade" in error["msg"]
        net.delete(pod, "ctr-a")
        assert chain not in cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
        assert chain not in cni_node.node.sh("ip6tables", "-t", "nat", "-S").stdout
    finally:
        net.close()


def test_a_full_ipv6_subnet_fails_the_add_and_frees_its_ipv4_address(cni_node: CniNode) -> None:
    net = CniNetwork.create(cni_node, next(_index), ipv6=True)
    try:
        assert net.subnet6 is not None
        net.subnet6 = IPv6Network(f"{net.subnet6.network_address}/126")  # gateway ::1, pods ::2 and ::3
        net.write_subnet_file()
        for label in "ab":
            net.add(net.pod(label), f"ctr-{label}")
        held = dict(net.reservations())
        error = net.invoke("ADD", net.conf(), container="ctr-c", netns=net.pod("c")).error()
        assert error["code"] == 101 and str(net.subnet6) in error["msg"]
        assert net.reservations() == held, "the IPv4 address the failed ADD took is free again"
        assert len(net.host_veths()) == 2
    finally:
        net.close()
