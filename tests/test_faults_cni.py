"""The CNI plugin under failure, end to end: the real shim, the real daemon.

In our design the shim (flanneld_py/cni/shim.py) only forwards the request over a
unix socket and the daemon does the work, so "killed during ADD" means two
different things that both really happen:

* the shim is killed (SIGKILL) at a random moment of ADD: before it connects,
  while it sends, while the daemon works or while it answers. The runtime sees
  a failed ADD and, as runtimes do, sends DEL for that container right away,
  possibly while the daemon is still busy with the ADD;
* the daemon is killed (SIGKILL) at a random moment of ADD; it is restarted,
  and the runtime sends DEL.

Three workers do this concurrently; every other ADD of theirs is left alone
and must succeed under the others' kills and DELs. Then some pods are
deleted, and a GC names the survivors. Afterwards nothing may be left but the
survivors' veths, address files and masquerade chains, every survivor holds
the address it was given and reaches its gateway, and no address is held
twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface

import pytest

from flanneld_py.cni.masq import chain_name
from flanneld_py.cni.models import Attachment
from flanneld_py.cni.wiring import host_veth_name
from flanneld_py.lab.cluster import Cluster, Node, cni_plugin_argv
from flanneld_py.lab.netns import Netns

from flanneld_py.lab.checks import time_until
from flanneld_py.unixsock import socket_answers
from lab_helpers import start

pytestmark = [pytest.mark.netns, pytest.mark.slow]

WORKERS = 3
SHIM_KILLS_PER_WORKER = 8
DAEMON_KILLS = 5
RACES = 40


@dataclass
class PodNs:
    name: str
    netns: Netns
    container_id: str
    result: dict | None = None  # type: ignore[type-arg]

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, "eth0")


class Runtime:
    """Plays the container runtime: runs the shim with CNI_* and the config, kills it when told."""

    def __init__(self, lab: Cluster, node: Node) -> None:
        self.lab = lab
        self.node = node
        self.config = lab.cni_config(node)
        self.namespaces: list[Netns] = []
        self.lock = threading.Lock()
        self.seq = 0

    def new_pod(self, prefix: str) -> PodNs:
        with self.lock:
            self.seq += 1
            name = f"fp{self.lab.tag}{prefix}{self.seq}"
        ns = Netns.create(name)
        with self.lock:
            self.namespaces.append(ns)
        return PodNs(name, ns, f"faults-{self.lab.tag}-{name}")

    def env(self, command: str, pod: PodNs) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": pod.container_id, "CNI_NETNS": pod.netns.path, "CNI_IFNAME": "eth0",
                "CNI_PATH": "/usr/lib/cni"}

    def run(self, command: str, pod: PodNs | None, config: dict | None = None,  # type: ignore[type-arg]
            kill_after: float | None = None) -> tuple[int | None, str]:
        """Exit code (None: killed) and stdout."""
        env = self.env(command, pod) if pod is not None else {
            "PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni"}
        proc = subprocess.Popen(self.node.netns.argv(*cni_plugin_argv()), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                start_new_session=True)
        if kill_after is not None:
            timer = threading.Timer(kill_after, lambda: _killpg(proc))
            timer.start()
        try:
            try:
                out, _ = proc.communicate(json.dumps(config or self.config), timeout=60)
            except BrokenPipeError:  # killed before it read its config
                out, _ = proc.communicate(timeout=60)
        finally:
            if kill_after is not None:
                timer.cancel()
        if proc.returncode is not None and proc.returncode < 0:
            return None, out
        return proc.returncode, out

    def run_until_answered(self, command: str, pod: PodNs | None, config: dict | None = None,  # type: ignore[type-arg]
                           timeout: float = 20) -> tuple[int | None, str]:
        """As a runtime does: try again while the plugin says 11 (try again later, e.g. the daemon restarts)."""
        deadline = time.monotonic() + timeout
        while True:
            code, out = self.run(command, pod, config)
            if code == 0 or time.monotonic() > deadline or '"code":11' not in out.replace(" ", ""):
                return code, out
            time.sleep(0.2)

    def request(self, command: str, pod: PodNs) -> bytes:
        """What the shim sends the daemon (see flanneld_py/cni/shim.py)."""
        env = {k: v for k, v in self.env(command, pod).items() if k.startswith("CNI_")}
        return json.dumps({"command": command, "env": env, "config": self.config}).encode()

    def close(self) -> None:
        for ns in self.namespaces:
            ns.delete()


def abandon(path: str, request: bytes) -> None:
    """Send a request and go away without reading the answer, as a shim killed right then."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)


