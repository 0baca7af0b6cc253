"""LocalManager and the lease runner against the in-memory subnet store: races, compaction,
a lost key, an outage. The same scenarios run against real etcd in test_etcd_integration.py
and, with whole daemons, in the fault suite."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld_py.core.lease import KeyDeleted, KeyPut, LeaseAdded, LeaseAttrs, LeaseEvent, LeaseRemoved
from flanneld_py.core.lease_policy import LeasePolicy, OwnLease
from flanneld_py.core.netconfig import parse_network_config
from flanneld_py.errors import FatalError
from flanneld_py.subnet.manager import Claim, LeaseLost, LocalManager, NoFreeSubnet
from flanneld_py.subnet.memory import MemoryRegistry
from flanneld_py.subnet.runner import LeaseRunner, acquire_lease, wait_for_config
from flanneld_py.subnet.store import EtcdUnavailable, WatchCompacted

EIGHT = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.8.0"}
CONFIG = parse_network_config(json.dumps(EIGHT))
DEADLINE = 10.0


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.51.100.{n}"), "udp", None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(body):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(body(), DEADLINE))


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# --- the store itself -----------------------------------------------------------------


def test_leases_expire_with_their_keys_and_revisions_count_changes():
    clock = Clock()
    store = MemoryRegistry(clock=clock)

    async def body() -> None:
        lease = await store.grant(10)
        assert await store.create_subnet("10.244.1.0-24", b"v", lease)
        assert not await store.create_subnet("10.244.1.0-24", b"w", lease)
        record = await store.get_subnet("10.244.1.0-24")
        assert record is not None and record.lease_id == lease
        assert not await store.update_subnet("10.244.1.0-24", b"x", lease, record.mod_revision - 1)
        assert await store.update_subnet("10.244.1.0-24", b"x", lease, record.mod_revision)
        clock.now += 5
        assert await store.lease_ttl(lease) == 5
        assert await store.keepalive(lease) == 10
        clock.now += 11
        assert await store.lease_ttl(lease) == -1 and await store.keepalive(lease) == 0
        assert await store.list_subnets() == ([], store.revision)
        await store.revoke(lease)  # already gone: fine

    run(body)


def test_watch_replays_from_a_revision_and_raises_on_compaction_and_outage():
    store = MemoryRegistry()

    async def body() -> None:
        _, start = await store.list_subnets()
        store.put_subnet("10.244.3.0-24", b"a")
        store.put_config(b"{}")
        store.delete_subnet("10.244.3.0-24")
        seen = []
        async for events, revision in store.watch_subnets(start + 1):
            seen += events
            if len(seen) == 2:
                break
        assert seen == [KeyPut("10.244.3.0-24", b"a"), KeyDeleted("10.244.3.0-24")]
        store.compact()
        with pytest.raises(WatchCompacted):
            async for _ in store.watch_subnets(start + 1):
                pass

        async def watch_all() -> None:
            async for _ in store.watch_subnets(store.revision + 1):
                pass

        watching = asyncio.create_task(watch_all())
        await asyncio.sleep(0.01)
        store.fail()
        with pytest.raises(EtcdUnavailable):
            await watching
        with pytest.raises(EtcdUnavailable):
            await store.get_config()
        store.recover()
        assert await store.get_config() == b"{}"

    run(body)


def test_config_waits_while_missing_or_unreachable():
    store = MemoryRegistry()
    store.fail()

    async def body() -> None:
        waiter = asyncio.create_task(wait_for_config(store))
        await asyncio.sleep(0.05)
        store.recover()
        await asyncio.sleep(0.05)
        assert not waiter.done()
        store.put_config(json.dumps(EIGHT).encode())
        assert (await waiter).subnet_count == 8

    run(body)


# --- LocalManager ------------------------------------------------------------------------


def test_claim_is_reused_after_restart_with_the_same_etcd_lease():
    store = MemoryRegistry()

    async def body() -> None:
        first = await LocalManager(store, lease_ttl=3600).acquire(CONFIG, attrs(1))
        again = await LocalManager(store, lease_ttl=3600).acquire(CONFIG, attrs(1))
        assert again.subnet == first.subnet and again.lease_id == first.lease_id
        assert store.live_leases() == [first.lease_id]
        wanted = IPv4Network("10.244.6.0/24") if first.subnet != IPv4Network("10.244.6.0/24") else IPv4Network("10.244.7.0/24")
        previous = await LocalManager(store).acquire(CONFIG, attrs(2), previous=wanted)
        assert previous.subnet == wanted

    run(body)


def test_twenty_claimants_race_for_eight_subnets():
    store = MemoryRegistry()

    async def claim(n: int) -> OwnLease | NoFreeSubnet:
        try:
            return await LocalManager(store, rng=random.Random(n)).acquire(CONFIG, attrs(n))
        except NoFreeSubnet as exc:
            return exc

    async def body() -> list[OwnLease | NoFreeSubnet]:
        return list(await asyncio.gather(*(claim(n) for n in range(1, 21))))

    results = run(body)
    winners = [r for r in results if isinstance(r, OwnLease)]
    assert len(winners) == 8 and len({w.subnet for w in winners}) == 8
    assert all("no free subnet" in str(r) for r in results if isinstance(r, NoFreeSubnet))
    assert len(store.live_leases()) == 8, "losers must revoke the leases they granted"


def test_a_lost_race_tries_another_subnet():
    store = MemoryRegistry()

    class Racing(MemoryRegistry):
        """Another node takes the subnet between our listing and our create, once."""

        async def create_subnet(self, name: str, value: bytes, lease_id: int, unique_prefix: str = "") -> bool:
            if not self.raced:
                self.raced = True
                self.put_subnet(name, attrs(99).to_json())
            return await super().create_subnet(name, value, lease_id, unique_prefix)

    store = Racing()
    store.raced = False  # type: ignore[attr-defined]

    async def body() -> None:
        own = await LocalManager(store).acquire(CONFIG, attrs(1), previous=IPv4Network("10.244.2.0/24"))
        assert own.subnet != IPv4Network("10.244.2.0/24")
        assert store.live_leases() == [own.lease_id]

    run(body)


def test_expired_lease_is_reclaimed_or_lost():
    clock = Clock()
    store = MemoryRegistry(clock=clock)

    async def body() -> None:
        manager = LocalManager(store, lease_ttl=2)
        own = await manager.acquire(CONFIG, attrs(4))
        clock.now += 3  # the lease ran out: the key is gone
        renewed = await manager.renew(own)
        assert renewed.subnet == own.subnet and renewed.lease_id != own.lease_id
        await store.revoke(renewed.lease_id)
        store.put_subnet(own.name, attrs(99).to_json(), await store.grant(60))
        with pytest.raises(LeaseLost, match="held by another node"):
            await manager.renew(renewed)

    run(body)


# --- the runner: policy + manager + store, as the daemon runs them --------------------------


class Harness:
    def __init__(self, store: MemoryRegistry, own: OwnLease, ttl: int = 3600) -> None:
        self.store = store
        self.manager = LocalManager(store, lease_ttl=ttl)
        self.applied: list[LeaseEvent] = []
        self.held: list[OwnLease] = []
        self.own = own

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        self.applied.extend(events)

    def start(self, margin: float = 0.0, claim: Claim | None = None) -> asyncio.Task[None]:
        policy = LeasePolicy(CONFIG, self.own, margin, asyncio.get_running_loop().time())
        runner = LeaseRunner(policy, self.manager, self.apply, self.held.append, claim)
        return asyncio.create_task(runner.run())

    def times_added(self, subnet: IPv4Network) -> int:
        return sum(1 for e in self.applied if isinstance(e, LeaseAdded) and e.lease.subnet == subnet)

    def added(self) -> set[IPv4Network]:
        return {e.lease.subnet for e in self.applied if isinstance(e, LeaseAdded)}

    def removed(self) -> set[IPv4Network]:
        return {e.lease.subnet for e in self.applied if isinstance(e, LeaseRemoved)}


async def _joined(store: MemoryRegistry, n: int, ttl: int = 3600) -> Harness:
    own = await LocalManager(store, lease_ttl=ttl).acquire(CONFIG, attrs(n))
    return Harness(store, own, ttl)


def test_runner_follows_peers_through_compaction_and_an_outage():
    store = MemoryRegistry()
    store.put_config(json.dumps(EIGHT).encode())

    async def body() -> None:
        node = await _joined(store, 1)
        peer = await LocalManager(store).acquire(CONFIG, attrs(2))
        task = node.start()
        await until(lambda: peer.subnet in node.added(), "the listed peer")
        store.compact()
        third = await LocalManager(store).acquire(CONFIG, attrs(3))
        await until(lambda: third.subnet in node.added(), "a peer after compaction")
        store.fail()
        await asyncio.sleep(0.2)
        assert not task.done() and not node.removed(), "an outage keeps every route"
        store.recover()
        store.delete_subnet(peer.name)
        await until(lambda: peer.subnet in node.removed(), "a removal after the outage")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body)


def test_runner_reclaims_our_deleted_key_and_dies_when_it_is_taken():
    store = MemoryRegistry()

    async def body() -> None:
        node = await _joined(store, 1)
        task = node.start()
        await asyncio.sleep(0.05)
        store.delete_subnet(node.own.name)
        await until(lambda: bool(node.held), "the re-claim")
        assert node.held[-1].subnet == node.own.subnet
        assert (await store.get_subnet(node.own.name)) is not None
        store.put_subnet(node.own.name, attrs(9).to_json())
        with pytest.raises(FatalError, match="rewritten for 198.51.100.9"):
            await task

    run(body)


def test_runner_dies_when_a_relisting_shows_our_key_taken():
    """The rewrite happened during an outage and was compacted away: only the re-listing shows it,
    and it is as fatal as in a watch batch."""
    store = MemoryRegistry()

    async def body() -> None:
        node = await _joined(store, 1)
        peer = await LocalManager(store).acquire(CONFIG, attrs(2))
        task = node.start()
        await until(lambda: peer.subnet in node.added(), "the listed peer")
        store.fail()
        store.put_subnet(node.own.name, attrs(9).to_json())
        store.compact()
        store.recover()
        with pytest.raises(FatalError, match="rewritten for 198.51.100.9"):
            await asyncio.wait_for(task, 30)

    run(body)


def test_runner_renews_and_retries_renewal_through_an_outage():
    store = MemoryRegistry(clock=Clock())  # the etcd lease never runs out: this is about retries

    async def body() -> None:
        node = await _joined(store, 1, ttl=1)  # renew every ttl/3
        task = node.start(margin=3600)
        await until(lambda: len(node.held) >= 2, "two renewals")
        store.fail()
        await asyncio.sleep(0.6)
        store.recover()
        count = len(node.held)
        await until(lambda: len(node.held) > count, "a renewal after the outage")
        assert {own.lease_id for own in node.held} == {node.own.lease_id}, "one etcd lease throughout"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body)


def test_acquire_retries_while_etcd_is_away():
    store = MemoryRegistry()
    store.fail()

    async def body() -> None:
        claim = asyncio.create_task(acquire_lease(LocalManager(store), CONFIG, attrs(1), None))
        await asyncio.sleep(0.1)
        assert not claim.done()
        store.recover()
        assert (await claim).own.attrs == attrs(1)

    run(body)


def test_a_config_changed_at_run_time_is_reported_once_and_its_return_too():
    from flanneld_py.subnet.runner import judge_config

    raw = json.dumps(EIGHT).encode()
    other = json.dumps({**EIGHT, "Network": "10.245.0.0/16", "SubnetMin": "10.245.1.0", "SubnetMax": "10.245.8.0"}).encode()
    assert judge_config(raw, CONFIG, None, "/p") == (None, None)
    reported, line = judge_config(other, CONFIG, None, "/p")
    assert reported == other and line is not None and line.level == "warning" and "/p/config changed" in line.message
    assert judge_config(other, CONFIG, reported, "/p") == (other, None), "said once"
    reported, line = judge_config(b"{", CONFIG, reported, "/p")
    assert line is not None and "is now invalid" in line.message
    reported, line = judge_config(None, CONFIG, reported, "/p")
    assert reported == b"" and line is not None and "was deleted" in line.message
    back = judge_config(raw, CONFIG, reported, "/p")[1]
    assert back is not None and back.level == "info" and "the one in use again" in back.message


def test_a_watch_that_ends_without_an_error_counts_as_lost_etcd():
    class Ending(MemoryRegistry):
        watches = 0

        async def watch_subnets(self, start_revision: int):  # type: ignore[no-untyped-def,override]
            self.watches += 1
            return
            yield

    store = Ending()

    async def body() -> None:
        node = await _joined(store, 1)
        task = node.start()
        await until(lambda: store.watches >= 2, "the watch started again")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body)


# --- one listing at start: the claim's listing seeds the watch ----------------------------


class Listing(MemoryRegistry):
    """Counts full listings."""

    lists = 0

    async def list_subnets(self):  # type: ignore[no-untyped-def]
        self.lists += 1
        return await super().list_subnets()


async def _claimed(store: MemoryRegistry, n: int) -> tuple[Harness, Claim]:
    claim = await LocalManager(store, lease_ttl=3600).claim(CONFIG, attrs(n))
    return Harness(store, claim.own), claim


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_claims_listing_seeds_the_watch_so_nothing_between_is_missed_or_doubled():
    store = Listing()

    async def body() -> None:
        early = await LocalManager(store).acquire(CONFIG, attrs(2))
        gone = await LocalManager(store).acquire(CONFIG, attrs(3))
        node, claim = await _claimed(store, 1)
        assert {r.name for r in claim.records} == {early.name, gone.name}, "listed before our key was written"
        lists = store.lists
        late = await LocalManager(store).acquire(CONFIG, attrs(4))  # between the listing and the watch
        await store.revoke(gone.lease_id)
        task = node.start(claim=claim)
        await until(lambda: late.subnet in node.added() and gone.subnet in node.removed(), "the changes in between")
        extra = await LocalManager(store).acquire(CONFIG, attrs(5))
        await until(lambda: extra.subnet in node.added(), "a peer after the start")
        assert store.lists == lists + 2, "no listing of our own: only the two later joiners' claims listed"
        assert [node.times_added(s) for s in (early.subnet, gone.subnet, late.subnet)] == [1, 1, 1]
        assert node.own.subnet not in node.added() and not node.held, "our own write is no peer, no re-claim"
        await _stop(task)

    run(body)


def test_a_compaction_between_the_claim_and_the_watch_relists():
    store = Listing()

    async def body() -> None:
        node, claim = await _claimed(store, 1)
        late = await LocalManager(store).acquire(CONFIG, attrs(2))
        store.compact()
        lists = store.lists
        task = node.start(claim=claim)
        await until(lambda: late.subnet in node.added(), "the peer, from a new listing")
        assert store.lists == lists + 1 and node.times_added(late.subnet) == 1
        await _stop(task)

    run(body)


def test_our_key_deleted_between_the_claim_and_the_watch_is_reclaimed():
    store = MemoryRegistry()

    async def body() -> None:
        node, claim = await _claimed(store, 1)
        store.delete_subnet(claim.own.name)
        task = node.start(claim=claim)
        await until(lambda: bool(node.held), "the re-claim")
        assert (await store.get_subnet(claim.own.name)) is not None
        await _stop(task)

    run(body)


def test_our_key_rewritten_for_another_node_between_the_claim_and_the_watch_is_fatal():
    store = MemoryRegistry()

    async def body() -> None:
        node, claim = await _claimed(store, 1)
        store.put_subnet(claim.own.name, attrs(9).to_json())
        with pytest.raises(FatalError, match="rewritten for 198.51.100.9"):
            await node.start(claim=claim)

    run(body)


def test_an_adopted_lease_seeds_the_watch_too():
    store = Listing()

    async def body() -> None:
        first, _ = await _claimed(store, 1)
        peer = await LocalManager(store).acquire(CONFIG, attrs(2))
        node, claim = await _claimed(store, 1)  # a restart: the same PublicIP takes its lease back
        assert claim.own.subnet == first.own.subnet and any(r.name == claim.own.name for r in claim.records)
        lists = store.lists
        task = node.start(claim=claim)
        await until(lambda: peer.subnet in node.added(), "the listed peer")
        await asyncio.sleep(0.05)
        assert store.lists == lists and node.times_added(peer.subnet) == 1 and not node.held
        await _stop(task)

    run(body)


def test_only_a_record_naming_exactly_our_address_is_adopted():
    store = MemoryRegistry()

    async def body() -> None:
        store.put_subnet("10.244.3.0-24", b'{"PublicIP":"198.51.100.10","BackendType":"udp"}')  # ours is a prefix of it
        store.put_subnet("10.244.5.0-24", b'{ "BackendType": "udp",\n  "PublicIP": "198.51.100.1" }')  # ours, spaced
        own = await LocalManager(store, lease_ttl=3600).acquire(CONFIG, attrs(1))
        assert own.subnet == IPv4Network("10.244.5.0/24")

    run(body)


def test_a_record_naming_our_address_with_json_escapes_is_adopted():
    """JSON lets a writer escape any character of the address; it is still our record."""
    store = MemoryRegistry()

    async def body() -> None:
        store.put_subnet("10.244.3.0-24", b'{"PublicIP":"198.51.100.\\u0031\\u0030","BackendType":"udp"}')  # .10
        store.put_subnet("10.244.6.0-24", b'{"PublicIP":"198.51.100.\\u0031","BackendType":"udp"}')  # ours
        own = await LocalManager(store, lease_ttl=3600).acquire(CONFIG, attrs(1))
        assert own.subnet == IPv4Network("10.244.6.0/24")

    run(body)


# --- coalescing: events that arrive while the datapath applies a batch ---------------------


class Gated(Harness):
    """Holds each apply (after the first, the listing) until the test opens the gate; records call sizes."""

    def __init__(self, store: MemoryRegistry, own: OwnLease) -> None:
        super().__init__(store, own)
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        self.calls.append(len(events))
        await self.gate.wait()
        await super().apply(events)


def test_events_arriving_during_an_apply_all_land_in_the_next_one():
    store = MemoryRegistry()
    wide = {**EIGHT, "SubnetMin": "10.244.160.0", "SubnetMax": "10.244.200.0"}  # our lease: above every key written below
    config = parse_network_config(json.dumps(wide))
    store.put_config(json.dumps(wide).encode())

    async def body() -> None:
        own = await LocalManager(store, lease_ttl=3600).acquire(config, attrs(1))
        store.put_subnet("10.244.99.0-24", attrs(99).to_json())
        node = Gated(store, own)
        task = node.start()
        await until(lambda: len(node.calls) == 1, "the listing applied")
        node.gate.clear()
        store.put_subnet("10.244.100.0-24", attrs(2).to_json())
        await until(lambda: len(node.calls) == 2, "the first event's apply under way")
        names = [f"10.244.{n}.0-24" for n in range(101, 151)]
        for n, name in enumerate(names):  # all while that apply is held
            store.put_subnet(name, attrs(3 + n).to_json())
        store.delete_subnet(names[0])  # changed twice meanwhile: the last word wins
        await asyncio.sleep(0.05)
        assert len(node.calls) == 2, "no second apply while one is running"
        node.gate.set()
        await until(lambda: len(node.calls) == 3 and len(node.applied) == 2 + 51, "the rest in one apply")
        assert node.calls[2] == 51, "every event that arrived during the apply, in the next one"
        assert node.added() == {IPv4Network(n.replace("-", "/")) for n in ["10.244.99.0-24", "10.244.100.0-24", *names]}
        assert isinstance(node.applied[-1], LeaseRemoved), "in order: the delete after its put"
        assert node.applied[-1].lease.subnet == IPv4Network("10.244.101.0/24")
        await _stop(task)

    run(body)


def test_coalesced_hands_over_what_it_read_before_the_watch_broke():
    from flanneld_py.subnet.runner import coalesced
    from flanneld_py.subnet.store import SubnetBatch

    first_taken = asyncio.Event()

    async def watch() -> AsyncIterator[SubnetBatch]:
        yield [KeyPut("n1", b"v")], 1
        await first_taken.wait()
        for revision in range(2, 6):
            yield [KeyPut(f"n{revision}", b"v")], revision
        raise EtcdUnavailable("watch broke")

    async def body() -> None:
        seen: list[tuple[list[str], int]] = []
        with pytest.raises(EtcdUnavailable, match="watch broke"):
            async for batch, revision in coalesced(watch()):
                seen.append(([e.name for e in batch], revision))
                first_taken.set()
                await asyncio.sleep(0.01)  # busy applying: the rest is read meanwhile
        assert seen == [(["n1"], 1), (["n2", "n3", "n4", "n5"], 5)]

    run(body)


def test_coalesced_reads_ahead_a_bounded_number_of_batches_while_the_datapath_stalls():
    from flanneld_py.subnet.runner import coalesced
    from flanneld_py.subnet.store import SubnetBatch

    read = 0

    async def endless() -> AsyncIterator[SubnetBatch]:
        nonlocal read
        while True:
            read += 1
            yield [KeyPut(f"n{read}", b"v")], read
            await asyncio.sleep(0)

    async def body() -> None:
        batches = coalesced(endless(), read_ahead=4)
        first, _ = await anext(batches)
        assert [e.name for e in first] == ["n1"]
        await asyncio.sleep(0.05)  # the datapath is stuck in an apply: the reader may not run away
        assert read <= 1 + 4 + 1, f"{read} batches read while one apply stalled"
        second, revision = await anext(batches)
        assert [e.name for e in second] == [f"n{n}" for n in range(2, revision + 1)]  # none lost, in order
        await batches.aclose()

    run(body)
