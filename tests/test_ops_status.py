"""The control socket round trip and ``flanneld-py status`` rendering and errors."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from flanneld_py.backend.base import PeerStats
from flanneld_py.ops.control import ControlServer, query
from flanneld_py.ops.snapshot import Snapshot
from flanneld_py.ops.status import render_status


def answer() -> dict:
    snap = Snapshot(
        taken_at=1000.0, phase="running", ready=True, uptime=3725, pid=42, backend="udp",
        network="10.244.0.0/16", mtu=1472, public_ip="198.51.100.1", subnet="10.244.7.0/24",
        lease_id=0xABC, lease_expires_at=1000.0 + 86000, datapath_up=True,
        etcd_endpoint="198.51.100.254:2379", etcd_silence=3.2, etcd_errors=1,
        peers=(PeerStats(IPv4Network("10.244.8.0/24"), "198.51.100.8", 5, 420, 4, 336, last_tx=48.0),),
        loop_time=50.0,
        drops={"no_route": 2, "not_a_peer": 0}, ip_masq=True,
    )
    return {**snap.to_json(), "health": {"code": 200, "status": "ok"}}


def test_render():
    text = render_status(answer())
    lines = text.splitlines()
    assert lines[0] == "flanneld-py 0.1.0 (pid 42): running, up 1h02m"
    assert "health    ok" in lines
    assert "lease     10.244.7.0/24 (etcd lease abc), expires in 23h53m" in lines
    assert "etcd      198.51.100.254:2379: last answer 3s ago, 1 errors, 0 reconnects" in lines
    assert "ip-masq   on, 0 repairs" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER SUBNET"))
    assert lines[header + 1].split() == ["10.244.8.0/24", "198.51.100.8", "5", "420", "4", "336", "2s", "ago", "never"]
    assert "drops     no_route 2" in lines


def test_render_unhealthy_without_lease():
    doc = {**Snapshot(taken_at=0.0, phase="acquiring lease", ready=False).to_json(),
           "health": {"code": 503, "reason": "not running: acquiring lease"}}
    text = render_status(doc)
    assert "health    unhealthy: not running: acquiring lease" in text
    assert "lease     none yet" in text and "no peers" in text and "drops     none" in text


def test_control_socket_round_trip(tmp_path):
    path = str(tmp_path / "run" / "ctl.sock")
    got: dict = {}

    async def run() -> None:
        server = ControlServer(answer)
        assert await server.start(path)
        # A second daemon must not steal a live socket.
        assert not await ControlServer(answer).start(path)
        got.update(await asyncio.to_thread(query, path))
        await server.close()

    asyncio.run(run())
    assert got["lease"]["subnet"] == "10.244.7.0/24"
    assert got["peers"][0]["tx_packets"] == 5


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens

    async def run() -> bool:
        server = ControlServer(answer)
        ok = await server.start(path)
        await server.close()
        return ok

    assert asyncio.run(run())


def test_a_regular_file_is_never_replaced(tmp_path):
    path = tmp_path / "precious"
    path.write_text("keep me")

    async def run() -> bool:
        return await ControlServer(answer).start(str(path))

    assert not asyncio.run(run())
    assert path.read_text() == "keep me"


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flanneld_py", "status", *args],
                          capture_output=True, text=True, timeout=30)


def test_status_without_daemon(tmp_path):
    proc = status(f"--control-socket={tmp_path}/none.sock")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"flanneld-py status: flanneld-py is not running here: no control socket at {tmp_path}/none.sock"
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    proc = status(f"--control-socket={path}")
    assert proc.returncode == 1 and "nothing listens" in proc.stderr


def test_status_json_passes_the_answer_through(tmp_path):
    path = str(tmp_path / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(100)
            conn.sendall(json.dumps(answer()).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "flanneld_py", "status", "--json"], capture_output=True,
                              text=True, timeout=30, env={**os.environ, "FLANNELD_CONTROL_SOCKET": path})
    finally:
        thread.join(5)
        listener.close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["public_ip"] == "198.51.100.1"


def test_render_shows_both_families_with_ipv6():
    base = answer()
    snap = replace(Snapshot(taken_at=1000.0, phase="running", ready=True, network="10.244.0.0/16",
                            subnet="10.244.7.0/24", lease_id=0xABC, lease_expires_at=1000.0 + 86000),
                   ipv6_network="fd00:10:244::/56", public_ipv6="2001:db8::1", subnet6="fd00:10:244:7::/64")
    doc = {**base, **{k: v for k, v in snap.to_json().items() if k in ("ipv6_network", "public_ipv6", "lease")}}
    lines = render_status(doc).splitlines()
    assert "lease     10.244.7.0/24 and fd00:10:244:7::/64 (etcd lease abc), expires in 23h53m" in lines
    assert "ipv6      fd00:10:244::/56, public IPv6 2001:db8::1" in lines
    assert not any(line.startswith("ipv6") for line in render_status(answer()).splitlines())


def test_render_shows_both_families_and_ipv6_only_peers():
    doc = answer()
    snap = Snapshot(taken_at=1000.0, phase="running", ready=True, peers=(
        PeerStats(IPv4Network("10.244.8.0/24"), "198.51.100.8",
                  subnet6=IPv6Network("fd00:10:244:8::/64"), public_ipv6="2001:db8::8"),
        PeerStats(IPv4Network("0.0.0.0/0"), "0.0.0.0",  # flannel's IPv6-only lease
                  subnet6=IPv6Network("fd00:10:244:9::/64"), public_ipv6="2001:db8::9"),
    ))
    doc["peers"] = snap.to_json()["peers"]
    lines = render_status(doc).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER SUBNET"))
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert rows[0][:2] == ["fd00:10:244:9::/64", "2001:db8::9"]  # sorted by the IPv4 half, 0.0.0.0/0 first
    assert rows[1][:4] == ["10.244.8.0/24,", "fd00:10:244:8::/64", "198.51.100.8,", "2001:db8::8"]
    assert not any("0.0.0.0" in line for line in lines[header:header + 3])
