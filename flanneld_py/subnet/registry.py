"""EtcdRegistry: flannel's keys in etcd through the v3 API (aetcd), and nothing else.

Policy (which subnet, when to renew, what a race means) lives in
:mod:`flanneld_py.subnet.manager`; this module only stores and reads.
"""

from __future__ import annotations

import asyncio
import time
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as etcd_errors
import grpc
from aetcd import rpc
from aetcd.rtypes import EventKind

from ..core.lease import KeyDeleted, KeyPut
from .store import EtcdAuthError, EtcdUnavailable, StoredSubnet, WatchCompacted

__all__ = [
    "EtcdAuthError",
    "EtcdTls",
    "endpoints_use_https",
    "EtcdUnavailable",
    "EtcdRegistry",
    "StoredSubnet",
    "WatchCompacted",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    https: bool = False  # an https:// endpoint: TLS even without files (the system's CAs)

    @property
    def enabled(self) -> bool:
        return bool(self.https or self.cafile or self.certfile or self.keyfile)

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC credentials; :class:`EtcdAuthError` naming the flag if a file cannot be used."""
        if bool(self.certfile) != bool(self.keyfile):
            raise EtcdAuthError("--etcd-certfile and --etcd-keyfile go together (a client certificate needs its key)")

        def read(flag: str, path: str | None) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as handle:
                    return handle.read()
            except OSError as exc:
                raise EtcdAuthError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read("--etcd-cafile", self.cafile),
            private_key=read("--etcd-keyfile", self.keyfile),
            certificate_chain=read("--etcd-certfile", self.certfile),
        )

    def explain(self, endpoint: str, detail: str) -> str:
        """Why a TLS failure happened, in the operator's terms (which flag and file to check)."""
        lowered = detail.lower()
        if "verify" in lowered or "issuer" in lowered or "peer name" in lowered:
            ca = f"--etcd-cafile={self.cafile}" if self.cafile else "the system's CAs (no --etcd-cafile given)"
            return f"cannot verify the certificate of etcd at {endpoint} with {ca}: {detail}"
        if "unwrap failed" in lowered or "tsi_data_corrupted" in lowered or "alert" in lowered:
            if not self.certfile:
                return (f"etcd at {endpoint} ended the TLS session: it requires a client certificate "
                        f"(give --etcd-certfile and --etcd-keyfile) ({detail})")
            return (f"etcd at {endpoint} ended the TLS session: it does not accept --etcd-certfile={self.certfile}; "
                    f"check that etcd's --trusted-ca-file signed it ({detail})")
        return f"TLS with etcd at {endpoint} failed: {detail}"


# A member that dies silently (frozen, powered off, cut off by a firewall) keeps a
# watch stream open forever without these: the client pings every 10 s on a
# busy connection and gives it up when 5 s pass without an answer. etcd allows
# pings every 5 s or more while a stream is open (--grpc-keepalive-min-time).
#
# Failover and retries are ours, so gRPC's own reconnect backoff (up to 2 min, and
# shared by every channel to an address through the global subchannel pool) must
# not keep a fresh channel from reaching an etcd that is back: each channel gets
# its own subchannels, and they retry within 2 s.
CHANNEL_OPTIONS = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.min_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}

_AUTH_MARKERS = ("ssl", "handshake", "certificate", "tls", "authenticat", "permission denied")
# With TLS, etcd rejects a client certificate by a TLS alert after the handshake,
# which gRPC reports as a failed unwrap of the first record.
_TLS_MARKERS = ("unwrap failed", "tsi_data_corrupted")
_TRANSIENT = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.InternalError,
    etcd_errors.WatchTimeoutError,  # a member that accepts the connection but never answers
    asyncio.TimeoutError,
)


class _Client(aetcd.Client):
    """aetcd's client with a TLS-capable channel (aetcd itself only dials plaintext)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._target = target
        self._credentials = credentials
        self._connect_lock = asyncio.Lock()

    @property
    def target(self) -> str:
        return self._target

    async def connect(self) -> None:
        async with self._connect_lock:  # requests that start together share one channel
            if not self._connected.is_set():
                await self._connect()

    async def _connect(self) -> None:
        options = list(self._options.items())
        if self._credentials is not None:
            self.channel = rpc.secure_channel(self._target, self._credentials, options=options)
        else:
            self.channel = rpc.insecure_channel(self._target, options=options)
        # A member cut off from the leader ends our watch and answers "no leader" (etcd's
        # WithRequireLeader): else a partitioned member would keep a silent watch open.
        metadata: list[tuple[str, str]] = [("hasleader", "true")]
        if self._username is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            try:
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                await self.channel.close()
                etcd_errors._handle_exception(exc)
            metadata.append(("token", resp.token))
        self.metadata = tuple(metadata)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


async def _close_quietly(client: _Client) -> None:
    try:
        await client.close()
    except Exception:  # closing a dead channel may fail; nothing to keep
        pass


def endpoints_use_https(text: str) -> bool:
    """True if any endpoint says ``https://``: then the channel must be TLS."""
    return any(item.strip().lower().startswith("https://") for item in text.split(","))


