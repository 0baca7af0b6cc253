"""A CNI lab: a node namespace running the CNI server, and the shim driven as a runtime drives it.

The runtime's part is played exactly: the plugin file is executed (its
shebang and all) inside the node namespace, with CNI_* in the environment
and the network config on stdin. Nothing here touches the host's namespace.
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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from flanneld_py.cni.models import Attachment
from flanneld_py.cni.wiring import host_veth_name
from flanneld_py.core.subnetenv import SubnetEnv
from flanneld_py.install import python_shim
from flanneld_py.lab.cluster import cni_plugin_argv
from flanneld_py.lab.netns import Netns, unique_tag

REPO = Path(__file__).resolve().parents[1]
PYTHON_SHIM = python_shim()
PLUGIN = cni_plugin_argv()  # the compiled shim when built (FLANNEL_PY_PLUGIN=python: the Python one)
CLUSTER = IPv4Network("10.244.0.0/16")
CLUSTER6 = IPv6Network("fd00:10:244::/56")
REFERENCE_PLUGINS = Path("/usr/lib/cni")


@dataclass
class PluginRun:
    """One plugin execution as the runtime saw it."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def ok(self) -> Any:
        assert self.code == 0, f"plugin failed ({self.code}): {self.stdout} {self.stderr}"
        return self.output

    def error(self) -> dict[str, Any]:
        assert self.code != 0, f"plugin unexpectedly succeeded: {self.stdout}"
        out = self.output
        assert isinstance(out, dict) and isinstance(out.get("code"), int) and isinstance(out.get("msg"), str), out
        return out


