"""Shared pieces of the end-to-end and fault tests (no tests here).

Everything runs inside the lab's namespaces: daemons get a control socket in
their node's workdir (the lab's default), traffic generators run in pod or node
namespaces, and whatever a helper starts it also stops (context managers), also
on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Network

from flanneld_py.lab.checks import ping_matrix, wait_until
from flanneld_py.lab.cluster import Cluster, Node, Pod
from flanneld_py.lab.netns import Netns
from flanneld_py.ops.control import query

PREFIX = "/coreos.com/network"


def control_socket(node: Node) -> str:
    return os.path.join(node.workdir, "control.sock")


def start(cluster: Cluster, *nodes: Node, extra: Sequence[str] = (), timeout: float = 30.0) -> None:
    """The one way tests start daemons: those of ``nodes`` at once (they race for leases as
    real nodes do), then wait until each is ready (``Cluster.wait_ready``: subnet file
    written and the CNI socket answering, which a stopped daemon's socket does not).

    Each daemon has its own control socket, ``control_socket(node)``, for ``status``.
    """
    for node in nodes:
        cluster.start_daemon(node, f"--control-socket={control_socket(node)}", *extra, wait=False)
    for node in nodes:
        cluster.wait_ready(node, timeout=timeout)


def status(node: Node) -> dict:  # type: ignore[type-arg]
    """The daemon's ``status --json`` answer; a daemon that does not answer fails the test with its log."""
    try:
        return query(control_socket(node), timeout=5.0)
    except OSError as exc:
        code = None if node.daemon is None else node.daemon.poll()
        raise AssertionError(f"{node.name}: no status ({exc}); daemon exit code {code}\n"
                             f"{node.log_text()[-4000:]}") from None


def ip_json(node: Node, *args: str) -> list[dict]:  # type: ignore[type-arg]
    """``ip -j ARGS`` inside the node, parsed."""
    return json.loads(node.netns.ip("-j", *args).stdout or "[]")


def routes6(node: Node, *where: str) -> dict[str, dict]:  # type: ignore[type-arg]
    """The node's IPv6 routes installed by flanneld (proto 252), by destination."""
    return {r["dst"]: r for r in ip_json(node, "-6", "route", "show", "proto", "252", *where)}


def subnet6(node: Node) -> IPv6Network:
    """The IPv6 subnet the node leased, from its subnet file."""
    found = node.subnet_env().ipv6_subnet
    assert found is not None
    return found


def routed_directly6(node: Node, peer: Node) -> bool:
    """``node`` reaches ``peer``'s IPv6 pods by a plain route via its underlay address (DirectRouting)."""
    route = routes6(node).get(str(subnet6(peer)))
    return route is not None and (route.get("gateway"), route.get("dev")) == (peer.address6, "eth0")


def peer_subnets(node: Node) -> set[str]:
    return {peer["subnet"] for peer in status(node)["peers"]}


def unreachable(pods: list[Pod], ipv6: bool, timeout: float) -> list[tuple[str, str]]:
    """Pod pairs whose ping still fails after ``timeout`` s of retries (a first ping may wait
    for the neighbour entry)."""
    failed: list[tuple[str, str]] = []

    def check() -> bool:
        failed[:] = [pair for pair, ok in ping_matrix(pods, ipv6=ipv6).items() if not ok]
        return not failed

    wait_until(check, timeout, interval=0.5)
    return failed


def alive(node: Node) -> bool:
    return node.daemon is not None and node.daemon.poll() is None


def log_count(node: Node, text: str) -> int:
    return node.log_text().count(text)


def subnet_key(subnet: object) -> str:
    network = str(subnet)
    return f"{PREFIX}/subnets/{network.replace('/', '-')}"


def etcd_lease_ids(cluster: Cluster) -> list[str]:
    assert cluster.etcd is not None
    out = cluster.etcd.ctl("lease", "list").stdout.splitlines()
    return [line.strip() for line in out[1:] if line.strip()]


# --- namespaces next to the nodes ----------------------------------------------------------


@contextlib.contextmanager
def underlay_host(cluster: Cluster, suffix: str, address: str) -> Iterator[Netns]:
    """A namespace on the lab's underlay switch with ``address``/24 (e.g. an intruder)."""
    ns = Netns.create(f"fp{cluster.tag}{suffix}")
    try:
        cluster.plug_into_underlay(ns, suffix, address)
        yield ns
    finally:
        ns.delete()


# --- traffic -------------------------------------------------------------------------------


@contextlib.contextmanager
def background(argv: list[str], stdin: bool = False) -> Iterator[subprocess.Popen[str]]:
    """A process that is killed (whole group) on the way out if it still runs; ``stdin``: a pipe to it."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@dataclass(frozen=True)
class PingStats:
    sent: int
    received: int
    interval: float
    longest_gap: int  # most consecutive echoes without a reply

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def lost_seconds(self) -> float:
        return self.lost * self.interval


# ICMP echo at a fixed rate from a raw socket; iputils ping slows down by itself
# while replies are missing, which would hide the very loss we measure. With seconds 0
# it sends until a line arrives on stdin; either way it then waits 1 s for late replies.
PINGER = r"""
import json, os, select, socket, struct, sys, time
from flanneld_py.core.packet import checksum
dst, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF

sent, got = 0, set()
start = time.monotonic()
end = start + seconds if seconds > 0 else float("inf")
readers = [sock] if seconds > 0 else [sock, sys.stdin]
next_send = start
print("started", flush=True)
while True:
    now = time.monotonic()
    if now >= end + 1.0:
        break
    if now >= next_send and now < end:
        body = struct.pack("!BBHHH", 8, 0, 0, ident, sent & 0xFFFF) + b"flanneld-py-faults!!"
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        sock.sendto(body, (dst, 0))
        sent += 1
        next_send = start + sent * interval
    wait = max(0.0, min(next_send if now < end else end + 1.0, end + 1.0) - time.monotonic())
    ready = select.select(readers, [], [], wait)[0]
    if sys.stdin in ready:
        sys.stdin.readline()
        readers, end = [sock], time.monotonic()
    if sock in ready:
        data = sock.recv(2048)
        offset = (data[0] & 15) * 4
        kind, _, _, rid, seq = struct.unpack_from("!BBHHH", data, offset)
        if kind == 0 and rid == ident:
            got.add(seq)
run, longest = 0, 0
for seq in range(sent):
    run = 0 if seq & 0xFFFF in got else run + 1
    longest = max(longest, run)
print(json.dumps({"sent": sent, "received": len(got), "longest_gap": longest}), flush=True)
"""


@contextlib.contextmanager
def continuous_ping(src: Pod, dst: Pod, seconds: float | None, interval: float = 0.01
                    ) -> Iterator[Callable[[], PingStats]]:
    """Echo requests every ``interval`` from ``src`` to ``dst`` for ``seconds`` (None: until
    ``result()`` is called); ``result()`` waits for the end."""
    argv = src.netns.argv(sys.executable, "-c", PINGER, str(dst.ip.ip), str(seconds or 0), str(interval))
    with background(argv, stdin=seconds is None) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"

        def result() -> PingStats:
            out, err = proc.communicate("stop\n" if seconds is None else None, timeout=(seconds or 0) + 30)
            assert proc.returncode == 0, err
            doc = json.loads(out.strip().splitlines()[-1])
            return PingStats(doc["sent"], doc["received"], interval, doc["longest_gap"])

        yield result


PACED_SENDER = r"""
import hashlib, random, socket, sys, time
host, port, total, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(7)
digest = hashlib.sha256()
chunk = 64 * 1024
count = total // chunk
with socket.create_connection((host, port), timeout=60) as conn:
    conn.settimeout(120)
    start = time.monotonic()
    for index in range(count):
        data = rng.randbytes(chunk)
        conn.sendall(data)
        digest.update(data)
        ahead = start + (index + 1) * seconds / count - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(digest.hexdigest(), count * chunk, flush=True)
"""


@contextlib.contextmanager
def paced_transfer(src: Pod, dst: Pod, nbytes: int, seconds: float, port: int = 5001
                   ) -> Iterator[Callable[[float], tuple[str, str]]]:
    """A TCP transfer spread over ``seconds``; ``finish(timeout)`` gives (sent, received) digests."""
    server_argv = dst.netns.argv(sys.executable, "-m", "flanneld_py.lab.tcpcheck", "serve", str(port))
    with background(server_argv) as server:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        sender_argv = src.netns.argv(sys.executable, "-c", PACED_SENDER, str(dst.ip.ip), str(port),
                                     str(nbytes), str(seconds))
        with background(sender_argv) as sender:
            def finish(timeout: float) -> tuple[str, str]:
                sent, err = sender.communicate(timeout=timeout)
                assert sender.returncode == 0, f"sender failed: {err}"
                received, _ = server.communicate(timeout=timeout)
                return sent.strip(), received.strip()

            yield finish


def reachable(src: Pod, dst: Pod) -> bool:
    return src.ping(str(dst.ip.ip), count=1, timeout=1)


def udp_snmp(netns: Netns) -> dict[str, int]:
    """The namespace's ``Udp:`` counters from /proc/net/snmp (InDatagrams, RcvbufErrors, ...)."""
    lines = [line.split() for line in netns.sh("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:])}


def dump(cluster: Cluster) -> str:
    """The end of every daemon's log, for assertion messages."""
    return "\n".join(f"--- {node.name}\n{node.log_text()[-2500:]}" for node in cluster.nodes)


def debug_dump(cluster: Cluster) -> None:
    """Print every daemon's log when FAULTS_DEBUG is set (to study a passing run)."""
    if os.environ.get("FAULTS_DEBUG"):
        print(dump(cluster))

