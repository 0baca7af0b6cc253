"""flannel's own CNI plugin (v1.1.2, delegating to bridge + host-local) on a subnet file we rendered.

A node running flanneld-py must give flannel's plugin what flanneld would: the
subnet file's IPv6 variables are read by the plugin, handed to host-local as a
second range set and to the pod as IPv6 routes. Runs in namespaces of its own.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_interface
from pathlib import Path
from typing import Any

import pytest

from cni_helpers import CLUSTER, CLUSTER6, REFERENCE_PLUGINS, pod_state, run_plugin
from flanneld_py.core.subnetenv import SubnetEnv
from flanneld_py.lab.netns import Netns, unique_tag

pytestmark = pytest.mark.netns

# ../shared/flannel from the repository's root; FLANNEL_SHARED_DIR names another folder (a worktree's tests)
SHARED = Path(os.environ.get("FLANNEL_SHARED_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "flannel")
PLUGIN_XZ = SHARED / "flannel-cni-plugin-v1.1.2-linux-amd64.xz"
SUBNET4 = IPv4Network("10.244.41.0/24")
SUBNET6 = IPv6Network("fd00:10:244:41::/64")

if not PLUGIN_XZ.exists():
    pytest.skip(f"flannel's CNI plugin is not at {PLUGIN_XZ.resolve()}", allow_module_level=True)
if not (REFERENCE_PLUGINS / "bridge").exists():
    pytest.skip(f"the reference bridge plugin is not in {REFERENCE_PLUGINS}", allow_module_level=True)


@pytest.fixture(scope="module")
def plugin_dir() -> Iterator[Path]:
    """flannel's plugin unpacked as ``flannel`` in a directory of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="flannel-cni-"))
    try:
        binary = workdir / "flannel"
        binary.write_bytes(lzma.decompress(PLUGIN_XZ.read_bytes()))
        binary.chmod(0o755)
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def node(plugin_dir: Path) -> Iterator[tuple[Netns, Path]]:
    tag = unique_tag()
    ns = Netns.create(f"fcni-{tag}-node")
    workdir = Path(tempfile.mkdtemp(prefix=f"fcni-{tag}-"))
    try:
        yield ns, workdir
    finally:
        ns.delete()
        shutil.rmtree(workdir, ignore_errors=True)


def flannel(node: Netns, plugin_dir: Path, workdir: Path, command: str, pod: Netns) -> dict[str, Any] | None:
    """Run flannel's plugin as kube-flannel.yml configures it, its files moved into ``workdir``."""
    conf = {"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
            "subnetFile": str(workdir / "subnet.env"), "dataDir": str(workdir / "flannel"),
            "ipam": {"dataDir": str(workdir / "ipam")},
            "delegate": {"hairpinMode": True, "isDefaultGateway": True, "bridge": "cnif0"}}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr-flannel", "CNI_IFNAME": "eth0",
           "CNI_NETNS": pod.path, "CNI_PATH": f"{plugin_dir}{os.pathsep}{REFERENCE_PLUGINS}"}
    run = run_plugin(node, [str(plugin_dir / "flannel")], env, json.dumps(conf))
    assert run.code == 0, f"flannel's plugin failed {command} ({run.code}): {run.stdout} {run.stderr}"
    return run.output  # type: ignore[no-any-return]


def ping_until(pod: Netns, address: str, timeout: float = 20) -> None:
    """The bridge plugin leaves the node's gateway to DAD; wait for it to answer."""
    deadline = time.monotonic() + timeout
    while pod.sh("ping", "-c", "1", "-W", "1", address, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{address} does not answer from {pod.name}"


@pytest.mark.parametrize("ipv4", [True, False], ids=["dual-stack", "ipv6-only"])
def test_flannels_plugin_reads_our_ipv6_subnet_file(node: tuple[Netns, Path], plugin_dir: Path, ipv4: bool) -> None:
    ns, workdir = node
    env = SubnetEnv(CLUSTER if ipv4 else None, SUBNET4 if ipv4 else None, 1450, True, CLUSTER6, SUBNET6)
    (workdir / "subnet.env").write_text(env.render())
    with Netns.create(f"{ns.name[:-5]}-pod") as pod:
        result = flannel(ns, plugin_dir, workdir, "ADD", pod)
        assert result is not None
        addresses = [ip_interface(ip["address"]) for ip in result["ips"]]
        gateway6 = str(SUBNET6.network_address + 1)
        assert [a.network for a in addresses] == ([SUBNET4] if ipv4 else []) + [SUBNET6]

        state = pod_state(pod)
        assert state["addresses6"] == [str(addresses[-1])]
        assert state["addresses"] == ([str(addresses[0])] if ipv4 else [])
        assert (str(CLUSTER6), gateway6) in state["routes6"] and ("default", gateway6) in state["routes6"]
        if ipv4:
            gateway4 = str(SUBNET4.network_address + 1)
            assert (str(CLUSTER), gateway4) in state["routes"] and ("default", gateway4) in state["routes"]
            ping_until(pod, gateway4)
        assert state["mtu"] == 1450
        ping_until(pod, gateway6)

        flannel(ns, plugin_dir, workdir, "DEL", pod)
        left = [p.name for p in (workdir / "ipam" / "cbr0").iterdir() if p.name[0].isdigit() or ":" in p.name]
        assert left == [], f"host-local kept {left}"
