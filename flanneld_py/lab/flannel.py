"""flannel's own pieces in the lab: flanneld v0.20.2 nodes next to flanneld-py nodes, and pods
wired by flannel's CNI plugin or by the reference ``bridge`` + ``host-local`` plugins.

The binaries come from ``$FLANNELD_BIN`` / ``$FLANNEL_CNI_BIN``, else from the xz files in
``../shared/flannel/`` beside the checkout (unpacked into a folder the caller owns). Where neither
exists, :class:`FlannelMissing` says so in one line (tests skip with it).
"""

from __future__ import annotations

import lzma
import os
import shutil
import time
from functools import partial
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from .checks import wait_until
from .cluster import PREFIX, REFERENCE_CNI, Cluster, CniPlugin, DaemonArgv, Node

__all__ = [
    "FLANNELD_ENV",
    "FLANNEL_CNI_ENV",
    "FlannelMissing",
    "bridge_plugin",
    "flannel_cni_binary",
    "flannel_cni_plugin",
    "flanneld_argv_builder",
    "flanneld_binary",
    "flanneld_knows",
    "start_flanneld",
    "start_nodes",
]

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "flannel"  # ../shared/flannel from the repo root
FLANNELD_ENV = "FLANNELD_BIN"
FLANNEL_CNI_ENV = "FLANNEL_CNI_BIN"
FLANNELD_XZ = "flanneld-v0.20.2-linux-amd64.xz"
FLANNEL_CNI_XZ = "flannel-cni-plugin-v1.1.2-linux-amd64.xz"
FLANNEL_CNI_NAME = "flannel"  # the file name kube-flannel.yml installs it under in /opt/cni/bin


class FlannelMissing(RuntimeError):
    """A binary of flannel's is neither named by its variable nor in ../shared/flannel/."""


def _binary(env: str, packed: str, name: str, dest: str) -> str:
    """``$env`` if set (it must be executable), else ``packed`` from ../shared/flannel unpacked to ``dest/name``."""
    named = os.environ.get(env)
    if named:
        if not os.access(named, os.X_OK):
            raise FlannelMissing(f"${env}={named} is not an executable file")
        return os.path.abspath(named)
    source = SHARED / packed
    if not source.is_file():
        raise FlannelMissing(f"no {source} and ${env} is not set")
    target = os.path.join(dest, name)
    if not os.path.exists(target):
        os.makedirs(dest, exist_ok=True)
        with lzma.open(source) as packed_file, open(target + ".part", "wb") as out:
            shutil.copyfileobj(packed_file, out)
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
    return target


def flanneld_binary(dest: str) -> str:
    """flannel's flanneld v0.20.2 (``$FLANNELD_BIN`` or unpacked into ``dest``)."""
    return _binary(FLANNELD_ENV, FLANNELD_XZ, "flanneld", dest)


def flannel_cni_binary(dest: str) -> str:
    """flannel's CNI plugin v1.1.2 (``$FLANNEL_CNI_BIN`` or unpacked into ``dest`` as ``flannel``)."""
    return _binary(FLANNEL_CNI_ENV, FLANNEL_CNI_XZ, FLANNEL_CNI_NAME, dest)


# --- flanneld ---------------------------------------------------------------------------------


def flanneld_argv_builder(binary: str, *args: str) -> DaemonArgv:
    """flannel's flanneld on a lab node: the lab's etcd and prefix, eth0, the node's subnet file,
    then ``args`` (e.g. ``--ip-masq``)."""

    def build(cluster: Cluster, node: Node, extra: tuple[str, ...]) -> list[str]:
        return [
            binary,
            f"--etcd-endpoints={cluster.etcd_endpoint}",
            f"--etcd-prefix={PREFIX}",
            "--iface=eth0",
            f"--subnet-file={node.subnet_file}",
            *args,
            *extra,
        ]

    return build


