"""The part of ``--peers`` that runs inside a node's namespace (where etcd and the datapath are).

``python3 -m bench.scale_agent HOST:PORT PREFIX COMMAND FILE [options]``

* ``fill FILE``: put every ``[name, value]`` of FILE under ``PREFIX/subnets/``
  (transactions of 100 puts, one after the other). Prints the wall-clock
  times the first transaction was sent (``started``) and the last one's
  commit was acknowledged (``committed``: every key exists from then on).
* ``clear FILE``: delete every name of FILE (same, and the same times).
* ``count --kind vxlan|host-gw --subnet-len L --want N``: wait until the node's
  kernel holds exactly N peer routes (every protocol but the kernel's own,
  destinations of length L inside the network) and, for vxlan, N permanent
  neighbours and N FDB entries on ``flannel.1``; print the wall-clock time it
  first saw that (after a first line saying it is counting). The same count
  for flanneld-py and flannel's flanneld.
* ``events FILE [--churn FILE2]``: for each ``[name, value]``, one at a time,
  note the time, put the lease, and wait until a probe packet to an address in
  its subnet leaves ``eth0`` toward the lease's PublicIP, encapsulated or
  routed as the backend does it. Prints ``{"latencies_ms": [...], "lost":
  [why, ...]}`` (an event that never reached the datapath is named). With
  ``--churn``, meanwhile rewrite the leases of FILE2 in turn (PublicIP moved
  back and forth) at ``--churn-rate`` per second.

The probe is the one outside observer for every mode, kernel or userspace: a
UDP datagram sent every half millisecond from the node to the new subnet, and
an ``AF_PACKET`` capture on ``eth0`` that sees it go out. For vxlan the frame
leaves only once route, neighbour and FDB entry are all in place; for udp
once the daemon knows the peer; for host-gw once the route is there. So that
no ARP for the (nonexistent) peer PublicIPs gets in the way, the agent first
gives each of them a permanent neighbour entry on ``eth0``. The clock starts
when the put is sent, so the figure includes etcd's commit and the watch
delivery: what an operator sees from "lease written" to "traffic flows".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from flanneld_py.netlink.batch import (
    AF_BRIDGE,
    AF_INET,
    NUD_PERMANENT,
    RtnlSocket,
    neigh_request,
)

__all__ = ["carries_probe", "main"]

BATCH = 100
UDP_PORT, VXLAN_PORT = 8285, 8472
NETWORK = IPv4Network("10.244.0.0/16")
RTPROT_KERNEL = 2
PROBE_INTERVAL = 0.0005
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
FAKE_PEER_MAC = "02:00:5e:00:00:01"


def carries_probe(frame: bytes, probe: bytes, peer: bytes) -> bool:
    """True if the Ethernet ``frame`` carries a packet to ``probe`` (4 bytes) the way a backend sends it.

    Routed as it is (host-gw: to the peer's MAC), or inside a datagram to
    ``peer``: the udp backend's (port 8285, the raw inner packet) or VXLAN
    (port 8472: an 8-byte header and the inner Ethernet header).
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return False
    outer_dst = frame[30:34]
    if outer_dst == probe:
        return True
    if outer_dst != peer:
        return False
    inner = _inner_ipv4(frame, 14 + (frame[14] & 0x0F) * 4)
    return inner is not None and frame[inner + 16:inner + 20] == probe


def _inner_ipv4(frame: bytes, udp: int) -> int | None:
    """Offset of the encapsulated IPv4 header, or None if the frame is not our tunnel's."""
    if frame[14 + 9] != 17 or len(frame) < udp + 8:
        return None
    (port,) = struct.unpack_from("!H", frame, udp + 2)
    if port == UDP_PORT:
        return udp + 8
    if port == VXLAN_PORT:
        return udp + 8 + 8 + 14
    return None


async def _client(endpoint: str) -> Any:
    import aetcd

    host, _, port = endpoint.rpartition(":")
    client = aetcd.Client(host=host, port=int(port), timeout=10)
    await client.connect()
    return client


async def fill(endpoint: str, prefix: str, leases: list[list[str]]) -> dict[str, float]:
    client = await _client(endpoint)
    started = time.time()
    try:
        for start in range(0, len(leases), BATCH):
            puts = [client.transactions.put(f"{prefix}/subnets/{name}".encode(), value.encode())
                    for name, value in leases[start:start + BATCH]]
            await client.transaction(compare=[], success=puts, failure=[])
        committed = time.time()
    finally:
        await client.close()
    return {"started": started, "committed": committed}


async def clear(endpoint: str, prefix: str, names: list[str]) -> dict[str, float]:
    client = await _client(endpoint)
    started = time.time()
    try:
        for start in range(0, len(names), BATCH):
            deletes = [client.transactions.delete(f"{prefix}/subnets/{name}".encode())
                       for name in names[start:start + BATCH]]
            await client.transaction(compare=[], success=deletes, failure=[])
        committed = time.time()
    finally:
        await client.close()
    return {"started": started, "committed": committed}


# --- the kernel's peer entries, counted the same for every daemon ---------------------------------


def count_peer_entries(rtnl: RtnlSocket, kind: str, subnet_len: int) -> int:
    """Peers fully in the kernel: routes, and for vxlan the fewest of routes, neighbours and FDB entries."""
    routes = sum(1 for r in rtnl.routes(None)
                 if r.proto != RTPROT_KERNEL and r.dst.prefixlen == subnet_len and r.dst.subnet_of(NETWORK))
    if kind != "vxlan":
        return routes
    indexes = _vxlan_index()
    if not indexes:
        return 0
    neighbours = rtnl.count_neighbours(AF_INET, indexes[0], NUD_PERMANENT)
    return min(routes, neighbours, rtnl.count_neighbours(AF_BRIDGE, indexes[0]))


def wait_count(kind: str, subnet_len: int, want: int, timeout: float) -> float:
    """The wall-clock time the node first held exactly ``want`` peers.

    Polls at most a third of the time, so the count takes little CPU from the daemon it watches.
    """
    rtnl = RtnlSocket()
    deadline = time.monotonic() + timeout
    have = -1
    while time.monotonic() < deadline:
        started = time.monotonic()
        have = count_peer_entries(rtnl, kind, subnet_len)
        if have == want:
            return time.time()
        time.sleep(max(0.01, 2 * (time.monotonic() - started)))
    raise TimeoutError(f"{kind}: {have} peers in the kernel after {timeout:g}s, not {want}")


# --- lease event to traffic --------------------------------------------------------------------------


class _ProbeWatch:
    """Sends probes to one address at a time and notes when one leaves ``eth0`` for the peer."""

    def __init__(self) -> None:
        self._capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._capture.bind(("eth0", 0))
        self._capture.settimeout(0.05)
        self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._target: tuple[bytes, bytes] | None = None
        self._seen: float | None = None
        self._found = threading.Event()
        self._stop = False
        self._threads = [threading.Thread(target=self._probe, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for thread in self._threads:
            thread.start()

    def arm(self, subnet: IPv4Network, peer: IPv4Address) -> None:
        self._found.clear()
        self._seen = None
        self._target = ((subnet.network_address + 5).packed, peer.packed)

    def wait(self, timeout: float) -> float:
        if not self._found.wait(timeout):
            raise TimeoutError("no probe packet left eth0 for the new peer")
        self._target = None
        assert self._seen is not None
        return self._seen

    def close(self) -> None:
        self._stop = True
        for thread in self._threads:
            thread.join()
        self._capture.close()
        self._sender.close()

    def _probe(self) -> None:
        while not self._stop:
            target = self._target
            if target is not None and not self._found.is_set():
                try:
                    self._sender.sendto(b"probe", (str(IPv4Address(target[0])), 9))
                except OSError:
                    pass  # no route yet
            time.sleep(PROBE_INTERVAL)

    def _watch(self) -> None:
        while not self._stop:
            try:
                frame, address = self._capture.recvfrom(2048)
            except TimeoutError:
                continue
            target = self._target
            if target is None or address[2] != PACKET_OUTGOING or self._found.is_set():
                continue
            if carries_probe(frame, *target):
                self._seen = time.time()
                self._found.set()


def _what_kernel_holds(subnet: IPv4Network) -> str:
    """The node's routes to ``subnet`` and its neighbour entry for the subnet's address (for error messages)."""
    rtnl = RtnlSocket()
    try:
        routes = [r for r in rtnl.routes(None) if r.dst == subnet]
        neighbours = [n for index in _vxlan_index() for n in rtnl.permanent_neighbours(index)
                      if n[0] == subnet.network_address]
    finally:
        rtnl.close()
    return f"routes {routes}, neighbours {neighbours}"


def _vxlan_index() -> list[int]:
    try:
        return [socket.if_nametoindex("flannel.1")]
    except OSError:
        return []


def static_peer_neighbours(leases: list[list[str]]) -> None:
    """Permanent ARP entries on eth0 for every PublicIP in ``leases`` (they need not exist)."""
    rtnl = RtnlSocket()
    index = socket.if_nametoindex("eth0")
    ips = {IPv4Address(json.loads(value)["PublicIP"]) for _, value in leases}
    errors = rtnl.send([neigh_request(index, ip, FAKE_PEER_MAC) for ip in sorted(ips)])
    rtnl.close()
    if any(errors):
        raise OSError(max(errors), "cannot add the static neighbours for the fake peers")


async def _churn(client: Any, prefix: str, leases: list[list[str]], rate: float) -> None:
    """Rewrite ``leases`` in turn, ``rate`` per second, each time with its PublicIP moved by one."""
    turn = 0
    while True:
        for name, value in leases:
            record = json.loads(value)
            address = IPv4Address(record["PublicIP"])
            record["PublicIP"] = str(address + 1 if turn % 2 == 0 else address)
            await client.put(f"{prefix}/subnets/{name}".encode(), json.dumps(record, separators=(",", ":")).encode())
            await asyncio.sleep(1 / rate)
        turn += 1


async def events(endpoint: str, prefix: str, leases: list[list[str]], timeout: float,
                 churn: list[list[str]], churn_rate: float) -> dict[str, list[Any]]:
    """Latencies of the events that reached the datapath, and why each other one did not."""
    static_peer_neighbours(leases + churn)
    watch = _ProbeWatch()
    client = await _client(endpoint)
    background = asyncio.create_task(_churn(client, prefix, churn, churn_rate)) if churn else None
    latencies: list[float] = []
    lost: list[str] = []
    try:
        if background is not None:
            await asyncio.sleep(1.0)  # churn under way before the first timed event
        for name, value in leases:
            watch.arm(IPv4Network(name.replace("-", "/")), IPv4Address(json.loads(value)["PublicIP"]))
            sent = time.time()
            await client.put(f"{prefix}/subnets/{name}".encode(), value.encode())
            try:
                seen = await asyncio.to_thread(watch.wait, timeout)
            except TimeoutError:
                lost.append(f"no probe packet to {name} left eth0 for its peer within {timeout:g}s; the kernel "
                            f"holds: {_what_kernel_holds(IPv4Network(name.replace('-', '/')))}")
                continue
            latencies.append((seen - sent) * 1000)
            await asyncio.sleep(0.05)
    finally:
        if background is not None:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        await client.close()
        await asyncio.to_thread(watch.close)
    return {"latencies_ms": latencies, "lost": lost}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scale_agent")
    parser.add_argument("endpoint", help="etcd HOST:PORT")
    parser.add_argument("prefix")
    parser.add_argument("command", choices=("fill", "clear", "count", "events"))
    parser.add_argument("file", nargs="?")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--kind", choices=("vxlan", "host-gw"), default="vxlan")
    parser.add_argument("--subnet-len", type=int, default=24)
    parser.add_argument("--want", type=int, default=0)
    parser.add_argument("--churn", help="a FILE of leases to rewrite while the events are timed")
    parser.add_argument("--churn-rate", type=float, default=100.0, help="rewrites per second (default: 100)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.file).read_text()) if args.file else []
    if args.command == "fill":
        print(json.dumps(asyncio.run(fill(args.endpoint, args.prefix, data))))
    elif args.command == "clear":
        print(json.dumps(asyncio.run(clear(args.endpoint, args.prefix, [n for n, *_ in data]))))
    elif args.command == "count":
        print(json.dumps({"ready": True}), flush=True)  # the caller starts its clock after this line
        print(json.dumps({"at": wait_count(args.kind, args.subnet_len, args.want, args.timeout)}))
    else:
        churn = json.loads(Path(args.churn).read_text()) if args.churn else []
        print(json.dumps(asyncio.run(events(args.endpoint, args.prefix, data, args.timeout, churn, args.churn_rate))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
