"""The daemon: wiring from :class:`DaemonOptions` to running parts, with one exit path.

Start-up order: etcd and the network config -> underlay interface (chosen by the
network's address families, as flanneld does) -> backend (its lease attributes) ->
subnet lease -> datapath -> subnet file -> CNI socket -> ready. Then two long-lived tasks: the lease (the runner of
:class:`~flanneld_py.core.lease_policy.LeasePolicy`: renewing ours, following
everyone's) and the network config's watch. A stop signal or a fatal error ends both and shuts down in order.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from ipaddress import IPv4Address, IPv6Address, IPv6Interface
from typing import Any, TypeVar

from .backend.base import Backend, BackendContext, CarriesIPv6, published_attrs
from .backend.factory import create_backend
from .cancellation import cancel_and_wait
from .core.lease import LeaseEvent
from .core.lease_policy import LeasePolicy
from .core.netconfig import ConfigError, NetworkConfig
from .core.subnetenv import SubnetEnv
from .core.underlay import Link, NoUnderlay, UnderlayChoice, choose_public_ipv6, ipv6_prefix
from .errors import FatalError
from .netlink import InterfaceInfo, Netlink, underlay_info
from .ops import attach_operations
from .options import DaemonOptions
from .state import DaemonState
from .subnet.manager import Claim, LeaseLost, LocalManager, NoFreeSubnet
from .subnet.registry import EtcdRegistry, EtcdTls, endpoints_use_https, parse_endpoints
from .subnet.runner import LeaseRunner, acquire_lease, follow_config, wait_for_config
from .subnet.store import EtcdAuthError
from .subnetfile import previous_ipv6_subnet, previous_subnet, write_subnet_file
from .unixsock import SocketPathBusy

__all__ = ["Daemon"]

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


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.state = DaemonState()
        self.store = EtcdRegistry(
            parse_endpoints(options.etcd_endpoints),
            prefix=options.etcd_prefix,
            tls=EtcdTls(options.etcd_cafile, options.etcd_certfile, options.etcd_keyfile,
                        https=endpoints_use_https(options.etcd_endpoints)),
            username=options.etcd_username,
            password=options.etcd_password,
        )
        self.manager = LocalManager(self.store, lease_ttl=max(1, round(options.subnet_lease_ttl)))
        self.netlink: Netlink | None = None
        self.subnet_env: SubnetEnv | None = None
        self.stopping = asyncio.Event()
        self._extras: list[object] = []  # started services with an async close()
        self._shutdown_step = "stopping the running tasks"
        self._underlay_link: Link | None = None  # the chosen interface, for its IPv6 address
        self._underlay_address6: IPv6Interface | None = None  # the IPv6 address chosen (IPv6-only network)
        self._claim: Claim | None = None  # how the lease was acquired: its listing seeds the lease watch
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
        self._set_phase("waiting for network config")
        config = await self._until_stopped(wait_for_config(self.store))
        if config is None:
            return
        self.state.config = config
        for warning in config.warnings:
            log.warning("%s", warning)
        log.info("network %s, subnets /%d, backend %s", config.network, config.subnet_len, config.backend.type)
        iface, public_ip = await self._choose_underlay(config)
        public_ipv6 = self._public_ipv6(config)
        backend = self._make_backend(config, iface, public_ip, public_ipv6)
        self._set_phase("acquiring lease")
        previous, previous6 = previous_subnet(self.options.subnet_file), previous_ipv6_subnet(self.options.subnet_file)
        attrs = published_attrs(backend, public_ipv6, config.enable_ipv4)
        claim = await self._until_stopped(acquire_lease(self.manager, config, attrs, previous, previous6))
        if claim is None:
            return
        own, self._claim = claim.own, claim
        self.state.hold(own)
        log.info("lease acquired: %s (etcd lease %x, ttl %ds)", own.subnets, own.lease_id, own.ttl)
        self._set_phase("starting datapath")
        if isinstance(backend, CarriesIPv6):
            await backend.start(own.subnet, own.subnet6)
        else:
            await backend.start(own.subnet)
        self.state.backend = backend
        env = SubnetEnv(config.network if config.enable_ipv4 else None, own.subnet if config.enable_ipv4 else None,
                        backend.mtu, self.options.ip_masq, config.ipv6.network if config.ipv6 else None, own.subnet6)
        write_subnet_file(self.options.subnet_file, env)
        log.info("wrote %s: subnet %s, mtu %d", self.options.subnet_file,
                 " and ".join(str(family.gateway) for family in env.ranges), env.mtu)
        await self._start_services(env)
        self.state.ready = True
        self._set_phase("running")

    async def _choose_underlay(self, config: NetworkConfig) -> tuple[InterfaceInfo, IPv4Address]:
        """The underlay from --iface, --iface-regex, --iface-can-reach and --public-ip(v6), as flannel
        picks it once it knows the network's families (by IPv6 on an IPv6-only network)."""
        assert self.netlink is not None
        choice = UnderlayChoice(self.options.iface, self.options.iface_regex, self.options.iface_can_reach,
                                self.options.public_ip, self.options.public_ipv6,
                                ipv6_only=config.enable_ipv6 and not config.enable_ipv4)
        try:
            underlay = await asyncio.to_thread(self.netlink.select_underlay, choice)
        except NoUnderlay as exc:
            raise FatalError(f"cannot choose the underlay interface: {exc}") from None
        for skipped in underlay.skipped:
            log.info("interface candidate skipped: %s", skipped)
        iface = underlay_info(underlay)
        self._underlay_link, self._underlay_address6 = underlay.link, underlay.address6
        if iface.address is None:
            log.info("using interface %s (%s, mtu %d), IPv6 only", iface.name, iface.address6, iface.mtu)
        else:
            log.info("using interface %s (%s, mtu %d), public IP %s", iface.name, iface.address, iface.mtu,
                     underlay.public_ip)
        return iface, underlay.public_ip

    def _public_ipv6(self, config: NetworkConfig) -> IPv6Address | None:
        """With EnableIPv6: --public-ipv6, else the underlay interface's global IPv6 address."""
        if not config.enable_ipv6:
            return None
        assert self._underlay_link is not None
        try:
            address = choose_public_ipv6(self._underlay_link, self.options.public_ipv6, self._underlay_address6)
        except NoUnderlay as exc:
            raise FatalError(str(exc)) from None
        assert config.ipv6 is not None
        log.info("IPv6 network %s, subnets /%d, public IPv6 %s", config.ipv6.network, config.ipv6.subnet_len,
                 address)
        return address

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

    def _make_backend(self, config: NetworkConfig, iface: InterfaceInfo, public_ip: IPv4Address,
                      public_ipv6: IPv6Address | None) -> Backend:
        assert self.netlink is not None
        segment6 = None
        if public_ipv6 is not None and self._underlay_link is not None:
            segment6 = ipv6_prefix(self._underlay_link, public_ipv6)
        ctx = BackendContext(config, iface, public_ip, self.netlink, offload=self.options.offload,
                             public_ipv6=public_ipv6, ipv6_prefix=segment6)
        try:
            return create_backend(ctx)
        except ValueError as exc:
            raise FatalError(str(exc)) from None

    async def _start_services(self, env: SubnetEnv) -> None:
        """The CNI socket (unless --cni-socket is empty): pods can be wired once the subnet file exists."""
        self.subnet_env = env
        if not self.options.cni_socket:
            return
        from .cni.models import ConfigDefaults  # here: a node without a CNI socket never loads the CNI side
        from .cni.server import CniServer

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
        assert self.state.config is not None
        tasks: list[asyncio.Task[None] | asyncio.Task[bool]] = [
            asyncio.create_task(self._run_lease(), name="lease"),
            asyncio.create_task(follow_config(self.store, self.state.config), name="config"),
            asyncio.create_task(self.stopping.wait(), name="stop"),
        ]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait(pending)
        for task in done:
            failure = task.exception()
            if failure is not None:
                raise failure

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
        await self.store.close()
        if self.netlink is not None:
            self._shutdown_step = "closing the netlink socket"
            await asyncio.to_thread(self.netlink.close)
        log.info("stopped (lease kept so that a restart gets the same subnet)")

    # --- the lease, after start-up ------------------------------------------------

    async def _run_lease(self) -> None:
        assert self.state.config is not None and self.state.lease is not None
        margin = self.options.subnet_lease_renew_margin * 60
        policy = LeasePolicy(self.state.config, self.state.lease, margin, asyncio.get_running_loop().time())
        claim, self._claim = self._claim, None
        await LeaseRunner(policy, self.manager, self._apply, self.state.hold, claim).run()

    async def _apply(self, events: Sequence[LeaseEvent]) -> None:
        backend = self.state.backend
        assert backend is not None
        self.state.peer_events += len(events)
        await backend.apply(events)
