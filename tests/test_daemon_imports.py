"""What the daemon loads for the configuration in use: a node that serves no CNI socket and no
metrics never imports prometheus_client, scapy or the CNI wiring, and no node pyroute2, aetcd (the
daemon declares etcd's messages itself) or tempfile with shutil (each costs RSS and start-up time). Checked in a fresh interpreter that really starts the backends, in a
namespace of its own. ssl is not on the list: uvloop imports it unconditionally.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from flanneld_py.lab.netns import Netns, unique_tag

pytestmark = pytest.mark.netns

NEVER_WITHOUT_CNI = ("pyroute2", "prometheus_client", "scapy", "flanneld_py.cni.plugin", "flanneld_py.cni.wiring",
                     "aetcd", "tempfile", "shutil")

# Start the udp backend (IPv4 and IPv6 pods) and the vxlan backend on a namespace's underlay, as the
# daemon does (its own Netlink, the underlay choice), then report the devices and what was imported.
_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from ipaddress import IPv4Network, IPv6Address, IPv6Network
    import flanneld_py.app
    from flanneld_py.backend.base import BackendContext
    from flanneld_py.backend.factory import create_backend
    from flanneld_py.core.netconfig import parse_network_config
    from flanneld_py.core.underlay import UnderlayChoice
    from flanneld_py.netlink import Netlink, underlay_info

    async def main():
        netlink = await asyncio.to_thread(Netlink)
        underlay = await asyncio.to_thread(netlink.select_underlay, UnderlayChoice())
        iface = underlay_info(underlay)
        for kind in ("udp", "vxlan"):
            doc = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56",
                   "Backend": {"Type": kind}}
            ctx = BackendContext(parse_network_config(json.dumps(doc)), iface, underlay.public_ip, netlink,
                                 public_ipv6=IPv6Address("2001:db8::1"), ipv6_prefix=IPv6Network("2001:db8::/64"))
            backend = create_backend(ctx)
            await backend.start(IPv4Network("10.244.5.0/24"), IPv6Network("fd00:10:244:5::/64"))
            yield kind, backend

    async def run():
        started = []
        async for kind, backend in main():
            started.append(backend)
        print(json.dumps({"iface": [started[0].ctx.iface.name, str(started[0].ctx.public_ip)],
                          "modules": sorted(sys.modules)}), flush=True)
        sys.stdin.readline()  # the test looks at the devices until it closes our stdin
        for backend in started:
            await backend.stop(cleanup=True)

    import uvloop
    uvloop.run(run())
""")


@pytest.fixture
def node() -> Netns:
    ns = Netns.create(f"imp-{unique_tag()}")
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        ns.ip("addr", "add", "192.0.2.7/24", "dev", "eth0")
        ns.ip("addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0p", "up")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "eth0")
        yield ns
    finally:
        ns.delete()


def _link(ns: Netns, name: str) -> dict:  # type: ignore[type-arg]
    (link,) = json.loads(ns.ip("-d", "-j", "addr", "show", "dev", name).stdout)
    return link  # type: ignore[no-any-return]


def test_a_node_without_cni_starts_udp_and_vxlan_without_pyroute2(node: Netns) -> None:
    import subprocess

    proc = node.popen(sys.executable, "-c", _SCRIPT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        report = json.loads(line)
        assert report["iface"] == ["eth0", "192.0.2.7"]  # the default route's interface, chosen without pyroute2
        loaded = [name for name in report["modules"] if name.split(".")[0] in NEVER_WITHOUT_CNI
                  or name in NEVER_WITHOUT_CNI]
        assert loaded == []
        assert "flanneld_py.netlink.batch" in report["modules"]
        assert "flanneld_py.subnet.etcdpb" in report["modules"]  # the etcd client was imported, without aetcd

        vtep = _link(node, "flannel.1")
        data = vtep["linkinfo"]["info_data"]
        assert vtep["linkinfo"]["info_kind"] == "vxlan" and "UP" in vtep["flags"]
        assert (data["id"], data["port"], data["local"], data["learning"]) == (1, 8472, "192.0.2.7", False)
        assert vtep["mtu"] == 1450
        assert [(a["local"], a["prefixlen"]) for a in vtep["addr_info"] if a["family"] == "inet"] == [("10.244.5.0", 32)]
        vtep6 = _link(node, "flannel-v6.1")
        assert vtep6["linkinfo"]["info_data"]["local6"] == "2001:db8::1"

        tun = _link(node, "flannel0")
        assert "UP" in tun["flags"] and tun["mtu"] == 1500 - 48
        assert [(a["local"], a["prefixlen"]) for a in tun["addr_info"] if a["family"] == "inet"] == [("10.244.5.0", 32)]
        routes = node.ip("route", "show", "dev", "flannel0").stdout
        routes6 = node.ip("-6", "route", "show", "dev", "flannel0").stdout
        assert "10.244.0.0/16 proto 252" in routes and "fd00:10:244::/56 proto 252" in routes6
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert "flannel.1" not in node.ip("link").stdout and "flannel0" not in node.ip("link").stdout


@pytest.mark.etcd
def test_an_empty_cni_socket_flag_serves_no_cni_socket() -> None:
    from flanneld_py.lab.cluster import Cluster
    from lab_helpers import start

    with Cluster(nodes=1) as lab:
        (node,) = lab.nodes
        node.serves_cni = False  # ready = the subnet file alone
        start(lab, node, extra=["--cni-socket="])
        assert node.daemon is not None and node.daemon.poll() is None
        assert not os.path.exists(node.cni_socket)
        assert "CNI requests served" not in node.log_text()
