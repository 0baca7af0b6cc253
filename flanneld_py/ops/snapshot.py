"""One reading of the daemon's state, shared by ``/healthz``, ``/metrics`` and ``status``.

:func:`take_snapshot` is the only place that reads the daemon and the clocks;
everything downstream (the health verdict, the metrics collector, the status
table) is a pure function of a :class:`Snapshot`, so tests build snapshots by
hand. Each snapshot carries the wall clock and the event loop's clock at
reading time, so ages are computed from it without reading clocks again.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import __version__
from ..backend.base import BatchCount, CountsBatches, CountsDrops, PeerStats
from ..options import DaemonOptions
from ..state import DaemonState
from ..subnet.store import StoreStats
from .diagnose import NodeProblem

__all__ = ["BatchView", "DaemonView", "Snapshot", "take_snapshot"]

BatchView = BatchCount  # the name the operations side has used


class DaemonView(Protocol):
    """The daemon as operations see it: read-only, plus a hook on phase changes."""

    @property
    def options(self) -> DaemonOptions: ...

    @property
    def state(self) -> DaemonState: ...

    @property
    def store(self) -> StoreStats: ...

    @property
    def on_state_change(self) -> list[Callable[[DaemonState], None]]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The daemon's state at one moment, as ``status`` and ``/healthz`` report it."""

    taken_at: float  # wall clock
    phase: str
    ready: bool
    uptime: float = 0.0
    pid: int = 0
    version: str = __version__
    network: str | None = None
    backend: str | None = None
    mtu: int | None = None
    public_ip: str | None = None
    subnet: str | None = None
    lease_id: int | None = None
    ipv6_network: str | None = None  # the IPv6 fields stay None without EnableIPv6
    public_ipv6: str | None = None
    subnet6: str | None = None
    lease_expires_at: float | None = None  # wall clock
    datapath_up: bool = False
    etcd_endpoint: str = ""
    etcd_errors: int = 0
    etcd_reconnects: int = 0
    etcd_silence: float | None = None  # seconds since etcd last answered; None: never
    peers: tuple[PeerStats, ...] = ()
    loop_time: float = 0.0  # the event loop's clock, which the peers' last_tx/last_rx use
    drops: Mapping[str, int] = field(default_factory=dict)
    batches: Mapping[str, BatchView] = field(default_factory=dict)
    peer_events: int = 0
    ip_masq: bool = False
    ipmasq_repairs: int = 0
    forward_rules: bool = False
    forward_repairs: int = 0
    problems: tuple[NodeProblem, ...] = ()  # node settings that break the overlay (ops.diagnose)

    @property
    def lease_remaining(self) -> float | None:
        return None if self.lease_expires_at is None else self.lease_expires_at - self.taken_at

    def age(self, loop_stamp: float) -> float | None:
        """Seconds since a hot-loop time stamp (0.0 means "never": None)."""
        return None if loop_stamp <= 0 else max(0.0, self.loop_time - loop_stamp)

    def to_json(self) -> dict[str, Any]:
        """The control socket's answer (``flanneld-py status --json``)."""
        return {
            "version": self.version,
            "pid": self.pid,
            "phase": self.phase,
            "ready": self.ready,
            "uptime_seconds": _round(self.uptime),
            "network": self.network,
            "backend": self.backend,
            "mtu": self.mtu,
            "public_ip": self.public_ip,
            "ipv6_network": self.ipv6_network,
            "public_ipv6": self.public_ipv6,
            "lease": None if self.subnet is None else {
                "subnet": self.subnet,
                "subnet6": self.subnet6,
                "etcd_lease_id": None if self.lease_id is None else f"{self.lease_id:x}",
                "expires_at": self.lease_expires_at,
                "expires_in_seconds": _round(self.lease_remaining),
            },
            "datapath_up": self.datapath_up,
            "etcd": {
                "endpoint": self.etcd_endpoint,
                "last_answer_seconds_ago": _round(self.etcd_silence),
                "errors": self.etcd_errors,
                "reconnects": self.etcd_reconnects,
            },
            "peers": [
                {
                    "subnet": str(p.subnet),
                    "public_ip": p.public_ip,
                    "subnet6": str(p.subnet6) if p.subnet6 is not None else None,
                    "public_ipv6": p.public_ipv6,
                    "subnets": p.subnets,
                    "addresses": p.addresses,
                    "tx_packets": p.tx_packets,
                    "tx_bytes": p.tx_bytes,
                    "rx_packets": p.rx_packets,
                    "rx_bytes": p.rx_bytes,
                    "last_tx_seconds_ago": _round(self.age(p.last_tx)),
                    "last_rx_seconds_ago": _round(self.age(p.last_rx)),
                }
                for p in self.peers
            ],
            "drops": dict(self.drops),
            "batches": {name: {"wakeups": b.wakeups, "buckets": list(b.buckets)} for name, b in self.batches.items()},
            "peer_events": self.peer_events,
            "ip_masq": {"enabled": self.ip_masq, "repairs": self.ipmasq_repairs},
            "forward_rules": {"enabled": self.forward_rules, "repairs": self.forward_repairs},
            "problems": [{"problem": p.code, "message": p.message, "fatal": p.fatal} for p in self.problems],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _batches(backend: object) -> dict[str, BatchCount]:
    return backend.batch_counts() if isinstance(backend, CountsBatches) else {}


def take_snapshot(daemon: DaemonView, etcd_silence: float | None, ipmasq_repairs: int = 0, *,
                  forward_repairs: int = 0, problems: tuple[NodeProblem, ...] = ()) -> Snapshot:
    """Read the daemon now. Runs on the event loop (cheap: no I/O, no locks).

    ``etcd_silence`` comes from the etcd probe (see :class:`~.health.EtcdProbe`).
    """
    state = daemon.state
    store = daemon.store
    wall = time.time()
    config, own, backend = state.config, state.lease, state.backend
    peers: tuple[PeerStats, ...] = ()
    drops: dict[str, int] = {}
    if backend is not None:
        peers = tuple(backend.peers())
        if isinstance(backend, CountsDrops):
            drops = backend.drop_counts()
    return Snapshot(
        taken_at=wall,
        phase=state.phase,
        ready=state.ready,
        uptime=wall - state.started_at,
        pid=os.getpid(),
        network=None if config is None else str(config.network),
        backend=None if config is None else config.backend.type,
        mtu=None if backend is None else backend.mtu,
        public_ip=None if own is None else str(own.attrs.public_ip),
        subnet=None if own is None else str(own.subnet),
        lease_id=None if own is None else own.lease_id,
        ipv6_network=None if config is None or config.ipv6 is None else str(config.ipv6.network),
        public_ipv6=None if own is None or own.attrs.public_ipv6 is None else str(own.attrs.public_ipv6),
        subnet6=None if own is None or own.subnet6 is None else str(own.subnet6),
        lease_expires_at=state.lease_expires_at,
        datapath_up=backend is not None and backend.is_up(),
        etcd_endpoint=store.endpoint,
        etcd_errors=store.errors,
        etcd_reconnects=store.reconnects,
        etcd_silence=etcd_silence,
        peers=peers,
        loop_time=asyncio.get_running_loop().time(),
        drops=drops,
        batches=_batches(backend),
        peer_events=state.peer_events,
        ip_masq=daemon.options.ip_masq,
        ipmasq_repairs=ipmasq_repairs,
        forward_rules=daemon.options.iptables_forward_rules,
        forward_repairs=forward_repairs,
        problems=problems,
    )