def run_plugin(node: Netns, argv: list[str], env: Mapping[str, str], stdin: str | bytes,
               timeout: float = 60) -> PluginRun:
    """Execute a CNI plugin in ``node`` the way a runtime does: env vars plus config on stdin."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    proc = subprocess.run(node.argv(*argv), input=data, capture_output=True, env=full_env, timeout=timeout)
    return PluginRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


class CniServerProcess:
    """``python3 -m flanneld_py.cni.server`` inside the node namespace."""

    def __init__(self, node: Netns, socket_path: str, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.node = node
        self.socket_path = socket_path
        self.extra_args = extra_args
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = self.node.popen(sys.executable, "-m", "flanneld_py.cni.server", "--socket", self.socket_path,
                                        *self.extra_args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"CNI server exited: {self.log_path.read_text()}")
            if "listening on" in self.log_path.read_text()[offset:]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"CNI server did not start: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@dataclass
class CniNode:
    """A node namespace with the CNI server in it, shared by the tests of one module."""

    tag: str
    node: Netns
    workdir: Path
    server: CniServerProcess

    @classmethod
    def create(cls, *server_args: str) -> CniNode:
        tag = unique_tag()
        workdir = Path(tempfile.mkdtemp(prefix=f"cnit-{tag}-"))
        node = Netns.create(f"cnit-{tag}-node")
        lab = cls(tag, node, workdir, CniServerProcess(node, str(workdir / "cni.sock"), workdir, server_args))
        try:
            lab.server.start()
        except BaseException:
            lab.close()
            raise
        return lab

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            self.node.delete()
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class CniNetwork:
    """One test's network on the node: its own bridge, subnet file, address store and pods."""

    lab: CniNode
    index: int
    subnet: IPv4Network | None  # None: an IPv6-only node
    mtu: int = 1472
    ipmasq: bool = True
    subnet6: IPv6Network | None = None
    pods: list[Netns] = field(default_factory=list)

    @classmethod
    def create(cls, lab: CniNode, index: int, prefixlen: int = 24, *, ipv4: bool = True, ipv6: bool = False,
               **kwargs: Any) -> CniNetwork:
        """Network ``index`` with the node subnets 10.244.<index>.0/<prefixlen> and (``ipv6``)
        fd00:10:244:<index>::/64, and its subnet file."""
        net = cls(lab, index, IPv4Network(f"10.244.{index}.0/{prefixlen}") if ipv4 else None,
                  subnet6=IPv6Network(f"fd00:10:244:{index:x}::/64") if ipv6 else None, **kwargs)
        net.write_subnet_file()
        return net

    @property
    def name(self) -> str:
        return f"net{self.index}"

    @property
    def bridge(self) -> str:
        return f"cnib{self.index}"

    @property
    def dir(self) -> Path:
        return self.lab.workdir / self.name

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def data_dir(self) -> Path:
        return self.dir / "ipam"

    def write_subnet_file(self) -> SubnetEnv:
        env = SubnetEnv(CLUSTER if self.subnet else None, self.subnet, self.mtu, self.ipmasq,
                        CLUSTER6 if self.subnet6 else None, self.subnet6)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.subnet_file.write_text(env.render())
        return env

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": self.name,
            "type": "flannel-py",
            "bridge": self.bridge,
            "isDefaultGateway": True,
            "hairpinMode": True,
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir),
            "daemonSocket": self.lab.server.socket_path,
        }
        conf.update(extra)
        return conf

    def pod(self, label: str) -> Netns:
        ns = Netns.create(f"cnit-{self.lab.tag}-{self.index}{label}")
        self.pods.append(ns)
        return ns

    def invoke(self, command: str, conf: dict[str, Any] | str | bytes, *, container: str = "",
               netns: Netns | str | None = None, ifname: str = "eth0",
               env: Mapping[str, str] | None = None) -> PluginRun:
        """Run the shim for ``command``; ``env`` entries override (an empty value drops the variable)."""
        variables = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
                     "CNI_PATH": str(REFERENCE_PLUGINS),
                     "CNI_NETNS": netns.path if isinstance(netns, Netns) else (netns or "")}
        variables.update(env or {})
        variables = {k: v for k, v in variables.items() if v}
        stdin = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        return run_plugin(self.lab.node, PLUGIN, variables, stdin)

    def add(self, pod: Netns, container: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        result = self.invoke("ADD", self.conf(version, **extra), container=container, netns=pod).ok()
        assert isinstance(result, dict)
        return result

    def delete(self, pod: Netns | str | None, container: str, **extra: Any) -> None:
        """DEL, then wait until the pod is really gone: the server removes it after answering."""
        out = self.invoke("DEL", self.conf(**extra), container=container, netns=pod).ok()
        assert out is None
        self.wait_removed(container)

    def wait_removed(self, container: str, ifname: str = "eth0", timeout: float = 10) -> None:
        host = host_veth_name(Attachment(container, ifname))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owners = [content.split("\n")[0] for content in self.reservations().values()]
            if container not in owners and host not in self.host_veths():
                return
            time.sleep(0.01)
        raise AssertionError(f"{container} still has {host} or an address {timeout} s after DEL")

    def reservations(self) -> dict[str, str]:
        """Address files in the store (name -> content)."""
        d = self.data_dir / self.name
        if not d.is_dir():
            return {}
        out = {}
        for path in d.iterdir():
            if path.name[0].isdigit() or ":" in path.name:  # IPv4 or IPv6 addresses
                try:
                    out[path.name] = path.read_text()
                except FileNotFoundError:  # released meanwhile
                    pass
        return out

    def host_veths(self) -> list[str]:
        links = json.loads(self.lab.node.ip("-j", "link", "show", "type", "veth").stdout or "[]")
        return [link["ifname"] for link in links]

    def close(self) -> None:
        for pod in self.pods:
            pod.delete()
        self._wait_for_ports_gone()
        self.lab.node.ip("link", "del", self.bridge, check=False)

    def _wait_for_ports_gone(self, timeout: float = 10.0) -> None:
        """The kernel tears a deleted pod namespace down later, and its veth's host end with it. A
        port still on the bridge would make the module's next test, on the same node with the same
        container ID (so the same host veth name), find that pod "already attached"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = self.lab.node.ip("-j", "link", "show", "master", self.bridge, check=False)
            if ports.returncode != 0 or not json.loads(ports.stdout or "[]"):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.bridge} still has ports {timeout:g}s after its pods' namespaces were deleted")


def pod_state(pod: Netns, ifname: str = "eth0") -> dict[str, Any]:
    """The interface, its addresses and the main table's routes, as ``ip -j`` reports them.

    ``addresses``/``routes``: IPv4; ``addresses6``/``routes6``: IPv6 (link-local addresses left out).
    """
    links = json.loads(pod.ip("-j", "addr", "show", "dev", ifname).stdout)
    routes = json.loads(pod.ip("-j", "-4", "route", "show").stdout)
    routes6 = json.loads(pod.ip("-j", "-6", "route", "show").stdout)
    (link,) = links
    return {
        "mtu": link["mtu"],
        "mac": link["address"],
        "up": "UP" in link["flags"],
        "index": link["ifindex"],
        "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"],
        "addresses6": [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]
                       if a["family"] == "inet6" and a.get("scope") != "link"],
        "tentative6": [a["local"] for a in link["addr_info"] if a.get("tentative")],
        "routes": {(r["dst"], r.get("gateway")) for r in routes},
        "routes6": {(r["dst"], r.get("gateway")) for r in routes6},
    }


def with_prev_result(conf: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "prevResult": result}


@contextmanager
def cni_network(lab: CniNode, index: int, **kwargs: Any) -> Iterator[CniNetwork]:
    """A :class:`CniNetwork` removed again (pods, bridge) when the block ends."""
    net = CniNetwork.create(lab, index, **kwargs)
    try:
        yield net
    finally:
        net.close()

