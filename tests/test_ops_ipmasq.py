"""flannel's iptables sets (masquerade, FORWARD accept): rule lists, restore payloads, and the
applier's repair logic (fake iptables)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest

from flanneld_py.ops.ipmasq import (
    RuleApplier,
    forward_rules,
    masq_ip6_rules,
    masq_rules,
    restore_lines,
    supports_random_fully,
)

NET = IPv4Network("10.244.0.0/16")
SUB = IPv4Network("10.244.7.0/24")
C = ["-m", "comment", "--comment", "flanneld masq"]


def test_masq_rules_match_flannel():
    rules = masq_rules(NET, SUB, random_fully=True)
    assert [(r.table, r.chain) for r in rules] == [("nat", "POSTROUTING")] + [("nat", "FLANNEL-POSTRTG")] * 6
    assert [list(r.spec) for r in rules] == [
        [*C, "-j", "FLANNEL-POSTRTG"],
        ["-m", "mark", "--mark", "0x4000/0x4000", *C, "-j", "RETURN"],
        ["-s", "10.244.7.0/24", "-d", "10.244.0.0/16", *C, "-j", "RETURN"],
        ["-s", "10.244.0.0/16", "-d", "10.244.7.0/24", *C, "-j", "RETURN"],
        ["!", "-s", "10.244.0.0/16", "-d", "10.244.7.0/24", *C, "-j", "RETURN"],
        ["-s", "10.244.0.0/16", "!", "-d", "224.0.0.0/4", *C, "-j", "MASQUERADE", "--random-fully"],
        ["!", "-s", "10.244.0.0/16", "-d", "10.244.0.0/16", *C, "-j", "MASQUERADE", "--random-fully"],
    ]


NET6 = IPv6Network("fd00:10:244::/56")
SUB6 = IPv6Network("fd00:10:244:7::/64")


@pytest.mark.parametrize("random_fully", [True, False])
def test_masq_ip6_rules_match_flannel(random_fully):
    """flannel v0.20.2 MasqIP6Rules: its own order, ff00::/8 for multicast."""
    tail = ["--random-fully"] if random_fully else []
    rules = masq_ip6_rules(NET6, SUB6, random_fully)
    assert [(r.table, r.chain, r.insert) for r in rules] == (
        [("nat", "POSTROUTING", True)] + [("nat", "FLANNEL-POSTRTG", False)] * 5)
    assert [list(r.spec) for r in rules] == [
        [*C, "-j", "FLANNEL-POSTRTG"],
        ["-m", "mark", "--mark", "0x4000/0x4000", *C, "-j", "RETURN"],
        ["-s", "fd00:10:244::/56", "-d", "fd00:10:244::/56", *C, "-j", "RETURN"],
        ["-s", "fd00:10:244::/56", "!", "-d", "ff00::/8", *C, "-j", "MASQUERADE", *tail],
        ["!", "-s", "fd00:10:244::/56", "-d", "fd00:10:244:7::/64", *C, "-j", "RETURN"],
        ["!", "-s", "fd00:10:244::/56", "-d", "fd00:10:244::/56", *C, "-j", "MASQUERADE", *tail],
    ]


def test_ipv6_forward_rules_match_flannel():
    fc = ["-m", "comment", "--comment", "flanneld forward"]
    assert [(r.table, r.chain, list(r.spec)) for r in forward_rules(NET6)] == [
        ("filter", "FORWARD", [*fc, "-j", "FLANNEL-FWD"]),
        ("filter", "FLANNEL-FWD", ["-s", "fd00:10:244::/56", *fc, "-j", "ACCEPT"]),
        ("filter", "FLANNEL-FWD", ["-d", "fd00:10:244::/56", *fc, "-j", "ACCEPT"]),
    ]


def test_without_random_fully():
    rules = masq_rules(NET, SUB, random_fully=False)
    assert not any("--random-fully" in r.spec for r in rules)
    assert rules[-1].spec[-2:] == ("-j", "MASQUERADE")


def test_every_rule_is_commented():
    for rule in masq_rules(NET, SUB, True) + forward_rules(NET):
        assert "--comment" in rule.spec


def test_forward_rules_match_flannel():
    fc = ["-m", "comment", "--comment", "flanneld forward"]
    assert [(r.table, r.chain, list(r.spec)) for r in forward_rules(NET)] == [
        ("filter", "FORWARD", [*fc, "-j", "FLANNEL-FWD"]),  # inserted at the top, as flannel's -I
        ("filter", "FLANNEL-FWD", ["-s", "10.244.0.0/16", *fc, "-j", "ACCEPT"]),
        ("filter", "FLANNEL-FWD", ["-d", "10.244.0.0/16", *fc, "-j", "ACCEPT"]),
    ]


@pytest.mark.parametrize("text, ok", [
    ("iptables v1.8.9 (nf_tables)", True),
    ("iptables v1.6.2", True),
    ("iptables v1.6.1", False),
    ("iptables v1.4.21", False),
    ("", False),
])
def test_random_fully_needs_iptables_1_6_2(text, ok):
    assert supports_random_fully(text) is ok


def test_restore_lines_delete_present_copies_then_append_in_order():
    rules = forward_rules(NET)
    lines = restore_lines(rules, [True, False, True])
    assert lines == {"filter": [
        '-D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
        '-I FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
        '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-D FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    ]}


class FakeIptables:
    """Chains as ordered rule lists; ``restore`` understands -A and -D lines."""

    binary = "iptables"

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str], list[tuple[str, ...]]] = {
            ("nat", "POSTROUTING"): [], ("filter", "FORWARD"): [],
        }
        self.restores = 0

    def ensure_chain(self, table, chain):
        self.chains.setdefault((table, chain), [])

    def rule_exists(self, table, chain, rule):
        return tuple(rule) in self.chains.get((table, chain), [])

    def delete_rule(self, table, chain, rule):
        if self.rule_exists(table, chain, rule):
            self.chains[(table, chain)].remove(tuple(rule))
            return True
        return False

    def delete_chain(self, table, chain):
        return self.chains.pop((table, chain), None) is not None

    def restore(self, table, lines):
        import shlex

        self.restores += 1
        for line in lines:
            op, chain, *spec = shlex.split(line)
            if op == "-A":
                self.chains[(table, chain)].append(tuple(spec))
            elif op == "-I":
                self.chains[(table, chain)].insert(0, tuple(spec))
            else:
                self.chains[(table, chain)].remove(tuple(spec))


def applier(ipt, subnet=SUB):
    current = {"subnet": subnet}

    def desired(random_fully):
        return masq_rules(NET, current["subnet"], random_fully) + forward_rules(NET)

    return RuleApplier(ipt, desired, random_fully=True), current


def test_installs_once_then_leaves_rules_alone():
    ipt = FakeIptables()
    app, _ = applier(ipt)
    assert app.ensure() is True
    assert ipt.chains[("nat", "FLANNEL-POSTRTG")] == [r.spec for r in masq_rules(NET, SUB, True)[1:]]
    assert app.ensure() is False and ipt.restores == 2  # one restore per table, nothing more
    assert app.repairs == 0


def test_a_deleted_rule_comes_back_in_its_place():
    ipt = FakeIptables()
    app, _ = applier(ipt)
    app.ensure()
    want = list(ipt.chains[("nat", "FLANNEL-POSTRTG")])
    ipt.chains[("nat", "FLANNEL-POSTRTG")].pop(2)
    ipt.chains[("nat", "POSTROUTING")].clear()
    assert app.ensure() is True
    assert ipt.chains[("nat", "FLANNEL-POSTRTG")] == want
    assert len(ipt.chains[("nat", "POSTROUTING")]) == 1
    assert app.repairs == 1


def test_a_new_subnet_replaces_the_old_rules():
    ipt = FakeIptables()
    app, current = applier(ipt)
    app.ensure()
    current["subnet"] = IPv4Network("10.244.9.0/24")
    app.ensure()
    specs = [" ".join(spec) for spec in ipt.chains[("nat", "FLANNEL-POSTRTG")]]
    assert not any("10.244.7.0/24" in spec for spec in specs)
    assert sum("10.244.9.0/24" in spec for spec in specs) == 3


def test_nothing_before_the_lease_is_known():
    ipt = FakeIptables()
    app = RuleApplier(ipt, lambda random_fully: None, random_fully=False)
    assert app.ensure() is False and ipt.restores == 0


def test_remove_all_deletes_rules_and_chains():
    ipt = FakeIptables()
    app, _ = applier(ipt)
    app.ensure()
    app.remove_all()
    assert ipt.chains == {("nat", "POSTROUTING"): [], ("filter", "FORWARD"): []}


def test_jumps_into_our_chains_go_to_the_top():
    assert [r.insert for r in masq_rules(NET, SUB, True)] == [True] + [False] * 6
    assert [r.insert for r in forward_rules(NET)] == [True, False, False]
    ipt = FakeIptables()
    ipt.chains[("filter", "FORWARD")] = [("-j", "DOCKER-USER"), ("-j", "REJECT")]
    app = RuleApplier(ipt, lambda random_fully: forward_rules(NET), random_fully=False, label="forward rules")
    app.ensure()
    assert ipt.chains[("filter", "FORWARD")][0][-1] == "FLANNEL-FWD"


def test_forward_rules_alone_and_their_cleanup():
    ipt = FakeIptables()
    app = RuleApplier(ipt, lambda random_fully: forward_rules(NET), random_fully=False, label="forward rules")
    assert app.ensure() is True and app.installed == forward_rules(NET)
    assert ipt.chains[("nat", "POSTROUTING")] == [] and ("nat", "FLANNEL-POSTRTG") not in ipt.chains
    ipt.chains[("filter", "FLANNEL-FWD")].clear()
    assert app.ensure() is True and app.repairs == 1 and len(ipt.chains[("filter", "FLANNEL-FWD")]) == 2
    app.remove_all()
    assert ipt.chains == {("nat", "POSTROUTING"): [], ("filter", "FORWARD"): []}


def test_in_place_after_a_pass():
    import asyncio

    ipt = FakeIptables()
    app = RuleApplier(ipt, lambda random_fully: forward_rules(NET), interval=3600, random_fully=False)
    assert app.in_place is None

    async def one_pass():
        app.start()
        for _ in range(200):
            if app.in_place is not None:
                break
            await asyncio.sleep(0.01)
        await app.close()

    asyncio.run(one_pass())
    assert app.in_place is True


def test_ipv6_rules_heal_like_the_ipv4_ones():
    ipt = FakeIptables()
    ipt.binary = "ip6tables"
    current = {"subnet": SUB6}
    app = RuleApplier(ipt, lambda rf: masq_ip6_rules(NET6, current["subnet"], rf) + forward_rules(NET6),
                      random_fully=False, label="ipv6 ip-masq")
    assert app.ensure() is True
    want = list(ipt.chains[("nat", "FLANNEL-POSTRTG")])
    assert want == [r.spec for r in masq_ip6_rules(NET6, SUB6, False)[1:]]
    ipt.chains[("nat", "FLANNEL-POSTRTG")].pop(1)
    ipt.chains[("filter", "FLANNEL-FWD")].clear()
    assert app.ensure() is True and app.repairs == 1
    assert ipt.chains[("nat", "FLANNEL-POSTRTG")] == want and len(ipt.chains[("filter", "FLANNEL-FWD")]) == 2
    current["subnet"] = IPv6Network("fd00:10:244:9::/64")
    app.ensure()
    specs = [" ".join(spec) for spec in ipt.chains[("nat", "FLANNEL-POSTRTG")]]
    assert not any("fd00:10:244:7::/64" in spec for spec in specs)
    assert sum("fd00:10:244:9::/64" in spec for spec in specs) == 1
