"""EtcdRegistry: flannel's keys in etcd through the v3 gRPC API, and nothing else.

Policy (which subnet, when to renew, what a race means) lives in
:mod:`flanneld_py.subnet.manager` and :mod:`flanneld_py.core.lease_policy`;
this module only stores and reads. The channel is ours (TLS, keepalive,
require-leader, a private subchannel pool); the messages and methods are
etcd's, declared in :mod:`.etcdpb` (only what flannel needs). Errors are told
apart by gRPC status code; a TLS failure, which gRPC reports as UNAVAILABLE
with only a text, is diagnosed by a handshake of our own with :mod:`ssl`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc

from ..core.lease import KeyDeleted, KeyPut
from .etcdpb import COMPARE_EQUAL, EVENT_PUT, TARGET_CREATE, TARGET_MOD, EtcdStub, message
from .store import EtcdAuthError, EtcdUnavailable, StoredSubnet, SubnetBatch, WatchCompacted

__all__ = [
    "EtcdAuthError",
    "EtcdRegistry",
    "EtcdTls",
    "EtcdUnavailable",
    "StoredSubnet",
    "WatchCompacted",
    "endpoints_use_https",
    "parse_endpoints",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """How to reach etcd over TLS (all None and ``https`` False: plain TCP)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    https: bool = False  # an https:// endpoint: TLS even without files (the system's CAs)

    @property
    def enabled(self) -> bool:
        return bool(self.https or self.cafile or self.certfile or self.keyfile)

    def _check_pair(self) -> None:
        if bool(self.certfile) != bool(self.keyfile):
            raise EtcdAuthError("--etcd-certfile and --etcd-keyfile go together (a client certificate needs its key)")

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC credentials; :class:`EtcdAuthError` naming the flag if a file cannot be used."""
        self._check_pair()

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

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust and client certificate as :meth:`credentials`, for :func:`diagnose_tls`."""
        self._check_pair()
        context = ssl.create_default_context(cafile=self.cafile or None)
        if self.certfile and self.keyfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        context.set_alpn_protocols(["h2"])
        return context

    def cannot_verify(self, endpoint: str, detail: str) -> str:
        ca = f"--etcd-cafile={self.cafile}" if self.cafile else "the system's CAs (no --etcd-cafile given)"
        return f"cannot verify the certificate of etcd at {endpoint} with {ca}: {detail}"

    def refused_by_server(self, endpoint: str, detail: str) -> str:
        if not self.certfile:
            return (f"etcd at {endpoint} ended the TLS session: it requires a client certificate "
                    f"(give --etcd-certfile and --etcd-keyfile) ({detail})")
        return (f"etcd at {endpoint} ended the TLS session: it does not accept --etcd-certfile={self.certfile}; "
                f"check that etcd's --trusted-ca-file signed it ({detail})")

    def failed(self, endpoint: str, detail: str) -> str:
        return f"TLS with etcd at {endpoint} failed: {detail} (does it serve TLS on that port?)"


async def diagnose_tls(tls: EtcdTls, endpoint: str, timeout: float = 2.0) -> str | None:
    """Why TLS with ``endpoint`` fails, in the operator's terms; None if it does not (or cannot be reached).

    gRPC reports every TLS failure as UNAVAILABLE with only a text, so we shake
    hands ourselves: a certificate we cannot verify is a typed error at once; a
    client certificate the server refuses comes as an alert after the handshake
    (TLS 1.3), where an accepting server sends its HTTP/2 settings instead.
    """
    host, _, port = endpoint.rpartition(":")
    try:
        context = tls.ssl_context()
    except (OSError, ssl.SSLError):
        return None  # the files were readable for gRPC; leave the verdict to it
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        return tls.cannot_verify(endpoint, exc.verify_message or "certificate verify failed")
    except ssl.SSLError as exc:
        return _tls_verdict(tls, endpoint, exc)
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(timeout):
            await reader.read(1)
    except ssl.SSLError as exc:
        return _tls_verdict(tls, endpoint, exc)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    return None


