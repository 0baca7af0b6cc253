"""Broken records in etcd, end to end: a lease value that is not JSON, a key that
is not a subnet, a lease outside the Network, and a network config that becomes
invalid (and is deleted) at run time. Each is logged once and skipped, no
daemon crashes, and the valid rest keeps being served.

Records are broken both before the daemons start (the first listing) and while
they run (the watch); each broken value is also written twice.
"""

from __future__ import annotations

import json

import pytest

from flanneld_py.lab.cluster import Cluster

from flanneld_py.lab.checks import time_until
from lab_helpers import (
    PREFIX,
    alive,
    dump,
    log_count,
    peer_subnets,
    reachable,
    start,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GOOD = {"PublicIP": "198.51.100.99", "PublicIPv6": None, "BackendType": "udp", "BackendData": None}

# (key under subnets/, value): before start, then while running
BROKEN_AT_START = [
    ("10.244.50.0-24", b"this is not json{"),
    ("garbage", json.dumps(GOOD).encode()),
    ("10.99.0.0-24", json.dumps(GOOD).encode()),  # outside Network
    ("10.244.51.0-24", b'{"PublicIP": "not-an-ip", "BackendType": "udp"}'),
]
BROKEN_AT_RUN = [
    ("10.244.60.0-24", b"\xff\xfe binary"),
    ("10.244.61.0/24", json.dumps(GOOD).encode()),  # not a key flannel writes
    ("172.16.0.0-24", json.dumps({**GOOD, "PublicIP": "198.51.100.98"}).encode()),  # outside Network
    ("10.244.62.0-26", json.dumps(GOOD).encode()),  # inside, wrong length
    ("10.244.63.0-24", b"[1, 2, 3]"),
]
VALID_AT_RUN = ("10.244.70.0-24", json.dumps({**GOOD, "PublicIP": "198.51.100.70"}).encode())
# the nodes lease below every key written above: a node whose random subnet were one of them
# would have its own lease overwritten by the test
NODES_BELOW = {"Network": "10.244.0.0/16", "SubnetMax": "10.244.49.0", "Backend": {"Type": "udp"}}


def test_broken_records_are_logged_once_and_skipped():
    with Cluster(nodes=3, config=NODES_BELOW) as lab:
        assert lab.etcd is not None

        def put(name: str, value: bytes) -> None:
            lab.etcd.ctl("put", f"{PREFIX}/subnets/{name}", value.decode(errors="surrogateescape"))

        for name, value in BROKEN_AT_START:
            put(name, value)
        n1, n2, n3 = lab.nodes
        start(lab, n1, n2)
        a, b = lab.add_pod(n1), lab.add_pod(n2)
        assert time_until(lambda: reachable(a, b) and reachable(b, a), 10) is not None, dump(lab)

        for name, value in BROKEN_AT_RUN + BROKEN_AT_START:  # new ones, and the old ones again
            put(name, value)
        put(*VALID_AT_RUN)
        for name, value in BROKEN_AT_RUN:
            put(name, value)  # twice: still one report
        for node in (n1, n2):
            assert time_until(lambda: "10.244.70.0/24" in peer_subnets(node), 30) is not None, dump(lab)

        def logged_everywhere(text: str, count: int) -> None:
            """Wait until both daemons logged ``text`` ``count`` times (they see events in etcd's order)."""
            assert time_until(lambda: all(log_count(n, text) >= count for n in (n1, n2)), 30) is not None, dump(lab)

        # the config breaks at run time, twice in two ways (the first bad value written twice),
        # is deleted, then restored
        valid_config = json.dumps(lab.config)
        for value in ('{"Network": "nonsense"}', '{"Network": "nonsense"}', "not json at all"):
            lab.etcd.ctl("put", f"{PREFIX}/config", value)
        logged_everywhere("network config /coreos.com/network/config is now invalid", 2)
        lab.etcd.ctl("del", f"{PREFIX}/config")
        logged_everywhere("network config /coreos.com/network/config was deleted", 1)
        # a node starting now refuses clearly, without a traceback
        lab.etcd.ctl("put", f"{PREFIX}/config", '{"Network": "nonsense"}')
        logged_everywhere("network config /coreos.com/network/config is now invalid", 3)
        lab.start_daemon(n3, wait=False)
        assert n3.daemon is not None
        code = n3.daemon.wait(timeout=30)
        assert code == 1, n3.log_text()
        assert "network config: Network='nonsense': is not a CIDR" in n3.log_text()
        assert "Traceback" not in n3.log_text()
        lab.etcd.ctl("put", f"{PREFIX}/config", valid_config)
        logged_everywhere("is the one in use again", 1)

        assert reachable(a, b) and reachable(b, a), dump(lab)
        for node in (n1, n2):
            assert alive(node), node.log_text()[-3000:]
            log = node.log_text()
            assert "Traceback" not in log, log
            for name, _ in BROKEN_AT_START + BROKEN_AT_RUN:
                assert log_count(node, f"skipping lease record {name!r}") == 1, (name, log[-4000:])
            # one report per change: the same bad value written twice is one report
            assert log_count(node, "network config /coreos.com/network/config is now invalid") == 3, log[-3000:]
            assert log_count(node, "Network='nonsense'") == 2, log[-3000:]
            assert log_count(node, "network config /coreos.com/network/config was deleted") == 1, log[-3000:]
            assert log_count(node, "is the one in use again") == 1, log[-3000:]
            assert "10.244.70.0/24" in peer_subnets(node)
        print(f"\nFIGURE records: {len(BROKEN_AT_START) + len(BROKEN_AT_RUN)} broken lease records and 3 bad "
              f"config states, each logged once per daemon, none fatal; the valid rest served")
