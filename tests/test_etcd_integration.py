"""The subnet manager and registry against a real etcd server (started per test)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from conftest import ETCD_PASSWORD, ETCD_USER

from flanneld_py.core.lease import KeyDeleted, KeyPut, LeaseAttrs
from flanneld_py.core.netconfig import parse_network_config
from flanneld_py.subnet.manager import LeaseLost, LocalManager, NoFreeSubnet
from flanneld_py.subnet.registry import EtcdRegistry
from flanneld_py.core.lease import LeaseAdded, LeaseRemoved
from flanneld_py.core.lease_policy import LeasePolicy
from flanneld_py.errors import FatalError
from flanneld_py.subnet.runner import LeaseRunner, follow_config, wait_for_config
from flanneld_py.subnet.store import EtcdAuthError, EtcdUnavailable, WatchCompacted

pytestmark = pytest.mark.etcd
PREFIX = "/coreos.com/network"
EIGHT = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.8.0"}


def registry(etcd) -> EtcdRegistry:
    return EtcdRegistry([f"127.0.0.1:{etcd.client_port}"], prefix=PREFIX, timeout=3)


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.51.100.{n}"), "udp", None)


def etcd_leases(etcd) -> list[int]:
    """The ids of etcd's live leases (etcdctl prints them in hex, zero-padded or not)."""
    return [int(line, 16) for line in etcd.ctl("lease", "list").stdout.splitlines()[1:] if line.strip()]


async def _with(etcd, body):
    reg = registry(etcd)
    try:
        return await body(reg)
    finally:
        await reg.close()


def test_config_missing_then_present(etcd):
    async def body(reg):
        waiter = asyncio.ensure_future(wait_for_config(reg))
        await asyncio.sleep(1.5)
        assert not waiter.done()
        etcd.ctl("put", f"{PREFIX}/config", json.dumps(EIGHT))
        config = await asyncio.wait_for(waiter, 15)
        assert config.subnet_count == 8

    asyncio.run(_with(etcd, body))