def start_flanneld(cluster: Cluster, node: Node, *, settle: float = 3.0, timeout: float = 30.0) -> None:
    """Start flanneld on ``node`` and wait until it wrote its subnet file and stayed up ``settle`` s.

    flanneld v0.20.2 sometimes panics in its etcd watch right after start-up (about one start
    in six): a daemon that exits within that time is started once more. Start flanneld nodes
    one after the other (two starting together can lose a lease race, or never learn each
    other's lease); ``settle`` also keeps them apart.
    """
    for attempt in (1, 2):
        began = time.time() - 0.1  # file times come from a coarser clock
        cluster.start_daemon(node, wait=False)
        proc = node.daemon
        assert proc is not None
        deadline = time.monotonic() + timeout
        up_since: float | None = None
        while proc.poll() is None and time.monotonic() < deadline:
            if up_since is None and _written_since(node.subnet_file, began):
                up_since = time.monotonic()
            if up_since is not None and time.monotonic() - up_since >= settle:
                return
            time.sleep(0.1)
        code = proc.poll()
        cluster.stop_daemon(node)
        if code is None:
            raise TimeoutError(f"flanneld on {node.name} wrote no subnet file in {timeout:g}s:\n{node.log_text()[-3000:]}")
        if attempt == 2:
            raise RuntimeError(f"flanneld on {node.name} exited {code} at start-up twice:\n{node.log_text()[-3000:]}")


def start_nodes(cluster: Cluster, learn_timeout: float = 10.0) -> None:
    """Start every node's daemon and wait until each is ready: the flanneld-py nodes together,
    then flannel's flanneld nodes (those serving no CNI socket) one after the other, so that each
    flanneld lists the leases already there when it starts.

    flanneld v0.20.2 takes only the first event of each etcd watch response and can lose leases
    written close together; a flanneld that has not taken a later flanneld node's lease within
    ``learn_timeout`` is restarted once (a fresh start lists every lease).
    """
    ours = [node for node in cluster.nodes if node.serves_cni]
    for node in ours:
        cluster.start_daemon(node, wait=False)
    for node in ours:
        cluster.wait_ready(node)
    started: list[Node] = []
    for node in cluster.nodes:
        if node.serves_cni:
            continue
        start_flanneld(cluster, node)
        subnet = node.subnet_env().ranges[0].subnet  # the IPv4 one where there is one
        for earlier in started:
            if not wait_until(partial(flanneld_knows, earlier, subnet), learn_timeout):
                cluster.stop_daemon(earlier)
                start_flanneld(cluster, earlier)
        started.append(node)


def flanneld_knows(node: Node, subnet: IPv4Network | IPv6Network) -> bool:
    """Whether flanneld on ``node`` took the lease of ``subnet``: its route there (vxlan, host-gw)
    or its log line (udp, whose peers live inside the daemon)."""
    if f"Subnet added: {subnet}" in node.log_text():
        return True
    return bool(node.netns.ip("route", "show", str(subnet)).stdout.strip())


def _written_since(path: str, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except FileNotFoundError:
        return False


# --- pods wired by other plugins -----------------------------------------------------------


def flannel_cni_plugin(binary: str) -> CniPlugin:
    """flannel's CNI plugin with kube-flannel.yml's config, its files in the node's workdir; it
    delegates to ``bridge`` + ``host-local``, so ``CNI_PATH`` names its folder and the reference one."""

    def config(cluster: Cluster, node: Node) -> dict:  # type: ignore[type-arg]
        return {
            "cniVersion": "0.3.1",
            "name": "cbr0",
            "type": "flannel",
            "delegate": {"hairpinMode": True, "isDefaultGateway": True},
            "subnetFile": node.subnet_file,
            "dataDir": os.path.join(node.workdir, "flannel-cni"),
            "ipam": {"dataDir": os.path.join(node.workdir, "host-local")},
        }

    return CniPlugin("flannel", (binary,), config, f"{os.path.dirname(binary)}:{REFERENCE_CNI}")


def _bridge_config(cluster: Cluster, node: Node) -> dict:  # type: ignore[type-arg]
    """``bridge`` + ``host-local`` as a user configures them from the node's subnet file."""
    env = node.subnet_env()
    return {
        "cniVersion": "1.0.0",
        "name": f"bridge-{cluster.tag}-{node.name}",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "hairpinMode": True,
        "ipMasq": not env.ipmasq,
        "mtu": env.mtu,
        "ipam": {"type": "host-local", "subnet": str(env.subnet), "dataDir": os.path.join(node.workdir, "host-local")},
    }


def bridge_plugin() -> CniPlugin:
    """The reference ``bridge`` plugin with ``host-local``, configured from the subnet file."""
    return CniPlugin("bridge", (os.path.join(REFERENCE_CNI, "bridge"),), _bridge_config)
