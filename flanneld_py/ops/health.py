"""``GET /healthz`` and ``GET /metrics`` on ``--healthz-ip``:``--healthz-port``.

Unlike flannel's endpoint, which always answers 200, ``/healthz`` judges:
200 while the lease is held, the datapath is up, the node forwards
(``net.ipv4.ip_forward=1``) and etcd answered within the staleness window;
503 with the reason otherwise. Node problems (see :mod:`.diagnose`) are listed
in the body under ``node_problems`` either way. The verdict is the pure
:func:`health_verdict` over a :class:`~.snapshot.Snapshot`.

The server is a few lines over ``asyncio.start_server``: one request per
connection, ``Connection: close``, nothing else of HTTP is needed here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .snapshot import Snapshot

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ..subnet.store import StoreStats

__all__ = ["EtcdProbe", "HealthServer", "etcd_staleness", "health_verdict"]

log = logging.getLogger(__name__)

MIN_STALENESS = 5.0
MAX_STALENESS = 60.0
READ_TIMEOUT = 5.0


def etcd_staleness(lease_ttl: float) -> float:
    """How long etcd may stay silent before ``/healthz`` says 503.

    A quarter of the lease TTL (silence that long puts a short lease at risk),
    at least 5 s and at most 60 s (past a minute we miss peer changes even
    when the lease is long): 60 s with the default 24 h TTL.
    """
    return min(MAX_STALENESS, max(MIN_STALENESS, lease_ttl / 4))


def health_verdict(snap: Snapshot, max_etcd_silence: float) -> tuple[int, dict[str, Any]]:
    """``(200, body)`` when healthy, else ``(503, body)`` naming the failed check and the reason."""
    remaining = snap.lease_remaining
    body: dict[str, Any] = {
        "phase": snap.phase,
        "subnet": snap.subnet,
        "backend": snap.backend,
        "lease_expires_in_seconds": None if remaining is None else round(remaining, 1),
        "etcd_last_answer_seconds_ago": None if snap.etcd_silence is None else round(snap.etcd_silence, 1),
    }
    if snap.subnet6 is not None:
        body["subnet6"] = snap.subnet6
    if snap.problems:
        body["node_problems"] = [{"problem": p.code, "message": p.message} for p in snap.problems]
    failed = _failed_check(snap, max_etcd_silence)
    if failed is None:
        return 200, {"status": "ok", **body}
    check, reason = failed
    return 503, {"status": "unhealthy", "failed": check, "reason": reason, **body}


def _failed_check(snap: Snapshot, max_etcd_silence: float) -> tuple[str, str] | None:
    """The first failing check (``phase``, ``lease``, ``datapath``, ``node``, ``etcd``) and why."""
    if not snap.ready or snap.phase != "running":
        return "phase", f"not running: {snap.phase}"
    remaining = snap.lease_remaining
    if snap.subnet is None or remaining is None:
        return "lease", "no subnet lease"
    if remaining <= 0:
        return "lease", f"subnet lease {snap.subnet} expired {-remaining:.0f}s ago"
    if not snap.datapath_up:
        return "datapath", "datapath is down"
    fatal = [p for p in snap.problems if p.fatal]
    if fatal:
        return "node", fatal[0].message
    if snap.etcd_silence is None:
        return "etcd", "etcd has not answered yet"
    if snap.etcd_silence > max_etcd_silence:
        return "etcd", f"etcd has not answered for {snap.etcd_silence:.0f}s (limit {max_etcd_silence:.0f}s)"
    return None


class EtcdProbe:
    """Asks etcd for the network config every ``interval`` seconds; ``answered_at``
    is the ``clock()`` time of the last answer (None: none yet).

    Health judges etcd by these probes alone: an idle daemon asks etcd nothing
    for hours, and opening a watch stream succeeds without reaching etcd, so
    neither says whether etcd answers *now*. Failures go through the daemon's
    registry, so they count in its error and reconnect counters.
    """

    def __init__(self, registry: StoreStats, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.interval = interval
        self.clock = clock
        self.answered_at: float | None = None

    def silence(self) -> float | None:
        """Seconds since etcd last answered a probe."""
        return None if self.answered_at is None else max(0.0, self.clock() - self.answered_at)

    async def run(self) -> None:
        from ..subnet.store import EtcdAuthError, EtcdUnavailable

        warned = False
        while True:
            try:
                await self.registry.get_config()
                self.answered_at = self.clock()
            except (EtcdUnavailable, EtcdAuthError) as exc:
                log.debug("etcd probe failed: %s", exc)
            except Exception as exc:  # keep probing; the silence shows in /healthz
                if not warned:
                    log.warning("etcd probe failed unexpectedly: %s: %s", type(exc).__name__, exc)
                    warned = True
            await asyncio.sleep(self.interval)


Response = tuple[int, str, bytes]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves ``/healthz`` from ``source()`` and ``/metrics`` from ``registry``."""

    def __init__(self, source: Callable[[], Snapshot], registry: CollectorRegistry, max_etcd_silence: float) -> None:
        self.source = source
        self.registry = registry
        self.max_etcd_silence = max_etcd_silence
        self._server: asyncio.AbstractServer | None = None

    def respond(self, method: str, path: str) -> Response:
        """Status, content type and body for one request (HEAD gets GET's headers)."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/healthz":
            code, body = health_verdict(self.source(), self.max_etcd_silence)
            return code, "application/json", json.dumps(body).encode() + b"\n"
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n"

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("health and metrics on http://%s:%d/healthz and /metrics", host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            while True:  # headers: read and ignore
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                if line in (b"\r\n", b"\n", b""):
                    break
            method, target, _version = request.decode("latin-1").split(" ", 2)
            code, content_type, body = self.respond(method, target.split("?", 1)[0])
            head = (
                f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            pass  # a bad or slow client gets no answer
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