def ask(path: str, request: bytes) -> dict:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def _killpg(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _node_veths(node: Node) -> set[str]:
    links = json.loads(node.netns.ip("-j", "link", "show", "type", "veth").stdout or "[]")
    return {link["ifname"] for link in links if link["ifname"] != "eth0"}  # eth0: the node's underlay


def _ipam_files(node: Node, network: str) -> dict[str, str]:
    directory = os.path.join(node.ipam_dir, network)
    out = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name[0].isdigit():
            with contextlib.suppress(FileNotFoundError):  # freed meanwhile
                with open(os.path.join(directory, name)) as handle:
                    out[name] = handle.read().split()[0]
    return out


def _pod_links(netns: Netns) -> list[str]:
    return [link["ifname"] for link in json.loads(netns.ip("-j", "link", "show").stdout or "[]")]


def _chains(node: Node) -> set[str]:
    rules = node.netns.sh("iptables", "-t", "nat", "-S").stdout.splitlines()
    return {line.split()[1] for line in rules if line.startswith("-N FLP-")}


def _pod_addresses(pod: PodNs) -> list[str]:
    links = json.loads(pod.netns.ip("-j", "addr", "show").stdout or "[]")
    return [f"{a['local']}/{a['prefixlen']}" for link in links if link["ifname"] != "lo"
            for a in link.get("addr_info", []) if a.get("family") == "inet"]


def test_cni_killed_during_add_leaks_nothing_and_never_hands_out_an_address_twice():
    with Cluster(nodes=1) as lab:
        node = lab.nodes[0]
        start(lab, node)
        runtime = Runtime(lab, node)
        network = runtime.config["name"]
        survivors: list[PodNs] = []
        outcomes: dict[str, int] = {"added": 0, "added under load": 0, "killed shim": 0, "killed daemon": 0,
                                    "abandoned": 0}
        failures: list[str] = []
        try:
            def worker(index: int) -> None:
                rng = random.Random(index)
                try:
                    for attempt in range(2 * SHIM_KILLS_PER_WORKER):
                        pod = runtime.new_pod(f"w{index}p")
                        # every other ADD is left alone: under the others' kills and DELs it must succeed.
                        # The rest: the shim needs ~30-80 ms to start, send and get its answer; kill anywhere
                        # in there (one that finishes first simply succeeds)
                        killed = attempt % 2 == 0
                        code, out = runtime.run("ADD", pod, kill_after=rng.uniform(0.0, 0.12) if killed else None)
                        if code == 0:
                            pod.result = json.loads(out)
                            with runtime.lock:
                                survivors.append(pod)
                                outcomes["added"] += 1
                                outcomes["added under load"] += not killed
                            continue
                        if code is not None:  # not killed: the ADD itself failed
                            failures.append(f"ADD {'(shim killed) ' if killed else ''}failed with {code}: {out}")
                        else:
                            with runtime.lock:
                                outcomes["killed shim"] += 1
                        # a failed ADD: the runtime cleans up with DEL at once
                        code, out = runtime.run_until_answered("DEL", pod)
                        if code != 0:
                            failures.append(f"DEL after a killed ADD failed: {out}")
                except Exception as exc:  # noqa: BLE001 - reported by the main thread
                    failures.append(repr(exc))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            assert not failures, failures
            # every ADD that was not killed succeeded: half of the workers' ADDs, all under load
            assert outcomes["added under load"] == WORKERS * SHIM_KILLS_PER_WORKER, outcomes
            assert outcomes["killed shim"] > 0, f"no shim was killed: the kill times miss the ADD ({outcomes})"

            # the daemon killed during ADD, restarted, then the runtime's DEL
            rng = random.Random(99)
            for _ in range(DAEMON_KILLS):
                pod = runtime.new_pod("d")
                proc = subprocess.Popen(runtime.node.netns.argv(*cni_plugin_argv()), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=runtime.env("ADD", pod), start_new_session=True)
                killer = threading.Timer(rng.uniform(0.0, 0.08), lambda: lab.stop_daemon(node, signal.SIGKILL))
                killer.start()
                out, _ = proc.communicate(json.dumps(runtime.config), timeout=60)
                killer.join()
                start(lab, node)
                if proc.returncode == 0:
                    pod.result = json.loads(out)
                    survivors.append(pod)
                    outcomes["added"] += 1
                    continue
                outcomes["killed daemon"] += 1
                code, out = runtime.run_until_answered("DEL", pod)
                assert code == 0, out

            # the race behind a killed shim, made tight: an ADD abandoned right after it was sent,
            # and the runtime's DEL for it 0-15 ms later, while the daemon may still be adding
            assert time_until(lambda: socket_answers(node.cni_socket), 20) is not None, node.log_text()[-3000:]
            abandoned: list[PodNs] = []
            for index in range(RACES):
                pod = runtime.new_pod("r")
                abandon(node.cni_socket, runtime.request("ADD", pod))
                time.sleep(rng.uniform(0.0, 0.015))
                answer = ask(node.cni_socket, runtime.request("DEL", pod))  # as the shim would forward it
                assert answer["exit"] == 0, answer
                outcomes["abandoned"] += 1
                abandoned.append(pod)
            # DEL alone, before any GC, must undo every abandoned ADD (DEL answers before its
            # removal runs, and an ADD still at work is undone once its answer cannot be delivered)
            def leftovers() -> dict[str, object]:
                owners = {p.container_id for p in abandoned}
                return {
                    "interfaces": [(p.name, _pod_links(p.netns)) for p in abandoned if _pod_links(p.netns) != ["lo"]],
                    "address files": {ip: who for ip, who in _ipam_files(node, network).items() if who in owners},
                    "veths": sorted(_node_veths(node) & {host_veth_name(p.attachment) for p in abandoned}),
                }

            assert time_until(lambda: not any(leftovers().values()), 30) is not None, (
                f"an ADD that ran on after its DEL left things behind: {leftovers()}\n{node.log_text()[-3000:]}")

            # some pods go away normally; a GC names the rest
            rng.shuffle(survivors)
            for pod in survivors[: len(survivors) // 3]:
                code, out = runtime.run_until_answered("DEL", pod)
                assert code == 0, out
            survivors = survivors[len(survivors) // 3:]
            gc_config = {**runtime.config, "cniVersion": "1.1.0",
                         "cni.dev/valid-attachments": [{"containerID": p.container_id, "ifname": "eth0"}
                                                       for p in survivors]}
            code, out = runtime.run_until_answered("GC", None, config=gc_config)
            assert code == 0, out
            assert len(survivors) >= WORKERS * SHIM_KILLS_PER_WORKER * 2 // 3, "the leak checks need survivors"

            # nothing left but the survivors' (DEL and GC answer before their queued removals end)
            expected_veths = {host_veth_name(p.attachment) for p in survivors}
            held = {p.container_id: str(IPv4Interface(p.result["ips"][0]["address"]).ip)  # type: ignore[index]
                    for p in survivors}
            expected_chains = {chain_name(network, p.attachment) for p in survivors}
            assert time_until(lambda: _node_veths(node) == expected_veths and _chains(node) == expected_chains
                              and sorted(_ipam_files(node, network).values()) == sorted(held), 30) is not None
            assert _node_veths(node) == expected_veths
            files = _ipam_files(node, network)
            assert sorted(files.values()) == sorted(held), f"address files {files} for survivors {held}"
            assert len(set(held.values())) == len(held), f"an address was handed out twice: {held}"
            for address, owner in files.items():
                assert held[owner] == address
            assert _chains(node) == expected_chains
            for pod in survivors:  # each survivor holds its address and reaches its gateway through its veth
                assert _pod_addresses(pod) == [pod.result["ips"][0]["address"]]  # type: ignore[index]
                gateway = pod.result["ips"][0]["gateway"]  # type: ignore[index]
                assert pod.netns.sh("ping", "-c", "1", "-W", "5", gateway, check=False).returncode == 0, pod.name
            dead = [ns for ns in runtime.namespaces if ns.name not in {p.name for p in survivors}]
            for ns in dead:
                assert _pod_links(ns) == ["lo"], f"{ns.name} still has {_pod_links(ns)}"
            assert node.daemon is not None and node.daemon.poll() is None
            print(f"\nFIGURE cni: {outcomes['killed shim']} ADDs with the shim killed, {outcomes['killed daemon']} "
                  f"with the daemon killed, {outcomes['abandoned']} abandoned with DEL 0-15 ms behind, "
                  f"{outcomes['added']} completed ({outcomes['added under load']} of them not killed, "
                  f"{WORKERS} concurrent workers); after "
                  f"DEL and GC: {len(survivors)} survivors, 0 leaked veths, address files or chains, 0 duplicates")
        finally:
            runtime.close()
