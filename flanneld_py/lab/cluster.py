"""A local cluster in namespaces: an underlay switch, etcd, nodes running the real
daemon, and pods wired by the real CNI plugin.

Layout (``<tag>`` is unique per run)::

    fp<tag>sw   bridge br0 + etcd on 198.51.100.254:2379
    fp<tag>n1   eth0 198.51.100.1/24   flanneld-py, cni0, flannel0
    fp<tag>n1p1 eth0 10.244.x.y        a pod of node 1

With ``underlay6`` every node's eth0 also has ``2001:db8::<index>/64`` (a dual-stack
underlay, for configs with ``EnableIPv6``) and forwards IPv6. With ``underlay6_only`` it
has that address alone (no IPv4 address: an IPv6-only underlay, for IPv6-only networks),
an IPv6 default route via the switch, and etcd listens on ``[2001:db8::fe]:2379``.

A node may run another daemon (``node_daemons``, e.g. flannel's own flanneld) and a pod may be
wired by another CNI plugin (``CniPlugin``); ``lab/flannel.py`` has flannel's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

from ..core.subnetenv import SubnetEnv
from ..install import compiled_shim, python_shim
from ..unixsock import socket_answers
from .etcd import EtcdMember
from .netns import Netns, run, unique_tag
from .pki import make_pki

__all__ = ["REFERENCE_CNI", "Cluster", "CniPlugin", "DaemonArgv", "Node", "Pod", "cni_plugin_argv"]

UNDERLAY = IPv4Network("198.51.100.0/24")
UNDERLAY6 = IPv6Network("2001:db8::/64")
ETCD_HOST = "198.51.100.254"
ETCD_HOST6 = "2001:db8::fe"  # the switch on an IPv6-only underlay
PREFIX = "/coreos.com/network"
REFERENCE_CNI = "/usr/lib/cni"  # Debian's containernetworking-plugins: bridge, host-local, portmap


def cni_plugin_argv(kind: str | None = None) -> list[str]:
    """How to run the flannel-py CNI plugin: the compiled shim when this installation has it
    (``flanneld-py install-cni`` installs the same file), else the Python shim. ``kind``
    ("compiled" or "python", default ``$FLANNEL_PY_PLUGIN``) forces one."""
    compiled = compiled_shim()
    kind = kind or os.environ.get("FLANNEL_PY_PLUGIN") or ("compiled" if compiled else "python")
    if kind == "compiled":
        if compiled is None:
            raise FileNotFoundError("the compiled CNI shim is not built: reinstall with a C compiler "
                                    "(pip install -e . builds flanneld_py/cni/bin/flannel-py)")
        return [str(compiled)]
    return [sys.executable, "-I", "-S", str(python_shim())]  # as its shebang runs it


@dataclass(frozen=True)
class CniPlugin:
    """A CNI plugin other than flannel-py, as a runtime runs it: the executable, its network
    config for a node, and the folders it finds its delegates in (``CNI_PATH``)."""

    name: str
    argv: tuple[str, ...]
    config: Callable[[Cluster, Node], dict]  # type: ignore[type-arg]
    path: str = REFERENCE_CNI


@dataclass
class Pod:
    name: str
    node: Node
    netns: Netns
    ip: IPv4Interface | None  # None: an IPv6-only pod (see ip6)
    result: dict  # type: ignore[type-arg]
    container_id: str
    plugin: CniPlugin | None = None  # None: flannel-py wired it

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.netns.sh(*cmd, check=check, timeout=timeout)

    @property
    def ip6(self) -> IPv6Interface | None:
        """The pod's IPv6 address from the CNI result (None on an IPv4-only network)."""
        found = [entry["address"] for entry in self.result.get("ips", []) if ":" in entry["address"]]
        return IPv6Interface(found[0]) if found else None

    def ping(self, address: str, count: int = 1, timeout: float = 2) -> bool:
        proc = self.sh("ping", "-c", str(count), "-W", str(int(timeout)), "-i", "0.2", address, check=False)
        return proc.returncode == 0