def _tls_verdict(tls: EtcdTls, endpoint: str, exc: ssl.SSLError) -> str:
    """An alert from the server means it refused our certificate (or its absence), by
    OpenSSL's reason code (e.g. ``TLSV13_ALERT_CERTIFICATE_REQUIRED``); else TLS itself failed."""
    reason = exc.reason or type(exc).__name__
    if "ALERT" in reason:
        return tls.refused_by_server(endpoint, reason)
    return tls.failed(endpoint, reason)


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

# Codes after which another try (on the next endpoint) may work. CANCELLED: the
# channel was closed under the call by another request's failover.
_TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})


class WatchNotCreated(TimeoutError):
    """A member accepted the watch stream but never confirmed the watch."""


class _WatchRefused(PermissionError):
    """etcd refused to create the watch: our token expired, or the user may not read the keys."""


class _TokenExpired(EtcdAuthError):
    """etcd no longer knows our auth token: authenticate again and retry (fatal only if that fails)."""


_REQUIRE_LEADER = (("hasleader", "true"),)
# etcd's texts (rpctypes) for the cases its status code does not tell apart
_INVALID_TOKEN = "invalid auth token"
_NO_USER = "user name is empty"
_PERMISSION_DENIED = "permission denied"


def _cancelled_here() -> bool:
    """Whether a CancelledError is this task's own cancellation, not grpc ending the calls of a
    channel that another request closed when it failed over."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _prefix_end(prefix: bytes) -> bytes:
    """The end of etcd's key range that holds every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\0"