def test_claim_is_flannels_record_and_reused_after_restart(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def body(reg):
        manager = LocalManager(reg, lease_ttl=3600)
        first = await manager.acquire(config, attrs(1))
        again = await LocalManager(reg, lease_ttl=3600).acquire(config, attrs(1))
        return first, again

    first, again = asyncio.run(_with(etcd, body))
    assert again.subnet == first.subnet
    assert again.lease_id == first.lease_id, "a restart must keep the one etcd lease"
    raw = etcd.ctl("get", f"{PREFIX}/subnets/{first.name}", "--print-value-only").stdout.strip()
    assert json.loads(raw) == {"PublicIP": "198.51.100.1", "PublicIPv6": None, "BackendType": "udp"}  # omitempty, as Go
    assert len(etcd_leases(etcd)) == 1


def test_previous_subnet_is_reused_when_free(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def body(reg):
        return await LocalManager(reg).acquire(config, attrs(2), previous=IPv4Network("10.244.6.0/24"))

    assert asyncio.run(_with(etcd, body)).subnet == IPv4Network("10.244.6.0/24")


def test_twenty_claimants_race_for_eight_subnets(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def claim(n: int):
        reg = registry(etcd)
        try:
            return await LocalManager(reg, rng=random.Random(n)).acquire(config, attrs(n))
        except NoFreeSubnet as exc:
            return exc
        finally:
            await reg.close()

    async def race():
        return await asyncio.gather(*(claim(n) for n in range(1, 21)))

    results = asyncio.run(race())
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, NoFreeSubnet)]
    assert len(winners) == 8 and len(losers) == 12
    assert len({w.subnet for w in winners}) == 8
    assert all("no free subnet" in str(e) for e in losers)
    keys = etcd.ctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").stdout.split()
    assert len(keys) == 8
    assert len(etcd_leases(etcd)) == 8, "losers must revoke the etcd leases they granted"


def test_renewals_keep_one_etcd_lease(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def body(reg):
        manager = LocalManager(reg, lease_ttl=60)
        own = await manager.acquire(config, attrs(3))
        for _ in range(5):
            own = await manager.renew(own)
        return own

    own = asyncio.run(_with(etcd, body))
    assert etcd_leases(etcd) == [own.lease_id]


def test_expired_lease_is_reclaimed_or_lost(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def body(reg):
        manager = LocalManager(reg, lease_ttl=2)
        own = await manager.acquire(config, attrs(4))
        await reg.revoke(own.lease_id)  # as if it expired: the key is gone
        renewed = await manager.renew(own)
        assert renewed.subnet == own.subnet and renewed.lease_id != own.lease_id
        # now another node takes it while we are away
        await reg.revoke(renewed.lease_id)
        other = await reg.grant(60)
        assert await reg.create_subnet(own.name, attrs(99).to_json(), other)
        with pytest.raises(LeaseLost, match="held by another node"):
            await manager.renew(renewed)

    asyncio.run(_with(etcd, body))


def test_watch_adds_deletes_and_resume_after_restart(etcd):
    async def body(reg):
        _, revision = await reg.list_subnets()
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.3.0-24", attrs(3).to_json().decode())
        etcd.ctl("del", f"{PREFIX}/subnets/10.244.3.0-24")
        seen = []
        async for events, rev in reg.watch_subnets(revision + 1):
            seen.extend(events)
            revision = rev
            if len(seen) == 2:
                break
        assert seen == [KeyPut("10.244.3.0-24", attrs(3).to_json()), KeyDeleted("10.244.3.0-24")]
        # etcd goes away mid-watch: the watch says so, then resumes where it left off
        etcd.stop()
        with pytest.raises(EtcdUnavailable):
            async for _ in reg.watch_subnets(revision + 1):
                pass
        etcd.start()
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.4.0-24", attrs(4).to_json().decode())
        for _ in range(10):
            try:
                async for events, _rev in reg.watch_subnets(revision + 1):
                    assert events == [KeyPut("10.244.4.0-24", attrs(4).to_json())]
                    return
            except EtcdUnavailable:
                await asyncio.sleep(0.5)
        raise AssertionError("watch did not resume")

    asyncio.run(asyncio.wait_for(_with(etcd, body), 60))


def test_watch_after_compaction_asks_for_relist(etcd):
    async def body(reg):
        _, old = await reg.list_subnets()
        for n in range(3):
            etcd.ctl("put", f"{PREFIX}/subnets/10.244.{n + 1}.0-24", attrs(n).to_json().decode())
        _, now = await reg.list_subnets()
        etcd.ctl("compact", str(now))
        with pytest.raises(WatchCompacted):
            async for _ in reg.watch_subnets(old + 1):
                pass
        records, _ = await reg.list_subnets()
        assert len(records) == 3

    asyncio.run(asyncio.wait_for(_with(etcd, body), 30))


OURS = IPv4Network("10.244.1.0/24")  # our subnet in the tests below, apart from the peers they write


class _Counting(EtcdRegistry):
    lists = 0

    async def list_subnets(self):  # type: ignore[no-untyped-def]
        self.lists += 1
        return await super().list_subnets()


async def _follow(reg, claim, applied, held):  # type: ignore[no-untyped-def]
    """The lease runner as the daemon starts it: from the claim's listing."""
    config = parse_network_config(json.dumps(EIGHT))
    policy = LeasePolicy(config, claim.own, 0.0, asyncio.get_running_loop().time())

    async def apply(events):  # type: ignore[no-untyped-def]
        applied.extend(events)

    await LeaseRunner(policy, LocalManager(reg), apply, held.append, claim).run()


async def _until(condition, what):  # type: ignore[no-untyped-def]
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _subnets(applied, kind):  # type: ignore[no-untyped-def]
    return [str(e.lease.subnet) for e in applied if isinstance(e, kind)]


def test_start_lists_once_and_misses_nothing_between_claim_and_watch(etcd):
    config = parse_network_config(json.dumps(EIGHT))
    etcd.ctl("put", f"{PREFIX}/subnets/10.244.7.0-24", attrs(7).to_json().decode())
    etcd.ctl("put", f"{PREFIX}/subnets/10.244.8.0-24", attrs(8).to_json().decode())

    async def body(reg):
        held: list = []
        claim = await LocalManager(reg).claim(config, attrs(1), previous=OURS)
        assert reg.lists == 1
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.6.0-24", attrs(6).to_json().decode())  # in between
        etcd.ctl("del", f"{PREFIX}/subnets/10.244.8.0-24")
        applied_events: list = []
        task = asyncio.create_task(_follow(reg, claim, applied_events, held))
        await _until(lambda: "10.244.6.0/24" in _subnets(applied_events, LeaseAdded)
                     and "10.244.8.0/24" in _subnets(applied_events, LeaseRemoved), "the changes in between")
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.5.0-24", attrs(5).to_json().decode())
        await _until(lambda: "10.244.5.0/24" in _subnets(applied_events, LeaseAdded), "a peer after the start")
        added = _subnets(applied_events, LeaseAdded)
        assert sorted(added) == ["10.244.5.0/24", "10.244.6.0/24", "10.244.7.0/24", "10.244.8.0/24"], "each once"
        assert reg.lists == 1 and not held, "one listing in all; our own write seen, no re-claim"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    reg = _Counting([f"127.0.0.1:{etcd.client_port}"], prefix=PREFIX, timeout=3)
    etcd.ctl("put", f"{PREFIX}/config", json.dumps(EIGHT))

    async def run():  # type: ignore[no-untyped-def]
        try:
            await body(reg)
        finally:
            await reg.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_compaction_or_our_key_changed_between_claim_and_watch(etcd):
    config = parse_network_config(json.dumps(EIGHT))

    async def body(reg):
        # compacted past the claim's listing: the runner lists again and finds the peer
        claim = await LocalManager(reg).claim(config, attrs(1), previous=OURS)
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.6.0-24", attrs(6).to_json().decode())
        _, now = await reg.list_subnets()
        etcd.ctl("compact", str(now))
        applied: list = []
        held: list = []
        task = asyncio.create_task(_follow(reg, claim, applied, held))
        await _until(lambda: "10.244.6.0/24" in _subnets(applied, LeaseAdded), "the peer after a re-listing")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # our key deleted in between: re-claimed
        claim = await LocalManager(reg).claim(config, attrs(1), previous=OURS)
        key = f"{PREFIX}/subnets/{claim.own.name}"
        etcd.ctl("del", key)
        held.clear()
        task = asyncio.create_task(_follow(reg, claim, [], held))
        await _until(lambda: bool(held), "the re-claim")
        assert (await reg.get_subnet(claim.own.name)) is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # our key rewritten for another node in between: fatal
        claim = await LocalManager(reg).claim(config, attrs(1), previous=OURS)
        etcd.ctl("put", key, attrs(9).to_json().decode())
        with pytest.raises(FatalError, match="rewritten for 198.51.100.9"):
            await _follow(reg, claim, [], [])

    etcd.ctl("put", f"{PREFIX}/config", json.dumps(EIGHT))
    asyncio.run(asyncio.wait_for(_with(etcd, body), 60))


def test_compaction_under_a_watching_daemon_is_no_outage_and_loses_nothing(etcd, caplog):
    """The lease watch and the config watch share one channel, as in the daemon. The lease watch
    falls behind a compaction (it starts from a claim's listing that was compacted away), then
    etcd is compacted again while it follows: it re-lists at once and says why in one line, every
    later change lands exactly once, and nothing reads as a lost etcd."""
    config = parse_network_config(json.dumps(EIGHT))

    def put(n: int) -> None:
        etcd.ctl("put", f"{PREFIX}/subnets/10.244.{n}.0-24", attrs(n).to_json().decode())

    def compact_now() -> None:
        revision = json.loads(etcd.ctl("get", "x", "-w", "json").stdout)["header"]["revision"]
        etcd.ctl("compact", str(revision))

    async def body(reg):
        claim = await LocalManager(reg).claim(config, attrs(1), previous=OURS)
        put(2)
        put(3)
        compact_now()
        applied: list = []
        held: list = []
        tasks = [asyncio.create_task(_follow(reg, claim, applied, held)),
                 asyncio.create_task(follow_config(reg, config))]
        try:
            await _until(lambda: {"10.244.2.0/24", "10.244.3.0/24"} <= set(_subnets(applied, LeaseAdded)),
                         "the peers, from a re-listing")
            for round_ in range(3):
                put(4 + round_)
                compact_now()  # while the watch follows
                etcd.ctl("del", f"{PREFIX}/subnets/10.244.{2 + round_}.0-24")
            await _until(lambda: {"10.244.4.0/24", "10.244.5.0/24", "10.244.6.0/24"} <= set(_subnets(applied, LeaseAdded))
                         and {"10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24"} <= set(_subnets(applied, LeaseRemoved)),
                         "every change after the compactions")
            await asyncio.sleep(0.5)  # anything doubled or late shows now
            added = _subnets(applied, LeaseAdded)
            assert sorted(added) == sorted(set(added)), f"a lease added twice: {added}"
            assert not held, "our key was never lost"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    etcd.ctl("put", f"{PREFIX}/config", json.dumps(EIGHT))
    with caplog.at_level(logging.INFO, logger="flanneld_py"):
        asyncio.run(asyncio.wait_for(_with(etcd, body), 60))
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "lost etcd" in line], lines
    assert len([line for line in lines if "fell behind a compaction" in line]) == 1, lines


# --- etcd with authentication ------------------------------------------------------------------


def _auth_registry(etcd, username: str | None, password: str | None) -> EtcdRegistry:
    return EtcdRegistry([f"127.0.0.1:{etcd.client_port}"], prefix=PREFIX, timeout=3,
                        username=username, password=password)


def test_auth_mistakes_are_one_line_errors_that_name_what_to_fix(etcd_auth):
    async def attempt(username, password, prefix=PREFIX):  # type: ignore[no-untyped-def]
        reg = _auth_registry(etcd_auth, username, password)
        reg.prefix = prefix
        try:
            with pytest.raises(EtcdAuthError) as caught:
                await reg.get_config()
            return str(caught.value)
        finally:
            await reg.close()

    async def body():  # type: ignore[no-untyped-def]
        return [await attempt(None, None), await attempt(ETCD_USER, "wrong"),
                await attempt(ETCD_USER, ETCD_PASSWORD, prefix="/elsewhere")]

    no_user, bad_password, no_access = asyncio.run(asyncio.wait_for(body(), 30))
    assert "requires authentication: give --etcd-username and --etcd-password" in no_user, no_user
    assert "refused the credentials" in bad_password and "invalid user ID or password" in bad_password
    assert "denied the etcd user access (etcdserver: permission denied): grant it read and write on /elsewhere/" \
        in no_access, no_access
    assert all("\n" not in text for text in (no_user, bad_password, no_access))


def test_a_watch_the_user_may_not_make_is_a_one_line_error_not_an_outage(etcd_auth):
    root = ("--user", "root:root-pw")
    for args in (("user", "add", "config-only:pw"), ("role", "add", "config-only"),
                 ("role", "grant-permission", "config-only", "read", f"{PREFIX}/config"),
                 ("user", "grant-role", "config-only", "config-only")):
        etcd_auth.ctl(*root, *args)

    async def body():  # type: ignore[no-untyped-def]
        reg = _auth_registry(etcd_auth, "config-only", "pw")
        try:
            await reg.get_config()
            with pytest.raises(EtcdAuthError) as caught:
                async for _ in reg.watch_subnets(1):
                    pass
            return str(caught.value), reg.reconnects
        finally:
            await reg.close()

    text, reconnects = asyncio.run(asyncio.wait_for(body(), 30))
    assert f"denied the etcd user a watch on {PREFIX}/subnets/" in text and f"grant it read on {PREFIX}/" in text, text
    assert reconnects == 0, "etcd answered: no failover"


def test_an_expired_auth_token_is_renewed_not_fatal(etcd_auth):
    """etcd forgets a token that went unused for --auth-token-ttl (5 min by default; 2 s here): a
    quiet node's next renewal or watch must authenticate again, not stop the daemon."""
    etcd_auth.ctl("--user", "root:root-pw", "put", f"{PREFIX}/config", json.dumps(EIGHT))
    config = parse_network_config(json.dumps(EIGHT))

    async def body():  # type: ignore[no-untyped-def]
        reg = _auth_registry(etcd_auth, ETCD_USER, ETCD_PASSWORD)
        try:
            own = await LocalManager(reg, lease_ttl=60).acquire(config, attrs(1))
            await asyncio.sleep(3.5)  # the token lapses
            assert await reg.keepalive(own.lease_id) > 0, "a renewal after the token lapsed"
            await asyncio.sleep(3.5)
            _, revision = await reg.list_subnets()
            await asyncio.sleep(3.5)
            watch = reg.watch_subnets(revision + 1)  # a watch created after the token lapsed
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.5)
            etcd_auth.ctl("--user", "root:root-pw", "put", f"{PREFIX}/subnets/10.244.2.0-24", attrs(2).to_json().decode())
            batch, _ = await asyncio.wait_for(first, 10)
            await watch.aclose()
            assert batch == [KeyPut("10.244.2.0-24", attrs(2).to_json())]
            assert reg.reconnects == 0, "no failover: etcd was there all along"
        finally:
            await reg.close()

    asyncio.run(asyncio.wait_for(body(), 60))
