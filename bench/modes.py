"""How each mode's testbed is built: two endpoints on different nodes, and the daemons to watch.

* ``bare``: two plain node namespaces on the lab's underlay (the switch
  bridge, veths, 198.51.100.0/24), no etcd, no daemon: node to node, the ceiling.
* ``host-gw``, ``vxlan``, ``udp``: ``Cluster(nodes=2, backend=...)`` running
  flanneld-py, one pod per node wired by the real ``flannel-py`` CNI plugin;
  pod to pod across nodes.
* ``flannel-udp``: the same lab with the user's flannel ``flanneld`` binary as
  the daemon (UDP backend, ``--ip-masq`` as kube-flannel.yml runs it), pods
  wired as flannel's own CNI plugin does it: ``bridge`` + ``host-local`` from
  ``/usr/lib/cni`` with the subnet and MTU of the daemon's subnet file.
* ``<mode>+flannel-cni``, ``<mode>+bridge-cni`` (with ``--cni-plugin``): a
  flanneld-py mode whose pods are wired by flannel's own CNI plugin, or by
  ``bridge`` + ``host-local`` configured from the subnet file; the daemons run
  with ``--ip-masq`` as under kube-flannel.yml, so neither plugin masquerades.
* ``c-relay`` (a reference, asked for by name): the ``udp`` lab, whose daemons
  are then stopped (``flannel0`` and the routes stay) and replaced by
  ``c_relay.c``, the smallest C relay, one packet per read and per
  ``sendto``: what any design that wakes a process per packet costs here.

With ``ipv6`` (the default of a run) the labs of :data:`IPV6_MODES` are dual
stack: the underlay also has ``2001:db8::/64`` and the daemons run with
``EnableIPv6`` (``fd00:10:244::/56``), so each pod (each node, for ``bare``)
also has an IPv6 address and the testbed an IPv6 pair of endpoints.

Every testbed is a context manager; leaving it (also by Ctrl-C) kills the
daemons and deletes every namespace and file the lab made.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from flanneld_py.lab.cluster import REFERENCE_CNI, CniPlugin, Cluster
from flanneld_py.lab.flannel import bridge_plugin, flannel_cni_plugin, flanneld_argv_builder, start_nodes
from flanneld_py.lab.netns import unique_tag

from .measure import Endpoint, MeasureError

__all__ = [
    "ALL_MODES",
    "DEFAULT_MODES",
    "FLANNELD_PY_MODES",
    "IPV6_MODES",
    "ModeError",
    "REFERENCE_CNI",
    "Testbed",
    "open_testbed",
    "plugin_mode",
    "split_plugin_mode",
]

DEFAULT_MODES = ("bare", "host-gw", "vxlan", "udp")
FLANNELD_PY_MODES = ("host-gw", "vxlan", "udp")
ALL_MODES = (*DEFAULT_MODES, "c-relay", "flannel-udp")
IPV6_MODES = ("bare", *FLANNELD_PY_MODES)  # measured over IPv6 too (flannel's udp and c-relay carry IPv4 only)
NETWORK6 = "fd00:10:244::/56"
CNI_PLUGINS = ("flannel", "bridge")  # --cni-plugin: who else wires the pods of the flanneld-py modes
C_RELAY_SOURCE = os.path.join(os.path.dirname(__file__), "c_relay.c")
CONNECT_TIMEOUT = 20.0


class ModeError(RuntimeError):
    """A testbed could not be built or its endpoints cannot reach each other."""


@dataclass
class Testbed:
    mode: str
    src: Endpoint
    dst: Endpoint
    daemon_pids: tuple[int, ...]
    cluster: Cluster
    notes: list[str] = field(default_factory=list)
    src6: Endpoint | None = None  # the same two ends over IPv6, in a dual-stack lab
    dst6: Endpoint | None = None


def plugin_mode(mode: str, plugin: str) -> str:
    """``udp`` wired by ``flannel`` -> ``udp+flannel-cni``."""
    return f"{mode}+{plugin}-cni"


def split_plugin_mode(mode: str) -> tuple[str, str | None]:
    """``udp+flannel-cni`` -> ("udp", "flannel"); ``udp`` -> ("udp", None)."""
    base, sep, rest = mode.partition("+")
    return (base, rest.removesuffix("-cni")) if sep else (mode, None)


def wait_reachable(src: Endpoint, dst: Endpoint, timeout: float = CONNECT_TIMEOUT) -> float:
    """Ping until ``dst`` answers ``src``; seconds it took.

    Raises:
        ModeError: no answer within ``timeout``.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        proc = src.netns.sh("ping", "-n", "-c", "1", "-W", "1", dst.address, check=False, timeout=10)
        if proc.returncode == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise ModeError(f"{dst.address} does not answer {src.address} after {timeout:g}s")


