"""flannel-py driven by the reference runtime: containernetworking/cni's ``cnitool`` (libcni).

libcni does what a container runtime does: it loads a network config list from a
directory, finds each plugin on CNI_PATH, runs the chain (flannel-py, then Debian's
portmap), caches the result and hands it to CHECK and DEL. ``.ci/setup`` builds the
tool from Debian's source package (``.ci/build-cnitool``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from cni_helpers import (
    CLUSTER,
    PLUGIN,
    PYTHON_SHIM,
    REFERENCE_PLUGINS,
    CniNetwork,
    CniNode,
    cni_network,
    pod_state,
    run_plugin,
)
from flanneld_py.lab.netns import Netns

pytestmark = pytest.mark.netns

CNITOOL = Path(sys.prefix) / "bin" / "cnitool"
LIBCNI_CACHE = Path("/var/lib/cni/results")  # libcni's result cache; cnitool offers no other place
HOST_PORT = 30081

if not CNITOOL.exists():
    pytestmark = [pytest.mark.netns, pytest.mark.skip(reason=f"{CNITOOL} missing: run .ci/setup")]


@dataclass
class Runtime:
    """cnitool in the node namespace, with its own config directory and plugin directory."""

    node: CniNode
    confdir: Path
    bindir: Path

    def run(self, command: str, network: str, pod: Netns, cap_args: dict[str, Any] | None = None) -> Any:
        env = {"NETCONFPATH": str(self.confdir), "CNI_PATH": str(self.bindir), "CNI_IFNAME": "eth0"}
        if cap_args is not None:
            env["CAP_ARGS"] = json.dumps(cap_args)
        return run_plugin(self.node.node, [str(CNITOOL), command, network, pod.path], env, b"")

    def write_list(self, net: CniNetwork, *chained: dict[str, Any]) -> str:
        """A .conflist for ``net``'s flannel-py config plus ``chained`` plugins; its name."""
        first = {k: v for k, v in net.conf().items() if k not in ("cniVersion", "name")}
        name = f"cnitool-{self.node.tag}-{net.name}"
        doc = {"cniVersion": "1.0.0", "name": name, "plugins": [first, *chained]}
        (self.confdir / f"{name}.conflist").write_text(json.dumps(doc))
        return name


@pytest.fixture
def runtime(cni_node: CniNode) -> Iterator[Runtime]:
    confdir, bindir = cni_node.workdir / "net.d", cni_node.workdir / "bin"
    confdir.mkdir(exist_ok=True)
    bindir.mkdir(exist_ok=True)
    plugin = Path(PLUGIN[0]) if len(PLUGIN) == 1 else PYTHON_SHIM  # the Python shim runs by its shebang
    for name, target in (("flannel-py", plugin), ("portmap", REFERENCE_PLUGINS / "portmap")):
        link = bindir / name
        if not link.exists():
            link.symlink_to(target)
    made = [d for d in (LIBCNI_CACHE.parent, LIBCNI_CACHE) if not d.exists()]
    try:
        yield Runtime(cni_node, confdir, bindir)
    finally:
        for cached in LIBCNI_CACHE.glob(f"cnitool-{cni_node.tag}-*"):
            cached.unlink(missing_ok=True)
        for directory in reversed(made):  # libcni's directories, if this test made them and they are empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        shutil.rmtree(confdir, ignore_errors=True)


@pytest.fixture
def net(cni_node: CniNode) -> Iterator[CniNetwork]:
    with cni_network(cni_node, 95) as network:
        yield network


def cnitool_container_id(pod: Netns) -> str:
    """cnitool names the container after a hash of the namespace path."""
    return "cnitool-" + hashlib.sha512(pod.path.encode()).hexdigest()[:20]


def cached_results(runtime: Runtime, network: str) -> list[Path]:
    return list(LIBCNI_CACHE.glob(f"{network}-*"))


def test_add_check_del_through_libcni(runtime: Runtime, net: CniNetwork) -> None:
    network = runtime.write_list(net)
    pod = net.pod("a")
    added = runtime.run("add", network, pod)
    result = added.ok()
    assert result["cniVersion"] == "1.0.0"
    (ip,) = result["ips"]
    address = IPv4Interface(ip["address"])
    assert address.network == net.subnet
    container = result["interfaces"][ip["interface"]]
    assert container["name"] == "eth0" and container["sandbox"] == pod.path
    state = pod_state(pod)
    assert state["up"] and str(address) in state["addresses"], state
    assert (str(CLUSTER), ip["gateway"]) in state["routes"] and ("default", ip["gateway"]) in state["routes"]
    assert net.lab.node.sh("ping", "-c", "1", "-W", "2", str(address.ip), check=False).returncode == 0
    assert cached_results(runtime, network), "libcni cached no result"

    # CHECK: libcni hands the cached result to the plugin as prevResult
    assert runtime.run("check", network, pod).ok() is None
    pod.ip("addr", "flush", "dev", "eth0")
    broken = runtime.run("check", network, pod)
    assert broken.code != 0 and str(address.ip) in broken.stderr, broken

    assert runtime.run("del", network, pod).ok() is None
    net.wait_removed(cnitool_container_id(pod))
    assert net.reservations() == {} and net.host_veths() == []
    assert cached_results(runtime, network) == []
    # a second DEL (the runtime retrying) is not an error
    assert runtime.run("del", network, pod).ok() is None


@pytest.mark.skipif(not (REFERENCE_PLUGINS / "portmap").exists(), reason="needs Debian's containernetworking-plugins")
def test_chained_portmap_gets_our_result_and_its_capability_args(runtime: Runtime, net: CniNetwork) -> None:
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
    network = runtime.write_list(net, portmap)
    pod = net.pod("b")
    mapping = {"portMappings": [{"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp"}]}
    result = runtime.run("add", network, pod, cap_args=mapping).ok()
    pod_ip = result["ips"][0]["address"].split("/")[0]
    nat = net.lab.node.sh("iptables", "-t", "nat", "-S").stdout
    assert f"--dport {HOST_PORT}" in nat and f"{pod_ip}:80" in nat, nat

    assert runtime.run("del", network, pod, cap_args=mapping).ok() is None
    nat = net.lab.node.sh("iptables", "-t", "nat", "-S").stdout
    assert f"--dport {HOST_PORT}" not in nat and pod_ip not in nat
    assert cached_results(runtime, network) == []