def parse_endpoints(text: str) -> list[str]:
    """``http://a:2379,https://b:2379`` -> ``["a:2379", "b:2379"]`` (gRPC targets)."""
    targets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        if not parts.hostname:
            raise ValueError(f"etcd endpoint {item!r} has no host")
        targets.append(f"{parts.hostname}:{parts.port or 2379}")
    if not targets:
        raise ValueError("no etcd endpoints given")
    return targets


class EtcdRegistry:
    """flannel's records in etcd: ``<prefix>/config`` and ``<prefix>/subnets/<name>``.

    Fails over between endpoints: a request that cannot reach the current
    endpoint moves to the next one and raises :class:`EtcdUnavailable`, so the
    caller's retry lands on a live member.
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/coreos.com/network",
        tls: EtcdTls | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.endpoints = endpoints
        self.prefix = prefix.rstrip("/")
        self._tls = tls if tls is not None and tls.enabled else None
        self._credentials: grpc.ChannelCredentials | None = None  # made at the first connection
        self._username = username
        self._password = password
        self._timeout = timeout
        self._index = 0
        self._client: _Client | None = None
        self.errors = 0
        self.reconnects = 0
        self.last_success: float | None = None  # time.monotonic() of the last answer

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    @property
    def subnets_prefix(self) -> bytes:
        return f"{self.prefix}/subnets/".encode()

    def subnet_key(self, name: str) -> bytes:
        return self.subnets_prefix + name.encode()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await _close_quietly(client)

    async def _connected(self) -> _Client:
        client = self._client
        if client is None:
            if self._tls is not None and self._credentials is None:
                self._credentials = self._tls.credentials()
            client = _Client(
                self.endpoint,
                self._credentials,
                username=self._username,
                password=self._password,
                timeout=self._timeout,
                options=CHANNEL_OPTIONS,
            )
            self._client = client  # before connecting, so that a failure fails over from it
            await self._call(client.connect(), client)
        return client

    async def _failover(self, client: _Client | None) -> None:
        """Move to the next endpoint because ``client`` failed.

        Requests and the watch share one client: when several of them fail
        on it together, only the first moves on (closing the client ends the
        others' calls, which then fail without skipping another endpoint).
        """
        if self._client is client:
            # Move on before closing: closing ends the watch, whose retry must
            # already find the next endpoint, not reconnect to this one.
            self._client = None
            self._index = (self._index + 1) % len(self.endpoints)
            self.reconnects += 1
        if client is not None:
            await _close_quietly(client)

    async def _call(self, awaitable, client: _Client | None):  # type: ignore[no-untyped-def]
        """Await one request on ``client``, mapping aetcd's errors onto ours."""
        endpoint = self.endpoint if client is None else client.target
        try:
            async with asyncio.timeout(self._timeout + 1):  # not wait_for: it can drop a cancellation
                result = await awaitable
        except _TRANSIENT as exc:
            self.errors += 1
            detail = str(exc) or type(exc).__name__
            lowered = detail.lower()
            if self._tls is not None and any(marker in lowered for marker in _AUTH_MARKERS + _TLS_MARKERS):
                raise EtcdAuthError(self._tls.explain(endpoint, detail)) from None
            if any(marker in lowered for marker in _AUTH_MARKERS):
                raise EtcdAuthError(f"etcd at {endpoint} refused us: {detail}") from None
            await self._failover(client)
            raise EtcdUnavailable(f"etcd at {endpoint} unreachable: {detail}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            # Not our cancellation: grpc ends the calls of a channel that another
            # request closed when it failed over, and this was one of them.
            self.errors += 1
            raise EtcdUnavailable(f"request to etcd at {endpoint} cut off by a failover") from None
        except etcd_errors.UnauthenticatedError as exc:
            self.errors += 1
            raise EtcdAuthError(f"etcd at {self.endpoint} refused the credentials: {exc}") from None
        self.last_success = time.monotonic()
        return result

    async def request(self, method: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        client = await self._connected()
        return await self._call(getattr(client, method)(*args, **kwargs), client)

    # --- config --------------------------------------------------------------

    @property
    def config_key(self) -> bytes:
        return f"{self.prefix}/config".encode()

    async def get_config(self) -> bytes | None:
        found = await self.request("get", self.config_key)
        return None if found is None else bytes(found.value)

    async def get_config_revision(self) -> tuple[bytes | None, int]:
        """The raw network config (None if absent) and the store revision it was read at."""
        result = await self.request("get_prefix", self.config_key)
        value = next((bytes(kv.value) for kv in result if bytes(kv.key) == self.config_key), None)
        return value, result.header.revision

    async def watch_config(self, start_revision: int) -> AsyncIterator[tuple[bytes | None, int]]:
        """The raw config at each change from ``start_revision`` on (None: deleted), with its revision."""
        async with aclosing(self._watch(self.config_key, start_revision, prefix=False)) as events:
            async for event in events:
                value = bytes(event.kv.value) if event.kind == EventKind.PUT else None
                yield value, int(event.kv.mod_revision)

    # --- subnets -------------------------------------------------------------

    async def list_subnets(self) -> tuple[list[StoredSubnet], int]:
        """All subnet records and the store revision they were read at."""
        result = await self.request("get_prefix", self.subnets_prefix)
        start = len(self.subnets_prefix)
        records = [
            StoredSubnet(bytes(kv.key)[start:].decode(errors="replace"), bytes(kv.value), kv.lease, kv.mod_revision)
            for kv in result
        ]
        return records, result.header.revision

    async def get_subnet(self, name: str) -> StoredSubnet | None:
        found = await self.request("get", self.subnet_key(name))
        if found is None:
            return None
        return StoredSubnet(name, bytes(found.value), found.lease, found.mod_revision)

    async def grant(self, ttl: int) -> int:
        lease = await self.request("lease", ttl)
        return int(lease.id)

    async def create_subnet(self, name: str, value: bytes, lease_id: int) -> bool:
        """Create the key only if absent, bound to ``lease_id``; False if it exists."""
        client = await self._connected()
        key = self.subnet_key(name)
        ok, _ = await self._call(client.transaction(
            compare=[client.transactions.create(key) == 0],
            success=[client.transactions.put(key, value, lease=lease_id)],
            failure=[],
        ), client)
        return bool(ok)

    async def update_subnet(self, name: str, value: bytes, lease_id: int, mod_revision: int) -> bool:
        """Rewrite our own key only if nobody changed it since ``mod_revision``."""
        client = await self._connected()
        key = self.subnet_key(name)
        ok, _ = await self._call(client.transaction(
            compare=[client.transactions.mod(key) == mod_revision],
            success=[client.transactions.put(key, value, lease=lease_id)],
            failure=[],
        ), client)
        return bool(ok)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh the etcd lease; its new TTL in seconds, 0 if it no longer exists."""
        reply = await self.request("refresh_lease", lease_id)
        return 0 if reply is None else int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.request("revoke_lease", lease_id)
        except etcd_errors.ClientError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of an etcd lease, or -1 if it does not exist."""
        info = await self.request("get_lease_info", lease_id, keys=False)
        return int(info.TTL)

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[tuple[list[KeyPut | KeyDeleted], int]]:
        """Batches of subnet events from ``start_revision`` on, each with its revision.

        Raises :class:`WatchCompacted` when that revision is gone and
        :class:`EtcdUnavailable` when the stream breaks; the caller resumes
        from the last revision it saw plus one.
        """
        start = len(self.subnets_prefix)
        async with aclosing(self._watch(self.subnets_prefix, start_revision, prefix=True)) as events:
            async for event in events:
                name = bytes(event.kv.key)[start:].decode(errors="replace")
                item: KeyPut | KeyDeleted
                if event.kind == EventKind.PUT:
                    item = KeyPut(name, bytes(event.kv.value))
                else:
                    item = KeyDeleted(name)
                yield [item], int(event.kv.mod_revision)

    async def _watch(self, key: bytes, start_revision: int, prefix: bool) -> AsyncIterator[Any]:
        """aetcd's events for ``key`` (or every key under it), with our errors (see watch_subnets)."""
        client = await self._connected()
        start_watch = client.watch_prefix if prefix else client.watch
        try:
            watch = await self._call(start_watch(key, start_revision=start_revision), client)
        except etcd_errors.RevisionCompactedError:
            raise WatchCompacted() from None
        try:
            async for event in watch:
                self.last_success = time.monotonic()
                yield event
        except etcd_errors.RevisionCompactedError:
            raise WatchCompacted() from None
        except (*_TRANSIENT, grpc.aio.AioRpcError, etcd_errors.ClientError) as exc:
            self.errors += 1
            await self._failover(client)
            raise EtcdUnavailable(f"watch on {client.target} broke: {exc}") from None
        finally:
            try:
                await watch.cancel()
            except Exception:  # the stream may already be gone
                pass
