"""flannel-py driven as a runtime drives it, checked against SPEC.md and the namespaces' real state."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface
from typing import Any

import pytest

from cni_helpers import CLUSTER, CniNetwork, CniNode, pod_state, with_prev_result
from flanneld_py.cni.models import Attachment
from flanneld_py.cni.wiring import host_veth_name

pytestmark = pytest.mark.netns

VERSIONS = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_index = itertools.count(1)


def make_network(cni_node: CniNode, prefixlen: int = 24, **kwargs: Any) -> CniNetwork:
    return CniNetwork.create(cni_node, next(_index), prefixlen, **kwargs)


@pytest.fixture
def net(cni_node: CniNode) -> Iterator[CniNetwork]:
    network = make_network(cni_node)
    try:
        yield network
    finally:
        network.close()


def assert_spec_result(result: dict[str, Any], version: str, net: CniNetwork, sandbox: str,
                       ifname: str = "eth0") -> IPv4Interface:
    """The result's structure per SPEC.md; returns the pod's address."""
    assert result["cniVersion"] == version
    interfaces = result["interfaces"]
    assert all(isinstance(i["name"], str) and MAC.match(i["mac"]) for i in interfaces)
    (ip,) = result["ips"]
    container = interfaces[ip["interface"]]
    assert container["name"] == ifname and container["sandbox"] == sandbox
    assert [i for i in interfaces if "sandbox" not in i], "the host veth is reported too"
    if version in ("0.3.1", "0.4.0"):
        assert ip["version"] == "4"
    else:
        assert "version" not in ip
    address = IPv4Interface(ip["address"])
    assert address.network == net.subnet and address.ip != net.subnet.network_address + 1
    assert ip["gateway"] == str(net.subnet.network_address + 1)
    assert result["routes"] == [{"dst": str(CLUSTER), "gw": ip["gateway"]}, {"dst": "0.0.0.0/0", "gw": ip["gateway"]}]
    assert isinstance(result["dns"], dict)
    return address


def host_link(cni_node: CniNode, name: str) -> dict[str, Any]:
    (link,) = json.loads(cni_node.node.ip("-d", "-j", "link", "show", "dev", name).stdout)
    return link  # type: ignore[no-any-return]


# --- ADD, CHECK, DEL -------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_in_each_version(net: CniNetwork, cni_node: CniNode, version: str) -> None:
    pod = net.pod("a")
    conf = net.conf(version, dns={"nameservers": ["10.96.0.10"], "search": ["cluster.local"]})
    result = net.invoke("ADD", conf, container="ctr-a", netns=pod).ok()
    address = assert_spec_result(result, version, net, pod.path)
    assert result["dns"] == {"nameservers": ["10.96.0.10"], "search": ["cluster.local"]}

    state = pod_state(pod)
    assert state["addresses"] == [str(address)] and state["mtu"] == 1472 and state["up"]
    assert ("default", str(net.subnet.network_address + 1)) in state["routes"]
    container = result["interfaces"][result["ips"][0]["interface"]]
    assert container["mac"] == state["mac"]
    host = next(i for i in result["interfaces"] if "sandbox" not in i)
    link = host_link(cni_node, host["name"])
    assert link["master"] == net.bridge and link["mtu"] == 1472 and "UP" in link["flags"]
    assert link["linkinfo"]["info_slave_data"]["hairpin"] is True
    bridge = json.loads(cni_node.node.ip("-j", "addr", "show", "dev", net.bridge).stdout)[0]
    assert f"{net.subnet.network_address + 1}/24" in [f"{a['local']}/{a['prefixlen']}" for a in bridge["addr_info"]]
    assert net.reservations() == {str(address.ip): "ctr-a\neth0"}

    check = net.invoke("CHECK", with_prev_result(conf, result), container="ctr-a", netns=pod)
    if version == "0.3.1":
        assert check.error()["code"] == 1  # CHECK only exists from 0.4.0 on
    else:
        assert check.ok() is None

    net.delete(pod, "ctr-a", cniVersion=version)
    assert net.reservations() == {}
    assert host["name"] not in net.host_veths()
    assert pod.ip("link", "show", "eth0", check=False).returncode != 0


def test_without_default_gateway_the_route_is_the_cluster_network(net: CniNetwork) -> None:
    pod = net.pod("a")
    result = net.add(pod, "ctr-a", isDefaultGateway=False)
    gateway = str(net.subnet.network_address + 1)
    assert result["routes"] == [{"dst": "10.244.0.0/16", "gw": gateway}]
    assert ("10.244.0.0/16", gateway) in pod_state(pod)["routes"]
    assert not any(dst == "default" for dst, _ in pod_state(pod)["routes"])
    net.delete(pod, "ctr-a")


def test_check_reports_what_changed(net: CniNetwork) -> None:
    pod = net.pod("a")
    conf = net.conf()
    result = net.add(pod, "ctr-a")
    pod.ip("route", "del", "default")
    error = net.invoke("CHECK", with_prev_result(conf, result), container="ctr-a", netns=pod).error()
    assert error["code"] == 103 and "route 0.0.0.0/0" in error["msg"]
    pod.ip("link", "set", "eth0", "mtu", "1400")
    error = net.invoke("CHECK", with_prev_result(conf, result), container="ctr-a", netns=pod).error()
    assert error["code"] == 103 and "MTU" in error["msg"]
    net.delete(pod, "ctr-a")
    error = net.invoke("CHECK", with_prev_result(conf, result), container="ctr-a", netns=pod).error()
    assert error["code"] == 103


def test_pods_on_the_same_bridge_reach_each_other(net: CniNetwork) -> None:
    a, b = net.pod("a"), net.pod("b")
    net.add(a, "ctr-a")
    address_b = IPv4Interface(net.add(b, "ctr-b")["ips"][0]["address"]).ip
    a.sh("ping", "-c", "2", "-i", "0.2", "-W", "2", str(address_b))
    net.delete(a, "ctr-a")
    net.delete(b, "ctr-b")


def test_gso_max_size_caps_both_ends(net: CniNetwork, cni_node: CniNode) -> None:
    pod = net.pod("a")
    result = net.add(pod, "ctr-a", gsoMaxSize=63000)
    host = next(i for i in result["interfaces"] if "sandbox" not in i)["name"]
    assert host_link(cni_node, host)["gso_max_size"] == 63000
    (inner,) = json.loads(pod.ip("-d", "-j", "link", "show", "eth0").stdout)
    assert inner["gso_max_size"] == 63000
    net.delete(pod, "ctr-a")


# --- DEL is idempotent -----------------------------------------------------


def test_del_of_an_unknown_container_succeeds(net: CniNetwork) -> None:
    pod = net.pod("a")
    net.delete(pod, "never-added")
    net.delete(None, "never-added")


def test_del_twice_succeeds(net: CniNetwork) -> None:
    pod = net.pod("a")
    net.add(pod, "ctr-a")
    net.delete(pod, "ctr-a")
    net.delete(pod, "ctr-a")
    assert net.reservations() == {}


def test_del_after_the_namespace_is_gone(net: CniNetwork) -> None:
    pod = net.pod("a")
    net.add(pod, "ctr-a")
    path = pod.path
    pod.delete()
    net.delete(path, "ctr-a")
    assert net.reservations() == {} and net.host_veths() == []


def test_del_after_the_interface_is_gone(net: CniNetwork) -> None:
    pod = net.pod("a")
    net.add(pod, "ctr-a")
    pod.ip("link", "del", "eth0")
    net.delete(pod, "ctr-a")
    assert net.reservations() == {}


def test_del_without_cni_netns_still_cleans_up(net: CniNetwork) -> None:
    pod = net.pod("a")
    net.add(pod, "ctr-a")
    net.delete(None, "ctr-a")
    assert net.reservations() == {} and net.host_veths() == []
    assert pod.ip("link", "show", "eth0", check=False).returncode != 0


# --- addresses -------------------------------------------------------------


def test_addresses_survive_a_server_restart_and_are_not_reused_at_once(net: CniNetwork, cni_node: CniNode) -> None:
    a, b, c = net.pod("a"), net.pod("b"), net.pod("c")
    first = net.add(a, "ctr-a")["ips"][0]["address"]
    second = net.add(b, "ctr-b")["ips"][0]["address"]
    cni_node.server.stop()
    assert net.invoke("ADD", net.conf(), container="ctr-c", netns=c).error()["code"] == 11
    cni_node.server.start()
    net.delete(a, "ctr-a")
    third = net.add(c, "ctr-c")["ips"][0]["address"]
    assert len({first, second, third}) == 3  # round-robin: the freed first address waits its turn
    assert set(net.reservations()) == {second.split("/")[0], third.split("/")[0]}
    net.delete(b, "ctr-b")
    net.delete(c, "ctr-c")


def test_a_full_subnet_is_a_clear_error_and_leaks_nothing(cni_node: CniNode) -> None:
    net = make_network(cni_node, prefixlen=29)  # .1 is the gateway: .2 to .6 for pods
    try:
        pods = [net.pod(str(i)) for i in range(6)]
        for i, pod in enumerate(pods[:5]):
            net.add(pod, f"ctr-{i}")
        error = net.invoke("ADD", net.conf(), container="ctr-5", netns=pods[5]).error()
        assert error["code"] == 101 and "no free address" in error["msg"]
        assert len(net.reservations()) == 5 and len(net.host_veths()) == 5
        assert pods[5].ip("link", "show", "eth0", check=False).returncode != 0
        net.delete(pods[0], "ctr-0")
        assert net.add(pods[5], "ctr-5")["ips"][0]["address"] == str(net.subnet.network_address + 2) + "/29"
        for i in range(1, 6):
            net.delete(pods[i], f"ctr-{i}")
    finally:
        net.close()


def test_twenty_concurrent_adds_get_twenty_addresses(net: CniNetwork) -> None:
    pods = [net.pod(f"p{i}") for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: net.add(pods[i], f"ctr-{i}"), range(20)))
    addresses = {r["ips"][0]["address"] for r in results}
    assert len(addresses) == 20
    assert len(net.reservations()) == 20 and len(net.host_veths()) == 20
    for pod, result in zip(pods, results):
        assert pod_state(pod)["addresses"] == [result["ips"][0]["address"]]
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda i: net.delete(pods[i], f"ctr-{i}"), range(20)))
    assert net.reservations() == {} and net.host_veths() == []


def test_two_hundred_add_del_cycles_leave_nothing_behind(net: CniNetwork, cni_node: CniNode) -> None:
    pod = net.pod("a")
    assert cni_node.server.proc is not None
    fds = f"/proc/{cni_node.server.proc.pid}/fd"
    net.add(pod, "warm-up")
    net.delete(pod, "warm-up")
    open_before = len(os.listdir(fds))
    seen = set()
    for i in range(200):
        seen.add(net.add(pod, f"cycle-{i}")["ips"][0]["address"])
        net.delete(pod, f"cycle-{i}")
    assert len(seen) > 100  # allocation walks the subnet instead of reusing one address
    assert net.reservations() == {} and net.host_veths() == []
    assert pod.ip("link", "show", "eth0", check=False).returncode != 0
    assert len(os.listdir(fds)) <= open_before + 2, "the server leaks file descriptors"


def test_gc_releases_addresses_of_attachments_that_are_not_valid(net: CniNetwork) -> None:
    pods = [net.pod(str(i)) for i in range(3)]
    results = [net.add(pod, f"ctr-{i}") for i, pod in enumerate(pods)]
    keep = results[1]["ips"][0]["address"].split("/")[0]
    valid = [{"containerID": "ctr-1", "ifname": "eth0"}]
    assert net.invoke("GC", net.conf("1.1.0", **{"cni.dev/valid-attachments": valid})).ok() is None
    assert net.reservations() == {keep: "ctr-1\neth0"}
    assert net.host_veths() == [host_veth_name(Attachment("ctr-1", "eth0"))]  # the others' veths went too
    assert net.invoke("GC", net.conf("1.0.0", **{"cni.dev/valid-attachments": valid})).error()["code"] == 1
    for i, pod in enumerate(pods):
        net.delete(pod, f"ctr-{i}")


# --- STATUS ----------------------------------------------------------------


def test_status_follows_the_subnet_file(net: CniNetwork) -> None:
    assert net.invoke("STATUS", net.conf("1.1.0")).ok() is None
    net.subnet_file.unlink()
    assert net.invoke("STATUS", net.conf("1.1.0")).error()["code"] == 50
    net.subnet_file.write_text("FLANNEL_NETWORK=nonsense\n")
    assert net.invoke("STATUS", net.conf("1.1.0")).error()["code"] == 50
    net.write_subnet_file()
    assert net.invoke("STATUS", net.conf("1.0.0")).error()["code"] == 1  # STATUS is a 1.1.0 command


# --- masquerade ------------------------------------------------------------


def test_masquerades_when_the_daemon_does_not(cni_node: CniNode) -> None:
    net = make_network(cni_node, ipmasq=False)
    try:
        pod = net.pod("a")
        result = net.add(pod, "ctr-a")
        address = result["ips"][0]["address"].split("/")[0]
        nat = cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
        (jump,) = [line for line in nat.splitlines() if f"-s {address}/32" in line]
        chain = jump.rsplit(" ", 1)[-1]
        assert f"-A {chain} -d 10.244.0.0/16" in nat and "-j MASQUERADE" in nat
        check = net.invoke("CHECK", with_prev_result(net.conf(), result), container="ctr-a", netns=pod)
        assert check.ok() is None
        net.delete(pod, "ctr-a")
        assert chain not in cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
        # A pod whose DEL never came: GC removes its chain along with its address.
        net.add(pod, "ctr-b")
        assert net.invoke("GC", net.conf("1.1.0", **{"cni.dev/valid-attachments": []})).ok() is None
        assert "FLP-" not in cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
        assert net.reservations() == {}
        net.delete(pod, "ctr-b")
    finally:
        net.close()


# --- failures --------------------------------------------------------------


def test_a_failed_add_rolls_back_everything(net: CniNetwork) -> None:
    pod = net.pod("a")
    pod.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
    error = net.invoke("ADD", net.conf(), container="ctr-a", netns=pod).error()
    assert error["code"] == 102 and "already has an interface eth0" in error["msg"]
    assert net.reservations() == {} and net.host_veths() == []


def test_a_second_add_of_the_same_attachment_is_refused(net: CniNetwork) -> None:
    pod = net.pod("a")
    first = net.add(pod, "ctr-a")
    error = net.invoke("ADD", net.conf(), container="ctr-a", netns=pod).error()
    assert error["code"] == 102 and "DEL" in error["msg"]
    assert list(net.reservations()) == [first["ips"][0]["address"].split("/")[0]]
    assert net.host_veths() == [host_veth_name(Attachment("ctr-a", "eth0"))]
    net.delete(pod, "ctr-a")


@pytest.mark.parametrize(("case", "code"), [
    ("bad json", 6),
    ("not an object", 7),
    ("no cniVersion", 7),
    ("unknown version", 1),
    ("bad network name", 7),
    ("no CNI_COMMAND", 4),
    ("unknown CNI_COMMAND", 4),
    ("no CNI_CONTAINERID", 4),
    ("no CNI_NETNS", 4),
    ("no CNI_IFNAME", 4),
    ("bad CNI_IFNAME", 4),
    ("absent namespace", 4),
    ("missing subnet file", 11),
    ("invalid subnet file", 100),
    ("no daemon", 11),
    ("CHECK without prevResult", 7),
    ("bad key type", 7),
])
def test_malformed_input_gets_the_right_code(net: CniNetwork, case: str, code: int) -> None:
    pod = net.pod("a")
    conf: Any = net.conf()
    env: dict[str, str] = {}
    command = "ADD"
    if case == "bad json":
        conf = '{"cniVersion": "1.0.0", "name": '
    elif case == "not an object":
        conf = "[1, 2]"
    elif case == "no cniVersion":
        del conf["cniVersion"]
    elif case == "unknown version":
        conf["cniVersion"] = "0.2.0"
    elif case == "bad network name":
        conf["name"] = "../etc"
    elif case == "no CNI_COMMAND":
        env["CNI_COMMAND"] = ""
    elif case == "unknown CNI_COMMAND":
        command = "ATTACH"
    elif case.startswith("no CNI_"):
        env[case[3:]] = ""
    elif case == "bad CNI_IFNAME":
        env["CNI_IFNAME"] = "eth0/x"
    elif case == "absent namespace":
        env["CNI_NETNS"] = f"/var/run/netns/cnit-{net.lab.tag}-absent"
    elif case == "missing subnet file":
        net.subnet_file.unlink()
    elif case == "invalid subnet file":
        net.subnet_file.write_text("FLANNEL_NETWORK=10.244.0.0/16\n")
    elif case == "no daemon":
        conf["daemonSocket"] = str(net.lab.workdir / "nobody.sock")
    elif case == "CHECK without prevResult":
        command = "CHECK"
    elif case == "bad key type":
        conf["hairpinMode"] = "yes"
    error = net.invoke(command, conf, container="ctr-x", netns=pod, env=env).error()
    assert error["code"] == code, error
    assert error["cniVersion"] in VERSIONS
    assert net.reservations() == {} and net.host_veths() == []
    if case == "absent namespace":
        assert not os.path.exists(env["CNI_NETNS"]), "a missing namespace must not be created"


def test_version_answers_in_the_version_asked_for(net: CniNetwork) -> None:
    for version in VERSIONS:
        out = net.invoke("VERSION", {"cniVersion": version}).ok()
        assert out == {"cniVersion": version, "supportedVersions": VERSIONS}
    assert net.invoke("VERSION", "").ok()["supportedVersions"] == VERSIONS
