"""Every datagram the offloaded udp path puts on the wire is one valid inner IPv4 packet.

A bulk pod-to-pod TCP transfer is captured on the sender's underlay interface
with UDP segmentation offload off on both nodes (so the capture shows the
datagrams the wire carries, not GSO super-packets, in both directions: the
data one way, runs of ACKs sent with one GSO call the other), and each is checked with
scapy as the oracle: the payload is exactly one IPv4 packet, no larger than
flannel0's MTU, with correct IP and TCP checksums, as a flannel peer expects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import RawPcapReader

from flanneld_py.lab.checks import tcp_transfer
from flanneld_py.lab.cluster import Cluster

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _valid_inner(payload: bytes, mtu: int) -> str | None:
    """Why ``payload`` is not one valid inner packet, or None."""
    if len(payload) > mtu:
        return f"{len(payload)} bytes exceeds the flannel0 MTU {mtu}"
    inner = IP(payload)
    if inner.version != 4 or inner.len != len(payload):
        return f"IP length {inner.len} != datagram payload {len(payload)}"
    fresh = IP(payload)
    del fresh.chksum
    if TCP in fresh:
        del fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    if fresh.chksum != inner.chksum:
        return "bad IP checksum"
    if TCP in inner and fresh[TCP].chksum != inner[TCP].chksum:
        return "bad TCP checksum"
    return None


@pytest.mark.parametrize("build", ["c", "python"])
def test_bulk_transfer_datagrams_are_valid_inner_packets(tmp_path, monkeypatch, build):
    """Both builds of the offload stages (compiled, pure-Python reference) put the same kind of datagrams out."""
    monkeypatch.setenv("FLANNELD_PY_OFFLOAD_IMPL", build)  # the daemons inherit it
    with Cluster(nodes=2) as lab:
        lab.start_all()
        stages = "compiled stages" if build == "c" else "pure-Python stages"
        assert all(stages in node.log_text() for node in lab.nodes)
        src, dst = lab.add_pod(lab.nodes[0]), lab.add_pod(lab.nodes[1])
        sender = lab.nodes[0]
        mtu = sender.subnet_env().mtu
        for node in lab.nodes:  # both directions: data one way, runs of ACKs the other
            node.netns.sh("ethtool", "-K", "eth0", "tx-udp-segmentation", "off")
        capture = str(tmp_path / "underlay.pcap")
        dump = sender.netns.popen("tcpdump", "-i", "eth0", "-s", "0", "-U", "-n", "-w", capture, "udp port 8285",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert dump.stderr is not None
            started = dump.stderr.readline().decode()  # tcpdump says so once it captures
            assert "listening on eth0" in started, started
            result = tcp_transfer(src, dst, 16 * 1024 * 1024)
            time.sleep(0.5)
        finally:
            os.kill(dump.pid, signal.SIGINT)
            dump.wait(timeout=10)
        assert result.intact
    problems, datagrams, largest = [], 0, 0
    for frame, _meta in RawPcapReader(capture):
        outer = IP(frame[14:])
        if UDP not in outer:
            continue
        payload = bytes(outer[UDP].payload)
        datagrams += 1
        largest = max(largest, len(payload))
        why = _valid_inner(payload, mtu)
        if why:
            problems.append(why)
    assert datagrams > 16 * 1024 * 1024 // mtu, f"only {datagrams} datagrams captured"
    assert not problems, f"{len(problems)} bad datagrams of {datagrams}, e.g. {problems[:5]}"
    assert largest == mtu, f"segments should fill the MTU ({mtu}); largest was {largest}"
