"""RoutedBackend: the peer handling both kernel backends (vxlan, host-gw) share.

flannel's ``route_network.go`` in Python: a backend only says which kernel
entries one peer lease wants (pure functions in :mod:`.kernel_state`); this
module keeps the accepted peers and how many of them want each entry, and
turns every batch of lease events into the change it makes: only the entries
whose wanted-ness flipped go to :func:`~.kernel_state.plan`, and from there
to the kernel in one batch. The :class:`~.reconcile_loop.ReconcileLoop`'s
timed full pass (list the kernel, plan against the whole union) catches
drift and retries whatever the kernel refused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Hashable, Sequence
from ipaddress import IPv4Network, IPv6Network

from ..core.lease import Lease, LeaseAdded, LeaseAttrs, LeaseEvent, LeaseRemoved, SubnetPair
from ..core.netconfig import NO_IPV4_SUBNET
from .base import BackendContext, PeerStats
from .kernel import Kernel, NetlinkKernel
from .kernel_state import Entry, PeerEntries, Plan, Scope, Wanted, plan
from .reconcile_loop import RECONCILE_INTERVAL, ReconcileLoop
from .reconciler import Reconciler

__all__ = ["RoutedBackend"]

log = logging.getLogger(__name__)

PEER_LINES_LIMIT = 50  # lease events in one batch that still get a log line each at INFO


def _subnets(lease: Lease) -> str:
    """A peer in log lines: its IPv4 subnet (the IPv6 one follows in the entries' summary), or its
    IPv6 subnet alone for an IPv6-only peer."""
    if lease.subnet == NO_IPV4_SUBNET and lease.subnet6 is not None:
        return str(lease.subnet6)
    return str(lease.subnet)


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
        self._peers: dict[SubnetPair, Lease] = {}  # by lease key: both subnets (IPv6-only leases share the IPv4 one)
        # What the accepted peers want, kept by the event loop; the reconcile thread
        # copies it under the lock.
        self._lock = threading.Lock()
        self._wants: dict[SubnetPair, frozenset[Entry]] = {}
        self._counts: Counter[Entry] = Counter()  # how many peers want each entry
        self._wants_for: Hashable = None  # the device state ``_wants`` was computed for
        self._version = 0  # counts lease batches applied
        self._wanted_cache: tuple[tuple[int, Hashable], Wanted] | None = None
        self._listed = False  # the first lease listing since start was applied
        self._recounted = False  # the device changed: a full pass must follow
        self._own_subnet: IPv4Network | None = None
        self._own_subnet6: IPv6Network | None = None
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

    def _device_state(self) -> Hashable:
        """What peer entries depend on besides the lease (e.g. our device's ifindex)."""
        return None

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

    async def start(self, own_subnet: IPv4Network, own_subnet6: IPv6Network | None = None) -> None:
        """Set up for our subnets (``own_subnet6`` with EnableIPv6: :class:`~.base.CarriesIPv6`'s start)."""
        self._own_subnet, self._own_subnet6 = own_subnet, own_subnet6
        await asyncio.to_thread(self._setup, own_subnet)
        self._wants_for = self._device_state()
        self._loop = ReconcileLoop(Reconciler(self._kernel, self._wanted), self.type_name,
                                   names=self._device_names, interval=self._interval, prune=False)
        await self._loop.sync("start")
        self._loop.start()

    def _wanted(self) -> Wanted:
        """What a full pass converges on (runs in the pass's thread, after repairing devices).

        The same object until a lease event or a device change, so a quiet pass can tell.
        """
        self._ensure()
        with self._lock:
            state = self._device_state()
            if self._wanted_cache is not None and self._wanted_cache[0] == (self._version, state):
                return self._wanted_cache[1]
            if self._wants_for == state:
                peers = frozenset(self._counts)
            else:  # the device changed under us: what peers want changed with it
                peers = frozenset().union(*(self._peer_entries(lease).entries for lease in self._peers.values()))
            wanted = Wanted(self._scope(), self._own_entries() | peers)
            self._wanted_cache = ((self._version, state), wanted)
            return wanted

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        assert self._loop is not None, "apply() before start()"
        updates: list[tuple[SubnetPair, frozenset[Entry]]] = []
        # one line per peer, unless a listing brings thousands: then one line in all, and each peer's at -v
        level = logging.INFO if len(events) <= PEER_LINES_LIMIT else logging.DEBUG
        verbs: Counter[str] = Counter()
        with self._lock:
            for event in events:
                if isinstance(event, LeaseAdded):
                    updates.append((event.lease.key, self._accept(event.lease, level, verbs)))
                elif isinstance(event, LeaseRemoved):
                    updates.append((event.lease.key, self._forget(event.lease, level, verbs)))
        if level != logging.INFO:
            log.info("peers: %s (%d in all; each peer's line at -v)",
                     ", ".join(f"{n} {verb}" for verb, n in sorted(verbs.items())) or "none changed", len(self._peers))
        self._loop.allow_pruning()
        # The wanted state changes in the reconcile thread, under the reconciler's lock, together
        # with the kernel: a full pass never sees peers wanted whose entries are not sent yet.
        await self._loop.apply_plan(lambda: self._count(updates), "peers")
        if not self._listed or self._recounted:
            # the first listing since start (or the device changed): one full pass, which also
            # drops what peers that left while we were down still had in the kernel
            self._listed, self._recounted = True, False
            await self._loop.sync("peers")

    def _count(self, updates: Sequence[tuple[SubnetPair, frozenset[Entry]]]) -> Plan:
        """Record what each updated peer now wants; the plan for the entries whose wanted-ness flipped.

        Only those entries: without listing the kernel, so a lease event costs what it changes.
        """
        with self._lock:
            self._version += 1
            if self._wants_for != self._device_state():
                self._recount()
                return Plan((), ())
            changes: list[tuple[frozenset[Entry], frozenset[Entry]]] = []
            for key, new in updates:  # in order: a batch may change one lease twice
                changes.append((self._wants.pop(key, frozenset()), new))
                if new:
                    self._wants[key] = new
            if not self._listed:  # the full pass that follows plans it all
                self._tally(changes)
                return Plan((), ())
            touched: set[Entry] = set().union(*(old | new for old, new in changes))
            before = frozenset(e for e in touched if self._counts[e] > 0)
            self._tally(changes)
            after = frozenset(e for e in touched if self._counts[e] > 0)
        return plan(Wanted(self._scope(), after), before)

    def _tally(self, changes: Sequence[tuple[frozenset[Entry], frozenset[Entry]]]) -> None:
        """Move each change's count from its old entries to its new ones; drop entries no peer wants."""
        for old, new in changes:
            self._counts.subtract(old)
            self._counts.update(new)
        for old, _ in changes:  # only an old entry can have dropped to zero
            for entry in old:
                if self._counts.get(entry, 1) <= 0:
                    del self._counts[entry]

    def _recount(self) -> None:
        """After a device was recreated (new ifindex), every peer's entries are new ones."""
        self._wants = {key: self._peer_entries(lease).entries for key, lease in self._peers.items()}
        self._counts = Counter(e for entries in self._wants.values() for e in entries)
        self._wants_for = self._device_state()
        self._recounted = True

    def _accept(self, lease: Lease, level: int, verbs: Counter[str]) -> frozenset[Entry]:
        """Record a new or changed peer; the entries it wants (none if it is ignored or refused)."""
        key = lease.key
        if lease.attrs.backend_type != self.type_name:
            log.warning("peer %s (%s) uses backend %r, not %s; ignoring it",
                        _subnets(lease), lease.attrs.node_address, lease.attrs.backend_type, self.type_name)
            self._peers.pop(key, None)
            return frozenset()
        wants = self._peer_entries(lease)
        if wants.refused is not None:
            log.error("peer %s (%s) refused: %s", _subnets(lease), lease.attrs.node_address, wants.refused)
            self._peers.pop(key, None)
            return frozenset()
        verb = "updated" if key in self._peers else "added"
        self._peers[key] = lease
        verbs[verb] += 1
        if log.isEnabledFor(level):  # a start-up's thousands of peers are logged only at -v
            log.log(level, "peer %s: %s %s", verb, _subnets(lease), wants.summary)
        return wants.entries

    def _forget(self, lease: Lease, level: int, verbs: Counter[str]) -> frozenset[Entry]:
        old = self._peers.pop(lease.key, None)
        if old is not None:
            verbs["removed"] += 1
            log.log(level, "peer removed: %s (was %s)", _subnets(old), old.attrs.node_address)
        return frozenset()

    def is_up(self) -> bool:
        return self._loop is not None and self._loop.running

    def peers(self) -> list[PeerStats]:
        return [PeerStats(lease.subnet, str(lease.attrs.public_ip), subnet6=lease.subnet6,
                          public_ipv6=str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else None)
                for lease in self._peers.values()]

    async def stop(self, cleanup: bool) -> None:
        """Without ``cleanup`` the kernel state stays, so pods keep talking across a restart."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        if not cleanup:
            await loop.stop()
            self._close_kernel()
            log.info("%s backend stopped; kernel state kept", self.type_name)
            return
        await loop.stop(self._scope())
        self._close_kernel()
        await asyncio.to_thread(self._teardown)
        log.info("%s backend stopped; kernel state removed", self.type_name)

    def _close_kernel(self) -> None:
        if isinstance(self._kernel, NetlinkKernel):
            self._kernel.close()
