"""``flanneld-py trace --iface IF``: decode the udp backend's datagrams on the underlay.

For every UDP datagram to or from the backend port it prints the outer
addresses, the inner IPv4 header (addresses, protocol, length, TTL), the
peers involved and the verdict the *receiving* node's daemon reaches. The
verdict comes from the daemon's own code: :class:`~flanneld_py.backend.udp.engine.Engine`
``inbound()`` (peer check, :func:`~flanneld_py.core.packet.check_ipv4`,
source-in-peer-subnet, destination-is-local) loaded with the leases.

Leases come from etcd (``--etcd-endpoints``), else from the local daemon's
control socket; with neither, only the packet checks run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from ..backend.udp.engine import Engine
from ..core.packet import Drop, check_ipv4
from ..options import DEFAULT_CONTROL_SOCKET

__all__ = ["Judge", "Topology", "describe", "main"]

DEFAULT_PORT = 8285


@dataclass(frozen=True, slots=True)
class Topology:
    """The overlay as some source knows it: the Network and every (subnet, PublicIP)."""

    network: IPv4Network
    leases: tuple[tuple[IPv4Network, str], ...]
    source: str
    port: int | None = None


class Judge:
    """What the node receiving a datagram does with it, decided by the daemon's Engine."""

    def __init__(self, topology: Topology | None, port: int = DEFAULT_PORT) -> None:
        self.topology = topology
        self.port = port
        self._by_ip = {ip: subnet for subnet, ip in topology.leases} if topology else {}
        self._engines: dict[IPv4Network, Engine] = {}

    def subnet_of(self, public_ip: str) -> IPv4Network | None:
        return self._by_ip.get(public_ip)

    def _engine(self, receiver: IPv4Network) -> Engine:
        engine = self._engines.get(receiver)
        if engine is None:
            assert self.topology is not None
            engine = Engine(self.topology.network, receiver, self.port)
            for subnet, ip in self.topology.leases:
                if subnet != receiver:
                    engine.set_peer(subnet, ip)
            self._engines[receiver] = engine
        return engine

    def verdict(self, outer_src: str, outer_dst: str, payload: bytes) -> str:
        receiver = self._by_ip.get(outer_dst)
        if receiver is None:
            problem = check_ipv4(payload, len(payload))
            if problem is not None:
                return f"drop: {problem.label}"
            if self.topology is None:
                return "well-formed (leases unknown)"
            return f"not for a flannel node: {outer_dst} holds no lease"
        engine = self._engine(receiver)
        before = list(engine.drops)
        if engine.inbound(bytearray(payload), len(payload), outer_src) is not None:
            return f"deliver into {receiver}"
        for index, (old, new) in enumerate(zip(before, engine.drops)):
            if new != old:
                return f"drop: {Drop(index).label}"
        return "drop"  # pragma: no cover - inbound() always counts its drops


def _inner_summary(payload: bytes) -> str:
    from scapy.layers.inet import ICMP, IP, TCP, UDP

    if len(payload) < 20 or payload[0] >> 4 != 4:
        return f"not IPv4 ({len(payload)} bytes)"
    inner = IP(payload)
    proto = inner.sprintf("%IP.proto%")
    detail = ""
    if TCP in inner:
        detail = f" {inner[TCP].sport} > {inner[TCP].dport} [{inner[TCP].sprintf('%TCP.flags%')}]"
    elif UDP in inner:
        detail = f" {inner[UDP].sport} > {inner[UDP].dport}"
    elif ICMP in inner:
        detail = f" {inner[ICMP].sprintf('%ICMP.type%')}"
    return f"{inner.src} > {inner.dst} {proto}{detail} len={inner.len} ttl={inner.ttl}"


def describe(outer_src: str, sport: int, outer_dst: str, dport: int, payload: bytes, judge: Judge) -> str:
    """One output line for one datagram (no time stamp)."""
    sender, receiver = judge.subnet_of(outer_src), judge.subnet_of(outer_dst)
    peers = f"{sender or '?'} > {receiver or '?'}"
    return (f"{outer_src}:{sport} > {outer_dst}:{dport} | {_inner_summary(payload)} | "
            f"peer {peers} | {judge.verdict(outer_src, outer_dst, payload)}")


# --- where the leases come from ------------------------------------------------


