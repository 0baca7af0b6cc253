"""/healthz verdicts from hand-made snapshots, the staleness window, and the HTTP routing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from flanneld_py.ops.health import EtcdProbe, HealthServer, etcd_staleness, health_verdict
from flanneld_py.ops.metrics import build_registry
from flanneld_py.ops.snapshot import Snapshot
from flanneld_py.subnet.store import EtcdUnavailable

NOW = 1_800_000_000.0


def healthy(**changes) -> Snapshot:
    fields = dict(
        taken_at=NOW, phase="running", ready=True, backend="udp", network="10.244.0.0/16",
        subnet="10.244.7.0/24", lease_expires_at=NOW + 3600, datapath_up=True, etcd_silence=2.0,
    )
    fields.update(changes)
    return Snapshot(**fields)


def test_healthy():
    code, body = health_verdict(healthy(), max_etcd_silence=10)
    assert code == 200
    assert body == {
        "status": "ok", "phase": "running", "subnet": "10.244.7.0/24", "backend": "udp",
        "lease_expires_in_seconds": 3600.0, "etcd_last_answer_seconds_ago": 2.0,
    }


@pytest.mark.parametrize("changes, check, reason", [
    ({"phase": "acquiring lease", "ready": False}, "phase", "not running: acquiring lease"),
    ({"phase": "stopping"}, "phase", "not running: stopping"),
    ({"subnet": None, "lease_expires_at": None}, "lease", "no subnet lease"),
    ({"lease_expires_at": NOW - 30}, "lease", "subnet lease 10.244.7.0/24 expired 30s ago"),
    ({"datapath_up": False}, "datapath", "datapath is down"),
    ({"etcd_silence": None}, "etcd", "etcd has not answered yet"),
    ({"etcd_silence": 12.4}, "etcd", "etcd has not answered for 12s (limit 10s)"),
])
def test_unhealthy(changes, check, reason):
    code, body = health_verdict(healthy(**changes), max_etcd_silence=10)
    assert code == 503
    assert (body["status"], body["failed"], body["reason"]) == ("unhealthy", check, reason)


def test_silence_at_the_limit_is_still_healthy():
    assert health_verdict(healthy(etcd_silence=10.0), 10)[0] == 200


@pytest.mark.parametrize("ttl, window", [(24 * 3600, 60), (20, 5), (2, 5), (100, 25)])
def test_staleness_window_follows_the_lease_ttl(ttl, window):
    assert etcd_staleness(ttl) == window


def server(snap: Snapshot) -> HealthServer:
    return HealthServer(lambda: snap, build_registry(lambda: snap, process=False), max_etcd_silence=10)


def test_routes():
    srv = server(healthy())
    code, ctype, body = srv.respond("GET", "/healthz")
    assert (code, ctype) == (200, "application/json") and json.loads(body)["status"] == "ok"
    code, ctype, body = srv.respond("GET", "/metrics")
    assert code == 200 and ctype.startswith("text/plain") and b"flanneld_ready 1.0" in body
    assert srv.respond("GET", "/")[0] == 404
    assert srv.respond("POST", "/healthz")[0] == 405
    assert server(healthy(datapath_up=False)).respond("GET", "/healthz")[0] == 503


def test_http_round_trip():
    async def run() -> tuple[bytes, bytes]:
        srv = server(healthy(etcd_silence=99.0))
        await srv.start("127.0.0.1", 0)
        port = srv._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            answers = []
            for request in (b"GET /healthz?verbose HTTP/1.1\r\nHost: x\r\n\r\n", b"HEAD /metrics HTTP/1.0\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answers.append(await reader.read())
                writer.close()
            return answers[0], answers[1]
        finally:
            await srv.close()

    health, head = asyncio.run(run())
    status, _, body = health.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"Connection: close" in status
    assert json.loads(body)["reason"] == "etcd has not answered for 99s (limit 10s)"
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")


class FakeRegistry:
    """Answers get_config() from a script: a value, or an exception to raise."""

    def __init__(self, script):
        self.script = list(script)

    async def get_config(self):
        outcome = self.script.pop(0) if self.script else b"{}"
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_etcd_probe_records_answers_only():
    now = [100.0]

    async def run() -> list:
        probe = EtcdProbe(FakeRegistry([b"{}", EtcdUnavailable("down"), EtcdUnavailable("down")]), 0.01,
                          clock=lambda: now[0])
        assert probe.silence() is None
        task = asyncio.create_task(probe.run())
        seen = []
        for step in range(3):
            await asyncio.sleep(0.005 if step == 0 else 0.01)
            now[0] += 10
            seen.append(probe.silence())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen

    assert asyncio.run(run()) == [10.0, 20.0, 30.0]  # one answer at t=100, then only failures


def test_healthy_dual_stack_names_both_subnets():
    code, body = health_verdict(replace(healthy(), subnet6="fd00:10:244:7::/64"), max_etcd_silence=10)
    assert code == 200 and body["subnet"] == "10.244.7.0/24" and body["subnet6"] == "fd00:10:244:7::/64"
