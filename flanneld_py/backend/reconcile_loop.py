"""The asyncio side of reconciling: passes on demand, on a timer, and soon after a failure.

Every pass runs in a worker thread (netlink is synchronous). Changes a timed
pass had to make are drift (someone changed our state) and each is logged
as a repair; an entry the kernel refused is warned about once and retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from ..netlink import NetlinkError
from .kernel import Failure
from .kernel_state import Plan, Scope, describe
from .reconciler import PassResult, Reconciler

__all__ = ["RECONCILE_INTERVAL", "RETRY_DELAY", "ReconcileLoop"]

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 5.0
RETRY_DELAY = 1.0  # a newly refused entry is retried this soon, not only at the next timed pass


class ReconcileLoop:
    """Runs :class:`~.reconciler.Reconciler` passes on demand (:meth:`sync`) and every ``interval`` seconds.

    Pruning starts off when ``prune`` is False, until :meth:`allow_pruning`
    or the first timed pass: right after a restart we do not yet know the
    peers, and must not drop the entries that still carry their traffic.
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
        self._failing: set[Failure] = set()
        self._retry = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._every_interval(), name=f"reconcile-{self.label}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def allow_pruning(self) -> None:
        self._prune = True

    async def sync(self, reason: str) -> PassResult | None:
        """One full pass now; None if the kernel could not even be listed (the next pass retries)."""
        try:
            result = await asyncio.to_thread(self.reconciler.run_pass, self._prune)
        except (NetlinkError, OSError, LookupError) as exc:
            log.warning("%s: reconcile (%s) failed: %s; retrying in %.0fs", self.label, reason, exc, self.interval)
            return None
        self._report(reason, result, full=True)
        return result

    async def apply_plan(self, changes: Callable[[], Plan], reason: str) -> None:
        """Apply a lease event's delta at once (see :meth:`.Reconciler.apply_plan`); a full pass
        retries what failed and catches drift."""
        self._report(reason, await asyncio.to_thread(self.reconciler.apply_plan, changes), full=False)

    async def stop(self, scope: Scope | None = None) -> PassResult:
        """Stop the timer; with ``scope``, remove everything we own in it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        result = await asyncio.to_thread(self.reconciler.close, scope)
        if result.removed or result.failed:
            log.info("%s: cleanup removed %d kernel entries", self.label, len(result.removed))
        self._report_failures(result, full=True)
        return result

    async def _every_interval(self) -> None:
        while True:
            reason = "drift"
            try:
                async with asyncio.timeout(self.interval):
                    await self._retry.wait()
                reason = "retry"
                await asyncio.sleep(RETRY_DELAY)
            except TimeoutError:
                self._prune = True
            self._retry.clear()
            await self.sync(reason)

    def _report(self, reason: str, result: PassResult, full: bool) -> None:
        names = self.names()
        if reason == "drift":
            for entry in result.added:
                log.warning("%s: drift repaired: restored %s", self.label, describe(entry, names))
            for entry in result.removed:
                log.warning("%s: drift repaired: removed stray %s", self.label, describe(entry, names))
        elif log.isEnabledFor(logging.DEBUG):
            for entry in result.removed:
                log.debug("%s: removed %s (%s)", self.label, describe(entry, names), reason)
            for entry in result.added:
                log.debug("%s: added %s (%s)", self.label, describe(entry, names), reason)
        self._report_failures(result, full)

    def _report_failures(self, result: PassResult, full: bool) -> None:
        """Warn once per failing entry and error, not on every retry; retry new failures soon.

        A full pass knows every failing entry; a delta only those it touched.
        """
        if not result.failed and not self._failing:
            return  # the common case, without hashing every entry a big batch changed
        now = set(result.failed)
        new = now - self._failing
        for entry, error in new:
            log.warning("%s: cannot apply %s: %s (will retry)", self.label, describe(entry, self.names()), error)
        if full:
            self._failing = now
        else:
            done = set(result.added) | set(result.removed)
            self._failing = {f for f in self._failing if f[0] not in done} | now
        if new:
            self._retry.set()
