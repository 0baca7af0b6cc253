"""What to do about our lease and everyone else's, as a pure state machine (no I/O, no clock).

Inputs are method calls: the results of the actions it asked for
(:meth:`LeasePolicy.relisted`, :meth:`~LeasePolicy.watched`,
:meth:`~LeasePolicy.reclaimed`, :meth:`~LeasePolicy.renewed`, ...), the
failures (:meth:`~LeasePolicy.compacted`, :meth:`~LeasePolicy.etcd_lost`,
:meth:`~LeasePolicy.renew_failed`, :meth:`~LeasePolicy.reclaim_lost`) and time
passing (:meth:`~LeasePolicy.handle_timer`, with ``now`` as an argument). Each
returns the actions to run, in order; :meth:`~LeasePolicy.get_timer` says when
to call :meth:`~LeasePolicy.handle_timer` next. The asyncio runner
(:mod:`flanneld_py.subnet.runner`) runs the actions and feeds the results back.

Two lanes run side by side: renewing our etcd lease (one :class:`Renew` at a
time) and following everyone's leases (:class:`Relist`, then :class:`Watch`;
after an outage :class:`CheckEtcd` first). Rules kept here:

* our key deleted (by hand, or the lease ran out): claim it again before the
  batch that showed it counts as seen, so a failed re-claim is retried;
* our key rewritten for another node's PublicIP, seen in a listing or a watch
  batch: fatal, the node must be drained;
* a compacted watch revision (the watch fell behind a compaction): say so,
  re-list at once (no backoff: etcd answered);
* etcd gone: say so once, keep the routes, retry with a short backoff, and
  ask etcd for a real answer before resuming the watch;
* a renewal that fails: retry with backoff, the datapath keeps forwarding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from .lease import BadRecord, KeyDeleted, KeyPut, LeaseAttrs, LeaseError, LeaseEvent, LeaseWatcher, format_subnet_key
from .netconfig import NetworkConfig
from .renewal import Backoff, renewal_delay

__all__ = [
    "Action",
    "ApplyPeers",
    "CheckEtcd",
    "Fatal",
    "LeasePolicy",
    "OwnLease",
    "Reclaim",
    "Relist",
    "Renew",
    "Report",
    "Watch",
]


@dataclass(frozen=True, slots=True)
class OwnLease:
    """The subnets we hold (both families in one key) and the etcd lease that keeps them."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int
    ttl: int
    subnet6: IPv6Network | None = None

    @property
    def name(self) -> str:
        return format_subnet_key(self.subnet, self.subnet6)

    @property
    def subnets(self) -> str:
        """Both subnets for a log line."""
        return str(self.subnet) if self.subnet6 is None else f"{self.subnet} and {self.subnet6}"


@dataclass(frozen=True, slots=True)
class Report:
    """A line for the log."""

    level: Literal["info", "warning"]
    message: str


@dataclass(frozen=True, slots=True)
class ApplyPeers:
    """Converge the datapath on these peer changes."""

    events: tuple[LeaseEvent, ...]


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Our key is gone: claim the same subnet again (then :meth:`LeasePolicy.reclaimed`)."""

    own: OwnLease


@dataclass(frozen=True, slots=True)
class Renew:
    """Refresh our etcd lease (then :meth:`LeasePolicy.renewed` or :meth:`~LeasePolicy.renew_failed`)."""

    own: OwnLease


@dataclass(frozen=True, slots=True)
class Relist:
    """Read every subnet record (then :meth:`LeasePolicy.relisted`)."""


@dataclass(frozen=True, slots=True)
class Watch:
    """Follow subnet changes from ``start_revision`` (each batch: :meth:`LeasePolicy.watched`)."""

    start_revision: int


@dataclass(frozen=True, slots=True)
class CheckEtcd:
    """Ask etcd for a real answer after an outage (then :meth:`LeasePolicy.etcd_back`)."""


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop the daemon with this reason."""

    reason: str


Action = Report | ApplyPeers | Reclaim | Renew | Relist | Watch | CheckEtcd | Fatal


@dataclass(frozen=True, slots=True)
class _Pending:
    """Peer changes held back until a re-claim of our key succeeds."""

    events: tuple[KeyPut | KeyDeleted, ...]
    revision: int
    relist: bool  # a whole listing (reset the watcher) rather than a watch batch


