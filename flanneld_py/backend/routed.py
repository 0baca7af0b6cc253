"""Peer handling shared by the kernel backends (vxlan, host-gw), and the reconciler every backend uses.

flannel's ``route_network.go`` in Python: a backend only says which kernel
entries one peer lease wants (pure functions in :mod:`.kernel_state`); this
module keeps the accepted peers, takes the union of their entries and
converges the kernel on it. Convergence is a full diff (list what we own, add
what is missing, remove what is no longer wanted), run after every batch of
lease events and every :data:`RECONCILE_INTERVAL` seconds, so an entry
deleted by hand is back within one interval.

Layers, bottom up:

- :class:`Kernel` (dump/add/remove) and :class:`NetlinkKernel`, its netlink
  implementation; tests inject an in-memory kernel instead.
- :class:`Reconciler`: one synchronous pass, run in a worker thread.
- :class:`ReconcileLoop`: the asyncio side, passes on demand and on a timer,
  and one log line per change it had to make.
- :class:`RoutedBackend`: the :class:`~.base.Backend` both kernel backends are.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Protocol

from ..core.lease import Lease, LeaseAdded, LeaseAttrs, LeaseEvent, LeaseRemoved
from ..netlink import RTPROT_FLANNEL, Netlink, NetlinkError, RouteSpec
from ..netlink import vxlan as nlvx
from .base import BackendContext, PeerStats
from .kernel_state import AddrSpec, Entry, FdbSpec, NeighSpec, PeerEntries, Plan, Scope, Wanted, describe, in_scope, plan

__all__ = [
    "RECONCILE_INTERVAL",
    "Kernel",
    "NetlinkKernel",
    "PassResult",
    "ReconcileLoop",
    "Reconciler",
    "RoutedBackend",
]

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 5.0


# --- kernel access -------------------------------------------------------------------


class Kernel(Protocol):
    """The kernel as the reconciler sees it (synchronous)."""

    def dump(self, scope: Scope) -> list[Entry]:
        """Every entry the kernel holds that falls in ``scope``."""
        ...

    def add(self, entry: Entry) -> None:
        """Add ``entry``, replacing one with the same identity."""
        ...

    def remove(self, entry: Entry) -> None:
        """Remove ``entry``; no error if it is already gone."""
        ...


class NetlinkKernel:
    """:class:`Kernel` over the shared netlink layer; call it from a worker thread."""

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    def dump(self, scope: Scope) -> list[Entry]:
        out: list[Entry] = [r for r in self.netlink.routes() if in_scope(scope, r)]
        for index in sorted(scope.device_ifindexes):
            out.extend(AddrSpec(index, a) for a in self.netlink.ipv4_addresses(index))
            out.extend(NeighSpec(index, ip, mac) for ip, mac in nlvx.permanent_neighbours(self.netlink, index))
            out.extend(FdbSpec(index, mac, dst) for mac, dst in nlvx.fdb_entries(self.netlink, index))
        return out

    def add(self, entry: Entry) -> None:
        if isinstance(entry, RouteSpec):
            self.netlink.replace_route(entry)
        elif isinstance(entry, NeighSpec):
            nlvx.replace_neigh(self.netlink, entry.ifindex, entry.ip, entry.mac)
        elif isinstance(entry, FdbSpec):
            nlvx.replace_fdb(self.netlink, entry.ifindex, entry.mac, entry.dst)
        else:
            self.netlink.ensure_address(entry.ifindex, entry.address, exclusive=False)

    def remove(self, entry: Entry) -> None:
        if isinstance(entry, RouteSpec):
            self._remove_route(entry)
        elif isinstance(entry, NeighSpec):
            nlvx.delete_neigh(self.netlink, entry.ifindex, entry.ip)
        elif isinstance(entry, FdbSpec):
            nlvx.delete_fdb(self.netlink, entry.ifindex, entry.mac, entry.dst)
        else:
            self._remove_address(entry)

    def _remove_route(self, route: RouteSpec) -> None:
        """Delete exactly our route (protocol and device given), never another route to the same subnet."""
        try:
            self.netlink.call("route", "del", dst=str(route.dst.network_address), dst_len=route.dst.prefixlen,
                              oif=route.ifindex, proto=RTPROT_FLANNEL)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                raise

    def _remove_address(self, entry: AddrSpec) -> None:
        try:
            self.netlink.call("addr", "del", index=entry.ifindex, address=str(entry.address.ip),
                              prefixlen=entry.address.network.prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise


# --- one pass ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PassResult:
    added: tuple[Entry, ...] = ()
    removed: tuple[Entry, ...] = ()
    failed: tuple[tuple[Entry, str], ...] = ()


class Reconciler:
    """One pass: ask what is wanted, list what the kernel holds, apply the difference.

    ``wanted`` runs at the start of every pass, in the pass's thread, so a
    backend may repair its device there (and report a new ifindex). Passes are
    serialised by a lock; after :meth:`close` no pass changes anything, so a
    pass still running when the daemon stops cannot undo the cleanup.
    """

    def __init__(self, kernel: Kernel, wanted: Callable[[], Wanted]) -> None:
        self.kernel = kernel
        self.wanted = wanted
        self._lock = threading.Lock()
        self._closed = False

    def run_pass(self, prune: bool = True) -> PassResult:
        with self._lock:
            if self._closed:
                return PassResult()
            return self._converge(self.wanted(), prune)

    def apply_plan(self, changes: Plan) -> PassResult:
        """Apply a precomputed change (a lease event's delta) without listing the kernel."""
        with self._lock:
            if self._closed:
                return PassResult()
            return self._apply(changes)

    def close(self, scope: Scope | None = None) -> PassResult:
        """Stop all further passes; with ``scope``, first remove every entry we own in it."""
        with self._lock:
            self._closed = True
            if scope is None:
                return PassResult()
            return self._converge(Wanted(scope, frozenset()), prune=True)

    def _converge(self, wanted: Wanted, prune: bool) -> PassResult:
        return self._apply(plan(wanted, self.kernel.dump(wanted.scope), prune=prune))

    def _apply(self, changes: Plan) -> PassResult:
        added: list[Entry] = []
        removed: list[Entry] = []
        failed: list[tuple[Entry, str]] = []
        for entry in changes.remove:
            if self._try(self.kernel.remove, entry, failed):
                removed.append(entry)
        for entry in changes.add:
            if self._try(self.kernel.add, entry, failed):
                added.append(entry)
        return PassResult(tuple(added), tuple(removed), tuple(failed))

    @staticmethod
    def _try(action: Callable[[Entry], None], entry: Entry, failed: list[tuple[Entry, str]]) -> bool:
        """One failed entry (say, a peer route the kernel refuses) must not stop the others."""
        try:
            action(entry)
        except (NetlinkError, OSError, LookupError) as exc:
            failed.append((entry, str(exc)))
            return False
        return True


# --- the asyncio side ------------------------------------------------------------------------


class ReconcileLoop:
    """Runs :class:`Reconciler` passes on demand (:meth:`sync`) and every ``interval`` seconds.

    Changes made by a timed pass are drift (someone changed our state), and
    each is logged as a repair. Pruning starts off when ``prune`` is False,
    until :meth:`allow_pruning` or the first timed pass: right after a restart
    we do not yet know the peers, and must not drop the entries that still
    carry their traffic.
    """

    def __init__(
        self,
        reconciler: Reconciler,
        label: str,
        names: Callable[[], Mapping[int, str]] = dict,
        interval: float = RECONCILE_INTERVAL,
        prune: bool = True,
    ) -> None:
        self.reconciler = reconciler
        self.label = label
        self.names = names
        self.interval = interval
        self._prune = prune
        self._task: asyncio.Task[None] | None = None
        self._failing: set[tuple[Entry, str]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._every_interval(), name=f"reconcile-{self.label}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def allow_pruning(self) -> None:
        self._prune = True

    async def sync(self, reason: str) -> PassResult | None:
        """One pass now; None if the kernel could not even be listed (the next pass retries)."""
        try:
            result = await asyncio.to_thread(self.reconciler.run_pass, self._prune)
        except (NetlinkError, OSError, LookupError) as exc:
            log.warning("%s: reconcile (%s) failed: %s; retrying in %.0fs", self.label, reason, exc, self.interval)
            return None
        self._report(reason, result)
        return result

    async def apply_plan(self, changes: Plan, reason: str) -> None:
        """Apply a lease event's delta at once; the timed full pass still catches drift."""
        if changes.add or changes.remove:
            self._report(reason, await asyncio.to_thread(self.reconciler.apply_plan, changes))

    async def stop(self, scope: Scope | None = None) -> PassResult:
        """Stop the timer; with ``scope``, remove everything we own in it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        result = await asyncio.to_thread(self.reconciler.close, scope)
        if result.removed or result.failed:
            log.info("%s: cleanup removed %d kernel entries", self.label, len(result.removed))
        self._report_failures(result)
        return result

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._prune = True
            await self.sync("drift")

    def _report(self, reason: str, result: PassResult) -> None:
        names = self.names()
        if reason == "drift":
            for entry in result.added:
                log.warning("%s: drift repaired: restored %s", self.label, describe(entry, names))
            for entry in result.removed:
                log.warning("%s: drift repaired: removed stray %s", self.label, describe(entry, names))
        else:
            for entry in result.removed:
                log.debug("%s: removed %s (%s)", self.label, describe(entry, names), reason)
            for entry in result.added:
                log.debug("%s: added %s (%s)", self.label, describe(entry, names), reason)
        self._report_failures(result)

    def _report_failures(self, result: PassResult) -> None:
        """Warn once per failing entry and error, not on every retry."""
        now = set(result.failed)
        for entry, error in now - self._failing:
            log.warning("%s: cannot apply %s: %s (will retry)", self.label, describe(entry, self.names()), error)
        self._failing = now


# --- the shared kernel backend ------------------------------------------------------------------


class RoutedBackend:
    """A :class:`~.base.Backend` whose peers are kernel entries (vxlan, host-gw).

    Subclasses supply ``type_name``, ``mtu``, ``lease_attrs`` and the hooks
    below; everything about peers (type filter, logging, union, reconcile,
    drift repair, cleanup) lives here.
    """

    type_name = ""

    def __init__(self, ctx: BackendContext, kernel: Kernel | None = None,
                 interval: float = RECONCILE_INTERVAL) -> None:
        self.ctx = ctx
        self._kernel: Kernel = kernel if kernel is not None else NetlinkKernel(ctx.netlink)
        self._interval = interval
        self._peers: dict[IPv4Network, Lease] = {}
        self._snapshot: tuple[Lease, ...] = ()  # replaced whole; read by the reconcile thread
        self._applied: Wanted | None = None  # what the last lease event asked of the kernel
        self._own_subnet: IPv4Network | None = None
        self._loop: ReconcileLoop | None = None

    # --- hooks -----------------------------------------------------------------------------

    @property
    def mtu(self) -> int:
        raise NotImplementedError

    @property
    def pod_gso_max_size(self) -> int | None:
        return None  # the kernel segments or forwards super-packets itself

    def lease_attrs(self) -> LeaseAttrs:
        raise NotImplementedError

    def _setup(self, own_subnet: IPv4Network) -> None:
        """Create or adopt our devices (worker thread)."""

    def _ensure(self) -> None:
        """Repair our devices at the start of each pass (worker thread)."""

    def _scope(self) -> Scope:
        raise NotImplementedError

    def _own_entries(self) -> frozenset[Entry]:
        return frozenset()

    def _peer_entries(self, lease: Lease) -> PeerEntries:
        raise NotImplementedError

    def _teardown(self) -> None:
        """Delete our devices after cleanup removed our entries (worker thread)."""

    def _device_names(self) -> dict[int, str]:
        return {self.ctx.iface.index: self.ctx.iface.name}

    # --- Backend ---------------------------------------------------------------------------

    async def start(self, own_subnet: IPv4Network) -> None:
        self._own_subnet = own_subnet
        await asyncio.to_thread(self._setup, own_subnet)
        self._loop = ReconcileLoop(Reconciler(self._kernel, self._wanted), self.type_name,
                                   names=self._device_names, interval=self._interval, prune=False)
        await self._loop.sync("start")
        self._loop.start()

    def _wanted(self) -> Wanted:
        """What a full pass converges on (runs in the pass's thread, after repairing devices)."""
        self._ensure()
        return self._union(self._snapshot)

    def _union(self, leases: tuple[Lease, ...]) -> Wanted:
        """The union of our own entries and every accepted peer's."""
        entries = set(self._own_entries())
        for lease in leases:
            entries |= self._peer_entries(lease).entries
        return Wanted(self._scope(), frozenset(entries))

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        assert self._loop is not None, "apply() before start()"
        for event in events:
            if isinstance(event, LeaseAdded):
                self._add_peer(event.lease)
            elif isinstance(event, LeaseRemoved):
                old = self._peers.pop(event.lease.subnet, None)
                if old is not None:
                    log.info("peer removed: %s (was %s)", old.subnet, old.attrs.public_ip)
        self._snapshot = tuple(self._peers.values())
        self._loop.allow_pruning()
        wanted = self._union(self._snapshot)
        before, self._applied = self._applied, wanted
        if before is None:
            # the first listing since start: one full pass, which also drops what
            # peers that left while we were down still had in the kernel
            await self._loop.sync("peers")
            return
        # Later events: only the difference they make, without listing the kernel. A full
        # pass per event dumps every peer's entries: quadratic when many leases change.
        await self._loop.apply_plan(plan(wanted, before.entries), "peers")

    def _add_peer(self, lease: Lease) -> None:
        subnet = lease.subnet
        if lease.attrs.backend_type != self.type_name:
            log.warning("peer %s (%s) uses backend %r, not %s; ignoring it",
                        subnet, lease.attrs.public_ip, lease.attrs.backend_type, self.type_name)
            self._peers.pop(subnet, None)
            return
        wants = self._peer_entries(lease)
        if wants.refused is not None:
            log.error("peer %s (%s) refused: %s", subnet, lease.attrs.public_ip, wants.refused)
            self._peers.pop(subnet, None)
            return
        verb = "updated" if subnet in self._peers else "added"
        self._peers[subnet] = lease
        log.info("peer %s: %s %s", verb, subnet, wants.summary)

    def is_up(self) -> bool:
        return self._loop is not None and self._loop.running

    def peers(self) -> list[PeerStats]:
        return [PeerStats(lease.subnet, str(lease.attrs.public_ip)) for lease in self._peers.values()]

    async def stop(self, cleanup: bool) -> None:
        """Without ``cleanup`` the kernel state stays, so pods keep talking across a restart."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        if not cleanup:
            await loop.stop()
            log.info("%s backend stopped; kernel state kept", self.type_name)
            return
        await loop.stop(self._scope())
        await asyncio.to_thread(self._teardown)
        log.info("%s backend stopped; kernel state removed", self.type_name)
