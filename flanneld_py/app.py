"""The daemon: wiring from :class:`DaemonOptions` to running parts, with one exit path.

Start-up order: underlay interface -> etcd and the network config -> backend
(its lease attributes) -> subnet lease -> datapath -> subnet file -> CNI
socket -> ready. Then two long-lived tasks: renewing our lease and watching
everyone's. A stop signal or a fatal error ends both and shuts down in order.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, TypeVar

from .backend.base import Backend, BackendContext
from .backend.registry import create_backend
from .cancellation import cancel_and_wait
from .cni.models import ConfigDefaults
from .cni.server import CniServer
from .core.lease import BadRecord, KeyDeleted, KeyPut, LeaseAttrs, LeaseError, LeaseEvent, LeaseWatcher
from .core.netconfig import ConfigError, NetworkConfig, parse_network_config
from .core.renewal import Backoff, renewal_delay
from .core.subnetenv import SubnetEnv
from .netlink import InterfaceInfo, Netlink
from .ops import attach_operations
from .options import DaemonOptions
from .subnet.manager import LeaseLost, LocalManager, NoFreeSubnet, OwnLease
from .subnet.registry import (
    EtcdAuthError,
    EtcdRegistry,
    EtcdTls,
    EtcdUnavailable,
    WatchCompacted,
    endpoints_use_https,
    parse_endpoints,
)
from .subnetfile import previous_subnet, write_subnet_file
from .unixsock import SocketPathBusy

__all__ = ["Daemon", "DaemonState", "FatalError"]

log = logging.getLogger("flanneld_py")
_T = TypeVar("_T")


STOP_DEADLINE = 4.5  # seconds from a stop signal to a forced exit (the promise: stopped within 5 s)


def _exit_if_stuck(deadline: float, step: Callable[[], str], loop: asyncio.AbstractEventLoop) -> None:
    """A last resort for a shutdown that hangs (say, a kernel call that never returns in a
    worker thread): exit anyway, so that a restart is not blocked until systemd's SIGKILL.
    The lease and the datapath are kept as on any stop without --cleanup-on-exit. The log
    says which step hung and where every thread was, for the bug report."""

    def give_up() -> None:
        log.error("shutdown did not finish within %.0fs (stuck at: %s); exiting anyway; "
                  "task and thread stacks follow on stderr", deadline, step())
        for task in list(asyncio.all_tasks(loop)):
            print(f"task {task.get_name()}: {' -> '.join(_await_chain(task.get_coro()))}", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(deadline, give_up)
    timer.daemon = True
    timer.start()


def _await_chain(coro: object) -> list[str]:
    """Where a coroutine waits, through the coroutines and async generators it awaits."""
    chain: list[str] = []
    while coro is not None and len(chain) < 32:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})")
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                or getattr(coro, "gi_yieldfrom", None))
    return chain


class FatalError(RuntimeError):
    """Ends the daemon with exit code 1 and this message."""


@dataclass
class DaemonState:
    """What the daemon is doing, for readiness, health, status and metrics."""

    phase: str = "starting"
    config: NetworkConfig | None = None
    lease: OwnLease | None = None
    lease_expires_at: float | None = None  # wall clock
    backend: Backend | None = None
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    peer_events: int = 0


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.state = DaemonState()
        self.registry = EtcdRegistry(
            parse_endpoints(options.etcd_endpoints),
            prefix=options.etcd_prefix,
            tls=EtcdTls(options.etcd_cafile, options.etcd_certfile, options.etcd_keyfile,
                        https=endpoints_use_https(options.etcd_endpoints)),
            username=options.etcd_username,
            password=options.etcd_password,
        )
        self.manager = LocalManager(self.registry, lease_ttl=max(1, round(options.subnet_lease_ttl)))
        self.netlink: Netlink | None = None
        self.subnet_env: SubnetEnv | None = None
        self.watcher: LeaseWatcher | None = None
        self.stopping = asyncio.Event()
        self._extras: list[object] = []  # started services with an async close()
        self._shutdown_step = "stopping the running tasks"
        self.on_state_change: list[Callable[[DaemonState], None]] = []  # run on every phase change

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)
        try:
            self._extras.extend(await attach_operations(self))
            await self._start()
            if self.stopping.is_set():
                return 0
            await self._serve()
        except (FatalError, ConfigError, NoFreeSubnet, LeaseLost, EtcdAuthError) as exc:
            log.error("%s", exc)
            return 1
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise
        except Exception:
            log.exception("flanneld-py failed unexpectedly; this is a bug, please report it with this log")
            return 1
        finally:
            await self._shutdown()
        return 0

    def _request_stop(self, signum: int | None = None) -> None:
        if signum is not None and not self.stopping.is_set():
            log.info("received %s, shutting down", signal.Signals(signum).name)
            _exit_if_stuck(STOP_DEADLINE, lambda: self._shutdown_step, asyncio.get_running_loop())
        self.stopping.set()

    def _set_phase(self, phase: str) -> None:
        self.state.phase = phase
        log.debug("phase: %s", phase)
        for callback in self.on_state_change:
            callback(self.state)

    async def _start(self) -> None:
        self.netlink = await asyncio.to_thread(Netlink)
        try:
            iface = await asyncio.to_thread(self.netlink.interface_info, self.options.iface)
        except LookupError as exc:  # a configuration mistake: say which setting to fix
            raise FatalError(f"{exc.args[0]}: set --iface (FLANNELD_IFACE) to the underlay interface") from None
        public_ip = IPv4Address(self.options.public_ip) if self.options.public_ip else iface.address
        log.info("using interface %s (%s, mtu %d), public IP %s", iface.name, iface.address, iface.mtu, public_ip)
        self._set_phase("waiting for network config")
        config = await self._until_stopped(self.manager.wait_for_config(self.stopping))
        if config is None:
            return
        self.state.config = config
        log.info("network %s, subnets /%d, backend %s", config.network, config.subnet_len, config.backend.type)
        backend = self._make_backend(config, iface, public_ip)
        self._set_phase("acquiring lease")
        own = await self._until_stopped(self._acquire(config, backend.lease_attrs()))
        if own is None:
            return
        self._hold(own)
        log.info("lease acquired: %s (etcd lease %x, ttl %ds)", own.subnet, own.lease_id, own.ttl)
        self._set_phase("starting datapath")
        await backend.start(own.subnet)
        self.state.backend = backend
        env = SubnetEnv(config.network, own.subnet, backend.mtu, self.options.ip_masq)
        write_subnet_file(self.options.subnet_file, env)
        log.info("wrote %s: subnet %s, mtu %d", self.options.subnet_file, env.gateway, env.mtu)
        await self._start_services(env)
        self.state.ready = True
        self._set_phase("running")

    async def _until_stopped(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """Await ``work`` unless a stop signal comes first (then None)."""
        task = asyncio.create_task(work)
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop.cancel()
            return task.result()
        await cancel_and_wait([task])
        return None

    def _make_backend(self, config: NetworkConfig, iface: InterfaceInfo, public_ip: IPv4Address) -> Backend:
        assert self.netlink is not None
        ctx = BackendContext(config, iface, public_ip, self.netlink, offload=self.options.offload)
        try:
            return create_backend(ctx)
        except ValueError as exc:
            raise FatalError(str(exc)) from None

    async def _acquire(self, config: NetworkConfig, attrs: LeaseAttrs) -> OwnLease:
        previous = previous_subnet(self.options.subnet_file)
        backoff = Backoff()
        while True:
            try:
                return await self.manager.acquire(config, attrs, previous)
            except EtcdUnavailable as exc:
                delay = backoff.next()
                log.warning("cannot reach etcd to acquire a lease (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    def _hold(self, own: OwnLease) -> None:
        self.state.lease = own
        self.state.lease_expires_at = time.time() + own.ttl

    async def _start_services(self, env: SubnetEnv) -> None:
        """The CNI socket: pods can be wired once the subnet file exists."""
        self.subnet_env = env
        server = CniServer(
            ConfigDefaults(subnet_file=self.options.subnet_file,
                           gso_max_size=self.state.backend.pod_gso_max_size if self.state.backend else None),
            current_lease=lambda: self.subnet_env,
            node=self.netlink,
        )
        try:
            await server.start(self.options.cni_socket)
        except SocketPathBusy as exc:
            raise FatalError(f"cannot serve the CNI plugin: {exc} (--cni-socket)") from None
        self._extras.append(server)

    async def _serve(self) -> None:
        tasks = [
            asyncio.create_task(self._renew_forever(), name="renew"),
            asyncio.create_task(self._watch_forever(), name="watch"),
            asyncio.create_task(self._watch_config_forever(), name="config"),
            asyncio.create_task(self.stopping.wait(), name="stop"),
        ]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(pending)
        for task in done:
            if task.get_name() != "stop" and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _shutdown(self) -> None:
        self._set_phase("stopping")
        for extra in reversed(self._extras):
            self._shutdown_step = f"closing {type(extra).__name__}"
            try:
                await extra.close()  # type: ignore[attr-defined]
            except Exception as exc:
                log.warning("closing %s: %s", type(extra).__name__, exc)
        if self.state.backend is not None:
            self._shutdown_step = f"stopping the {self.state.backend.type_name} backend"
            await self.state.backend.stop(cleanup=self.options.cleanup_on_exit)
        self._shutdown_step = "closing the etcd client"
        await self.registry.close()
        if self.netlink is not None:
            self._shutdown_step = "closing the netlink socket"
            await asyncio.to_thread(self.netlink.close)
        log.info("stopped (lease kept so that a restart gets the same subnet)")

    # --- renewal -------------------------------------------------------------

    async def _renew_forever(self) -> None:
        margin = self.options.subnet_lease_renew_margin * 60
        while True:
            own = self.state.lease
            assert own is not None
            await asyncio.sleep(renewal_delay(own.ttl, margin))
            await self._renew_once()

    async def _renew_once(self) -> None:
        backoff = Backoff(first=0.5, ceiling=5.0)
        while True:
            own = self.state.lease
            assert own is not None
            try:
                renewed = await self.manager.renew(own)
            except EtcdUnavailable as exc:
                delay = backoff.next()
                log.warning("lease renewal failed (%s); retrying in %.1fs, datapath keeps forwarding", exc, delay)
                await asyncio.sleep(delay)
                continue
            if renewed.lease_id != own.lease_id:
                log.info("lease on %s re-claimed under etcd lease %x", renewed.subnet, renewed.lease_id)
            else:
                log.info("lease on %s renewed (ttl %ds)", renewed.subnet, renewed.ttl)
            self._hold(renewed)
            return

    # --- watch ---------------------------------------------------------------

    async def _watch_forever(self) -> None:
        assert self.state.config is not None and self.state.lease is not None
        self.watcher = LeaseWatcher(self.state.config, own_subnet=self.state.lease.subnet)
        backoff = Backoff(first=0.5, ceiling=3.0)  # short: a rejoining etcd should be noticed quickly
        revision: int | None = None
        lost = False
        while True:
            try:
                if lost:
                    await self.registry.get_config()  # a real answer, not just a reconnect
                    log.info("etcd is back; resuming the watch at revision %s", "start" if revision is None else revision + 1)
                    lost = False
                if revision is None:
                    revision = await self._relist()
                async for events, event_revision in self.registry.watch_subnets(revision + 1):
                    await self._handle_events(events)
                    revision = event_revision
                    backoff.reset()
            except WatchCompacted:
                log.info("watch revision %s was compacted; re-listing all leases", revision)
                revision = None
            except EtcdUnavailable as exc:
                if not lost:
                    log.warning("lost etcd (%s); keeping current routes and retrying", exc)
                    lost = True
                await asyncio.sleep(backoff.next())

    async def _watch_config_forever(self) -> None:
        """Say once when the network config in etcd changes, breaks or goes away at run time.

        The datapath keeps the config read at start (flannel's rule: a new
        config needs a restart), so a bad edit never takes a running node down.
        """
        reported: bytes | None = None  # the raw value last complained about
        backoff = Backoff(first=1.0, ceiling=30.0)
        while True:
            try:
                raw, revision = await self.registry.get_config_revision()
                reported = self._judge_config(raw, reported)
                async for raw, revision in self.registry.watch_config(revision + 1):
                    reported = self._judge_config(raw, reported)
                    backoff.reset()
            except WatchCompacted:
                continue
            except EtcdUnavailable:
                await asyncio.sleep(backoff.next())  # the lease watch reports etcd's absence

    def _judge_config(self, raw: bytes | None, reported: bytes | None) -> bytes | None:
        running = self.state.config
        assert running is not None
        if raw is None:
            problem = "was deleted"
        else:
            try:
                config = parse_network_config(raw)
            except ConfigError as exc:
                problem = f"is now invalid ({exc})"
            else:
                if config == running:
                    if reported is not None:
                        log.info("network config %s/config is the one in use again", self.registry.prefix)
                    return None
                problem = "changed"
        value = b"" if raw is None else raw
        if value != reported:
            log.warning("network config %s/config %s; still using the config read at start (Network %s, "
                        "backend %s); restart flanneld-py to apply a new one",
                        self.registry.prefix, problem, running.network, running.backend.type)
        return value

    async def _relist(self) -> int:
        assert self.watcher is not None
        records, revision = await self.registry.list_subnets()
        own = self.state.lease
        if own is not None and not any(r.name == own.name for r in records):
            await self._reclaim()
        events = self.watcher.reset(KeyPut(r.name, r.value) for r in records)
        await self._apply(events)
        return revision

    async def _handle_events(self, events: list[KeyPut | KeyDeleted]) -> None:
        assert self.watcher is not None and self.state.lease is not None
        own = self.state.lease
        others = []
        for event in events:
            if event.name != own.name:
                others.append(event)
            elif isinstance(event, KeyDeleted):
                log.warning("our lease %s was deleted from etcd", own.subnet)
                await self._reclaim()
            else:
                self._check_still_ours(event)
        await self._apply(self.watcher.update(others))

    def _check_still_ours(self, event: KeyPut) -> None:
        own = self.state.lease
        assert own is not None
        try:
            holder = LeaseAttrs.from_json(event.value).public_ip
        except LeaseError:
            return
        if holder != own.attrs.public_ip:
            raise LeaseLost(f"our subnet {own.subnet} was rewritten for {holder}; exiting so that this node gets drained")

    async def _reclaim(self) -> None:
        own = self.state.lease
        assert own is not None
        self._hold(await self.manager.reclaim(own))

    async def _apply(self, events: list[LeaseEvent]) -> None:
        backend = self.state.backend
        assert backend is not None
        real = []
        for event in events:
            if isinstance(event, BadRecord):
                log.warning("skipping lease record %r: %s", event.name, event.reason)
            else:
                real.append(event)
        if real:
            self.state.peer_events += len(real)
            await backend.apply(real)