def _daemon_pids(cluster: Cluster) -> tuple[int, ...]:
    """The daemons' own processes (every thread is counted). Not the helpers they fork for a
    moment: iptables every few seconds with ``--ip-masq`` (and in flanneld for its forward
    rules), which would be gone by the next CPU sample."""
    pids: list[int] = []
    for node in cluster.nodes:
        if node.daemon is None or node.daemon.poll() is not None:
            raise ModeError(f"the daemon on {node.name} is not running: {node.log_text()[-2000:]}")
        pids.append(node.daemon.pid)
    return tuple(pids)


def _start_daemons(cluster: Cluster) -> None:
    try:
        start_nodes(cluster)
    except (RuntimeError, TimeoutError) as exc:
        raise ModeError(f"daemon did not start: {exc}") from None


def _build_bare(cluster: Cluster) -> Testbed:
    n1, n2 = cluster.nodes
    bed = Testbed("bare", Endpoint(n1.netns, n1.address), Endpoint(n2.netns, n2.address), (), cluster)
    if n1.address6 is not None and n2.address6 is not None:
        bed.src6, bed.dst6 = Endpoint(n1.netns, n1.address6), Endpoint(n2.netns, n2.address6)
    return bed


def _build_flanneld_py(cluster: Cluster, mode: str) -> Testbed:
    _start_daemons(cluster)
    pods = [cluster.add_pod(node) for node in cluster.nodes]
    src, dst = (Endpoint(pod.netns, str(pod.ip.ip)) for pod in pods)
    bed = Testbed(mode, src, dst, _daemon_pids(cluster), cluster)
    ends6 = [(pod.netns, pod.ip6) for pod in pods]
    if all(ip6 is not None for _, ip6 in ends6):
        bed.src6, bed.dst6 = (Endpoint(netns, str(ip6.ip)) for netns, ip6 in ends6 if ip6 is not None)
    return bed


def _build_with_plugin(cluster: Cluster, mode: str, plugin: CniPlugin) -> Testbed:
    _start_daemons(cluster)
    pods = [cluster.add_pod(node, plugin) for node in cluster.nodes]
    src, dst = (Endpoint(pod.netns, str(pod.ip.ip)) for pod in pods)
    return Testbed(mode, src, dst, _daemon_pids(cluster), cluster)


def _other_plugin(name: str, flannel_cni: str | None) -> CniPlugin:
    if name == "bridge":
        return bridge_plugin()
    if name == "flannel" and flannel_cni:
        return flannel_cni_plugin(flannel_cni)
    raise ModeError(f"pods wired by {name!r} need {'--cni-plugin flannel' if name == 'flannel' else 'a known plugin'}")


