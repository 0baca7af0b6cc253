"""``GET /healthz`` and ``GET /metrics`` on ``--healthz-ip``:``--healthz-port``.

Unlike flannel's endpoint, which always answers 200, ``/healthz`` judges:
200 while the lease is held, the datapath is up and etcd answered within the
staleness window; 503 with the reason otherwise. The verdict is the pure
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

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .snapshot import Snapshot

if TYPE_CHECKING:
    from ..subnet.registry import EtcdRegistry

__all__ = ["HealthServer", "etcd_staleness", "health_verdict", "probe_etcd_forever"]

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
    """``(200, body)`` when healthy, else ``(503, body)`` with ``body["reason"]``."""
    remaining = snap.lease_remaining
    body: dict[str, Any] = {
        "phase": snap.phase,
        "subnet": snap.subnet,
        "backend": snap.backend,
        "lease_expires_in_seconds": None if remaining is None else round(remaining, 1),
        "etcd_last_answer_seconds_ago": None if snap.etcd_silence is None else round(snap.etcd_silence, 1),
    }
    reason = _unhealthy_reason(snap, max_etcd_silence)
    if reason is None:
        return 200, {"status": "ok", **body}
    return 503, {"status": "unhealthy", "reason": reason, **body}


def _unhealthy_reason(snap: Snapshot, max_etcd_silence: float) -> str | None:
    if not snap.ready or snap.phase != "running":
        return f"not running: {snap.phase}"
    remaining = snap.lease_remaining
    if snap.subnet is None or remaining is None:
        return "no subnet lease"
    if remaining <= 0:
        return f"subnet lease {snap.subnet} expired {-remaining:.0f}s ago"
    if not snap.datapath_up:
        return "datapath is down"
    if snap.etcd_silence is None:
        return "etcd has not answered yet"
    if snap.etcd_silence > max_etcd_silence:
        return f"etcd has not answered for {snap.etcd_silence:.0f}s (limit {max_etcd_silence:.0f}s)"
    return None


async def probe_etcd_forever(registry: EtcdRegistry, interval: float) -> None:
    """Keep ``registry.last_success`` current with a cheap read whenever etcd has
    been quiet for ``interval`` (renewals and watch events count as answers),
    so that silence means etcd is unreachable, not merely that nothing happened."""
    from ..subnet.registry import EtcdAuthError, EtcdUnavailable

    warned = False
    while True:
        last = registry.last_success
        if last is None or time.monotonic() - last >= interval:
            try:
                await registry.get_config()
            except (EtcdUnavailable, EtcdAuthError) as exc:
                log.debug("etcd probe failed: %s", exc)
            except Exception as exc:  # keep probing; the health verdict shows the silence
                if not warned:
                    log.warning("etcd probe failed unexpectedly: %s: %s", type(exc).__name__, exc)
                    warned = True
        await asyncio.sleep(interval)


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
        except (asyncio.TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            pass  # a bad or slow client gets no answer
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
