"""Wiring of the operations pieces around the daemon (seen through :class:`~.snapshot.DaemonView`).

Started at the very beginning of ``Daemon.run()``, before etcd is reached:

* systemd notify: ``STATUS=`` on every phase change, ``READY=1`` exactly when
  the daemon turns ready (lease held, datapath up, subnet file written),
  ``STOPPING=1`` on shutdown, ``WATCHDOG=1`` from the event loop;
* an etcd probe that keeps "etcd answered recently" meaningful when the
  daemon has nothing else to ask;
* ``/healthz`` + ``/metrics`` when ``--healthz-port`` is set;
* the control socket for ``flanneld-py status``;
* once the lease is known, flannel's FORWARD accept rules (unless
  ``--iptables-forward-rules=false``) and, with ``--ip-masq``, the masquerade
  rules, each set kept in place every ``--iptables-resync`` seconds; in
  ip6tables too when ``ipv6_lease`` gives the IPv6 Network and subnet;
* the node checks (``ip_forward``, with IPv6 ``net.ipv6.conf.all.forwarding``,
  FORWARD policy): logged, and shown in status, metrics and ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from ipaddress import IPv6Network
from typing import Any

from ..cancellation import cancel_and_wait
from ..errors import FatalError
from ..firewall import Iptables
from ..state import DaemonState
from .control import ControlServer
from .diagnose import NodeDoctor
from .health import EtcdProbe, HealthServer, etcd_staleness, health_verdict
from .ipmasq import Rule, RuleApplier, forward_rules, masq_ip6_rules, masq_rules
from .notify import Notifier, watchdog_interval, watchdog_loop
from .snapshot import DaemonView, Snapshot, take_snapshot

__all__ = ["Operations", "status_line"]

log = logging.getLogger("flanneld_py.ops")

MONITOR_SECONDS = 2.0


def _repairs(*appliers: RuleApplier | None) -> int:
    """Repairs of one rule set over both families."""
    return sum(applier.repairs for applier in appliers if applier is not None)


def status_line(snap: Snapshot, code: int, body: Mapping[str, Any]) -> str:
    """The one-line ``STATUS=`` systemd shows for us."""
    if snap.phase != "running":
        return snap.phase
    peers = len(snap.peers)
    line = f"running: subnet {snap.subnet}, backend {snap.backend}, {peers} peer{'s' if peers != 1 else ''}"
    if code != 200:
        line += f"; unhealthy: {body.get('reason')}"
    return line


class Operations:
    def __init__(self, daemon: DaemonView, environ: Mapping[str, str]) -> None:
        self.daemon = daemon
        self.options = daemon.options
        self.notifier = Notifier.from_environ(environ)
        self.watchdog = watchdog_interval(environ, os.getpid())
        self.staleness = etcd_staleness(self.options.subnet_lease_ttl)
        self.etcd_probe = EtcdProbe(daemon.store, self.staleness / 3)
        self.masq: RuleApplier | None = None
        self.forward: RuleApplier | None = None
        self.masq6: RuleApplier | None = None
        self.forward6: RuleApplier | None = None
        # The daemon sets this: (IPv6 Network, our IPv6 subnet) while the config enables IPv6.
        self.ipv6_lease: Callable[[], tuple[IPv6Network, IPv6Network] | None] = lambda: None
        self._rules_started = False
        self.doctor = NodeDoctor(self._forward_rules_in_place, self.options.iptables_resync,
                                 ipv6_enabled=lambda: self.ipv6_lease() is not None)
        self.health: HealthServer | None = None
        self.control: ControlServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_failed: str | None = None

    # --- readings -------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.daemon, self.etcd_probe.silence(), _repairs(self.masq, self.masq6),
                             forward_repairs=_repairs(self.forward, self.forward6),
                             problems=self.doctor.problems)

    def _forward_rules_in_place(self) -> bool | None:
        if not self.options.iptables_forward_rules:
            return False
        return None if self.forward is None else self.forward.in_place

    def control_answer(self) -> dict[str, Any]:
        snap = self.snapshot()
        code, body = health_verdict(snap, self.staleness)
        return {**snap.to_json(), "health": {"code": code, **body}}

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on failure, stop what was started and raise."""
        self.daemon.on_state_change.append(self._on_state)
        try:
            if self.watchdog is not None:
                self._spawn(watchdog_loop(self.notifier, self.watchdog), "watchdog")
            self._spawn(self.etcd_probe.run(), "etcd-probe")
            self._spawn(self.doctor.run(), "node-checks")
            if self.notifier.enabled or self.options.healthz_port:
                self._spawn(self._monitor(), "monitor")
            if self.options.healthz_port:
                await self._start_health()
            if self.options.control_socket:
                await self._start_control(self.options.control_socket)
        except BaseException:
            await self.close()
            raise

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _start_health(self) -> None:
        from .metrics import build_registry  # prometheus_client costs ~9 MB: only load it when serving metrics

        self.health = HealthServer(self.snapshot, build_registry(self.snapshot), self.staleness)
        try:
            await self.health.start(self.options.healthz_ip, self.options.healthz_port)
        except OSError as exc:
            self.health = None
            raise FatalError(
                f"cannot serve /healthz on {self.options.healthz_ip}:{self.options.healthz_port}: {exc.strerror or exc}"
            ) from None

    async def _start_control(self, path: str) -> None:
        server = ControlServer(self.control_answer)
        try:
            if await server.start(path):
                self.control = server
        except OSError as exc:
            log.warning("no control socket at %s: %s", path, exc.strerror or exc)

    def _on_state(self, state: DaemonState) -> None:
        try:
            if self.notifier.enabled:
                self._notify(state)
            if (not self._rules_started and state.phase != "stopping"
                    and state.config is not None and state.lease is not None):
                self._rules_started = True
                self._start_rules()
        except Exception:  # a callback must never break the daemon's start-up
            log.exception("operations: handling phase %r failed", state.phase)

    def _notify(self, state: DaemonState) -> None:
        if state.phase == "stopping":
            self.notifier.stopping()
        elif state.phase == "running" and state.ready:
            snap = self.snapshot()
            self.notifier.ready(status_line(snap, *health_verdict(snap, self.staleness)))
        else:
            self.notifier.status(state.phase)

    def _start_rules(self) -> None:
        """flannel's iptables sets, each on its own: FORWARD accept (default on) and masquerade."""
        state = self.daemon.state

        def masq(random_fully: bool) -> list[Rule] | None:
            if state.config is None or state.lease is None:
                return None
            return masq_rules(state.config.network, state.lease.subnet, random_fully)

        def forward(_random_fully: bool) -> list[Rule] | None:
            return None if state.config is None else forward_rules(state.config.network)

        interval = self.options.iptables_resync
        random_fully = False if self.options.ip_masq_fully_random_disable else None  # None: ask iptables
        ipv4 = state.config is None or state.config.enable_ipv4  # IPv6-only: ip6tables only
        if self.options.iptables_forward_rules and ipv4:
            self.forward = RuleApplier(Iptables(), forward, interval, random_fully=False, label="forward rules")
            self.forward.start()
        if self.options.ip_masq and ipv4:
            self.masq = RuleApplier(Iptables(), masq, interval, random_fully=random_fully, label="ip-masq")
            self.masq.start()
        if self.ipv6_lease() is not None:
            self._start_ipv6_rules(interval, random_fully)

    def _start_ipv6_rules(self, interval: float, random_fully: bool | None) -> None:
        """The same sets in ip6tables, for the IPv6 Network (flannel's MasqIP6Rules and ForwardRules)."""

        def masq6(random_fully: bool) -> list[Rule] | None:
            lease = self.ipv6_lease()
            return None if lease is None else masq_ip6_rules(*lease, random_fully)

        def forward6(_random_fully: bool) -> list[Rule] | None:
            lease = self.ipv6_lease()
            return None if lease is None else forward_rules(lease[0])

        ip6tables = Iptables().for_ipv6()
        if self.options.iptables_forward_rules:
            self.forward6 = RuleApplier(ip6tables, forward6, interval, random_fully=False, label="ipv6 forward rules")
            self.forward6.start()
        if self.options.ip_masq:
            self.masq6 = RuleApplier(ip6tables, masq6, interval, random_fully=random_fully, label="ipv6 ip-masq")
            self.masq6.start()

    async def _monitor(self) -> None:
        """Keep systemd's STATUS current and log health transitions."""
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            snap = self.snapshot()
            if snap.phase != "running":
                continue
            code, body = health_verdict(snap, self.staleness)
            self.notifier.status(status_line(snap, code, body))
            failed = body.get("failed")
            if failed != self._last_failed and self.health is not None:
                if failed is None:
                    log.info("health: ok again")
                else:
                    log.warning("health: unhealthy: %s", body["reason"])
            self._last_failed = failed

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for rules in (self.masq, self.forward, self.masq6, self.forward6):
            if rules is not None:
                await rules.close(cleanup=self.options.cleanup_on_exit)
        for server in (self.health, self.control):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.close()
        await self.notifier.close()
        with contextlib.suppress(ValueError):
            self.daemon.on_state_change.remove(self._on_state)
