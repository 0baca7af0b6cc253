"""IPv6 claims: both subnets in one key, claimed in one transaction, renewed by one etcd lease,
reused after a restart, raced for; against the in-memory store and against real etcd."""

from __future__ import annotations

import asyncio
import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flanneld_py.core.lease import LeaseAdded, LeaseAttrs, parse_lease_key
from flanneld_py.core.lease_policy import LeasePolicy, OwnLease
from flanneld_py.core.netconfig import NO_IPV4_SUBNET, parse_network_config
from flanneld_py.subnet.manager import LocalManager, NoFreeSubnet
from flanneld_py.subnet.memory import MemoryRegistry
from flanneld_py.subnet.registry import EtcdRegistry
from flanneld_py.subnet.runner import LeaseRunner
from flanneld_py.subnet.store import Registry

PREFIX = "/coreos.com/network"
DUAL = parse_network_config(json.dumps({
    "Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.8.0",
    "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56",
}))
V6ONLY = parse_network_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56",
                                          "IPv6SubnetMax": "fd00:10:244:8::"}))
DEADLINE = 20.0


def attrs(n: int, v4: bool = True) -> LeaseAttrs:
    public_ip = IPv4Address(f"192.0.2.{n}") if v4 else IPv4Address("0.0.0.0")
    return LeaseAttrs(public_ip, "vxlan", {"VNI": 1}, IPv6Address(f"2001:db8::{n}"), {"VNI": 1})


def run(body):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(body(), DEADLINE))


# --- scenarios, each run against both stores ----------------------------------------------------


async def claim_is_one_key_reused_after_restart(store: Registry) -> str:
    first = await LocalManager(store, lease_ttl=3600).acquire(DUAL, attrs(1))
    assert first.subnet6 is not None and DUAL.ipv6 is not None and DUAL.ipv6.holds_subnet(first.subnet6)
    assert DUAL.holds_subnet(first.subnet)
    records, _ = await store.list_subnets()
    assert [r.name for r in records] == [f"{first.subnet.network_address}-24&{first.subnet6.network_address}-64"]
    assert LeaseAttrs.from_json(records[0].value) == attrs(1)
    again = await LocalManager(store, lease_ttl=3600).acquire(DUAL, attrs(1))
    assert (again.subnet, again.subnet6, again.lease_id) == (first.subnet, first.subnet6, first.lease_id)
    renewed = await LocalManager(store, lease_ttl=3600).renew(again)  # one etcd lease keeps both
    assert renewed.lease_id == first.lease_id and renewed.ttl > 0
    return first.name


async def previous_subnets_are_reused_from_the_subnet_file(store: Registry) -> None:
    want4, want6 = IPv4Network("10.244.6.0/24"), IPv6Network("fd00:10:244:42::/64")
    own = await LocalManager(store).acquire(DUAL, attrs(2), previous=want4, previous6=want6)
    assert (own.subnet, own.subnet6) == (want4, want6)
    # a previous IPv6 subnet that is taken (or outside the config) is replaced, the IPv4 one kept
    other = await LocalManager(store).acquire(DUAL, attrs(3), previous=IPv4Network("10.244.7.0/24"), previous6=want6)
    assert other.subnet == IPv4Network("10.244.7.0/24") and other.subnet6 not in (None, want6)


async def racers_get_distinct_pairs_and_losers_revoke(store: Registry) -> list[OwnLease]:
    async def claim(n: int) -> OwnLease | NoFreeSubnet:
        try:
            return await LocalManager(store, rng=random.Random(n)).acquire(DUAL, attrs(n))
        except NoFreeSubnet as exc:
            return exc

    results = await asyncio.gather(*(claim(n) for n in range(1, 13)))
    winners = [r for r in results if isinstance(r, OwnLease)]
    assert len(winners) == 8
    assert len({w.subnet for w in winners}) == 8 and len({w.subnet6 for w in winners}) == 8
    return winners


async def ipv6_only_claims_use_flannels_zero_ipv4_half(store: Registry) -> None:
    one = await LocalManager(store, rng=random.Random(1)).acquire(V6ONLY, attrs(1, v4=False))
    two = await LocalManager(store, rng=random.Random(1)).acquire(V6ONLY, attrs(2, v4=False))
    assert one.subnet == two.subnet == NO_IPV4_SUBNET and one.subnet6 != two.subnet6
    assert one.name.startswith("0.0.0.0-0&fd00:10:244:")
    again = await LocalManager(store).acquire(V6ONLY, attrs(1, v4=False))  # same PublicIPv6: same lease
    assert (again.subnet6, again.lease_id) == (one.subnet6, one.lease_id)