@dataclass
class Node:
    name: str
    index: int
    netns: Netns
    address: str
    workdir: str
    daemon: subprocess.Popen[bytes] | None = None
    pods: list[Pod] = field(default_factory=list)
    serves_cni: bool = True  # False for a daemon that is not flanneld-py (no CNI socket to wait for)
    address6: str | None = None  # its IPv6 underlay address, with ``underlay6``

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.workdir, "subnet.env")

    @property
    def cni_socket(self) -> str:
        return os.path.join(self.workdir, "cni.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "flanneld.log")

    @property
    def ipam_dir(self) -> str:
        return os.path.join(self.workdir, "ipam")

    def subnet_env(self) -> SubnetEnv:
        with open(self.subnet_file) as handle:
            return SubnetEnv.parse(handle.read())

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def routes(self) -> list[dict[str, Any]]:
        routes: list[dict[str, Any]] = json.loads(self.netns.ip("-j", "route", "show").stdout or "[]")
        return routes


DaemonArgv = Callable[["Cluster", Node, tuple[str, ...]], list[str]]
"""Builds the command line of a node's daemon: (cluster, node, extra args) -> argv."""


class Cluster:
    """Context manager that builds the lab and tears every piece of it down.

    ``daemon_argv_builder`` replaces the command that runs on each node (default:
    flanneld-py with :meth:`default_daemon_argv`), e.g. flannel's own flanneld;
    ``wait_for_cni_socket=False`` is for such a daemon, which serves no CNI
    socket: it is then ready once the subnet file exists. ``node_daemon_args``
    adds flags to single nodes, by node index (node ``n2`` is index 2), also
    when a test restarts them; ``node_daemons`` runs another daemon on single
    nodes (a mixed cluster), which then count as serving no CNI socket.
    ``etcd_tls`` runs etcd on https with client certificates, and flanneld-py with them.
    """

    def __init__(
        self,
        nodes: int = 3,
        network: str = "10.244.0.0/16",
        backend: dict | None = None,  # type: ignore[type-arg]
        config: dict | None = None,  # type: ignore[type-arg]
        tag: str | None = None,
        daemon_args: tuple[str, ...] = (),
        node_daemon_args: Mapping[int, tuple[str, ...]] | None = None,
        start_etcd: bool = True,
        daemon_argv_builder: DaemonArgv | None = None,
        wait_for_cni_socket: bool = True,
        node_daemons: Mapping[int, DaemonArgv] | None = None,
        underlay6: bool = False,
        underlay6_only: bool = False,
        etcd_tls: bool = False,
    ) -> None:
        self.tag = tag or unique_tag()
        self.node_count = nodes
        self.config = config or {"Network": network, "Backend": backend or {"Type": "udp"}}
        self.daemon_args = daemon_args
        self.node_daemon_args = dict(node_daemon_args or {})  # by node index, kept across restarts
        self.workdir = tempfile.mkdtemp(prefix=f"flanneld-lab-{self.tag}-")
        self.switch: Netns | None = None
        self.etcd: EtcdMember | None = None
        self.nodes: list[Node] = []
        self._namespaces: list[Netns] = []
        self._start_etcd = start_etcd
        self._daemon_argv_builder = daemon_argv_builder
        self.wait_for_cni_socket = wait_for_cni_socket
        self._node_daemons = dict(node_daemons or {})
        self._pod_seq = 0
        self.underlay6 = underlay6 or underlay6_only
        self.underlay6_only = underlay6_only
        self.etcd_tls = etcd_tls
        self._client_tls: dict[str, str] = {}  # the daemons' --etcd-cafile/certfile/keyfile, with etcd_tls

    # --- build & tear down ---------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plug_into_underlay(self, ns: Netns, suffix: str, address: str) -> None:
        """Cable ``ns`` to the underlay switch: its eth0, up, with ``address``/24 (a node, an
        etcd member, an outside host or an intruder). The caller owns ``ns``; the switch
        port (``p<tag><suffix>``) goes with it."""
        assert self.switch is not None
        port = f"p{self.tag}{suffix}"
        run(["ip", "link", "add", port, "netns", self.switch.name, "type", "veth", "peer", "name", "eth0",
             "netns", ns.name])
        self.switch.ip("link", "set", port, "master", "br0", "up")
        if ":" in address:
            ns.ip("addr", "add", f"{address}/{UNDERLAY6.prefixlen}", "dev", "eth0", "nodad")
        else:
            ns.ip("addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")

    def _ns(self, suffix: str) -> Netns:
        ns = Netns.create(f"fp{self.tag}{suffix}")
        self._namespaces.append(ns)
        return ns

    def _build(self) -> None:
        self.switch = self._ns("sw")
        # A fixed MAC: a bridge otherwise takes its lowest port's MAC, which changes when a
        # port joins later (an outside host, an intruder), and then etcd's address behind
        # br0 stays unreachable until every node's neighbour entry for it expires.
        self.switch.ip("link", "add", "br0", "address", "02:00:5e:00:53:fe", "type", "bridge")
        if self.underlay6_only:
            self.switch.ip("addr", "add", f"{ETCD_HOST6}/{UNDERLAY6.prefixlen}", "dev", "br0", "nodad")
        else:
            self.switch.ip("addr", "add", f"{ETCD_HOST}/24", "dev", "br0")
        self.switch.ip("link", "set", "br0", "up")
        if self._start_etcd:
            self.etcd = self._tls_etcd() if self.etcd_tls else EtcdMember("e0", self._etcd_host, self.workdir,
                                                                          netns=self.switch)
            self.etcd.start()
            self.put_config(self.config)
        for index in range(1, self.node_count + 1):
            self.add_node(index)

    def _tls_etcd(self) -> EtcdMember:
        """etcd on https with client-certificate authentication, from a PKI of its own."""
        pki = make_pki(os.path.join(self.workdir, "pki"), ETCD_HOST6 if self.underlay6_only else ETCD_HOST)
        self._client_tls = {"cafile": f"{pki['ca']}.crt", "certfile": f"{pki['client']}.crt",
                            "keyfile": f"{pki['client']}.key"}
        return EtcdMember("e0", self._etcd_host, self.workdir, netns=self.switch, scheme="https", tls_args=[
            f"--cert-file={pki['server']}.crt", f"--key-file={pki['server']}.key",
            "--client-cert-auth", f"--trusted-ca-file={pki['ca']}.crt",
        ], client_tls={"cacert": self._client_tls["cafile"], "cert": self._client_tls["certfile"],
                       "key": self._client_tls["keyfile"]})

    def add_node(self, index: int) -> Node:
        ns = self._ns(f"n{index}")
        address = str((UNDERLAY6 if self.underlay6_only else UNDERLAY).network_address + index)
        self.plug_into_underlay(ns, f"n{index}", address)
        ns.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        address6 = None
        if self.underlay6_only:
            address6 = address
            ns.sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            ns.ip("-6", "route", "add", "default", "via", ETCD_HOST6, "dev", "eth0")
        elif self.underlay6:
            address6 = str(UNDERLAY6.network_address + index)
            ns.ip("addr", "add", f"{address6}/{UNDERLAY6.prefixlen}", "dev", "eth0", "nodad")
            ns.sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        workdir = os.path.join(self.workdir, f"n{index}")
        os.makedirs(workdir, exist_ok=True)
        serves_cni = self.wait_for_cni_socket and index not in self._node_daemons
        node = Node(f"n{index}", index, ns, address, workdir, serves_cni=serves_cni, address6=address6)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            self.stop_daemon(node, signal.SIGKILL)
        if self.etcd is not None:
            self.etcd.stop()
        for ns in reversed(self._namespaces):
            ns.delete()
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- etcd --------------------------------------------------------------------

    @property
    def _etcd_host(self) -> str:
        """The etcd host as a URL has it (an IPv6 literal in brackets)."""
        return f"[{ETCD_HOST6}]" if self.underlay6_only else ETCD_HOST

    @property
    def etcd_endpoint(self) -> str:
        return f"{'https' if self.etcd_tls else 'http'}://{self._etcd_host}:2379"

    def put_config(self, config: dict) -> None:  # type: ignore[type-arg]
        assert self.etcd is not None
        self.etcd.ctl("put", f"{PREFIX}/config", json.dumps(config))

    def leases(self) -> dict[str, dict]:  # type: ignore[type-arg]
        assert self.etcd is not None
        out = self.etcd.ctl("get", "--prefix", f"{PREFIX}/subnets/").stdout.splitlines()
        return {out[i].rsplit("/", 1)[1]: json.loads(out[i + 1]) for i in range(0, len(out) - 1, 2)}

    # --- daemons -------------------------------------------------------------------

    def daemon_argv(self, node: Node, extra: tuple[str, ...] = ()) -> list[str]:
        if node.index in self._node_daemons:
            return self._node_daemons[node.index](self, node, extra)
        if self._daemon_argv_builder is not None:
            return self._daemon_argv_builder(self, node, extra)
        return self.default_daemon_argv(node, extra)

    def set_node_daemon(self, node: Node, daemon: DaemonArgv | None) -> None:
        """Run ``daemon`` on ``node`` from its next start (None: flanneld-py), as when a node is
        rolled over from flannel's flanneld to flanneld-py or back."""
        if daemon is None:
            self._node_daemons.pop(node.index, None)
        else:
            self._node_daemons[node.index] = daemon
        node.serves_cni = self.wait_for_cni_socket and daemon is None

    def default_daemon_argv(self, node: Node, extra: tuple[str, ...] = ()) -> list[str]:
        """flanneld-py on ``node``, pointed at the lab's etcd, files in the node's workdir."""
        return [
            sys.executable, "-m", "flanneld_py",
            f"--etcd-endpoints={self.etcd_endpoint}",
            *(f"--etcd-{flag}={path}" for flag, path in self._client_tls.items()),
            "--iface=eth0",
            f"--subnet-file={node.subnet_file}",
            f"--cni-socket={node.cni_socket}",
            f"--control-socket={os.path.join(node.workdir, 'control.sock')}",
            *self.daemon_args,
            *self.node_daemon_args.get(node.index, ()),
            *extra,
        ]

    def start_daemon(self, node: Node, *extra: str, wait: bool = True, env: dict[str, str] | None = None) -> None:
        argv = node.netns.argv(*self.daemon_argv(node, extra))
        with open(node.log_path, "ab") as log:
            node.daemon = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: Node, timeout: float = 30.0) -> None:
        """Ready = subnet file written and the CNI socket answering (where the node serves one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.daemon is not None and node.daemon.poll() is not None:
                raise RuntimeError(f"flanneld-py on {node.name} exited {node.daemon.returncode}:\n{node.log_text()[-3000:]}")
            if os.path.exists(node.subnet_file) and (
                    not node.serves_cni or socket_answers(node.cni_socket)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"flanneld-py on {node.name} not ready after {timeout}s:\n{node.log_text()[-3000:]}")

    def stop_daemon(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc, node.daemon = node.daemon, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def start_all(self, *extra: str) -> None:
        for node in self.nodes:
            self.start_daemon(node, *extra, wait=False)
        for node in self.nodes:
            self.wait_ready(node)

    # --- pods ------------------------------------------------------------------------

    def cni_config(self, node: Node) -> dict:  # type: ignore[type-arg]
        return {
            "cniVersion": "1.0.0",
            "name": f"cbr0-{self.tag}-{node.name}",
            "type": "flannel-py",
            "bridge": "cni0",
            "isDefaultGateway": True,
            "subnetFile": node.subnet_file,
            "daemonSocket": node.cni_socket,
            "dataDir": node.ipam_dir,
        }

    def cni(self, node: Node, command: str, pod_netns: Netns, container_id: str,
            ifname: str = "eth0", plugin: CniPlugin | None = None) -> subprocess.CompletedProcess[str]:
        """Run a CNI plugin for ``node`` as a runtime does (default: flannel-py and its config)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": pod_netns.path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": plugin.path if plugin else REFERENCE_CNI,
        }
        stdin = json.dumps(plugin.config(self, node) if plugin else self.cni_config(node))
        argv = list(plugin.argv) if plugin else cni_plugin_argv()
        return subprocess.run(node.netns.argv(*argv), input=stdin, env=env,
                              capture_output=True, text=True, timeout=30)

    def add_pod(self, node: Node, plugin: CniPlugin | None = None) -> Pod:
        """A pod namespace on ``node`` wired by flannel-py (or by ``plugin``)."""
        self._pod_seq += 1
        name = f"{node.name}p{self._pod_seq}"
        ns = self._ns(name)
        container_id = f"lab-{self.tag}-{name}"
        proc = self.cni(node, "ADD", ns, container_id, plugin=plugin)
        if proc.returncode != 0:
            raise RuntimeError(f"CNI ADD for {name} by {plugin.name if plugin else 'flannel-py'} failed: "
                               f"{proc.stdout} {proc.stderr}")
        result = json.loads(proc.stdout)
        ip = next((IPv4Interface(entry["address"]) for entry in result["ips"] if "." in entry["address"]), None)
        pod = Pod(name, node, ns, ip, result, container_id, plugin)
        node.pods.append(pod)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        proc = self.cni(pod.node, "DEL", pod.netns, pod.container_id, plugin=pod.plugin)
        if proc.returncode != 0:
            raise RuntimeError(f"CNI DEL for {pod.name} failed: {proc.stdout} {proc.stderr}")
        pod.node.pods.remove(pod)
        pod.netns.delete()

    def all_pods(self) -> list[Pod]:
        return [pod for node in self.nodes for pod in node.pods]
