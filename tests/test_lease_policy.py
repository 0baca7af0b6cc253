"""The lease policy as a pure state machine: inputs in, actions out, time as an argument.

No etcd, no asyncio, no namespaces: every branch of core/lease_policy.py.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from flanneld_py.core.lease import KeyDeleted, KeyPut, Lease, LeaseAdded, LeaseAttrs, LeaseRemoved
from flanneld_py.core.lease_policy import (
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
from flanneld_py.core.netconfig import parse_network_config

CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
OURS = OwnLease(IPv4Network("10.244.1.0/24"), LeaseAttrs(IPv4Address("198.51.100.1"), "udp"), 0x10, ttl=60)
PEER = IPv4Network("10.244.2.0/24")


def put(name: str, ip: str) -> KeyPut:
    return KeyPut(name, LeaseAttrs(IPv4Address(ip), "udp").to_json())


OWN_PUT = put(OURS.name, "198.51.100.1")
PEER_PUT = put("10.244.2.0-24", "198.51.100.2")
PEER_LEASE = Lease(PEER, LeaseAttrs(IPv4Address("198.51.100.2"), "udp"))


def policy(margin: float = 30.0, now: float = 100.0) -> LeasePolicy:
    return LeasePolicy(CONFIG, OURS, margin, now)


def watching(p: LeasePolicy, revision: int = 5) -> LeasePolicy:
    assert p.start() == [Relist()]
    p.relisted([OWN_PUT], revision)
    return p


def test_starts_with_a_relist_and_renews_margin_before_expiry():
    p = policy(margin=20.0, now=100.0)
    assert p.start() == [Relist()]
    assert p.get_timer() == 140.0
    assert p.handle_timer(139.9) == []
    assert p.handle_timer(140.0) == [Renew(OURS)]
    assert p.get_timer() is None, "no second renewal while one runs"
    assert p.handle_timer(500.0) == []


def test_renewal_results_set_the_next_deadline_and_back_off_on_failure():
    p = policy(margin=20.0, now=0.0)
    p.handle_timer(40.0)
    assert p.renew_failed("etcd down", 40.0) == [
        Report("warning", "lease renewal failed (etcd down); retrying in 0.5s, datapath keeps forwarding")]
    assert p.get_timer() == 40.5
    assert p.handle_timer(40.5) == [Renew(OURS)]
    p.renew_failed("etcd down", 40.5)
    assert p.get_timer() == 41.5, "the backoff doubles"
    p.handle_timer(41.5)
    assert p.renewed(OURS, 42.0) == [Report("info", "lease on 10.244.1.0/24 renewed (ttl 60s)")]
    assert p.get_timer() == 82.0
    p.handle_timer(82.0)
    p.renew_failed("again", 82.0)
    assert p.get_timer() == 82.5, "a success resets the backoff"


def test_a_renewal_that_had_to_reclaim_says_so_and_is_held():
    p = policy()
    fresh = replace(OURS, lease_id=0x20)
    assert p.renewed(fresh, 0.0) == [Report("info", "lease on 10.244.1.0/24 re-claimed under etcd lease 20")]
    assert p.own == fresh


def test_short_ttl_renews_three_times_per_ttl():
    p = LeasePolicy(CONFIG, replace(OURS, ttl=9), 3600.0, 0.0)
    assert p.get_timer() == 3.0


def test_relist_applies_peers_then_watches_from_the_next_revision():
    p = policy()
    p.start()
    assert p.relisted([OWN_PUT, PEER_PUT], 7) == [ApplyPeers((LeaseAdded(PEER_LEASE),)), Watch(8)]


def test_start_from_the_claims_listing_applies_peers_and_watches_after_it_without_our_key():
    p = policy()
    assert p.start_from([PEER_PUT], 7) == [ApplyPeers((LeaseAdded(PEER_LEASE),)), Watch(8)], \
        "our key was written after the listing: no re-claim"
    assert p.watched([OWN_PUT], 9) == [], "the watch replays our own write"
    assert p.watched([KeyDeleted(OURS.name)], 10)[-1] == Reclaim(OURS)


def test_relist_without_our_key_reclaims_before_applying():
    p = policy()
    p.start()
    assert p.relisted([PEER_PUT], 7) == [Reclaim(OURS)]
    again = replace(OURS, lease_id=0x30)
    assert p.reclaimed(again) == [ApplyPeers((LeaseAdded(PEER_LEASE),)), Watch(8)]
    assert p.own == again


def test_bad_records_are_reported_not_applied():
    p = policy()
    p.start()
    bad = KeyPut("10.244.3.0-24", b"nope")
    assert p.relisted([OWN_PUT, bad], 3) == [
        Report("warning", "skipping lease record '10.244.3.0-24': lease value is not JSON"), Watch(4)]


def test_watch_batches_apply_peer_changes_and_skip_our_unchanged_key():
    p = watching(policy())
    assert p.watched([PEER_PUT], 6) == [ApplyPeers((LeaseAdded(PEER_LEASE),))]
    assert p.watched([OWN_PUT], 7) == [], "our own record, still ours: nothing to do"
    assert p.watched([KeyPut(OURS.name, b"garbage")], 8) == [], "an unreadable rewrite is not another holder"
    assert p.watched([KeyDeleted("10.244.2.0-24")], 9) == [ApplyPeers((LeaseRemoved(PEER_LEASE),))]


def test_our_key_deleted_is_reclaimed_before_the_batch_counts_as_seen():
    p = watching(policy(), revision=5)
    assert p.watched([KeyDeleted(OURS.name)], 6) == [
        Report("warning", "our lease 10.244.1.0/24 was deleted from etcd"), Reclaim(OURS)]
    # the re-claim fails on an outage: the batch is not seen, so the watch resumes before it
    p.etcd_lost("gone", 10.0)
    p.handle_timer(10.5)
    assert p.etcd_back()[-1] == Watch(6)


def test_our_key_deleted_then_reclaimed_moves_the_watch_on():
    p = watching(policy(), revision=5)
    p.watched([PEER_PUT, KeyDeleted(OURS.name)], 6)
    assert p.reclaimed(OURS) == [ApplyPeers((LeaseAdded(PEER_LEASE),))]
    p.etcd_lost("gone", 0.0)
    p.handle_timer(1.0)
    assert p.etcd_back()[-1] == Watch(7)


def test_our_key_rewritten_for_another_node_is_fatal():
    p = watching(policy())
    actions = p.watched([put(OURS.name, "198.51.100.9")], 6)
    assert actions == [Fatal("our subnet 10.244.1.0/24 was rewritten for 198.51.100.9; "
                             "exiting so that this node gets drained")]


def test_a_listing_with_our_key_rewritten_for_another_node_is_fatal_too():
    """One rule for both paths: a re-listing (after start, a compaction or an outage) that shows
    our key naming another node stops the daemon just as a watch batch does, and applies nothing."""
    p = watching(policy(), revision=5)
    p.compacted()
    actions = p.relisted([put(OURS.name, "198.51.100.9"), PEER_PUT], 9)
    assert actions == [Fatal("our subnet 10.244.1.0/24 was rewritten for 198.51.100.9; "
                             "exiting so that this node gets drained")]
    fresh = policy()
    fresh.start()
    assert fresh.relisted([put(OURS.name, "198.51.100.9")], 3) == actions
    assert fresh.relisted([OWN_PUT, PEER_PUT], 4) == [ApplyPeers((LeaseAdded(PEER_LEASE),)), Watch(5)], \
        "our own PublicIP is no rewrite"


def test_a_lost_create_race_on_reclaim_is_fatal():
    p = watching(policy())
    assert p.reclaim_lost("subnet taken") == [Fatal("subnet taken")]


def test_compaction_relists_at_once():
    p = watching(policy(), revision=5)
    assert p.compacted(9) == [Report("info", "the lease watch fell behind a compaction (it needed revision 6, etcd "
                                             "keeps revisions from 9 on); re-listing all leases and watching on from there"),
                              Relist()]
    assert p.get_timer() == 130.0, "no retry timer (only the renewal): the re-list runs now"


def test_outage_is_reported_once_backs_off_and_checks_etcd_before_resuming():
    p = watching(policy(margin=0.0, now=0.0), revision=5)  # renewal far away: ttl/3 = 20s
    assert p.etcd_lost("refused", 1.0) == [Report("warning", "lost etcd (refused); keeping current routes and retrying")]
    assert p.get_timer() == 1.5
    assert p.handle_timer(1.4) == []
    assert p.handle_timer(1.5) == [CheckEtcd()]
    assert p.etcd_lost("refused", 2.0) == [], "said once"
    assert p.get_timer() == 3.0, "backing off"
    assert p.handle_timer(3.0) == [CheckEtcd()]
    assert p.etcd_back() == [Report("info", "etcd is back; resuming the watch at revision 6"), Watch(6)]
    p.watched([PEER_PUT], 6)
    p.etcd_lost("refused", 10.0)
    assert p.get_timer() == 10.5, "a watch batch resets the backoff"


def test_outage_before_any_listing_resumes_with_a_relist():
    p = policy(now=0.0)
    p.start()
    p.etcd_lost("refused", 0.0)
    p.handle_timer(0.5)
    assert p.etcd_back() == [Report("info", "etcd is back; resuming the watch at revision start"), Relist()]


def test_compaction_drops_a_held_back_batch():
    p = watching(policy(), revision=5)
    p.watched([KeyDeleted(OURS.name)], 6)
    p.compacted()
    assert p.reclaimed(OURS) == [], "the next listing redoes it"


def test_renew_and_resume_can_fall_due_together():
    p = watching(policy(margin=0.0, now=0.0))
    p.etcd_lost("x", 19.9)
    assert p.handle_timer(25.0) == [Renew(OURS), CheckEtcd()]
