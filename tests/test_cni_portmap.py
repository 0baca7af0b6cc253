"""Chaining: Debian's portmap plugin runs after flannel-py with our result as prevResult."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from cni_helpers import REFERENCE_PLUGINS, CniNetwork, CniNode, cni_network, run_plugin, with_prev_result
from flanneld_py.lab.netns import Netns

pytestmark = pytest.mark.netns

PORTMAP = REFERENCE_PLUGINS / "portmap"
HOST_PORT = 30080
POD_PORT = 8080
LISTENER = f"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {POD_PORT}))
srv.listen()
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(b"hello from the pod to " + peer[0].encode())
    conn.close()
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    print(conn.recv(100).decode())
"""


@pytest.fixture
def net(cni_node: CniNode) -> Iterator[CniNetwork]:
    with cni_network(cni_node, 90) as network:
        yield network


@pytest.fixture
def outside(cni_node: CniNode) -> Iterator[Netns]:
    """A client beyond the node: 198.51.100.2, the node being 198.51.100.1."""
    client = Netns.create(f"cnit-{cni_node.tag}-out")
    try:
        client.ip("link", "add", "up0", "type", "veth", "peer", "name", "cnitout", "netns", cni_node.node.name)
        client.ip("addr", "add", "198.51.100.2/24", "dev", "up0")
        client.ip("link", "set", "up0", "up")
        cni_node.node.ip("addr", "add", "198.51.100.1/24", "dev", "cnitout")
        cni_node.node.ip("link", "set", "cnitout", "up")
        yield client
    finally:
        client.delete()  # takes the veth pair along


def portmap_env(command: str, pod: Netns, container: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0",
            "CNI_PATH": str(REFERENCE_PLUGINS)}


def portmap(cni_node: CniNode, command: str, pod: Netns, container: str, conf: dict[str, Any]) -> Any:
    return run_plugin(cni_node.node, [str(PORTMAP)], portmap_env(command, pod, container), json.dumps(conf)).ok()


def fetch(ns: Netns, host: str, port: int) -> str:
    return ns.sh(sys.executable, "-c", CLIENT, host, str(port), timeout=20).stdout.strip()


@pytest.mark.skipif(not PORTMAP.exists(), reason="needs Debian's containernetworking-plugins")
def test_a_mapped_host_port_reaches_the_pod(cni_node: CniNode, net: CniNetwork, outside: Netns) -> None:
    pod = net.pod("a")
    conf = net.conf("1.0.0")
    ours = net.add(pod, "ctr-pm")
    pod_ip = ours["ips"][0]["address"].split("/")[0]
    mapping = {"cniVersion": "1.0.0", "name": net.name, "type": "portmap",
               "capabilities": {"portMappings": True},
               "runtimeConfig": {"portMappings": [{"hostPort": HOST_PORT, "containerPort": POD_PORT,
                                                   "protocol": "tcp"}]}}
    final = portmap(cni_node, "ADD", pod, "ctr-pm", with_prev_result(mapping, ours))
    assert final["ips"] == ours["ips"] and final["interfaces"] == ours["interfaces"]

    listener = pod.popen(sys.executable, "-c", LISTENER, stdout=subprocess.PIPE)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == b"ready"
        gateway = str(net.subnet.network_address + 1)
        assert fetch(cni_node.node, gateway, HOST_PORT).startswith("hello from the pod")
        assert fetch(outside, "198.51.100.1", HOST_PORT) == "hello from the pod to 198.51.100.2"
        assert fetch(cni_node.node, pod_ip, POD_PORT).startswith("hello from the pod")
    finally:
        listener.kill()
        listener.wait()

    # CHECK runs down the chain with the chain's final result.
    assert net.invoke("CHECK", with_prev_result(conf, final), container="ctr-pm", netns=pod).ok() is None
    check = run_plugin(cni_node.node, [str(PORTMAP)], portmap_env("CHECK", pod, "ctr-pm"),
                       json.dumps(with_prev_result(mapping, final)))
    # portmap 1.1.x looks for ip6tables rules it never made for an IPv4-only pod
    # (containernetworking/plugins#819); anything else is a real failure.
    assert check.code == 0 or "could not check ipv6 dnat" in check.error()["msg"], check

    # DEL runs the chain in reverse.
    assert portmap(cni_node, "DEL", pod, "ctr-pm", with_prev_result(mapping, final)) is None
    net.delete(pod, "ctr-pm")
    nat = cni_node.node.sh("iptables", "-t", "nat", "-S").stdout
    assert f"--dport {HOST_PORT}" not in nat and pod_ip not in nat
    assert net.reservations() == {} and net.host_veths() == ["cnitout"]  # only the outside link is left