async def _topology_from_etcd(ns: argparse.Namespace) -> Topology:
    from ..core.lease import KeyPut, LeaseWatcher
    from ..core.netconfig import parse_network_config
    from ..subnet.registry import EtcdRegistry, EtcdTls, parse_endpoints

    registry = EtcdRegistry(parse_endpoints(ns.etcd_endpoints), prefix=ns.etcd_prefix,
                            tls=EtcdTls(ns.etcd_cafile, ns.etcd_certfile, ns.etcd_keyfile))
    try:
        raw = await registry.get_config()
        if raw is None:
            raise ValueError(f"no network config at {ns.etcd_prefix}/config")
        config = parse_network_config(raw)
        records, _revision = await registry.list_subnets()
    finally:
        await registry.close()
    watcher = LeaseWatcher(config)
    watcher.reset(KeyPut(r.name, r.value) for r in records)
    leases = tuple((lease.subnet, str(lease.attrs.public_ip)) for lease in watcher.leases.values())
    return Topology(config.network, leases, f"etcd {ns.etcd_endpoints}", config.backend.port)


def _topology_from_daemon(path: str) -> Topology | None:
    from .control import query

    try:
        doc: dict[str, Any] = query(path, timeout=2.0)
    except (OSError, ValueError):
        return None
    if not doc.get("network") or not doc.get("lease"):
        return None
    leases = [(IPv4Network(doc["lease"]["subnet"]), str(doc["public_ip"]))]
    leases += [(IPv4Network(p["subnet"]), str(p["public_ip"])) for p in doc.get("peers", [])]
    return Topology(IPv4Network(doc["network"]), tuple(leases), f"daemon at {path}")


# --- capture -------------------------------------------------------------------


def main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flanneld-py trace",
                                     description="Decode udp-backend datagrams on an underlay interface (needs root).")
    parser.add_argument("--iface", required=True, help="underlay interface to capture on")
    parser.add_argument("--port", type=int, default=None, help=f"backend UDP port (default: the config's, or {DEFAULT_PORT})")
    parser.add_argument("--count", type=int, default=0, help="stop after N datagrams (0: until interrupted)")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--etcd-endpoints", default=None, help="read the leases from etcd (comma-separated)")
    parser.add_argument("--etcd-prefix", default="/coreos.com/network")
    parser.add_argument("--etcd-cafile", default=None)
    parser.add_argument("--etcd-certfile", default=None)
    parser.add_argument("--etcd-keyfile", default=None)
    parser.add_argument("--control-socket", default=os.environ.get("FLANNELD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET,
                        help="without --etcd-endpoints, ask the local daemon for the leases (default %(default)s)")
    ns = parser.parse_args(list(args))

    topology: Topology | None
    if ns.etcd_endpoints:
        try:
            topology = asyncio.run(_topology_from_etcd(ns))
        except Exception as exc:  # any etcd or config failure ends the tool with its reason
            print(f"flanneld-py trace: cannot read leases from etcd: {exc}", file=sys.stderr)
            return 1
    else:
        topology = _topology_from_daemon(ns.control_socket)
    port = ns.port or (topology.port if topology and topology.port else DEFAULT_PORT)
    judge = Judge(topology, port)
    known = f"{len(topology.leases)} leases from {topology.source}" if topology else "leases unknown"
    return _capture(ns, port, judge, known)


def _capture(ns: argparse.Namespace, port: int, judge: Judge, known: str) -> int:
    from scapy.config import conf
    from scapy.layers.inet import IP, UDP
    from scapy.sendrecv import sniff

    def show(packet: Any) -> None:
        if IP not in packet or UDP not in packet:
            return
        outer, udp = packet[IP], packet[UDP]
        stamp = time.strftime("%H:%M:%S", time.localtime(float(packet.time))) + f".{int(packet.time * 1000) % 1000:03d}"
        line = describe(outer.src, udp.sport, outer.dst, udp.dport, bytes(udp.payload), judge)
        print(f"{stamp} {line}", flush=True)

    def started() -> None:
        print(f"tracing udp port {port} on {ns.iface} ({known}); Ctrl-C to stop", file=sys.stderr, flush=True)

    options: dict[str, Any] = {}
    if shutil.which(conf.prog.tcpdump):  # a kernel BPF filter; without tcpdump, filter in Python
        options["filter"] = f"udp port {port}"
    else:
        options["lfilter"] = lambda p: UDP in p and port in (p[UDP].sport, p[UDP].dport)
    try:
        sniff(iface=ns.iface, prn=show, store=False, count=ns.count, timeout=ns.timeout,
              started_callback=started, **options)
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as exc:
        print(f"flanneld-py trace: cannot capture on {ns.iface}: {exc}", file=sys.stderr)
        return 1
    return 0
