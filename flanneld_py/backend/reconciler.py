"""One reconcile pass: ask what is wanted, list what the kernel holds, apply the difference.

The difference is :func:`~.kernel_state.plan`'s (pure, the one place that
decides what to change); this module only runs it against a
:class:`~.kernel.Kernel` and says what was done and what failed.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..netlink import NetlinkError
from .kernel import Failure, Kernel
from .kernel_state import Entry, Plan, Scope, Wanted, identity, plan

__all__ = ["PassResult", "Reconciler"]


def _same_objects(a: list[Entry], b: list[Entry]) -> bool:
    """The same entry objects in the same order (a kernel that did not change lists just that)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass or delta did: entries added and removed, and those the kernel refused."""

    added: tuple[Entry, ...] = ()
    removed: tuple[Entry, ...] = ()
    failed: tuple[Failure, ...] = ()


class Reconciler:
    """Full passes and lease-event deltas over one kernel (run them in worker threads).

    ``wanted`` runs at the start of every full pass, in the pass's thread, so
    a backend may repair its device there (and report a new ifindex); it
    returns the same object while nothing changed, and a kernel that lists
    the same entry objects unchanged (see
    :meth:`~.kernel.NetlinkKernel.dump`) lets a quiet pass skip planning. After
    :meth:`close` no pass changes anything, so a pass still running when the
    daemon stops cannot undo the cleanup.
    """

    def __init__(self, kernel: Kernel, wanted: Callable[[], Wanted]) -> None:
        self.kernel = kernel
        self.wanted = wanted
        self._lock = threading.Lock()  # held while the wanted state or the kernel changes
        self._pass = threading.Lock()  # one full pass at a time
        self._closed = False
        self._settled: tuple[Wanted, bool, list[Entry]] | None = None  # the inputs of the last empty plan
        self._touched: set[Hashable] | None = None  # identities changed by deltas while a pass lists and plans

    def run_pass(self, prune: bool = True) -> PassResult:
        """List the kernel and plan without holding up lease events; apply what they did not touch.

        A delta that lands while the pass lists and plans changed what the
        pass saw; the pass leaves the entries it touched alone (the delta
        has them right) and applies the rest.
        """
        with self._pass:
            with self._lock:
                if self._closed:
                    return PassResult()
                wanted = self.wanted()
                self._touched = set()
            try:
                actual = self.kernel.dump(wanted.scope)
                changes = self._plan(wanted, actual, prune)
            finally:
                with self._lock:
                    touched, self._touched = self._touched, None
            with self._lock:
                if self._closed:
                    return PassResult()
                if touched:
                    changes = Plan(tuple(e for e in changes.remove if identity(e) not in touched),
                                   tuple(e for e in changes.add if identity(e) not in touched))
                    self._settled = None
                return self._apply(changes)

    def apply_plan(self, changes: Callable[[], Plan]) -> PassResult:
        """Apply a change (a lease event's delta) without listing the kernel.

        ``changes`` runs under the lock, so it may update what ``wanted``
        returns: the update and the kernel change it makes are one step for
        any full pass.
        """
        with self._lock:
            if self._closed:
                return PassResult()
            made = changes()
            if self._touched is not None:
                self._touched.update(identity(e) for e in made.remove + made.add)
            return self._apply(made)

    def close(self, scope: Scope | None = None) -> PassResult:
        """Stop all further passes; with ``scope``, first remove every entry we own in it."""
        with self._pass, self._lock:
            self._closed = True
            if scope is None:
                return PassResult()
            wanted = Wanted(scope, frozenset())
            return self._apply(self._plan(wanted, self.kernel.dump(scope), prune=True))

    def _plan(self, wanted: Wanted, actual: list[Entry], prune: bool) -> Plan:
        settled = self._settled
        if settled is not None and settled[0] is wanted and settled[1] == prune and _same_objects(actual, settled[2]):
            # plan() is pure: the very inputs that gave an empty plan last time give one again
            return Plan((), ())
        changes = plan(wanted, actual, prune=prune)
        self._settled = None if changes else (wanted, prune, actual)
        return changes

    def _apply(self, changes: Plan) -> PassResult:
        """Every entry of the plan is either done or listed as failed, never dropped."""
        if not changes:
            return PassResult()
        try:
            failed = self.kernel.change(changes)
        except (NetlinkError, OSError) as exc:
            # the socket failed, not one entry: nothing is known to be done
            return PassResult(failed=tuple((e, str(exc)) for e in changes.remove + changes.add))
        if not failed:
            return PassResult(changes.add, changes.remove)
        refused = {entry for entry, _ in failed}
        return PassResult(tuple(e for e in changes.add if e not in refused),
                          tuple(e for e in changes.remove if e not in refused),
                          tuple(failed))