class LeasePolicy:
    """The lease state machine; see the module docstring for its inputs and rules."""

    def __init__(self, config: NetworkConfig, own: OwnLease, renew_margin: float, now: float) -> None:
        self.own = own
        self._watcher = LeaseWatcher(config, own_subnet=own.subnet, own_subnet6=own.subnet6)
        self._margin = renew_margin
        self._renew_at: float | None = now + renewal_delay(own.ttl, renew_margin)  # None: renewing
        self._renew_backoff = Backoff(first=0.5, ceiling=5.0)
        self._watch_backoff = Backoff(first=0.5, ceiling=3.0)  # short: a rejoining etcd is noticed quickly
        self._revision: int | None = None  # the last revision applied; None: must re-list
        self._lost = False
        self._resume_at: float | None = None  # when the watch lane retries after an outage
        self._pending: _Pending | None = None

    # --- time ---------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The watch lane's first step."""
        return [self._resume()]

    def start_from(self, records: Iterable[KeyPut], revision: int) -> list[Action]:
        """The watch lane's first steps from the listing our lease was acquired from: its peers,
        then the watch from the revision after it.

        Unlike :meth:`relisted`, our key's absence means nothing here: the
        claim wrote it after this listing, and the watch replays that write
        (and anything that happened to it since).
        """
        self._pending = _Pending(tuple(records), revision, relist=True)
        return self._commit()

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to do (None: only after an input)."""
        times = [t for t in (self._renew_at, self._resume_at) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self._renew_at is not None and now >= self._renew_at:
            self._renew_at = None
            out.append(Renew(self.own))
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
            out.append(self._resume())
        return out

    # --- the renewal lane ---------------------------------------------------------

    def renewed(self, own: OwnLease, now: float) -> list[Action]:
        if own.lease_id != self.own.lease_id:
            message = f"lease on {own.subnets} re-claimed under etcd lease {own.lease_id:x}"
        else:
            message = f"lease on {own.subnets} renewed (ttl {own.ttl}s)"
        self.own = own
        self._renew_backoff.reset()
        self._renew_at = now + renewal_delay(own.ttl, self._margin)
        return [Report("info", message)]

    def renew_failed(self, detail: str, now: float) -> list[Action]:
        delay = self._renew_backoff.next()
        self._renew_at = now + delay
        return [Report("warning", f"lease renewal failed ({detail}); retrying in {delay:.1f}s, "
                                  "datapath keeps forwarding")]

    # --- the watch lane -----------------------------------------------------------

    def relisted(self, records: Iterable[KeyPut], revision: int) -> list[Action]:
        listing = tuple(records)
        ours = next((record for record in listing if record.name == self.own.name), None)
        if ours is not None and (taken := self._taken(ours)) is not None:
            return [taken]
        self._pending = _Pending(listing, revision, relist=True)
        if ours is not None:
            return self._commit()
        return [Reclaim(self.own)]

    def watched(self, events: Iterable[KeyPut | KeyDeleted], revision: int) -> list[Action]:
        out: list[Action] = []
        others: list[KeyPut | KeyDeleted] = []
        deleted = False
        for event in events:
            if event.name != self.own.name:
                others.append(event)
            elif isinstance(event, KeyDeleted):
                out.append(Report("warning", f"our lease {self.own.subnets} was deleted from etcd"))
                deleted = True
            elif (taken := self._taken(event)) is not None:
                return [taken]
        self._pending = _Pending(tuple(others), revision, relist=False)
        if deleted:
            return [*out, Reclaim(self.own)]
        return out + self._commit()

    def reclaimed(self, own: OwnLease) -> list[Action]:
        self.own = own
        return self._commit()

    def reclaim_lost(self, reason: str) -> list[Action]:
        """Another node holds our subnet now (a lost create race)."""
        return [Fatal(reason)]

    def compacted(self, oldest: int = 0) -> list[Action]:
        """The watch fell behind a compaction (``oldest``: the oldest revision etcd keeps, 0 if
        unknown): re-list at once. etcd answered, so this is no outage and waits for no backoff."""
        self._pending = None
        facts = [f"it needed revision {self._revision + 1}"] if self._revision is not None else []
        facts += [f"etcd keeps revisions from {oldest} on"] if oldest else []
        why = f" ({', '.join(facts)})" if facts else ""
        report = Report("info", f"the lease watch fell behind a compaction{why}; "
                                "re-listing all leases and watching on from there")
        self._revision = None
        return [report, Relist()]

    def etcd_lost(self, detail: str, now: float) -> list[Action]:
        """The watch lane's request failed: retry after a backoff, keep the routes."""
        self._pending = None
        self._resume_at = now + self._watch_backoff.next()
        if self._lost:
            return []
        self._lost = True
        return [Report("warning", f"lost etcd ({detail}); keeping current routes and retrying")]

    def etcd_back(self) -> list[Action]:
        self._lost = False
        where = "start" if self._revision is None else self._revision + 1
        return [Report("info", f"etcd is back; resuming the watch at revision {where}"), self._resume()]

    # --- inside ---------------------------------------------------------------------

    def _taken(self, ours: KeyPut) -> Fatal | None:
        """Our key naming another node's PublicIP (in a listing or a watch batch): that node
        holds our subnet now, so two nodes would route it; fatal, the node must be drained.
        A record that is no valid lease names nobody: not acted on."""
        holder = _holder(ours.value)
        if holder is None or holder == self.own.attrs.node_address:
            return None
        return Fatal(f"our subnet {self.own.subnets} was rewritten for {holder}; exiting so that this node gets drained")

    def _resume(self) -> Action:
        if self._lost:
            return CheckEtcd()
        if self._revision is None:
            return Relist()
        return Watch(self._revision + 1)

    def _commit(self) -> list[Action]:
        """The held-back batch counts as seen: apply it and move the revision on."""
        pending, self._pending = self._pending, None
        if pending is None:  # an outage or a compaction dropped it: the next listing redoes it
            return []
        out: list[Action] = []
        if pending.relist:
            events = self._watcher.reset(e for e in pending.events if isinstance(e, KeyPut))
        else:
            events = self._watcher.update(pending.events)
            self._watch_backoff.reset()
        real: list[LeaseEvent] = []
        for event in events:
            if isinstance(event, BadRecord):
                verb = "lease record" if event.partly else "skipping lease record"
                out.append(Report("warning", f"{verb} {event.name!r}: {event.reason}"))
            else:
                real.append(event)
        if real:
            out.append(ApplyPeers(tuple(real)))
        self._revision = pending.revision
        if pending.relist:
            out.append(Watch(pending.revision + 1))
        return out


def _holder(value: bytes) -> IPv4Address | IPv6Address | None:
    """The node a lease value names, or None if it is not a valid lease."""
    try:
        return LeaseAttrs.from_json(value).node_address
    except LeaseError:
        return None
