"""One reconcile pass: ask what is wanted, list what the kernel holds, apply the difference.

The difference is :func:`~.kernel_state.plan`'s (pure, the one place that
decides what to change); this module only runs it against a
:class:`~.kernel.Kernel` and says what was done and what failed.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..netlink import NetlinkError
from .kernel import Failure, Kernel
from .kernel_state import Entry, Plan, Scope, Wanted, plan

__all__ = ["PassResult", "Reconciler"]


def _same_objects(a: list[Entry], b: list[Entry]) -> bool:
    """The same entry objects in the same order (a kernel that did not change lists just that)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


@dataclass(frozen=True, slots=True)
class PassResult:
    added: tuple[Entry, ...] = ()
    removed: tuple[Entry, ...] = ()
    failed: tuple[Failure, ...] = ()


class Reconciler:
    """Passes over one kernel, serialised by a lock (run them in a worker thread).

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
        self._lock = threading.Lock()
        self._closed = False
        self._settled: tuple[Wanted, bool, list[Entry]] | None = None  # the inputs of the last empty plan

    def run_pass(self, prune: bool = True) -> PassResult:
        with self._lock:
            if self._closed:
                return PassResult()
            return self._converge(self.wanted(), prune)

    def apply_plan(self, changes: Callable[[], Plan]) -> PassResult:
        """Apply a change (a lease event's delta) without listing the kernel.

        ``changes`` runs under the pass lock, so it may update what ``wanted``
        returns: no full pass sees that update before the kernel got it.
        """
        with self._lock:
            if self._closed:
                return PassResult()
            return self._apply(changes())

    def close(self, scope: Scope | None = None) -> PassResult:
        """Stop all further passes; with ``scope``, first remove every entry we own in it."""
        with self._lock:
            self._closed = True
            if scope is None:
                return PassResult()
            return self._converge(Wanted(scope, frozenset()), prune=True)

    def _converge(self, wanted: Wanted, prune: bool) -> PassResult:
        actual = self.kernel.dump(wanted.scope)
        settled = self._settled
        if settled is not None and settled[0] is wanted and settled[1] == prune and _same_objects(actual, settled[2]):
            # plan() is pure: the very inputs that gave an empty plan last time give one again
            return PassResult()
        changes = plan(wanted, actual, prune=prune)
        self._settled = None if changes else (wanted, prune, actual)
        return self._apply(changes)

    def _apply(self, changes: Plan) -> PassResult:
        """Every entry of the plan is either done or listed as failed, never dropped."""
        if not changes:
            return PassResult()
        try:
            failed = self.kernel.change(changes)
        except (NetlinkError, OSError) as exc:
            # the socket failed, not one entry: nothing is known to be done
            return PassResult(failed=tuple((e, str(exc)) for e in changes.remove + changes.add))
        refused = {entry for entry, _ in failed}
        return PassResult(tuple(e for e in changes.add if e not in refused),
                          tuple(e for e in changes.remove if e not in refused),
                          tuple(failed))