def _build_c_relay(cluster: Cluster) -> Testbed:
    """The udp lab with each daemon replaced by the C relay (flannel0 and its route outlive the daemon)."""
    binary = os.path.join(cluster.workdir, "c-relay")
    compiled = subprocess.run(["cc", "-O2", "-o", binary, C_RELAY_SOURCE], capture_output=True, text=True)
    if compiled.returncode != 0:
        raise ModeError(f"mode c-relay needs a C compiler: {compiled.stderr.strip()[-500:]}")
    bed = _build_flanneld_py(cluster, "c-relay")
    n1, n2 = cluster.nodes
    for node, peer in ((n1, n2), (n2, n1)):
        cluster.stop_daemon(node)
        with open(node.log_path, "ab") as log:  # its errors show where a daemon's would
            node.daemon = node.netns.popen(binary, "flannel0", node.address, peer.address,
                                           stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    bed.daemon_pids = _daemon_pids(cluster)
    return bed


def make_cluster(mode: str, flanneld: str | None = None, tag: str | None = None, *, etcd_tls: bool = False,
                 ipv6: bool = False) -> Cluster:
    """The (not yet entered) lab for ``mode``; ``etcd_tls``: etcd on https with client certificates
    (for flanneld-py's modes; flannel's daemon and the bare lab keep plain etcd); dual stack with
    ``ipv6`` for :data:`IPV6_MODES`."""
    tag = tag or unique_tag()
    if mode == "bare":
        return Cluster(nodes=2, tag=tag, start_etcd=False, underlay6=ipv6)
    if mode in FLANNELD_PY_MODES:
        if ipv6:
            config = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": NETWORK6,
                      "Backend": {"Type": mode}}
            return Cluster(nodes=2, config=config, tag=tag, underlay6=True, etcd_tls=etcd_tls)
        return Cluster(nodes=2, backend={"Type": mode}, tag=tag, etcd_tls=etcd_tls)
    base, plugin = split_plugin_mode(mode)
    if plugin in CNI_PLUGINS and base in FLANNELD_PY_MODES:
        return Cluster(nodes=2, backend={"Type": base}, tag=tag, daemon_args=("--ip-masq",), etcd_tls=etcd_tls)
    if mode == "c-relay":  # offloads off: the relay reattaches to flannel0 as a plain TUN device
        return Cluster(nodes=2, backend={"Type": "udp"}, tag=tag, daemon_args=("--offload=false",),
                       etcd_tls=etcd_tls)
    if mode == "flannel-udp":
        if not flanneld:
            raise ModeError("mode flannel-udp needs --flanneld PATH")
        return Cluster(nodes=2, backend={"Type": "udp"}, tag=tag,
                       daemon_argv_builder=flanneld_argv_builder(flanneld, "--ip-masq"), wait_for_cni_socket=False)
    raise ModeError(f"unknown mode {mode!r} (choose from {', '.join(ALL_MODES)})")


@contextmanager
def open_testbed(mode: str, flanneld: str | None = None, tag: str | None = None,
                 flannel_cni: str | None = None, *, etcd_tls: bool = False, ipv6: bool = False) -> Iterator[Testbed]:
    """Build ``mode``'s lab, wait until its endpoints reach each other (over IPv6 too, with
    ``ipv6`` and a mode of :data:`IPV6_MODES`), yield it, tear it down.

    Raises:
        ModeError: the lab could not be built, a daemon failed, or no connectivity.
    """
    cluster = make_cluster(mode, flanneld, tag, etcd_tls=etcd_tls, ipv6=ipv6 and mode in IPV6_MODES)
    plugin = split_plugin_mode(mode)[1]
    with cluster:
        try:
            if mode == "bare":
                bed = _build_bare(cluster)
            elif mode == "flannel-udp":
                bed = _build_with_plugin(cluster, mode, bridge_plugin())
            elif plugin is not None:
                bed = _build_with_plugin(cluster, mode, _other_plugin(plugin, flannel_cni))
            elif mode == "c-relay":
                bed = _build_c_relay(cluster)
            else:
                bed = _build_flanneld_py(cluster, mode)
            took = wait_reachable(bed.src, bed.dst)
            bed.notes.append(f"reachable {took:.2f}s after the pods were wired")
            if bed.src6 is not None and bed.dst6 is not None:
                took = wait_reachable(bed.src6, bed.dst6)
                bed.notes.append(f"reachable over IPv6 {took:.2f}s after IPv4")
        except (RuntimeError, MeasureError) as exc:
            if isinstance(exc, ModeError):
                raise
            raise ModeError(str(exc)) from None
        yield bed
