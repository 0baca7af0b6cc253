"""Operations against real daemons in the namespace lab: metrics, status, trace, ip-masq, health.

One module-scoped cluster: two nodes whose daemons serve /healthz and /metrics
on 127.0.0.1 inside their namespace, a control socket in their work dir, and
``--ip-masq``; a pod on each node (the real CNI plugin); and an "outside"
host on the underlay (198.51.100.200). The
lease TTL is short so that the etcd staleness window is 5 s. The health test
stops etcd, so it runs last.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Network

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flanneld_py.lab.checks import wait_until
from flanneld_py.lab.cluster import Cluster, Node, Pod
from flanneld_py.lab.netns import Netns
from flanneld_py.ops.ipmasq import masq_rules, restore_lines
from lab_helpers import control_socket, start, underlay_host

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

PORT = 8471
OUTSIDE = "198.51.100.200"
LEASE_TTL = "20s"  # -> a 5 s etcd staleness window

RECV = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',int(sys.argv[1])))\n"
    "s.settimeout(10); print('ready',flush=True)\n"
    "data,addr=s.recvfrom(100); print(addr[0],flush=True)\n"
)
SEND = (  # argv: destination, port, [payload in hex]
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.sendto(bytes.fromhex(sys.argv[3]) if len(sys.argv)>3 else b'hello',(sys.argv[1],int(sys.argv[2])))\n"
)


@dataclass
class Lab:
    cluster: Cluster
    outside: Netns
    pods: list[Pod]

    @property
    def n1(self) -> Node:
        return self.cluster.nodes[0]

    @property
    def n2(self) -> Node:
        return self.cluster.nodes[1]


def flannel0_ip(node: Node) -> str:
    return str(node.subnet_env().subnet.network_address)


@pytest.fixture(scope="module")
def lab():
    with Cluster(nodes=2) as cluster:
        start(cluster, *cluster.nodes, extra=("--healthz-ip=127.0.0.1", f"--healthz-port={PORT}", "--ip-masq",
                                              f"--subnet-lease-ttl={LEASE_TTL}"))
        with underlay_host(cluster, "out", OUTSIDE) as outside:
            yield Lab(cluster, outside, [cluster.add_pod(node) for node in cluster.nodes])


def http_get(node: Node, path: str) -> tuple[int, str]:
    proc = node.netns.sh("curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{PORT}{path}",
                         check=False, timeout=15)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = http_get(node, "/metrics")
    assert code == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def peer_labels(peer: Node) -> tuple[tuple[str, str], ...]:
    return (("peer_ip", peer.address), ("peer_subnet", str(peer.subnet_env().subnet)))


def ping(node: Node, target: str, count: int) -> None:
    node.netns.sh("ping", "-c", str(count), "-i", "0.2", "-W", "2", target, timeout=30)


def source_seen(receiver: Netns, sender: Pod, destination: str, port: int = 9999) -> str:
    """Send UDP from pod ``sender`` to ``destination``; the source address ``receiver`` saw."""
    listener = receiver.popen(sys.executable, "-c", RECV, str(port), stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        for _ in range(3):
            sender.sh(sys.executable, "-c", SEND, destination, str(port))
            if wait_until(lambda: listener.poll() is not None, 1.0, 0.05):
                break
        out, _ = listener.communicate(timeout=15)
        return out.strip()
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


# --- metrics and status ----------------------------------------------------------------


def test_metrics_counters_rise_by_the_packets_sent(lab):
    n1, n2 = lab.n1, lab.n2
    before1, before2 = metrics(n1), metrics(n2)
    ping(n1, flannel0_ip(n2), count=5)
    after1, after2 = metrics(n1), metrics(n2)

    def rise(before, after, name, peer):
        key = (name, peer_labels(peer))
        return after[key] - before.get(key, 0)

    assert rise(before1, after1, "flanneld_peer_sent_packets_total", n2) == 5
    assert rise(before1, after1, "flanneld_peer_received_packets_total", n2) == 5
    assert rise(before1, after1, "flanneld_peer_sent_bytes_total", n2) == 5 * 84
    assert rise(before2, after2, "flanneld_peer_received_packets_total", n1) == 5
    assert rise(before2, after2, "flanneld_peer_sent_packets_total", n1) == 5
    assert after1[("flanneld_routes", ())] == 1
    assert after1[("flanneld_ready", ())] == 1
    assert after1[("flanneld_batch_size_packets_bucket", (("direction", "tun"), ("le", "+Inf")))] >= 5
    info = [key for key in after1 if key[0] == "flanneld_info"]
    assert info and ("backend", "udp") in info[0][1]
    expiry = after1[("flanneld_lease_expiry_timestamp_seconds", ())]
    assert time.time() < expiry <= time.time() + 20


def test_status_reads_the_running_daemon(lab):
    n1, n2 = lab.n1, lab.n2
    ping(n1, flannel0_ip(n2), count=2)
    proc = subprocess.run([sys.executable, "-m", "flanneld_py", "status", f"--control-socket={control_socket(n1)}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"lease     {n1.subnet_env().subnet} " in text
    assert "health    ok" in text and "backend udp" in text and "ip-masq   on" in text
    row = next(line for line in text.splitlines() if line.startswith(str(n2.subnet_env().subnet)))
    assert n2.address in row and row.count("s ago") == 2
    proc = subprocess.run([sys.executable, "-m", "flanneld_py", "status", "--json",
                           f"--control-socket={control_socket(n1)}"], capture_output=True, text=True, timeout=30)
    doc = json.loads(proc.stdout)
    assert doc["lease"]["subnet"] == str(n1.subnet_env().subnet)
    assert doc["peers"][0]["tx_packets"] >= 2 and doc["peers"][0]["last_rx_seconds_ago"] < 10
    assert doc["health"]["code"] == 200


# --- trace -----------------------------------------------------------------------------------


def run_trace(node: Node, count: int, *flags: str, traffic) -> list[str]:
    proc = node.netns.popen(sys.executable, "-m", "flanneld_py", "trace", "--iface", "eth0", "--count", str(count),
                            "--timeout", "20", *flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        banner = proc.stderr.readline() if ready else ""
        assert banner.startswith("tracing udp port 8285 on eth0"), banner + (proc.stderr.read() if proc.poll() else "")
        traffic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out.splitlines()


def test_trace_shows_headers_peers_and_verdicts(lab):
    n1, n2 = lab.n1, lab.n2
    a, b = str(n1.subnet_env().subnet), str(n2.subnet_env().subnet)
    from scapy.layers.inet import ICMP, IP

    spoofed = bytes(IP(src=flannel0_ip(n2), dst=flannel0_ip(n1)) / ICMP()).hex()

    def traffic() -> None:
        ping(n1, flannel0_ip(n2), count=2)
        lab.outside.sh(sys.executable, "-c", SEND, n1.address, "8285", spoofed)

    lines = run_trace(n1, 5, f"--control-socket={control_socket(n1)}", traffic=traffic)
    assert len(lines) == 5, lines
    out = [line for line in lines if f"{n1.address}:8285 > {n2.address}:8285" in line]
    back = [line for line in lines if f"{n2.address}:8285 > {n1.address}:8285" in line]
    assert len(out) == 2 and len(back) == 2, lines
    for line in out:
        assert f"| {flannel0_ip(n1)} > {flannel0_ip(n2)} icmp echo-request len=84 ttl=63 |" in line
        assert line.endswith(f"| peer {a} > {b} | deliver into {b}")
    for line in back:
        assert "icmp echo-reply" in line and line.endswith(f"| peer {b} > {a} | deliver into {a}")
    assert lines[-1].endswith(f"| peer ? > {a} | drop: not_a_peer") and f"{OUTSIDE}:" in lines[-1]


def test_trace_with_leases_from_etcd(lab):
    n1, n2 = lab.n1, lab.n2
    lines = run_trace(n1, 2, f"--etcd-endpoints={lab.cluster.etcd_endpoint}",
                      traffic=lambda: ping(n1, flannel0_ip(n2), count=1))
    assert len(lines) == 2 and all("| deliver into 10.244." in line for line in lines), lines


# --- ip-masq -----------------------------------------------------------------------------------


def test_subnet_file_says_ipmasq(lab):
    assert all(node.subnet_env().ipmasq for node in lab.cluster.nodes)


def test_traffic_to_the_outside_leaves_with_the_node_address(lab):
    assert source_seen(lab.outside, lab.pods[0], OUTSIDE) == lab.n1.address


def test_traffic_between_pods_keeps_pod_addresses(lab):
    sender, receiver = lab.pods
    assert source_seen(receiver.netns, sender, str(receiver.ip.ip)) == str(sender.ip.ip)


def test_rules_deleted_by_hand_come_back(lab):
    n1 = lab.n1
    env = n1.subnet_env()
    rules = masq_rules(IPv4Network(env.network), env.subnet, random_fully=True)
    jump, masquerade = rules[0], rules[5]
    for rule in (masquerade, jump):
        n1.netns.sh("iptables", "-t", "nat", "-D", rule.chain, *rule.spec)

    def present(rule) -> bool:
        return n1.netns.sh("iptables", "-t", "nat", "-C", rule.chain, *rule.spec, check=False).returncode == 0

    assert not present(jump)
    # the daemon re-checks every 5 s; 30 s is a generous deadline for that, not a speed claim
    assert wait_until(lambda: present(jump) and present(masquerade), timeout=30), "rules not restored"
    listed = n1.netns.sh("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout.splitlines()[1:]
    assert listed == restore_lines(rules[1:], [False] * 6)["nat"]  # all back, in flannel's order
    assert metrics(n1)[("flanneld_ipmasq_repairs_total", ())] >= 1
    assert source_seen(lab.outside, lab.pods[0], OUTSIDE) == n1.address


# --- health: stops etcd, so it runs last ------------------------------------------------------


def test_health_follows_etcd(lab):
    n1 = lab.n1
    code, body = http_get(n1, "/healthz")
    assert code == 200 and '"status": "ok"' in body
    assert http_get(n1, "/nope")[0] == 404
    etcd = lab.cluster.etcd
    assert etcd is not None
    etcd.stop()
    answers: list[tuple[int, str]] = []
    try:
        assert wait_until(lambda: answers.append(http_get(n1, "/healthz")) or answers[-1][0] == 503, timeout=15), \
            answers[-1]
        body = json.loads(answers[-1][1])
        assert body["failed"] == "etcd" and body["reason"].startswith("etcd has not answered for"), body
        assert "(limit 5s)" in body["reason"]
        # the health monitor notices on its next pass and logs it
        assert wait_until(lambda: "health: unhealthy: etcd has not answered" in n1.log_text(), timeout=30)
    finally:
        etcd.start()
    assert wait_until(lambda: http_get(n1, "/healthz")[0] == 200, timeout=20), http_get(n1, "/healthz")
    assert metrics(n1)[("flanneld_etcd_request_errors_total", ())] > 0
    assert wait_until(lambda: "health: ok again" in n1.log_text(), timeout=30)
