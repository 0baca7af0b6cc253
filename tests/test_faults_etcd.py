"""etcd failing under running daemons: a 30 s outage of the only member, and
members of a 3-member cluster failing one after the other: the member the
daemons talk to frozen (a silent death), the leader stopped, and a member cut
off from the others while its clients still reach it.

Real etcd, real daemons, real pods and traffic in namespaces; nothing mocked.
The figures these tests print (``FIGURE ...``) go into the README's
reliability section.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from flanneld_py.lab.cluster import Cluster
from flanneld_py.lab.etcd import EtcdMember, etcdctl_argv
from flanneld_py.lab.netns import Netns, run

from flanneld_py.lab.checks import time_until
from lab_helpers import (
    PREFIX,
    alive,
    debug_dump,
    dump,
    paced_transfer,
    peer_subnets,
    reachable,
    start,
    status,
    subnet_key,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

OUTAGE = 30.0


def test_etcd_outage_keeps_pods_talking_and_daemons_reconnect():
    with Cluster(nodes=3) as lab:
        n1, n2, n3 = lab.nodes
        start(lab, n1, n2)
        a, b = lab.add_pod(n1), lab.add_pod(n2)
        assert time_until(lambda: reachable(a, b), 10) is not None, dump(lab)
        routes_before = {n.name: n.routes() for n in (n1, n2)}
        peers_before = {n.name: peer_subnets(n) for n in (n1, n2)}
        assert all(len(p) == 1 for p in peers_before.values()), peers_before

        # ~24 MB over 42 s: the transfer runs before, across and after the outage.
        with paced_transfer(a, b, 24 << 20, seconds=42) as finish:
            time.sleep(4)
            assert lab.etcd is not None
            lab.etcd.stop()
            stopped = time.monotonic()
            withdrawn = []
            while time.monotonic() - stopped < OUTAGE:
                for node in (n1, n2):
                    assert alive(node), f"{node.name} died while etcd was down:\n{node.log_text()[-3000:]}"
                    if peer_subnets(node) != peers_before[node.name] or node.routes() != routes_before[node.name]:
                        withdrawn.append(node.name)
                time.sleep(1)
            lab.etcd.start()
            returned = time.monotonic()
            reconnect = {}
            for node in (n1, n2):
                # a daemon is back when its watch resumed (it logs so) and etcd answers it again
                took = time_until(lambda: "etcd is back; resuming the watch" in node.log_text(), 30)
                assert took is not None, f"{node.name} did not resume its watch:\n{node.log_text()[-3000:]}"
                reconnect[node.name] = time.monotonic() - returned
            sent, received = finish(90)

        assert sent == received and sent, f"transfer corrupted or cut: sent {sent!r}, received {received!r}"
        assert not withdrawn, f"routes or peers withdrawn during the outage on {withdrawn}"
        for node in (n1, n2):
            assert "lost etcd" in node.log_text()
            assert "peer removed" not in node.log_text()
            assert status(node)["etcd"]["last_answer_seconds_ago"] is not None

        # a node that joins now is reachable from everyone (how soon, including its pod's CNI ADD,
        # is printed as a figure, not asserted: a loaded machine only makes it later)
        start(lab, n3)
        ready = time.monotonic()
        c = lab.add_pod(n3)
        pairs = [(a, c), (b, c), (c, a), (c, b)]
        joined = time_until(lambda: all(reachable(x, y) for x, y in pairs), 60, interval=0.05)
        join_seconds = time.monotonic() - ready
        assert joined is not None, f"n3 not reachable from every pod\n{dump(lab)}"
        print(f"\nFIGURE etcd-outage: {OUTAGE:.0f}s outage, transfer intact ({sent.split()[1]} bytes), "
              f"0 routes withdrawn, watch resumed {max(reconnect.values()):.1f}s after etcd returned "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in reconnect.items())}), "
              f"new node reachable from all {join_seconds:.2f}s after it was ready")
        debug_dump(lab)


# --- a 3-member etcd cluster ----------------------------------------------------------------

MEMBER_IPS = ["198.51.100.251", "198.51.100.252", "198.51.100.253"]


class EtcdCluster:
    """Three etcd members, each in its own namespace on the lab's underlay switch.

    ``frozen`` lists members that etcdctl must not use (stopped with SIGSTOP or cut off).
    """

    def __init__(self, lab: Cluster) -> None:
        self.lab = lab
        self.namespaces: list[Netns] = []
        self.members: list[EtcdMember] = []
        self.frozen: list[EtcdMember] = []

    def __enter__(self) -> EtcdCluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        lab = self.lab
        initial = ",".join(f"m{i}=http://{ip}:2380" for i, ip in enumerate(MEMBER_IPS))
        for i, ip in enumerate(MEMBER_IPS):
            ns = Netns.create(f"fp{lab.tag}e{i}")
            self.namespaces.append(ns)
            lab.plug_into_underlay(ns, f"e{i}", ip)
            self.members.append(EtcdMember(f"m{i}", ip, lab.workdir, netns=ns, initial_cluster=initial))
        for member in self.members:
            member.start(wait=False)
        for member in self.members:
            member.wait_ready(timeout=30)

    def close(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                os.killpg(member.proc.pid, signal.SIGCONT)
            member.stop()
        for ns in reversed(self.namespaces):
            ns.delete()

    @property
    def endpoints(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def usable(self) -> list[EtcdMember]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None and m not in self.frozen]

    def ctl(self, *args: str) -> str:
        """etcdctl against the members that are running (not stopped, not frozen)."""
        endpoints = ",".join(m.client_url for m in self.usable())
        deadline = time.monotonic() + 20  # across an election
        while True:
            proc = run(self.namespaces[0].argv(*etcdctl_argv(endpoints, *args)), check=False,
                       env={**os.environ, "ETCDCTL_API": "3"})
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert proc.returncode == 0, f"etcdctl {args} failed: {proc.stderr}\n{self.describe()}"
        return proc.stdout

    def describe(self) -> str:
        out = []
        for member in self.members:
            proc = member.ctl("endpoint", "status", "-w", "json", check=False)
            out.append(f"{member.name}: {proc.stdout.strip() or proc.stderr.strip()[-300:]}")
        return "\n".join(out)

    def statuses(self) -> list[tuple[EtcdMember, dict]]:  # type: ignore[type-arg]
        out = []
        for member in self.usable():
            doc = json.loads(member.ctl("endpoint", "status", "-w", "json").stdout)
            out.append((member, doc[0]["Status"]))
        return out

    def leader(self) -> EtcdMember | None:
        for member, state in self.statuses():
            if state["leader"] == state["header"]["member_id"]:
                return member
        return None

    def member_id(self, member: EtcdMember) -> str:
        doc = json.loads(member.ctl("endpoint", "status", "-w", "json").stdout)
        return format(doc[0]["Status"]["header"]["member_id"], "x")


def _lease_ids(lab_nodes, cluster: EtcdCluster) -> dict[str, int]:
    """subnet key -> etcd lease id, as etcd holds them now."""
    out = {}
    for node in lab_nodes:
        key = subnet_key(node.subnet_env().subnet)
        kv = json.loads(cluster.ctl("get", key, "-w", "json"))
        entries = kv.get("kvs") or []
        out[key] = entries[0].get("lease", 0) if entries else 0
    return out


def test_etcd_cluster_member_and_leader_loss_interrupt_neither_renewal_nor_watch():
    ttl = 12
    with Cluster(nodes=2, start_etcd=False) as lab, EtcdCluster(lab) as etcd:
        etcd.ctl("put", f"{PREFIX}/config", json.dumps(lab.config))
        args = (f"--etcd-endpoints={etcd.endpoints}", f"--subnet-lease-ttl={ttl}s")
        start(lab, *lab.nodes, extra=args)
        n1, n2 = lab.nodes
        a, b = lab.add_pod(n1), lab.add_pod(n2)
        assert time_until(lambda: reachable(a, b), 10) is not None, dump(lab)
        leases = _lease_ids(lab.nodes, etcd)
        assert all(leases.values()), leases

        # the daemons talk to the first endpoint; make sure that one is not the leader
        first = etcd.members[0]
        assert time_until(lambda: etcd.leader() is not None, 10) is not None
        if etcd.leader() is first:
            etcd.ctl("move-leader", etcd.member_id(etcd.members[1]))
            assert time_until(lambda: etcd.leader() not in (None, first), 10) is not None

        figures = {}
        fake = 0

        def watch_still_works(step: str, since: float) -> None:
            """A new peer record reaches both daemons, and a deleted one leaves them."""
            nonlocal fake
            fake += 1
            taken = {str(node.subnet_env().subnet) for node in lab.nodes}
            subnet = next(f"10.244.{x}.0/24" for x in range(250 - fake, 0, -3) if f"10.244.{x}.0/24" not in taken)
            value = json.dumps({"PublicIP": f"198.51.100.{200 + fake}", "PublicIPv6": None,
                                "BackendType": "udp", "BackendData": None})
            etcd.ctl("put", subnet_key(subnet), value)
            seen = time_until(lambda: all(subnet in peer_subnets(n) for n in lab.nodes), 30)
            assert seen is not None, f"{step}: the watch missed a new lease\n{dump(lab)}"
            figures[step] = time.monotonic() - since  # from the failure to the lease seen everywhere
            etcd.ctl("del", subnet_key(subnet))
            gone = time_until(lambda: all(subnet not in peer_subnets(n) for n in lab.nodes), 30)
            assert gone is not None, f"{step}: the watch missed a deleted lease\n{dump(lab)}"

        def renewal_still_works(step: str, over: float) -> None:
            """Keys and their etcd leases outlive ``over`` seconds (more than a TTL) unchanged."""
            deadline = time.monotonic() + over
            while time.monotonic() < deadline:
                now = _lease_ids(lab.nodes, etcd)
                assert now == leases, f"{step}: a lease was lost or re-claimed: {leases} -> {now}\n{dump(lab)}"
                for node in lab.nodes:
                    assert alive(node), f"{step}: {node.name} died\n{node.log_text()[-3000:]}"
                time.sleep(1)

        # 1. the member the daemons talk to goes silent (frozen: its TCP connections stay open)
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGSTOP)
        failed = time.monotonic()
        etcd.frozen.append(first)
        try:
            watch_still_works("member frozen", failed)
            renewal_still_works("member frozen", ttl + 3)
        finally:
            os.killpg(first.proc.pid, signal.SIGCONT)
            etcd.frozen.remove(first)
        assert time_until(lambda: first.ctl("endpoint", "health", check=False).returncode == 0, 20) is not None

        # 2. the leader is stopped
        leader = etcd.leader()
        assert leader is not None
        leader.stop()
        failed = time.monotonic()
        try:
            watch_still_works("leader stopped", failed)
            renewal_still_works("leader stopped", ttl + 3)
        finally:
            leader.start(wait=False)
        assert time_until(lambda: leader.ctl("endpoint", "health", check=False).returncode == 0, 30) is not None

        # 3. the member n1 talks to is cut off from the other members (its clients still reach it)
        used = status(n1)["etcd"]["endpoint"]
        index = [m.client_url.split("//")[1] for m in etcd.members].index(used)
        cut_off = etcd.namespaces[index]
        rules = [[chain, "-p", "tcp", port, "2380"] for chain in ("INPUT", "OUTPUT") for port in ("--dport", "--sport")]
        for rule in rules:
            cut_off.sh("iptables", "-A", *rule, "-j", "DROP")
        failed = time.monotonic()
        etcd.frozen.append(etcd.members[index])  # etcdctl: not through that one
        try:
            watch_still_works("member partitioned", failed)
            renewal_still_works("member partitioned", ttl + 3)
        finally:
            for rule in rules:
                cut_off.sh("iptables", "-D", *rule, "-j", "DROP", check=False)
            etcd.frozen.remove(etcd.members[index])
        assert time_until(lambda: reachable(a, b) and reachable(b, a), 10) is not None
        for node in lab.nodes:
            assert "LeaseLost" not in node.log_text() and "re-claimed" not in node.log_text(), node.log_text()
        print("\nFIGURE etcd-cluster: a new lease seen by both daemons " + ", ".join(
            f"{k}: {v:.1f}s" for k, v in figures.items()) + f" after the failure; lease ids unchanged throughout (ttl {ttl}s)")
        debug_dump(lab)