class _Member:
    """One gRPC channel to one etcd member, and the few calls flannel's records need."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None,
                 username: str | None, password: str | None, timeout: float) -> None:
        self.target = target
        options = list(CHANNEL_OPTIONS.items())
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.etcd = EtcdStub(self.channel)
        self.timeout = timeout
        # A member cut off from the leader ends our watch and answers "no leader" (etcd's
        # WithRequireLeader): else a partitioned member would keep a silent watch open.
        self.metadata: tuple[tuple[str, str], ...] = _REQUIRE_LEADER
        self._username = username
        self._password = password

    async def authenticate(self) -> None:
        """Trade the username and password for a token (nothing to do without them); again when
        etcd says the token expired (a simple token lapses after ``--auth-token-ttl``, 5 min by
        default, without a request, so a quiet node's next renewal would find it gone)."""
        if self._username is None:
            return
        request = message("AuthenticateRequest", name=self._username, password=self._password or "")
        try:
            reply = await self.etcd.authenticate(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # etcd's "authentication failed"
                raise EtcdAuthError(f"etcd at {self.target} refused the credentials: {exc.details()}") from None
            raise
        self.metadata = (*_REQUIRE_LEADER, ("token", reply.token))

    async def close(self) -> None:
        await self.channel.close()

    async def range(self, key: bytes, prefix: bool = False) -> Any:
        request = message("RangeRequest", key=key, range_end=_prefix_end(key) if prefix else b"")
        return await self.etcd.range(request, timeout=self.timeout, metadata=self.metadata)

    async def put_if(self, key: bytes, value: bytes, lease_id: int, *, mod_revision: int,
                     absent_prefix: bytes = b"") -> bool:
        """Put only if the key's mod revision is ``mod_revision`` (0: only if absent) and, with
        ``absent_prefix``, no key starting with it exists (all in one transaction)."""
        compare = message("Compare", key=key, result=COMPARE_EQUAL, target=TARGET_MOD, mod_revision=mod_revision)
        if mod_revision == 0:
            compare = message("Compare", key=key, result=COMPARE_EQUAL, target=TARGET_CREATE, create_revision=0)
        compares = [compare]
        if absent_prefix:  # every key in the range must have create revision 0, i.e. none exists
            compares.append(message("Compare", key=absent_prefix, range_end=_prefix_end(absent_prefix),
                                    result=COMPARE_EQUAL, target=TARGET_CREATE, create_revision=0))
        put = message("RequestOp", request_put=message("PutRequest", key=key, value=value, lease=lease_id))
        reply = await self.etcd.txn(message("TxnRequest", compare=compares, success=[put], failure=[]),
                                    timeout=self.timeout, metadata=self.metadata)
        return bool(reply.succeeded)

    async def grant(self, ttl: int) -> int:
        reply = await self.etcd.lease_grant(message("LeaseGrantRequest", TTL=ttl), timeout=self.timeout,
                                            metadata=self.metadata)
        return int(reply.ID)

    async def keepalive(self, lease_id: int) -> int:
        call = self.etcd.lease_keepalive(iter([message("LeaseKeepAliveRequest", ID=lease_id)]),
                                         timeout=self.timeout, metadata=self.metadata)
        try:
            async for reply in call:
                return int(reply.TTL)
            return 0
        finally:
            call.cancel()

    async def revoke(self, lease_id: int) -> None:
        try:
            await self.etcd.lease_revoke(message("LeaseRevokeRequest", ID=lease_id), timeout=self.timeout,
                                         metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # already gone: what we wanted
                raise

    async def time_to_live(self, lease_id: int) -> int:
        reply = await self.etcd.lease_time_to_live(message("LeaseTimeToLiveRequest", ID=lease_id, keys=False),
                                                   timeout=self.timeout, metadata=self.metadata)
        return int(reply.TTL)

    async def watch(self, key: bytes, start_revision: int, prefix: bool) -> AsyncGenerator[Any, None]:
        """etcd's events for ``key`` (or every key under it) from ``start_revision``, one at a time.

        Raises :class:`WatchCompacted`, :class:`WatchNotCreated`, or gRPC's error
        when the stream breaks (a member without a leader ends it so).
        """
        create = message("WatchCreateRequest", key=key, range_end=_prefix_end(key) if prefix else b"",
                         start_revision=start_revision)
        call = self.etcd.watch(metadata=self.metadata)
        try:
            await call.write(message("WatchRequest", create_request=create))
            created = False
            while True:
                if created:
                    reply = await call.read()
                else:
                    try:
                        async with asyncio.timeout(self.timeout):
                            reply = await call.read()
                    except TimeoutError:
                        raise WatchNotCreated(f"watch on {self.target} was not confirmed") from None
                if reply is grpc.aio.EOF:
                    raise EtcdUnavailable(f"watch on {self.target} ended")
                refusal = (_INVALID_TOKEN, _PERMISSION_DENIED)  # only ever in the reply that creates the watch
                if not created and reply.canceled and any(text in reply.cancel_reason for text in refusal):
                    raise _WatchRefused(reply.cancel_reason)
                created = created or reply.created
                if reply.compact_revision:  # etcd also marks the watch cancelled: this comes first
                    raise WatchCompacted(int(reply.compact_revision))
                if reply.canceled:
                    raise EtcdUnavailable(f"watch on {self.target} cancelled: {reply.cancel_reason}")
                for event in reply.events:
                    yield event
        finally:
            call.cancel()


async def _close_quietly(member: _Member) -> None:
    try:
        await member.close()
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
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # an IPv6 literal
        targets.append(f"{host}:{parts.port or 2379}")
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
        self._member: _Member | None = None
        self._connecting: asyncio.Lock | None = None
        self.errors = 0
        self.reconnects = 0
        self.last_success: float | None = None  # time.monotonic() of the last answer

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    @property
    def subnets_prefix(self) -> bytes:
        return f"{self.prefix}/subnets/".encode()

    @property
    def config_key(self) -> bytes:
        return f"{self.prefix}/config".encode()

    def subnet_key(self, name: str) -> bytes:
        return self.subnets_prefix + name.encode()

    async def close(self) -> None:
        if self._member is not None:
            member, self._member = self._member, None
            await _close_quietly(member)

    async def _connected(self) -> _Member:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # requests that start together share one channel
            member = self._member
            if member is None:
                if self._tls is not None and self._credentials is None:
                    self._credentials = self._tls.credentials()
                member = _Member(self.endpoint, self._credentials, self._username, self._password, self._timeout)
                self._member = member  # before authenticating, so that a failure fails over from it
                await self._call(member.authenticate(), member)
        return member

    async def _failover(self, member: _Member | None) -> None:
        """Move to the next endpoint because ``member`` failed.

        Requests and the watch share one channel: when several of them fail
        on it together, only the first moves on (closing the channel ends the
        others' calls, which then fail without skipping another endpoint).
        """
        if self._member is member:
            # Move on before closing: closing ends the watch, whose retry must
            # already find the next endpoint, not reconnect to this one.
            self._member = None
            self._index = (self._index + 1) % len(self.endpoints)
            self.reconnects += 1
        if member is not None:
            await _close_quietly(member)

    async def _request(self, make: Callable[[_Member], Awaitable[_T]]) -> _T:
        """``make``'s request on the current member; once more with a fresh token if ours expired."""
        member = await self._connected()
        try:
            return await self._call(make(member), member)
        except _TokenExpired:
            await self._call(member.authenticate(), member)
            return await self._call(make(member), member)

    async def _call(self, awaitable: Awaitable[_T], member: _Member) -> _T:
        """Await one request on ``member``, mapping gRPC's errors onto ours."""
        try:
            async with asyncio.timeout(self._timeout + 1):  # not wait_for: it can drop a cancellation
                result = await awaitable
        except grpc.aio.AioRpcError as exc:
            raise await self._classify(exc.code(), exc.details() or exc.code().name, member) from None
        except TimeoutError:
            raise await self._classify(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time", member) from None
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            # Not our cancellation: grpc ends the calls of a channel that another
            # request closed when it failed over, and this was one of them.
            self.errors += 1
            raise EtcdUnavailable(f"request to etcd at {member.target} cut off by a failover") from None
        self.last_success = time.monotonic()
        return result

    async def _classify(self, code: grpc.StatusCode, detail: str, member: _Member) -> Exception:
        """Our error for a failed call: fatal when the operator must act, else fail over."""
        self.errors += 1
        if code == grpc.StatusCode.PERMISSION_DENIED:  # the user is known but may not touch these keys
            return EtcdAuthError(f"etcd at {member.target} denied the etcd user access ({detail}): "
                                 f"grant it read and write on {self.prefix}/")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if _INVALID_TOKEN in detail and self._username is not None:
                return _TokenExpired(f"etcd at {member.target} refused the credentials: {detail}")
            return EtcdAuthError(f"etcd at {member.target} refused the credentials: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT and _NO_USER in detail:
            return EtcdAuthError(f"etcd at {member.target} requires authentication: give --etcd-username "
                                 f"and --etcd-password ({detail})")
        if code == grpc.StatusCode.UNAVAILABLE and self._tls is not None:
            problem = await diagnose_tls(self._tls, member.target)
            if problem is not None:
                return EtcdAuthError(problem)
        if code not in _TRANSIENT_CODES:
            log.warning("etcd at %s answered %s: %s; trying the next endpoint", member.target, code.name, detail)
        await self._failover(member)
        return EtcdUnavailable(f"etcd at {member.target} unreachable: {detail}")

    # --- config --------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        value, _revision = await self.get_config_revision()
        return value

    async def get_config_revision(self) -> tuple[bytes | None, int]:
        """The raw network config (None if absent) and the store revision it was read at."""
        reply = await self._request(lambda member: member.range(self.config_key))
        value = next((bytes(kv.value) for kv in reply.kvs), None)
        return value, int(reply.header.revision)

    async def watch_config(self, start_revision: int) -> AsyncGenerator[tuple[bytes | None, int], None]:
        """The raw config at each change from ``start_revision`` on (None: deleted), with its revision."""
        async with aclosing(self._watch(self.config_key, start_revision, prefix=False)) as events:
            async for event in events:
                value = bytes(event.kv.value) if event.type == EVENT_PUT else None
                yield value, int(event.kv.mod_revision)

    # --- subnets -------------------------------------------------------------

    def _subnet(self, kv: Any) -> StoredSubnet:
        name = bytes(kv.key)[len(self.subnets_prefix):].decode(errors="replace")
        return StoredSubnet(name, bytes(kv.value), int(kv.lease), int(kv.mod_revision))

    async def list_subnets(self) -> tuple[list[StoredSubnet], int]:
        """All subnet records and the store revision they were read at."""
        reply = await self._request(lambda member: member.range(self.subnets_prefix, prefix=True))
        return [self._subnet(kv) for kv in reply.kvs], int(reply.header.revision)

    async def get_subnet(self, name: str) -> StoredSubnet | None:
        reply = await self._request(lambda member: member.range(self.subnet_key(name)))
        found: Iterable[Any] = reply.kvs
        return next((self._subnet(kv) for kv in found), None)

    async def grant(self, ttl: int) -> int:
        return await self._request(lambda member: member.grant(ttl))

    async def create_subnet(self, name: str, value: bytes, lease_id: int, unique_prefix: str = "") -> bool:
        """Create the key only if absent (and no key starts with ``unique_prefix``), bound to
        ``lease_id``; False if it exists."""
        absent = self.subnet_key(unique_prefix) if unique_prefix else b""
        return await self._request(lambda member: member.put_if(self.subnet_key(name), value, lease_id,
                                                                mod_revision=0, absent_prefix=absent))

    async def update_subnet(self, name: str, value: bytes, lease_id: int, mod_revision: int) -> bool:
        """Rewrite our own key only if nobody changed it since ``mod_revision``."""
        key = self.subnet_key(name)
        return await self._request(lambda member: member.put_if(key, value, lease_id, mod_revision=mod_revision))

    async def keepalive(self, lease_id: int) -> int:
        """Refresh the etcd lease; its new TTL in seconds, 0 if it no longer exists."""
        return max(0, await self._request(lambda member: member.keepalive(lease_id)))

    async def revoke(self, lease_id: int) -> None:
        await self._request(lambda member: member.revoke(lease_id))

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of an etcd lease, or -1 if it does not exist."""
        return await self._request(lambda member: member.time_to_live(lease_id))

    async def watch_subnets(self, start_revision: int) -> AsyncGenerator[SubnetBatch, None]:
        """Batches of subnet events from ``start_revision`` on, each with its revision.

        Raises :class:`WatchCompacted` when that revision is gone and
        :class:`EtcdUnavailable` when the stream breaks; the caller resumes
        from the last revision it saw plus one.
        """
        async with aclosing(self._watch(self.subnets_prefix, start_revision, prefix=True)) as events:
            async for event in events:
                name = bytes(event.kv.key)[len(self.subnets_prefix):].decode(errors="replace")
                item: KeyPut | KeyDeleted
                if event.type == EVENT_PUT:
                    item = KeyPut(name, bytes(event.kv.value))
                else:
                    item = KeyDeleted(name)
                yield [item], int(event.kv.mod_revision)

    async def _watch(self, key: bytes, start_revision: int, prefix: bool) -> AsyncGenerator[Any, None]:
        """etcd's events for ``key`` (or every key under it), with our errors (see watch_subnets).

        etcd refuses a watch when it is created, before any event, so a refusal is retried once
        with a fresh token (ours may have expired) without repeating an event.
        """
        member = await self._connected()
        for fresh_token in (False, True):
            try:
                async with aclosing(member.watch(key, start_revision, prefix)) as events:
                    async for event in events:
                        self.last_success = time.monotonic()
                        yield event
                return
            except _WatchRefused as exc:
                self.errors += 1
                if fresh_token or self._username is None:
                    raise EtcdAuthError(f"etcd at {member.target} denied the etcd user a watch on "
                                        f"{key.decode(errors='replace')} ({exc}): grant it read on {self.prefix}/") from None
                await self._call(member.authenticate(), member)
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise
                # Not our cancellation: another request failed over and closed the channel.
                self.errors += 1
                raise EtcdUnavailable(f"watch on {member.target} cut off by a failover") from None
            except (grpc.aio.AioRpcError, WatchNotCreated, EtcdUnavailable) as exc:
                self.errors += 1
                await self._failover(member)
                if isinstance(exc, EtcdUnavailable):  # ended or cancelled: its text names the endpoint already
                    raise EtcdUnavailable(str(exc)) from None
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                raise EtcdUnavailable(f"watch on {member.target} broke: {detail}") from None