async def peers_see_both_subnets(store: Registry) -> None:
    mine = await LocalManager(store, lease_ttl=3600).acquire(DUAL, attrs(1))
    theirs = await LocalManager(store, lease_ttl=3600).acquire(DUAL, attrs(2))
    seen: list[LeaseAdded] = []

    async def apply(events):  # type: ignore[no-untyped-def]
        seen.extend(e for e in events if isinstance(e, LeaseAdded))

    policy = LeasePolicy(DUAL, mine, 0.0, asyncio.get_running_loop().time())
    task = asyncio.create_task(LeaseRunner(policy, LocalManager(store, lease_ttl=3600), apply, lambda _: None).run())
    try:
        for _ in range(2000):
            if seen:
                break
            await asyncio.sleep(0.005)
        assert [(e.lease.subnet, e.lease.subnet6, e.lease.attrs) for e in seen] == [
            (theirs.subnet, theirs.subnet6, attrs(2))]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


SCENARIOS = [claim_is_one_key_reused_after_restart, previous_subnets_are_reused_from_the_subnet_file,
             racers_get_distinct_pairs_and_losers_revoke, ipv6_only_claims_use_flannels_zero_ipv4_half,
             peers_see_both_subnets]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_in_memory(scenario):
    store = MemoryRegistry()
    run(lambda: scenario(store))
    if scenario is racers_get_distinct_pairs_and_losers_revoke:
        assert len(store.live_leases()) == 8


@pytest.mark.etcd
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_real_etcd(etcd, scenario):
    async def body():  # type: ignore[no-untyped-def]
        reg = EtcdRegistry([f"127.0.0.1:{etcd.client_port}"], prefix=PREFIX, timeout=3)
        try:
            return await scenario(reg)
        finally:
            await reg.close()

    result = run(body)
    if scenario is claim_is_one_key_reused_after_restart:
        raw = etcd.ctl("get", f"{PREFIX}/subnets/{result}", "--print-value-only").stdout.strip()
        assert json.loads(raw) == {"PublicIP": "192.0.2.1", "PublicIPv6": "2001:db8::1", "BackendType": "vxlan",
                                   "BackendData": {"VNI": 1}, "BackendV6Data": {"VNI": 1}}
        assert parse_lease_key(result)[1] is not None
    if scenario is racers_get_distinct_pairs_and_losers_revoke:
        listed = etcd.ctl("lease", "list").stdout.splitlines()[1:]
        assert len([line for line in listed if line.strip()]) == 8, "losers must revoke the leases they granted"


def test_a_full_ipv6_range_is_no_free_subnet_naming_it():
    tiny = parse_network_config(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True,
                                            "IPv6Network": "fd00::/120"}))
    store = MemoryRegistry()

    async def body() -> None:
        for n in range(1, 4):
            await LocalManager(store).acquire(tiny, attrs(n))
        with pytest.raises(NoFreeSubnet, match="no free IPv6 subnet left in fd00::/120"):
            await LocalManager(store).acquire(tiny, attrs(9))

    run(body)


class Racing(MemoryRegistry):
    """Another node creates ``race(name)`` between our listing and our create, once."""

    def __init__(self, race) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.race = race
        self.raced = False

    async def create_subnet(self, name: str, value: bytes, lease_id: int, unique_prefix: str = "") -> bool:
        if not self.raced:
            self.raced = True
            self.put_subnet(self.race(name), attrs(99).to_json(), await self.grant(3600))
        return await super().create_subnet(name, value, lease_id, unique_prefix)


def test_a_race_for_our_ipv4_half_under_another_ipv6_half_is_lost_and_retried():
    store = Racing(lambda name: name.split("&")[0] + "&fd00:10:244:99::-64")
    want4 = IPv4Network("10.244.2.0/24")

    async def body() -> None:
        own = await LocalManager(store).acquire(DUAL, attrs(1), previous=want4)
        assert own.subnet != want4
        names = [r.name for r in (await store.list_subnets())[0]]
        assert len(names) == 2 and sum(name.startswith("10.244.2.0-24") for name in names) == 1

    run(body)


def test_a_race_for_our_ipv6_half_under_another_ipv4_half_is_lost_and_retried():
    store = Racing(lambda name: "10.244.8.0-24&" + name.split("&")[1])
    want6 = IPv6Network("fd00:10:244:42::/64")

    async def body() -> None:
        own = await LocalManager(store).acquire(DUAL, attrs(1), previous6=want6)
        assert own.subnet6 not in (None, want6)
        keys = [parse_lease_key(r.name) for r in (await store.list_subnets())[0]]
        assert len(keys) == 2 and [k[1] for k in keys].count(want6) == 1
        assert len(store.live_leases()) == 2, "the lost claim's etcd lease is revoked"

    run(body)
