"""The asyncio side of the lease: runs :class:`~flanneld_py.core.lease_policy.LeasePolicy`'s
actions against a subnet store, and the daemon's other waits on etcd.

Every retry loop around etcd lives here, each with its own backoff: waiting
for the network config, acquiring a lease, and (through the policy) renewing
it and following everyone's. Only this module reads the event loop's clock
for the lease; the policy gets ``now`` as an argument.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from ipaddress import IPv4Network, IPv6Network

from ..cancellation import cancel_and_wait
from ..core.lease import KeyDeleted, KeyPut, LeaseAttrs, LeaseEvent
from ..core.lease_policy import (
    Action,
    ApplyPeers,
    CheckEtcd,
    Fatal,
    LeasePolicy,
    OwnLease,
    Reclaim,
    Relist,
    Renew,
    Report,
    Watch,
)
from ..core.netconfig import ConfigError, NetworkConfig, parse_network_config
from ..core.renewal import Backoff
from ..errors import FatalError
from .manager import Claim, LeaseLost, LocalManager
from .store import EtcdUnavailable, Registry, SubnetBatch, WatchCompacted

__all__ = ["LeaseRunner", "acquire_lease", "coalesced", "follow_config", "judge_config", "wait_for_config"]

log = logging.getLogger("flanneld_py")


async def wait_for_config(registry: Registry) -> NetworkConfig:
    """Read ``<prefix>/config``, waiting (and saying so) while it is missing or etcd is away.

    An invalid config raises :class:`ConfigError` at once.
    """
    backoff = Backoff(first=1.0, ceiling=10.0)
    warned = False
    while True:
        try:
            raw = await registry.get_config()
        except EtcdUnavailable as exc:
            log.warning("waiting for etcd: %s", exc)
        else:
            if raw is not None:
                return parse_network_config(raw)
            if not warned:
                log.warning(
                    "network config %s/config is missing; waiting for it "
                    "(e.g. etcdctl put %s/config '{\"Network\": \"10.244.0.0/16\"}')",
                    registry.prefix, registry.prefix,
                )
                warned = True
        await asyncio.sleep(backoff.next())


async def acquire_lease(manager: LocalManager, config: NetworkConfig, attrs: LeaseAttrs,
                        previous: IPv4Network | None, previous6: IPv6Network | None = None) -> Claim:
    """:meth:`LocalManager.claim`, retried while etcd cannot be reached."""
    backoff = Backoff()
    while True:
        try:
            return await manager.claim(config, attrs, previous, previous6)
        except EtcdUnavailable as exc:
            delay = backoff.next()
            log.warning("cannot reach etcd to acquire a lease (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


class LeaseRunner:
    """Runs the policy's two lanes (renewal, watch) until a fatal action or cancellation.

    ``apply`` gets the peer changes for the datapath; ``hold`` is told every
    lease we hold after a renewal or a re-claim. With ``claim`` (how our lease
    was acquired), its listing gives the peers and the watch starts right
    after it, instead of listing every lease again.
    """

    def __init__(
        self,
        policy: LeasePolicy,
        manager: LocalManager,
        apply: Callable[[Sequence[LeaseEvent]], Awaitable[None]],
        hold: Callable[[OwnLease], None],
        claim: Claim | None = None,
    ) -> None:
        self.policy = policy
        self.manager = manager
        self.registry = manager.registry
        self.apply = apply
        self.hold = hold
        self._claim = claim
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Raises :class:`FatalError` when the policy says so."""
        claim, self._claim = self._claim, None  # only the first start may use it
        if claim is None:
            first = self.policy.start()
        else:
            first = self.policy.start_from((KeyPut(r.name, r.value) for r in claim.records), claim.revision)
        lanes: set[asyncio.Task[None]] = {self._lane(self._watch_lane, first)}
        try:
            while True:
                deadline = self.policy.get_timer()
                timeout = None if deadline is None else max(0.0, deadline - self._loop.time())
                if lanes:
                    done, _ = await asyncio.wait(lanes, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                else:  # both lanes wait for a timer (a renewal, a retry after an outage)
                    done = set()
                    await asyncio.sleep(timeout or 0.0)
                for task in done:
                    lanes.discard(task)
                    task.result()  # a fatal action or a bug ends the daemon
                for action in self.policy.handle_timer(self._loop.time()):
                    lane = self._renew_lane if isinstance(action, Renew) else self._watch_lane
                    lanes.add(self._lane(lane, [action]))
        finally:
            await cancel_and_wait(lanes)

    def _lane(self, body: Callable[[list[Action]], Awaitable[None]], actions: list[Action]) -> asyncio.Task[None]:
        async def run() -> None:
            await body(actions)

        return asyncio.create_task(run())

    async def _renew_lane(self, actions: list[Action]) -> None:
        try:
            await self._perform(actions)
        except EtcdUnavailable as exc:
            await self._perform(self.policy.renew_failed(str(exc), self._loop.time()))

    async def _watch_lane(self, actions: list[Action]) -> None:
        while actions:
            try:
                await self._perform(actions)
                return
            except WatchCompacted as exc:
                actions = self.policy.compacted(exc.oldest)
            except EtcdUnavailable as exc:
                actions = self.policy.etcd_lost(str(exc), self._loop.time())

    async def _perform(self, actions: list[Action]) -> None:
        """Run ``actions`` in order, and the actions their results lead to."""
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            queue[:0] = await self._step(action)

    async def _step(self, action: Action) -> list[Action]:
        policy = self.policy
        match action:
            case Report(level, message):
                log.log(logging.WARNING if level == "warning" else logging.INFO, "%s", message)
            case Fatal(reason):
                raise FatalError(reason)
            case ApplyPeers(changes):
                await self.apply(changes)
            case Renew(own):
                try:
                    renewed = await self.manager.renew(own)  # re-claims if the etcd lease ran out
                except LeaseLost as exc:
                    return policy.reclaim_lost(str(exc))
                self.hold(renewed)
                return policy.renewed(renewed, self._loop.time())
            case Reclaim(own):
                try:
                    reclaimed = await self.manager.reclaim(own)
                except LeaseLost as exc:
                    return policy.reclaim_lost(str(exc))
                self.hold(reclaimed)
                return policy.reclaimed(reclaimed)
            case Relist():
                records, revision = await self.registry.list_subnets()
                return policy.relisted((KeyPut(r.name, r.value) for r in records), revision)
            case CheckEtcd():
                await self.registry.get_config()  # a real answer, not just a reconnect
                return policy.etcd_back()
            case Watch(start):
                async with aclosing(coalesced(self.registry.watch_subnets(start))) as batches:
                    async for batch, revision in batches:
                        await self._perform(policy.watched(batch, revision))
                raise EtcdUnavailable("the watch ended")  # a store's watch ends only by an error; never wait on nothing
        return []


_ENDED = object()  # the store's watch returned (it does so only by an error; see the Watch step)
READ_AHEAD = 8192  # watch batches read ahead at most; then the reader waits and etcd's stream pushes back


async def coalesced(batches: AsyncIterator[SubnetBatch], read_ahead: int = READ_AHEAD) -> AsyncGenerator[SubnetBatch, None]:
    """The store's watch batches, with those that arrived while the caller was busy merged into one.

    A reader task goes on reading while the datapath applies the last batch;
    the next batch is everything read meanwhile, in order, at the last
    revision. So a burst of lease writes costs one plan and one kernel batch
    per apply, not one per event. The watch's error is raised after the
    events read before it. At most ``read_ahead`` batches wait: a datapath
    that stalls leaves the rest to gRPC's flow control, not to our memory.
    """
    queue: asyncio.Queue[SubnetBatch | BaseException | object] = asyncio.Queue(read_ahead)

    async def read() -> None:
        try:
            async for batch in batches:
                await queue.put(batch)
        except Exception as exc:  # handed to the consumer, which raises it in its own task
            await queue.put(exc)
            return
        await queue.put(_ENDED)

    reader = asyncio.create_task(read(), name="watch-reader")
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            events: list[KeyPut | KeyDeleted] = []
            revision = None
            for item in items:
                if isinstance(item, tuple):
                    events += item[0]
                    revision = item[1]
            if revision is not None:
                yield events, revision
            last = items[-1]
            if isinstance(last, BaseException):
                raise last
            if last is _ENDED:
                return
    finally:
        await cancel_and_wait([reader])


async def follow_config(registry: Registry, running: NetworkConfig) -> None:
    """Say once when the network config in etcd changes, breaks or goes away at run time.

    The datapath keeps the config read at start (flannel's rule: a new
    config needs a restart), so a bad edit never takes a running node down.
    """
    reported: bytes | None = None  # the raw value last complained about
    backoff = Backoff(first=1.0, ceiling=30.0)
    while True:
        try:
            raw, read_at = await registry.get_config_revision()
            reported = _report(judge_config(raw, running, reported, registry.prefix))
            async for raw, _revision in registry.watch_config(read_at + 1):
                reported = _report(judge_config(raw, running, reported, registry.prefix))
                backoff.reset()
        except WatchCompacted:
            continue
        except EtcdUnavailable:
            await asyncio.sleep(backoff.next())  # the lease watch reports etcd's absence


def judge_config(raw: bytes | None, running: NetworkConfig, reported: bytes | None,
                 prefix: str) -> tuple[bytes | None, Report | None]:
    """What to say about the config now in etcd: the value to remember as reported, and a line."""
    if raw is None:
        problem = "was deleted"
    else:
        try:
            config = parse_network_config(raw)
        except ConfigError as exc:
            problem = f"is now invalid ({exc})"
        else:
            if config == running:
                back = None if reported is None else Report("info", f"network config {prefix}/config is the one in use again")
                return None, back
            problem = "changed"
    value = b"" if raw is None else raw
    if value == reported:
        return value, None
    return value, Report("warning", f"network config {prefix}/config {problem}; still using the config read at "
                                    f"start (Network {running.network}, backend {running.backend.type}); "
                                    "restart flanneld-py to apply a new one")


def _report(judged: tuple[bytes | None, Report | None]) -> bytes | None:
    reported, line = judged
    if line is not None:
        log.log(logging.WARNING if line.level == "warning" else logging.INFO, "%s", line.message)
    return reported
